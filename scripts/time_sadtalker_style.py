#!/usr/bin/env python3
"""Time a SadTalker-style render of a coefficient job as one whole process, for comparison with `sfr render`.

It renders the way SadTalker's make_animation does, with sfr's plain modules (no inference rewrites):
batch rows of the source image repeated, frames split across the rows, the generator re-encoding the
source at every step, fp32, no denormal flushing, nothing written. Usage:

    scripts/time_sadtalker_style.py CHECKPOINT_DIR [--golden ../shared/reference/golden-crop] [--batch-size 2]
"""

import time

START = time.time()

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sfr_cli.checkpoints import find_checkpoints, load_networks  # noqa: E402
from sfr_cli.coeffs import prepare_semantics, read_coefficients, read_source_coefficients  # noqa: E402
from sfr_cli.config import config_path, load_config  # noqa: E402
from sfr_cli.media import read_source_image  # noqa: E402
from sfr_cli.nets.geometry import transform_keypoints  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("--golden", default=str(Path(__file__).resolve().parents[2] / "shared" / "reference" / "golden-crop"))
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    golden = Path(args.golden)
    nets = load_networks(load_config(config_path()), find_checkpoints(args.checkpoint_dir))
    semantics = prepare_semantics(read_coefficients(golden / "coeffs.mat"),
                                  read_source_coefficients(golden / "source_coeffs.mat"))
    rows, frames = args.batch_size, semantics.frame_count
    steps = -(-frames // rows)
    source = torch.from_numpy(read_source_image(golden / "source.png", 256))[None].repeat(rows, 1, 1, 1)
    window = torch.from_numpy(semantics.source_window())[None].repeat(rows, 1, 1)
    with torch.no_grad():
        kp_canonical = nets.kp_detector(source)
        kp_source = transform_keypoints(kp_canonical, nets.mapping(window))
        started = time.time()
        for step in range(steps):
            picks = [min(row * steps + step, frames - 1) for row in range(rows)]
            windows = torch.from_numpy(np.stack([semantics.windows(i, i + 1)[0] for i in picks]))
            nets.generator(source, transform_keypoints(kp_canonical, nets.mapping(windows)), kp_source)
    print(f"rendered {frames} frames in {time.time() - started:.1f} s; whole process {time.time() - START:.1f} s")


if __name__ == "__main__":
    main()
