"""OpenCV's `cv2.resize` on uint8 images, bit for bit: bilinear (`INTER_LINEAR`, SadTalker's paste-back
resizes) and Lanczos-4 (`INTER_LANCZOS4`, facexlib's background upscale and RealESRGANer's final resize).

No file access and no device choice: tensors stay where the caller put them.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

# cv::resize's weights: float taps rounded to 11-bit fixed point; Lanczos-4's two passes drop 22 bits with
# rounding at the end.
RESIZE_COEF_BITS = 11
RESIZE_COEF_SCALE = 1 << RESIZE_COEF_BITS
LANCZOS_TAPS = 8
_FLT_EPSILON = 1.1920928955078125e-07
_S45 = 0.70710678118654752440084436210485
_LANCZOS_CS = ((1, 0), (-_S45, -_S45), (0, 1), (_S45, -_S45), (-1, 0), (_S45, _S45), (0, -1), (-_S45, _S45))


# --------------------------------------------------------------------------------------------------
# cv2.resize(INTER_LINEAR) for uint8, bit for bit
# --------------------------------------------------------------------------------------------------
def _linear_taps(src_px: int, dst_px: int, clamp_weights: bool, device) -> Tuple[torch.Tensor, ...]:
    """Source indices (i0, i1) and 11-bit weights (w0, w1) for each of `dst_px` outputs.

    Half-pixel centres; the float position is computed in double and stored as float32, as OpenCV
    does. Along x a position outside the picture clamps its weight to the edge pixel; along y OpenCV
    keeps the fractional weights and clamps only the row indices (`clamp_weights=False`), which
    changes the fixed-point rounding of the first and last rows when enlarging.
    """
    scale = 1.0 / (dst_px / src_px)
    pos = ((torch.arange(dst_px, dtype=torch.float64) + 0.5) * scale - 0.5).to(torch.float32)
    start = torch.floor(pos)
    frac = pos - start
    start = start.to(torch.int64)
    if clamp_weights:
        low = start < 0
        high = start >= src_px - 1
        frac = torch.where(low | high, torch.zeros_like(frac), frac)
        start = torch.where(low, torch.zeros_like(start), start)
        start = torch.where(high, torch.full_like(start, src_px - 1), start)
    i0 = start.clamp(0, src_px - 1)
    i1 = (start + 1).clamp(0, src_px - 1)
    # saturate_cast<short>(float) rounds half to even, like torch.round
    w1 = torch.round(frac * RESIZE_COEF_SCALE).to(torch.int32)
    w0 = torch.round((1.0 - frac) * RESIZE_COEF_SCALE).to(torch.int32)
    return tuple(t.to(device) for t in (i0, i1, w0, w1))


def combine_rows(top: torch.Tensor, bottom: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """OpenCV's vectorised vertical pass: each 22-bit row sum drops 4 bits, is multiplied by its
    11-bit weight keeping the high 16 bits, and the sum is rounded by 2 more bits. (Its scalar
    formula rounds once and differs by one level on about a third of pixels.)"""
    acc = ((top >> 4) * b0) >> 16
    acc = acc + (((bottom >> 4) * b1) >> 16)
    return ((acc + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def resize_linear(frames: torch.Tensor, width_px: int, height_px: int) -> torch.Tensor:
    """`cv2.resize(frame, (width_px, height_px))` (INTER_LINEAR) for every frame, bit-exact.

    frames: `(B, H, W, C) uint8`; returns `(B, height_px, width_px, C) uint8` on the same device.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4:
        raise ValueError(f"resize_linear takes (B, H, W, C) uint8, got {tuple(frames.shape)} {frames.dtype}")
    _, src_h, src_w, _ = frames.shape
    if (src_h, src_w) == (height_px, width_px):
        return frames.clone()
    x0, x1, a0, a1 = _linear_taps(src_w, width_px, True, frames.device)
    y0, y1, b0, b1 = _linear_taps(src_h, height_px, False, frames.device)
    rows = torch.unique(torch.cat([y0, y1]))  # only the source rows some output row reads
    remap = torch.empty(src_h, dtype=torch.int64, device=frames.device)
    remap[rows] = torch.arange(rows.numel(), device=frames.device)
    source = frames.index_select(1, rows).to(torch.int32)
    horizontal = source.index_select(2, x0) * a0.view(1, 1, -1, 1)
    horizontal += source.index_select(2, x1) * a1.view(1, 1, -1, 1)
    top = horizontal.index_select(1, remap[y0])
    bottom = horizontal.index_select(1, remap[y1])
    return combine_rows(top, bottom, b0.view(1, -1, 1, 1), b1.view(1, -1, 1, 1))


def resize_to_box_aspect(frames: torch.Tensor, box_w_px: int, box_h_px: int) -> torch.Tensor:
    """SadTalker's animate.py step: a `size x size` frame resized to `(size, int(size * h / w))`."""
    size = frames.shape[2]
    return resize_linear(frames, size, aspect_height_px(size, box_w_px, box_h_px))


def aspect_height_px(size_px: int, box_w_px: int, box_h_px: int) -> int:
    """`int(size * h / w)`, in Python floats like animate.py."""
    return int(size_px * box_h_px / box_w_px)


# --------------------------------------------------------------------------------------------------
# cv2.resize(INTER_LANCZOS4) for uint8
# --------------------------------------------------------------------------------------------------
def _lanczos4_taps(src_px: int, dst_px: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source indices `(dst_px, 8)` int64 (replicated at the edges) and 11-bit weights `(dst_px, 8)` int32.

    As cv::resize: position `(float)((d + 0.5) * scale - 0.5)` with `scale = 1 / (dst / src)` in double,
    its floor and float32 fraction; interpolateLanczos4 of the fraction (sin/cos in double, each tap
    stored as float32, their float32 sum's reciprocal applied in float32); taps rounded half to even.
    """
    scale = 1.0 / (dst_px / src_px)
    pos = ((torch.arange(dst_px, dtype=torch.float64) + 0.5) * scale - 0.5).to(torch.float32)
    start = torch.floor(pos)
    frac = pos - start  # float32, exact
    shifted = frac + 3  # float arithmetic in OpenCV too: x + 3 and x + 3 - i round to float32
    taps = []
    y0 = -shifted.to(torch.float64) * math.pi * 0.25
    s0, c0 = torch.sin(y0), torch.cos(y0)
    for i, (cs_sin, cs_cos) in enumerate(_LANCZOS_CS):
        y = -(shifted - i).to(torch.float64) * math.pi * 0.25
        taps.append(((cs_sin * s0 + cs_cos * c0) / (y * y)).to(torch.float32))
    total = torch.zeros(dst_px, dtype=torch.float32)
    for tap in taps:
        total = total + tap
    total = 1.0 / total
    coeffs = torch.stack([tap * total for tap in taps], 1)
    exact = torch.zeros(LANCZOS_TAPS, dtype=torch.float32)
    exact[3] = 1
    coeffs = torch.where((frac < _FLT_EPSILON)[:, None], exact, coeffs)
    weights = torch.round(coeffs * RESIZE_COEF_SCALE).to(torch.int32)
    index = start.to(torch.int64)[:, None] + torch.arange(-3, 5)[None, :]
    return index.clamp_(0, src_px - 1).to(device), weights.to(device)


def resize_lanczos4(images: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """`cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LANCZOS4)`, bit for bit.

    images: `(B, C, H, W) uint8`; returns `(B, C, out_h, out_w) uint8` on the same device (a copy when
    the size does not change, as OpenCV). Horizontal pass first (int32 sums of 11-bit taps), then the
    vertical one, `(sum + 2^21) >> 22` saturated to [0, 255]; edge pixels are replicated. All in int32, as
    OpenCV: no input can overflow it (the largest sum is 255 * (P^2 + N^2) < 2.11e9 for the taps' positive
    and negative parts P and N).
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"resize_lanczos4 takes (B, C, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    _, _, src_h, src_w = images.shape
    if (src_h, src_w) == (out_h, out_w):
        return images.clone()
    x_index, x_weights = _lanczos4_taps(src_w, out_w, images.device)
    y_index, y_weights = _lanczos4_taps(src_h, out_h, images.device)
    # the horizontal pass gathers whole columns: transposed, they are contiguous rows (4x faster on a CPU)
    columns = images.transpose(2, 3).to(torch.int32).contiguous()
    rows = _weighted_rows(columns, x_index, x_weights).transpose(2, 3).contiguous()
    out = _weighted_rows(rows, y_index, y_weights)
    shift = 2 * RESIZE_COEF_BITS
    return ((out + (1 << (shift - 1))) >> shift).clamp_(0, 255).to(torch.uint8)


def _weighted_rows(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`out[..., i, :] = sum_k weights[i, k] * values[..., index[i, k], :]`, int32 like OpenCV's sums."""
    out = None
    for k in range(LANCZOS_TAPS):
        term = values.index_select(2, index[:, k]).mul_(weights[:, k, None])
        out = term if out is None else out.add_(term)
    return out


