"""Write ``demo/coeffs.npy``: 75 frames (3 s at 25 fps) of plausible SadTalker crop-mode coefficients.

Starts from the golden case's driving rows (``../shared/reference/golden-crop/coeffs.mat``) and varies
them smoothly over time: the 64 expression columns oscillate around their mean at speech-like rates
(1.5 to 4.5 Hz, amplitude the golden rows' own spread), the 3 rotation columns turn the head slowly
(about +-6 degrees over the clip) and the 3 translation columns drift a little. Deterministic.

    python scripts/make_demo_coeffs.py [--golden PATH] [--out demo/coeffs.npy]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sfr_cli.coeffs import CROP_COEFFS, EXPRESSION_COEFFS, read_coefficients

FRAMES = 75
FPS = 25.0
SEED = 7
ROTATION_AMPLITUDE_RAD = 0.1  # about 6 degrees
TRANSLATION_AMPLITUDE = 0.02
REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "reference" / "golden-crop" / "coeffs.mat"


def demo_coefficients(golden_rows: np.ndarray, frames: int = FRAMES, fps: float = FPS,
                      seed: int = SEED) -> np.ndarray:
    """``golden_rows`` ``(K, 70) float32`` -> ``(frames, 70) float32`` smoothly varying coefficients."""
    rng = np.random.default_rng(seed)
    rows = golden_rows[:, :CROP_COEFFS].astype(np.float64)
    mean = rows.mean(axis=0)
    spread = np.maximum(rows.std(axis=0), 0.02)
    t = np.arange(frames)[:, None] / fps  # (frames, 1) seconds
    out = np.tile(mean, (frames, 1))

    expression_hz = rng.uniform(1.5, 4.5, size=EXPRESSION_COEFFS)
    phase = rng.uniform(0, 2 * np.pi, size=EXPRESSION_COEFFS)
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t)  # syllable-like loudness swell
    out[:, :EXPRESSION_COEFFS] += 1.5 * spread[:EXPRESSION_COEFFS] * envelope * np.sin(
        2 * np.pi * expression_hz * t + phase)

    seconds = frames / fps
    turn = np.sin(2 * np.pi * t / seconds)  # one slow turn there and back over the clip
    out[:, 64:67] += ROTATION_AMPLITUDE_RAD * turn * np.array([0.3, 1.0, 0.2])
    out[:, 67:70] += TRANSLATION_AMPLITUDE * turn * np.array([1.0, 0.5, 0.0])
    return out.astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=GOLDEN, help="SadTalker coefficient file to start from")
    parser.add_argument("--out", type=Path, default=REPO / "demo" / "coeffs.npy")
    args = parser.parse_args(argv)
    coefficients = demo_coefficients(read_coefficients(args.golden))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, coefficients)
    print(args.out)


if __name__ == "__main__":
    main()
