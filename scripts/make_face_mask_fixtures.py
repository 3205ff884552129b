"""Write tests/data/opencv_face_mask_cases.npz: small cases run through OpenCV's own `cv2.GaussianBlur` on
float64 images (default border, BORDER_REFLECT_101) and through facexlib's parse-mask steps (MASK_COLORMAP,
two GaussianBlur((101, 101), 11), 10 px border zeroed, / 255) on a small label map, so the tests can check
sfr's torch versions (sfr_cli.nets.parsenet) to float64 rounding without OpenCV being a dependency.

OpenCV is not installed by sfr; run this from a throwaway environment that has it:
    python -m venv /tmp/cv && /tmp/cv/bin/pip install opencv-python-headless numpy
    /tmp/cv/bin/python scripts/make_face_mask_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

BLUR_CASES = [  # (height, width, ksize, sigma): small kernels, and 101 / 11 wider than the image
    (37, 53, 7, 1.5), (40, 31, 15, 4.0), (64, 48, 101, 11.0), (23, 90, 101, 11.0),
]
MASK_SHAPE = (96, 112)  # labels (H, W); upstream's are 512 x 512, the steps do not depend on the size
MASK_COLORMAP = [0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0]


def main(out: str = "tests/data/opencv_face_mask_cases.npz") -> None:
    import cv2

    rng = np.random.default_rng(2027)
    arrays = {"opencv_version": np.array(cv2.__version__)}
    for i, (h, w, ksize, sigma) in enumerate(BLUR_CASES):
        image = rng.uniform(0.0, 255.0, (h, w))
        arrays[f"blur{i}_in"] = image
        arrays[f"blur{i}_params"] = np.array([ksize, sigma])
        arrays[f"blur{i}_out"] = cv2.GaussianBlur(image, (ksize, ksize), sigma)
    # blocky labels (regions of 8x8 px, all 19 classes), as a parse map looks
    coarse = rng.integers(0, len(MASK_COLORMAP), (MASK_SHAPE[0] // 8, MASK_SHAPE[1] // 8))
    labels = np.kron(coarse, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    mask = np.zeros(labels.shape)
    for idx, color in enumerate(MASK_COLORMAP):
        mask[labels == idx] = color
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    thres = 10
    mask[:thres, :] = 0
    mask[-thres:, :] = 0
    mask[:, :thres] = 0
    mask[:, -thres:] = 0
    arrays["mask_labels"] = labels
    arrays["mask_out"] = mask / 255.0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
