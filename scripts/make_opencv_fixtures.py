"""Write tests/data/opencv_paste_cases.npz: small random cases run through OpenCV's own
`cv2.resize` (INTER_LINEAR) and `cv2.seamlessClone` (NORMAL_CLONE, all-255 mask), so the tests can
check sfr's torch versions bit for bit without OpenCV being a dependency.

OpenCV is not installed by sfr; run this from a throwaway environment that has it:
    python -m venv /tmp/cv && /tmp/cv/bin/pip install opencv-python-headless numpy
    /tmp/cv/bin/python scripts/make_opencv_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RESIZE_CASES = [  # (src_h, src_w, dst_h, dst_w)
    (17, 23, 40, 9), (50, 50, 31, 37), (33, 41, 64, 71), (7, 5, 30, 31), (64, 64, 32, 32), (20, 20, 13, 5),
]
CLONE_CASES = [  # (picture_h, picture_w, x1, y1, box_w, box_h)
    (40, 50, 10, 12, 18, 14), (30, 30, 0, 0, 11, 13), (25, 33, 20, 10, 13, 15), (24, 24, 3, 4, 9, 8),
]


def main(out: str = "tests/data/opencv_paste_cases.npz") -> None:
    import cv2

    rng = np.random.default_rng(2026)
    arrays = {"opencv_version": np.array(cv2.__version__)}
    for i, (h, w, dh, dw) in enumerate(RESIZE_CASES):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arrays[f"resize{i}_in"] = image
        arrays[f"resize{i}_out"] = cv2.resize(image, (dw, dh))
    for i, (ph, pw, x1, y1, bw, bh) in enumerate(CLONE_CASES):
        # smooth-ish content so few values clamp at 0 or 255
        picture = cv2.GaussianBlur(rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8), (5, 5), 0)
        patch = cv2.GaussianBlur(rng.integers(0, 256, (bh, bw, 3), dtype=np.uint8), (3, 3), 0)
        centre = ((2 * x1 + bw) // 2, (2 * y1 + bh) // 2)
        blended = cv2.seamlessClone(patch, picture, 255 * np.ones_like(patch), centre, cv2.NORMAL_CLONE)
        arrays[f"clone{i}_picture"] = picture
        arrays[f"clone{i}_patch"] = patch
        arrays[f"clone{i}_box"] = np.array([x1, y1, x1 + bw, y1 + bh])
        arrays[f"clone{i}_out"] = blended
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
