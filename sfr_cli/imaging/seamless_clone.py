"""SadTalker's full-mode paste: the Poisson blend that `cv2.seamlessClone(..., NORMAL_CLONE)` computes for an
all-255 mask, placing rendered frames into the original picture at a box.

No file access and no device choice here: callers pass tensors on the device they want.

Frames are `(B, H, W, 3) uint8` (channel order does not matter: every channel is treated alike).
A box is `(x1, y1, x2, y2)` in picture pixels, exclusive ends, as SadTalker's `ox1, oy1, ox2, oy2`.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .resize import resize_linear, resize_to_box_aspect

# seamlessClone erodes its (border-zeroed) mask 3 times with a 3x3 kernel: the guidance field in the
# outer 3 pixels of the cloned region comes from the destination, not from the patch.
CLONE_ERODED_PX = 3
MIN_BOX_PX = 8  # the blend needs an interior; the box search does not look for smaller faces

Box = Tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------------
# seamlessClone(NORMAL_CLONE) with a full mask
# --------------------------------------------------------------------------------------------------
def _dst1(values: torch.Tensor) -> torch.Tensor:
    """Unnormalised DST-I along the last axis: `X_k = sum_j x_j sin(pi (j+1)(k+1) / (n+1))`."""
    n = values.shape[-1]
    padded = F.pad(values, (1, n + 1))  # [0, x, 0 ... 0]: without the odd mirror Im is simply halved
    return torch.fft.rfft(padded, dim=-1).imag[..., 1 : n + 1].neg()


def _dst2(values: torch.Tensor) -> torch.Tensor:
    """DST-I along both last axes; the transposes are made contiguous (FFTs along strided axes are slow)."""
    across = _dst1(values).transpose(-1, -2).contiguous()
    return _dst1(across).transpose(-1, -2).contiguous()


def _poisson_divisor(h: int, w: int, dtype, device) -> torch.Tensor:
    """Eigenvalues of the 5-point Laplacian under DST-I, times the DST pair's scale (h+1)(w+1)/4."""
    ky = torch.arange(1, h + 1, dtype=torch.float64)
    kx = torch.arange(1, w + 1, dtype=torch.float64)
    eig = (2 * torch.cos(math.pi * ky / (h + 1)) - 2).view(-1, 1) + (2 * torch.cos(math.pi * kx / (w + 1)) - 2).view(1, -1)
    return (eig * ((h + 1) * (w + 1) / 4.0)).to(dtype=dtype, device=device)


def _solve_poisson_dirichlet(rhs: torch.Tensor) -> torch.Tensor:
    """Solve the 5-point `laplacian(f) = rhs` on `(..., h, w)` with f = 0 just outside, by DST-I."""
    h, w = rhs.shape[-2:]
    spectrum = _dst2(rhs.contiguous()) / _poisson_divisor(h, w, rhs.dtype, rhs.device)
    return _dst2(spectrum)


def clone_rhs(patch: torch.Tensor, region: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Right-hand side of seamlessClone's Poisson equation for the region's interior.

    patch, region: `(B, C, h, w)`, the source patch and the destination pixels it covers (the
    cloned region: the box less its outer pixel). The guidance field is the patch's forward
    differences where the eroded mask is set and the destination's in the outer CLONE_ERODED_PX
    pixels; its divergence (backward differences) minus the fixed boundary ring's contribution.
    Returns `(B, C, h-2, w-2)`.
    """
    patch = patch.to(dtype).contiguous()
    region = region.to(dtype).contiguous()
    h, w = region.shape[-2:]
    inner_y = torch.zeros(h, dtype=torch.bool, device=region.device)
    inner_x = torch.zeros(w, dtype=torch.bool, device=region.device)
    inner_y[CLONE_ERODED_PX : h - CLONE_ERODED_PX] = True
    inner_x[CLONE_ERODED_PX : w - CLONE_ERODED_PX] = True
    inner = (inner_y.view(-1, 1) & inner_x.view(1, -1)).to(dtype)
    outer = 1 - inner
    # forward differences (column x holds v[x+1] - v[x]), mixed per pixel by the eroded mask
    grad_x = (patch[..., :, 1:] - patch[..., :, :-1]) * inner[:, :-1]
    grad_x += (region[..., :, 1:] - region[..., :, :-1]) * outer[:, :-1]
    grad_y = (patch[..., 1:, :] - patch[..., :-1, :]) * inner[:-1, :]
    grad_y += (region[..., 1:, :] - region[..., :-1, :]) * outer[:-1, :]
    div = (grad_x[..., 1:-1, 1:] - grad_x[..., 1:-1, :-1]) + (grad_y[..., 1:, 1:-1] - grad_y[..., :-1, 1:-1])
    # the boundary ring is known: move its neighbours' terms to the right-hand side
    div[..., 0, :] -= region[..., 0, 1:-1]
    div[..., -1, :] -= region[..., -1, 1:-1]
    div[..., :, 0] -= region[..., 1:-1, 0]
    div[..., :, -1] -= region[..., 1:-1, -1]
    return div


def seamless_clone_full(patch: torch.Tensor, region: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """seamlessClone's result over its region, with the region's outer ring kept from the destination.

    patch, region: `(B, h, w, C) uint8`, h, w >= 3. Returns `(B, h, w, C) uint8`. The solution is
    truncated toward zero after clamping to [0, 255], as OpenCV's solver writes it (not rounded).
    """
    solved = clone_solution(patch, region, dtype)
    out = region.permute(0, 3, 1, 2).clone()
    out[..., 1:-1, 1:-1] = solved.clamp_(0, 255).to(torch.uint8)  # float->uint8 truncates
    return out.permute(0, 2, 3, 1)


def clone_solution(patch: torch.Tensor, region: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The blend's float solution over the region's interior, before OpenCV's truncation.
    patch, region: `(B, h, w, C) uint8`; returns `(B, C, h-2, w-2)` in `dtype`."""
    return _solve_poisson_dirichlet(clone_rhs(patch.permute(0, 3, 1, 2), region.permute(0, 3, 1, 2), dtype))


def clip_box(box: Box, width_px: int, height_px: int) -> Box:
    x1, y1, x2, y2 = box
    return max(x1, 0), max(y1, 0), min(x2, width_px), min(y2, height_px)


def paste_frames(frames_box: torch.Tensor, picture: torch.Tensor, box: Box, dtype=torch.float32) -> torch.Tensor:
    """SadTalker's paste_pic step for frames already resized to the box.

    frames_box: `(B, y2-y1, x2-x1, C) uint8`; picture: `(H, W, C) uint8`. Returns `(B, H, W, C) uint8`.
    seamlessClone drops the patch's outer pixel and centres it on the box, which places the cloned
    region at `[y1+1, y2-1) x [x1+1, x2-1)`. A box that runs past the picture is clipped: the part
    inside is blended with the picture's edge as its fixed boundary (OpenCV would refuse it).
    """
    x1, y1, x2, y2 = box
    height_px, width_px = picture.shape[:2]
    if frames_box.shape[1:3] != (y2 - y1, x2 - x1):
        raise ValueError(f"frames are {tuple(frames_box.shape[1:3])}, box is {y2 - y1}x{x2 - x1}")
    cx1, cy1, cx2, cy2 = clip_box((x1 + 1, y1 + 1, x2 - 1, y2 - 1), width_px, height_px)
    if cx2 - cx1 < 3 or cy2 - cy1 < 3:
        raise ValueError(f"box {box} leaves no interior inside the {width_px}x{height_px} picture")
    patch = frames_box[:, cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
    region = picture[cy1:cy2, cx1:cx2].unsqueeze(0).expand(patch.shape[0], -1, -1, -1)
    out = picture.unsqueeze(0).repeat(patch.shape[0], 1, 1, 1)
    out[:, cy1:cy2, cx1:cx2] = seamless_clone_full(patch, region, dtype)
    return out


def clone_into_picture(frames: torch.Tensor, picture: torch.Tensor, box: Box, dtype=torch.float32) -> torch.Tensor:
    """The whole of SadTalker's full-mode paste from rendered `(B, S, S, C) uint8` frames:
    resize to the box's aspect `(S, int(S*h/w))`, then to the box, then the blend."""
    x1, y1, x2, y2 = box
    aspect = resize_to_box_aspect(frames, x2 - x1, y2 - y1)
    return paste_frames(resize_linear(aspect, x2 - x1, y2 - y1), picture, box, dtype)


