#!/usr/bin/env python3
"""Fidelity of sfr on a GPU with the reference weights, in both of SadTalker's on-disk layouts.

- fp32 on the device against SadTalker's own golden frames: max and mean uint8 levels and the share of
  values off by one or more, for golden-crop (crop mode), golden-paste's renderer frames (full mode, 73
  coefficients) and golden-paste's full frames (pasted back into the picture on the device, against
  SadTalker's steps with OpenCV);
- fp16 and bf16 against fp32 on the device: PSNR of every frame (minimum and mean over the clip),
  on the golden clip and on a longer driven clip (``--frames``).

Usage: scripts/gpu_fidelity.py [--device cuda] [--frames 64] [--json OUT.json]
(writes the reference weights with ../shared/reference/make_reference_checkpoint.py into a temporary folder)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from sfr_cli.bench import job_inputs
from sfr_cli.checkpoints import find_checkpoints, load_networks
from sfr_cli.coeffs import prepare_semantics, read_coefficients, read_source_coefficients
from sfr_cli.config import CONFIG_DIR, load_config
from sfr_cli.engine import Engine, EngineOptions, configure_torch, resolve_device
from sfr_cli.media import read_source_image

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
GOLDEN = REFERENCE / "golden-crop"
GOLDEN_PASTE = REFERENCE / "golden-paste"


def render(nets, image, semantics, device, precision, batch_size):
    engine = Engine(nets, EngineOptions(device=device, precision=precision, batch_size=batch_size))
    source = engine.prepare_source(image, semantics.source_window())
    return np.stack(list(engine.render(source, semantics)))


def read_pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p))[..., :3] for p in sorted(folder.glob("*.png"))])


def level_gap(got: np.ndarray, want: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return {"max_levels": int(diff.max()), "mean_levels": float(diff.mean()), "share_off": float((diff > 0).mean())}


def golden_paste(folder: Path, device: str) -> dict:
    """Full mode on the device with the weights in ``folder``: renderer frames and pasted frames."""
    from sfr_cli.renderer import Renderer

    renderer = Renderer(checkpoint_dir=folder, device=device, precision="fp32", batch_size=2)
    options = dict(coeffs=GOLDEN_PASTE / "coeffs.mat", source=GOLDEN_PASTE / "source.png",
                   source_coeffs=GOLDEN_PASTE / "source_coeffs.mat", preprocess="full")
    frames = np.stack(list(renderer.frames(**options)))
    with tempfile.TemporaryDirectory() as tmp:
        renderer.render(**options, frames_dir=Path(tmp) / "full", paste_into=GOLDEN_PASTE / "original.png")
        full = read_pngs(Path(tmp) / "full")
    return {"fp32_vs_golden_paste_frames": level_gap(frames, read_pngs(GOLDEN_PASTE / "frames")),
            "fp32_pasted_vs_golden_full_frames": level_gap(full, read_pngs(GOLDEN_PASTE / "full_frames"))}


def psnr_per_frame(a, b):
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoints-root", help="reuse ROOT/pth and ROOT/safetensors when they hold the "
                        "reference weights (else they are written into a temporary folder)")
    parser.add_argument("--json")
    args = parser.parse_args()
    configure_torch(resolve_device(args.device))
    config = load_config(CONFIG_DIR / "facerender.yaml")
    golden = read_pngs(GOLDEN / "frames")
    golden_semantics = prepare_semantics(read_coefficients(GOLDEN / "coeffs.mat"),
                                         read_source_coefficients(GOLDEN / "source_coeffs.mat"))
    golden_image = read_source_image(GOLDEN / "source.png", 256)
    long_image, long_semantics = job_inputs(70, args.frames, 256)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("pth", "safetensors"):
            folder = Path(args.checkpoints_root or tmp) / layout
            if not (folder / "mapping_00109-model.pth.tar").is_file():
                subprocess.run([sys.executable, str(REFERENCE / "make_reference_checkpoint.py"), str(folder),
                                "--layout", layout, "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
            nets = load_networks(config, find_checkpoints(folder))
            fp32 = render(nets, golden_image, golden_semantics, args.device, "fp32", 2)
            row = {"fp32_vs_golden_crop": level_gap(fp32, golden), **golden_paste(folder, args.device)}
            long_fp32 = render(nets, long_image, long_semantics, args.device, "fp32", args.batch_size)
            for precision in ("fp16", "bf16"):
                for name, (image, semantics, reference, batch) in {
                        "golden": (golden_image, golden_semantics, fp32, 2),
                        "long": (long_image, long_semantics, long_fp32, args.batch_size)}.items():
                    db = psnr_per_frame(render(nets, image, semantics, args.device, precision, batch), reference)
                    row[f"{precision}_{name}_psnr_db"] = {"min": float(db.min()), "mean": float(db.mean()),
                                                          "frames": len(db)}
            report[layout] = row
            print(layout, json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
