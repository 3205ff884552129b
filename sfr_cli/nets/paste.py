"""Paste-back tensor math: OpenCV-exact bilinear resize of uint8 frames, the Poisson blend that
`cv2.seamlessClone(..., NORMAL_CLONE)` computes for an all-255 mask, and the search for the box of the
original picture that SadTalker's preprocessing cropped.

No file access and no device choice here: callers pass tensors on the device they want.

Frames are `(B, H, W, 3) uint8` (channel order does not matter: every channel is treated alike).
A box is `(x1, y1, x2, y2)` in picture pixels, exclusive ends, as SadTalker's `ox1, oy1, ox2, oy2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# cv2.resize INTER_LINEAR on uint8: weights are float taps rounded to 11-bit fixed point.
RESIZE_COEF_BITS = 11
RESIZE_COEF_SCALE = 1 << RESIZE_COEF_BITS
# seamlessClone erodes its (border-zeroed) mask 3 times with a 3x3 kernel: the guidance field in the
# outer 3 pixels of the cloned region comes from the destination, not from the patch.
CLONE_ERODED_PX = 3
MIN_BOX_PX = 8  # the blend needs an interior; the box search does not look for smaller faces
COARSE_SIDE_PX = 64  # the box search's first look: the picture's short side at this many pixels
COARSE_RATIO = 1.1  # its steps in box size and aspect ratio
COARSE_MAX_ASPECT = 2.5  # widest and tallest boxes considered (faces clipped by the picture's edge)

Box = Tuple[int, int, int, int]


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


def _combine_rows(top: torch.Tensor, bottom: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
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
    return _combine_rows(top, bottom, b0.view(1, -1, 1, 1), b1.view(1, -1, 1, 1))


def resize_to_box_aspect(frames: torch.Tensor, box_w_px: int, box_h_px: int) -> torch.Tensor:
    """SadTalker's animate.py step: a `size x size` frame resized to `(size, int(size * h / w))`."""
    size = frames.shape[2]
    return resize_linear(frames, size, aspect_height_px(size, box_w_px, box_h_px))


def aspect_height_px(size_px: int, box_w_px: int, box_h_px: int) -> int:
    """`int(size * h / w)`, in Python floats like animate.py."""
    return int(size_px * box_h_px / box_w_px)


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


def paste_back(frames: torch.Tensor, picture: torch.Tensor, box: Box, dtype=torch.float32) -> torch.Tensor:
    """The whole of SadTalker's full-mode paste from rendered `(B, S, S, C) uint8` frames:
    resize to the box's aspect `(S, int(S*h/w))`, then to the box, then the blend."""
    x1, y1, x2, y2 = box
    aspect = resize_to_box_aspect(frames, x2 - x1, y2 - y1)
    return paste_frames(resize_linear(aspect, x2 - x1, y2 - y1), picture, box, dtype)


# --------------------------------------------------------------------------------------------------
# Finding the box
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxMatch:
    """The box whose exact resize best reproduces the crop, and how well: `exact` when every value
    matches; `mean_abs_levels`/`max_abs_levels` over the whole crop."""

    box: Box
    mean_abs_levels: float
    max_abs_levels: int

    @property
    def exact(self) -> bool:
        return self.max_abs_levels == 0


def _resize_sampled(picture: torch.Tensor, boxes: torch.Tensor, out_w: int, out_h: int,
                    xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Exact INTER_LINEAR resize of many boxes of one picture to (out_h, out_w), evaluated only at
    output columns `xs` and rows `ys`. picture `(H, W, C) int32`; boxes `(N, 4)` int64.
    Returns `(N, len(ys), len(xs), C) int32` values in [0, 255]."""
    cols = []
    for axis, (lo, hi, n_out, sel, clamp) in enumerate(
        ((boxes[:, 0], boxes[:, 2], out_w, xs, True), (boxes[:, 1], boxes[:, 3], out_h, ys, False))
    ):
        size = (hi - lo).to(torch.float64)
        scale = 1.0 / (n_out / size)
        pos = ((sel.to(torch.float64).view(1, -1) + 0.5) * scale.view(-1, 1) - 0.5).to(torch.float32)
        start = torch.floor(pos)
        frac = pos - start
        start = start.to(torch.int64)
        last = (hi - lo - 1).view(-1, 1)
        if clamp:
            low = start < 0
            high = start >= last
            frac = torch.where(low | high, torch.zeros_like(frac), frac)
            start = torch.where(low, torch.zeros_like(start), start)
            start = torch.where(high, last.expand_as(start), start)
        i0 = torch.minimum(start.clamp(min=0), last) + lo.view(-1, 1)
        i1 = torch.minimum((start + 1).clamp(min=0), last) + lo.view(-1, 1)
        w1 = torch.round(frac * RESIZE_COEF_SCALE).to(torch.int32)
        w0 = torch.round((1.0 - frac) * RESIZE_COEF_SCALE).to(torch.int32)
        cols.append((i0, i1, w0, w1))
    (x0, x1, a0, a1), (y0, y1, b0, b1) = cols
    width = picture.shape[1]
    flat = picture.reshape(-1, picture.shape[2])

    def row(yi):  # (N, ny, nx, C) horizontal pass of rows yi
        base = yi.unsqueeze(2) * width
        left = flat[(base + x0.unsqueeze(1)).reshape(-1)].view(*base.shape[:2], x0.shape[1], -1)
        right = flat[(base + x1.unsqueeze(1)).reshape(-1)].view(*base.shape[:2], x0.shape[1], -1)
        return left * a0.view(a0.shape[0], 1, -1, 1) + right * a1.view(a1.shape[0], 1, -1, 1)

    top, bottom = row(y0), row(y1)
    out = _combine_rows(top, bottom, b0.view(b0.shape[0], -1, 1, 1), b1.view(b1.shape[0], -1, 1, 1))
    return out.to(torch.int32)


def _coarse_boxes(crop: torch.Tensor, picture: torch.Tensor, keep: int) -> Tuple[List[Box], float]:
    """Candidate boxes from a zero-mean SSD template match over box sizes and aspect ratios on a
    grey, downscaled picture (float, approximate; one batched FFT correlation). crop `(S, S, C)`,
    picture `(H, W, C)` uint8. Returns the boxes, best first, and the picture pixels per coarse pixel."""
    height_px, width_px = picture.shape[:2]
    factor = max(1.0, min(height_px, width_px) / COARSE_SIDE_PX)
    ch, cw = max(8, round(height_px / factor)), max(8, round(width_px / factor))
    small = F.interpolate(picture.permute(2, 0, 1)[None].float(), size=(ch, cw), mode="bilinear",
                          antialias=True, align_corners=False)[0].mean(0)
    template_src = crop.permute(2, 0, 1)[None].float()
    fy, fx = ch / height_px, cw / width_px
    min_px = max(6, math.ceil(MIN_BOX_PX * max(fx, fy)))
    heights = sorted({int(round(v)) for v in _geometric(min_px, ch, COARSE_RATIO)} | {ch})
    shapes = []
    for th in heights:
        for aspect in _geometric(1 / COARSE_MAX_ASPECT, COARSE_MAX_ASPECT, COARSE_RATIO):
            tw = int(round(th * aspect))
            if min_px <= tw <= cw and (th, tw) not in shapes:
                shapes.append((th, tw))
    fft_h, fft_w = 2 * ch, 2 * cw
    picture_f = torch.fft.rfft2(small, s=(fft_h, fft_w))
    integral = F.pad(small, (1, 0, 1, 0)).cumsum(0).cumsum(1)
    integral_sq = F.pad(small * small, (1, 0, 1, 0)).cumsum(0).cumsum(1)
    candidates = []  # (score, box)
    for chunk in [shapes[i : i + 64] for i in range(0, len(shapes), 64)]:
        templates = torch.zeros(len(chunk), ch, cw)
        energies = []
        for k, (th, tw) in enumerate(chunk):
            t = F.interpolate(template_src, size=(th, tw), mode="bilinear", antialias=True,
                              align_corners=False)[0].mean(0)
            t = t - t.mean()
            templates[k, :th, :tw] = t
            energies.append(float((t * t).sum()))
        corr = torch.fft.irfft2(picture_f * torch.conj(torch.fft.rfft2(templates, s=(fft_h, fft_w))), s=(fft_h, fft_w))
        for k, (th, tw) in enumerate(chunk):
            n = th * tw
            window_sum = _window(integral, th, tw)
            window_var = _window(integral_sq, th, tw) - window_sum * window_sum / n
            # zero-mean SSD per pixel, relative to the template's own contrast
            score = (window_var - 2 * corr[k, : ch - th + 1, : cw - tw + 1] + energies[k]) / (energies[k] + n)
            best = int(torch.argmin(score))
            y, x = divmod(best, score.shape[1])
            candidates.append((float(score.view(-1)[best]), (x / fx, y / fy, (x + tw) / fx, (y + th) / fy)))
    candidates.sort(key=lambda c: c[0])
    out = []
    for _, (x1, y1, x2, y2) in candidates[:keep]:
        out.append(clip_box((int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2))), width_px, height_px))
    return out, factor


def _window(integral: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    return integral[th:, tw:] - integral[:-th, tw:] - integral[th:, :-tw] + integral[:-th, :-tw]


def _geometric(lo: float, hi: float, ratio: float) -> List[float]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= ratio
    return out


def _valid(boxes: torch.Tensor, width_px: int, height_px: int) -> torch.Tensor:
    return ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width_px) & (boxes[:, 3] <= height_px)
            & (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_PX) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_PX))


def _refine(crop_i: torch.Tensor, picture_i: torch.Tensor, box: Box, step: int,
            xs: torch.Tensor, ys: torch.Tensor) -> Tuple[Box, float]:
    """Alternating local search: the best (x1, x2) for fixed (y1, y2), then the best (y1, y2), with
    offsets of -2..2 steps, halving the step down to 1 pixel. Scores the mean absolute difference of
    the exact resize at sampled output pixels."""
    height_px, width_px = picture_i.shape[:2]
    out_h, out_w = crop_i.shape[:2]
    target = crop_i[ys][:, xs].unsqueeze(0)
    offsets = torch.arange(-2, 3)
    grid = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1).reshape(-1, 2)
    current = torch.tensor(box, dtype=torch.int64)

    def score(boxes):
        ok = _valid(boxes, width_px, height_px)
        result = torch.full((boxes.shape[0],), float("inf"))
        if ok.any():
            values = _resize_sampled(picture_i, boxes[ok], out_w, out_h, xs, ys)
            result[ok] = (values - target).abs().float().mean(dim=(1, 2, 3))
        return result

    best = float(score(current.view(1, 4))[0])
    while True:
        for _ in range(12):
            moved = False
            for pair in ((0, 2), (1, 3)):
                boxes = current.view(1, 4).repeat(grid.shape[0], 1)
                boxes[:, pair[0]] += grid[:, 0] * step
                boxes[:, pair[1]] += grid[:, 1] * step
                scores = score(boxes)
                i = int(torch.argmin(scores))
                if float(scores[i]) < best:
                    best, current, moved = float(scores[i]), boxes[i].clone(), True
            if not moved:
                break
        if step == 1:
            break
        step = max(1, step // 2)
    return tuple(int(v) for v in current), best


def find_box(crop: torch.Tensor, picture: torch.Tensor) -> BoxMatch:
    """The box `(x1, y1, x2, y2)` of `picture` whose `cv2.resize` to the crop's size reproduces
    `crop` best (exactly, when the crop was written by SadTalker's preprocessing from this picture).

    crop: `(S, S, C) uint8`; picture: `(H, W, C) uint8`; both on the CPU. A coarse template match over
    sizes and aspect ratios proposes boxes; an integer local search with the exact resize refines
    them; the best is scored on the whole crop.
    """
    height_px, width_px = picture.shape[:2]
    out_h, out_w = crop.shape[:2]
    crop_i, picture_i = crop.to(torch.int32), picture.to(torch.int32)
    xs = torch.linspace(0, out_w - 1, min(out_w, 48)).round().to(torch.int64).unique()
    ys = torch.linspace(0, out_h - 1, min(out_h, 48)).round().to(torch.int64).unique()
    coarse, factor = _coarse_boxes(crop, picture, keep=4)
    results = []
    for candidate in coarse:
        if not bool(_valid(torch.tensor([candidate]), width_px, height_px)[0]):
            continue
        box, sampled = _refine(crop_i, picture_i, candidate, max(1, int(factor)), xs, ys)
        results.append((sampled, box))
        if sampled == 0.0:
            break
    if not results:
        raise ValueError("no candidate box inside the picture")
    results.sort()
    box = results[0][1]
    # a last exhaustive +-1 look in all four coordinates, scored on every pixel
    offsets = torch.tensor([-1, 0, 1])
    grid = torch.cartesian_prod(offsets, offsets, offsets, offsets)
    boxes = torch.tensor(box).view(1, 4) + grid
    boxes = boxes[_valid(boxes, width_px, height_px)]
    all_x, all_y = torch.arange(out_w), torch.arange(out_h)
    best: Optional[BoxMatch] = None
    for chunk in boxes.split(9):
        diff = (_resize_sampled(picture_i, chunk, out_w, out_h, all_x, all_y) - crop_i.unsqueeze(0)).abs()
        means = diff.float().mean(dim=(1, 2, 3))
        for j in range(chunk.shape[0]):
            m = BoxMatch(tuple(int(v) for v in chunk[j]), float(means[j]), int(diff[j].max()))
            if best is None or m.mean_abs_levels < best.mean_abs_levels:
                best = m
    return best
