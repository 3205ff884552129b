"""Time sfr's paste-back per frame: the blend alone (seamlessClone's Poisson solve) and the whole paste
(aspect resize, box resize, blend), for SadTalker's golden case (a 300x306 box in a 640x1024 picture)
and a 500x500 box in a 1920x1080 picture. Random content; the cost does not depend on it.

    python scripts/bench_paste.py [--device cpu|cuda] [--batch 1] [--repeats 20] [--threads N] [--opencv]

`--opencv` also times cv2.seamlessClone on the same inputs when OpenCV is importable (it is not an
sfr dependency; install opencv-python-headless in a separate environment to compare). Both run with
the library's default threads, warmed up, one frame at a time unless --batch says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sfr_cli.bench import sync_device
from sfr_cli.imaging import resize, seamless_clone

CASES = {  # name: (picture width, height, box)
    "300x306 box in 640x1024": (640, 1024, (150, 120, 450, 426)),
    "500x500 box in 1920x1080": (1920, 1080, (700, 290, 1200, 790)),
}


def _time(fn, device, repeats: int) -> float:
    fn()
    fn()  # warm-up: FFT plans, allocator
    sync_device(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--opencv", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch (and OpenCV) threads; default: theirs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    rows = []
    for name, (width, height, box) in CASES.items():
        x1, y1, x2, y2 = box
        picture_np = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        frames_np = rng.integers(0, 256, (args.batch, 256, 256, 3), dtype=np.uint8)
        picture = torch.from_numpy(picture_np).to(device)
        frames = torch.from_numpy(frames_np).to(device)
        patch = resize.resize_linear(resize.resize_to_box_aspect(frames, x2 - x1, y2 - y1), x2 - x1, y2 - y1)
        blend = _time(lambda: seamless_clone.paste_frames(patch, picture, box), device, args.repeats) / args.batch
        whole = _time(lambda: seamless_clone.clone_into_picture(frames, picture, box).cpu(), device, args.repeats) / args.batch
        row = {"case": name, "device": str(device), "batch": args.batch, "threads": torch.get_num_threads(),
               "blend_ms_per_frame": round(blend * 1e3, 2), "paste_back_ms_per_frame": round(whole * 1e3, 2)}
        if args.opencv:
            try:
                import cv2

                if args.threads is not None:
                    cv2.setNumThreads(args.threads)
            except ImportError:
                row["opencv"] = "not installed"
            else:
                patch_np = patch[0].cpu().numpy()
                mask = np.full(patch_np.shape, 255, np.uint8)
                centre = ((x1 + x2) // 2, (y1 + y2) // 2)
                cv_time = _time(lambda: cv2.seamlessClone(patch_np, picture_np, mask, centre, cv2.NORMAL_CLONE),
                                torch.device("cpu"), args.repeats)
                row["opencv_seamless_clone_ms"] = round(cv_time * 1e3, 2)
                row["opencv_threads"] = cv2.getNumThreads()
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
