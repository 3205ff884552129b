#!/usr/bin/env python3
"""Fidelity of sfr on a GPU with the reference weights, in both of SadTalker's on-disk layouts.

- fp32 on the device against SadTalker's own golden frames (golden-crop): max and mean uint8 levels
  and the share of values off by one or more;
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


def render(nets, image, semantics, device, precision, batch_size):
    engine = Engine(nets, EngineOptions(device=device, precision=precision, batch_size=batch_size))
    source = engine.prepare_source(image, semantics.source_window())
    return np.stack(list(engine.render(source, semantics)))


def psnr_per_frame(a, b):
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    configure_torch(resolve_device(args.device))
    config = load_config(CONFIG_DIR / "facerender.yaml")
    golden = np.stack([np.asarray(Image.open(p)) for p in sorted((GOLDEN / "frames").glob("*.png"))])
    golden_semantics = prepare_semantics(read_coefficients(GOLDEN / "coeffs.mat"),
                                         read_source_coefficients(GOLDEN / "source_coeffs.mat"))
    golden_image = read_source_image(GOLDEN / "source.png", 256)
    long_image, long_semantics = job_inputs(70, args.frames, 256)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("pth", "safetensors"):
            folder = Path(tmp) / layout
            subprocess.run([sys.executable, str(REFERENCE / "make_reference_checkpoint.py"), str(folder),
                            "--layout", layout, "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
            nets = load_networks(config, find_checkpoints(folder))
            fp32 = render(nets, golden_image, golden_semantics, args.device, "fp32", 2)
            diff = np.abs(fp32.astype(np.int16) - golden.astype(np.int16))
            row = {"fp32_vs_golden": {"max_levels": int(diff.max()), "mean_levels": float(diff.mean()),
                                      "share_off": float((diff > 0).mean())}}
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
