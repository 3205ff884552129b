"""Write tests/data/opencv_enhancer_cases.npz: small random cases run through the OpenCV calls of the
face enhancer's geometry (facexlib's FaceRestoreHelper as GFPGAN drives it), so the tests can check sfr's
torch versions (sfr_cli/imaging/face_align.py, face_blend.py, resize.py) without OpenCV being a dependency:

- warpAffine (INTER_LINEAR, BORDER_CONSTANT): uint8 3-channel with align_warp_face's grey border, uint8
  1-channel, float64 and float32 masks; matrices shrinking, enlarging, rotating, hanging over the frame's
  edge, and one entirely outside;
- resize (INTER_LANCZOS4) of uint8: exact 2x, odd sizes both ways, and the same size;
- estimateAffinePartial2D(method=LMEDS) on random 5-point sets (face-like, one with an outlier, one with
  two, plain random) with the inlier masks, and invertAffineTransform;
- paste: facexlib's use_parse paste written out with OpenCV on small synthetic frames (2x and 1x, two
  overlapping faces), to check the blend's order, dtype and truncation.

OpenCV is not installed by sfr; run this from a throwaway environment that has it (the golden used 4.14):
    python -m venv /tmp/cv && /tmp/cv/bin/pip install opencv-python-headless==4.14.0.94 numpy
    /tmp/cv/bin/python scripts/make_enhancer_opencv_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]])
ALIGN_BORDER_BGR = (135, 133, 132)


def similarity(scale, angle, tx, ty):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, s, tx], [-s, c, ty]])


def smooth(rng, shape, cv2, ksize=7):
    """Random but smooth float64 values in [0, 1] (what a blurred parse mask looks like)."""
    noise = rng.random(shape)
    return np.clip(cv2.GaussianBlur(noise, (ksize, ksize), 0) * 1.6 - 0.3, 0, 1)


def warp_cases(rng, cv2):
    image = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (33, 29), dtype=np.uint8)
    mask64 = smooth(rng, (36, 36), cv2)
    mask32 = smooth(rng, (30, 38), cv2).astype(np.float32)
    color32 = rng.random((21, 25, 3)).astype(np.float32)
    return [  # (name, image, matrix, (out_w, out_h), border)
        ("align", image, similarity(1.37, 0.21, -9.3, 4.1), (48, 48), ALIGN_BORDER_BGR),
        ("edge", image, similarity(1.9, -0.35, 30.7, -21.2), (48, 48), ALIGN_BORDER_BGR),
        ("shrink", image, similarity(0.41, 0.07, 3.3, 2.6), (37, 29), ALIGN_BORDER_BGR),
        ("outside", image, similarity(1.2, 0.0, 400.0, 10.0), (20, 16), ALIGN_BORDER_BGR),
        ("general", image, np.array([[0.93, -0.41, 12.25], [0.38, 1.07, -3.5]]), (45, 39), (7, 250, 31)),
        ("gray", gray, similarity(1.63, 2.9, 61.0, 39.0), (41, 35), 0),
        ("mask64", mask64, similarity(0.83, -0.12, 13.8, 20.4), (60, 52), 0),
        ("mask64_edge", mask64, similarity(1.3, 0.5, -17.1, -6.6), (40, 40), 0.37),
        ("mask32", mask32, similarity(1.11, 0.33, 5.5, -2.0), (44, 41), 0),
        ("color32", color32, similarity(1.7, -0.2, -3.0, 6.0), (33, 30), (0.3, 0.7, 0.1)),
    ]


RESIZE_CASES = [  # (src_h, src_w, channels, dst_h, dst_w)
    (24, 32, 3, 48, 64), (17, 23, 3, 40, 9), (33, 41, 3, 64, 71), (50, 50, 3, 31, 37), (7, 5, 3, 30, 31),
    (13, 19, 1, 26, 38), (20, 20, 3, 20, 20),
]


def point_sets(rng):
    sets = []
    for i in range(8):
        scale = rng.uniform(0.1, 0.5)
        face = FFHQ_TEMPLATE_512 * scale + rng.uniform(0, 150, 2) + rng.normal(0, 1.5, (5, 2))
        if i == 3:
            face[2] += (25.0, -18.0)  # one landmark far off: LMeDS drops it
        if i == 6:
            face[0] += (-30.0, 12.0)
            face[4] += (22.0, 27.0)
        sets.append(face.astype(np.float32))
    sets.append(rng.uniform(0, 256, (5, 2)).astype(np.float32))
    sets.append(rng.uniform(-40, 300, (5, 2)).astype(np.float32))
    return sets


def paste_case(cv2, rng, frame_hw, faces, upscale, face_size=48):
    """facexlib's paste_faces_to_input_image (use_parse) on a small frame, with synthetic restored faces and
    masks; `faces` holds each face's (scale, angle, tx, ty) of its face-to-crop matrix."""
    h, w = frame_hw
    frame = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (3, 3), 0)
    h_up, w_up = int(h * upscale), int(w * upscale)
    background = cv2.resize(frame, (w_up, h_up), interpolation=cv2.INTER_LANCZOS4)
    arrays = {"frame": frame, "upscale": np.array(float(upscale))}
    result = background
    for k, params in enumerate(faces):
        affine = similarity(*params)
        restored = rng.integers(0, 256, (face_size, face_size, 3), dtype=np.uint8)
        mask = smooth(rng, (face_size, face_size), cv2, 9)
        mask[:3, :] = 0
        mask[-3:, :] = 0
        mask[:, :3] = 0
        mask[:, -3:] = 0
        inverse = cv2.invertAffineTransform(affine) * upscale
        inverse[:, 2] += 0.5 * upscale if upscale > 1 else 0
        inv_restored = cv2.warpAffine(restored, inverse, (w_up, h_up))
        inv_mask = cv2.warpAffine(mask, inverse, (w_up, h_up), flags=3)[:, :, None]
        result = inv_mask * inv_restored + (1 - inv_mask) * result
        arrays.update({f"affine{k}": affine, f"restored{k}": restored, f"mask{k}": mask})
    arrays["out"] = result.astype(np.uint8)
    return arrays


def main(out: str = "tests/data/opencv_enhancer_cases.npz") -> None:
    import cv2

    rng = np.random.default_rng(1414)
    arrays = {"opencv_version": np.array(cv2.__version__)}
    for name, image, matrix, (out_w, out_h), border in warp_cases(rng, cv2):
        border_value = border if isinstance(border, tuple) else (border,) * 4
        arrays[f"warp_{name}_in"] = image
        arrays[f"warp_{name}_matrix"] = matrix
        arrays[f"warp_{name}_border"] = np.array(border_value, dtype=np.float64)
        arrays[f"warp_{name}_out"] = cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                                                    borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)
    for i, (h, w, c, dh, dw) in enumerate(RESIZE_CASES):
        image = rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)
        arrays[f"resize{i}_in"] = image
        arrays[f"resize{i}_out"] = cv2.resize(image, (dw, dh), interpolation=cv2.INTER_LANCZOS4)
    for i, points in enumerate(point_sets(rng)):
        matrix, inliers = cv2.estimateAffinePartial2D(points, FFHQ_TEMPLATE_512, method=cv2.LMEDS)
        arrays[f"lmeds{i}_points"] = points
        arrays[f"lmeds{i}_matrix"] = matrix
        arrays[f"lmeds{i}_inliers"] = inliers.ravel().astype(bool)
    for i in range(4):
        matrix = rng.normal(0, 2, (2, 3))
        arrays[f"invert{i}_in"] = matrix
        arrays[f"invert{i}_out"] = cv2.invertAffineTransform(matrix)
    cases = [
        ((30, 36), [(1.6, 0.15, -10.0, -4.0)], 2),
        ((30, 36), [(1.5, -0.2, -6.0, -3.0), (1.7, 0.3, -20.0, -12.0)], 2),  # overlapping faces
        ((28, 34), [(1.2, 0.1, -3.0, 9.0)], 1),  # --enhancer-upscale 1; the face runs off the frame
    ]
    for i, (frame_hw, faces, upscale) in enumerate(cases):
        for key, value in paste_case(cv2, rng, frame_hw, faces, upscale).items():
            arrays[f"paste{i}_{key}"] = value
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(out, Path(out).stat().st_size, "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
