"""Restored faces blended back into their frames, exact to facexlib's
FaceRestoreHelper.paste_faces_to_input_image (`use_parse=True`, the branch GFPGAN takes) and the OpenCV 4.14
calls it makes:

- `upsample_background`: the frame upscaled `upscale` times with `resize.resize_lanczos4`;
- `paste_inverse_affines`: `cv2.invertAffineTransform(M) * upscale` plus facexlib's extra offset;
- `paste_faces`: each restored face and its soft parse mask warped back into the upscaled frame and blended,
  `mask * face + (1 - mask) * background` in float64 face after face, truncated to uint8 at the end, all
  computed only inside each face's footprint (outside it the warped mask is exactly 0 and the background
  is kept bit for bit);
- `blend_restored_faces`: the three together, for `--enhancer-upscale` 1 or 2.

No file access and no device choice: tensors stay where the caller put them. Images are `(B, C, H, W)`
with any channel order (every channel is treated alike); affine matrices `(N, 2, 3) float64`.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .face_align import invert_affine, warp_affine, warp_footprint
from .resize import resize_lanczos4


# --------------------------------------------------------------------------------------------------
# get_inverse_affine + paste_faces_to_input_image
# --------------------------------------------------------------------------------------------------
def upscaled_size(height_px: int, width_px: int, upscale: float) -> Tuple[int, int]:
    """facexlib's `int(h * upscale), int(w * upscale)`."""
    return int(height_px * upscale), int(width_px * upscale)


def paste_offset(upscale: float) -> float:
    """facexlib's extra translation for the paste (`0.5 * upscale` when upscale > 1, else 0).

    Added by facexlib's fix "imprecise back alignment when upscale_factor > 1": cv2.resize puts input
    pixel x's centre at `x * s + (s - 1) / 2` in the upscaled frame, but the inverse affine scaled by s
    maps it to `x * s`. The fix adds `s / 2` (1.0 for s = 2), half an upscaled pixel more than the
    centre-to-centre `(s - 1) / 2`; the golden frames carry it, so sfr reproduces it as it is.
    """
    return 0.5 * upscale if upscale > 1 else 0.0


def paste_inverse_affines(affine_matrices: torch.Tensor, upscale: float) -> torch.Tensor:
    """The matrices paste_faces_to_input_image warps with: `invertAffineTransform(M) * upscale`
    (get_inverse_affine) with `paste_offset(upscale)` added to the translation.
    affine_matrices: `(N, 2, 3)` face-to-template matrices; returns `(N, 2, 3) float64`."""
    inverse = invert_affine(affine_matrices) * upscale
    inverse[..., 2] += paste_offset(upscale)
    return inverse


def upsample_background(frames: torch.Tensor, upscale: float) -> torch.Tensor:
    """paste_faces_to_input_image's background: `(B, C, H, W) uint8` resized with Lanczos-4 to
    `upscaled_size(H, W, upscale)` (a copy for upscale 1)."""
    out_h, out_w = upscaled_size(frames.shape[2], frames.shape[3], upscale)
    return resize_lanczos4(frames, out_h, out_w)


def _faces_by_frame(frame_index: torch.Tensor) -> Dict[int, List[int]]:
    order: Dict[int, List[int]] = {}
    for face, frame in enumerate(frame_index.tolist()):
        order.setdefault(int(frame), []).append(face)
    return order


def paste_faces(background: torch.Tensor, restored_faces: torch.Tensor, soft_masks: torch.Tensor,
                inverse_affines: torch.Tensor, frame_index: torch.Tensor,
                blend_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The blend of paste_faces_to_input_image (use_parse) for every frame.

    background: `(B, C, Hu, Wu) uint8`, the upscaled frames (`upsample_background`).
    restored_faces: `(N, C, S, S) uint8`, GFPGAN's output crops, same channel order as the background.
    soft_masks: `(N, S, S)` float in [0, 1], each face's parse mask before the inverse warp (upstream's
    is float64; a float32 one is widened exactly).
    inverse_affines: `(N, 2, 3) float64` (`paste_inverse_affines`); frame_index: `(N,)` int64, the frame of
    each face. Faces of one frame are blended in the order given (facexlib's: detection score order).
    Returns `(B, C, Hu, Wu) uint8`.

    Per face, as facexlib: the face warped with INTER_LINEAR (border 0), the mask warped likewise (float),
    `background = mask * face + (1 - mask) * background` in `blend_dtype`, the background staying float
    from one face to the next; at the end truncated to uint8 (numpy's astype). Only each frame's union of
    face footprints is computed; outside it the result is the background unchanged, as upstream's.
    `blend_dtype=torch.float64` reproduces upstream's arithmetic exactly; float32 (for devices without
    float64) may move a value by one level where the float64 result sits next to an integer.
    """
    if background.dim() != 4 or background.dtype != torch.uint8:
        raise ValueError(f"paste_faces: background must be (B, C, H, W) uint8, got {tuple(background.shape)} "
                         f"{background.dtype}")
    count = restored_faces.shape[0]
    if restored_faces.dtype != torch.uint8 or restored_faces.dim() != 4:
        raise ValueError(f"paste_faces: restored faces must be (N, C, S, S) uint8, got "
                         f"{tuple(restored_faces.shape)} {restored_faces.dtype}")
    if soft_masks.shape != (count,) + tuple(restored_faces.shape[2:]):
        raise ValueError(f"paste_faces: masks {tuple(soft_masks.shape)} do not match faces "
                         f"{tuple(restored_faces.shape)} (one (S, S) mask per face)")
    if inverse_affines.shape != (count, 2, 3) or frame_index.shape != (count,):
        raise ValueError(f"paste_faces: {count} faces need (N, 2, 3) matrices and (N,) frame indices, got "
                         f"{tuple(inverse_affines.shape)} and {tuple(frame_index.shape)}")
    out = background.clone()
    if count == 0:
        return out
    _, _, out_h, out_w = background.shape
    face_h, face_w = restored_faces.shape[2:]
    mask_dtype = torch.float64 if blend_dtype == torch.float64 else torch.float32
    masks = soft_masks.to(mask_dtype)[:, None]
    boxes = warp_footprint(inverse_affines, face_h, face_w, out_h, out_w).tolist()
    for frame, faces in _faces_by_frame(frame_index).items():
        faces = [f for f in faces if boxes[f][0] < boxes[f][2] and boxes[f][1] < boxes[f][3]]
        if not faces:
            continue
        ux0, uy0 = min(boxes[f][0] for f in faces), min(boxes[f][1] for f in faces)
        ux1, uy1 = max(boxes[f][2] for f in faces), max(boxes[f][3] for f in faces)
        region = background[frame, :, uy0:uy1, ux0:ux1].to(blend_dtype)
        for face in faces:
            x0, y0, x1, y1 = boxes[face]
            matrix = inverse_affines[face : face + 1]
            warped = warp_affine(restored_faces[face : face + 1], matrix, out_h, out_w, 0, box=(x0, y0, x1, y1))
            mask = warp_affine(masks[face : face + 1], matrix, out_h, out_w, 0, box=(x0, y0, x1, y1))
            mask = mask[0].to(blend_dtype)
            window = region[:, y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
            window.copy_(mask * warped[0].to(blend_dtype) + (1 - mask) * window)
        out[frame, :, uy0:uy1, ux0:ux1] = region.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates
    return out


def blend_restored_faces(frames: torch.Tensor, restored_faces: torch.Tensor, soft_masks: torch.Tensor,
                         affine_matrices: torch.Tensor, frame_index: torch.Tensor, upscale: float = 2,
                         blend_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """paste_faces_to_input_image end to end: frames `(B, C, H, W) uint8`, the faces' restored crops,
    soft masks and face-to-template `affine_matrices` `(N, 2, 3)` (from `similarity_lmeds`), frame_index
    `(N,)`. Returns `(B, C, int(H * upscale), int(W * upscale)) uint8`; a frame without faces is just its
    Lanczos-4 upscale."""
    background = upsample_background(frames, upscale)
    inverse = paste_inverse_affines(affine_matrices.to(torch.float64), upscale)
    return paste_faces(background, restored_faces, soft_masks, inverse, frame_index, blend_dtype)
