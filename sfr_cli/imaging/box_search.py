"""Where SadTalker's preprocessing cut its crop from the original picture: the box whose exact bilinear
resize best reproduces the crop (a coarse look over box sizes and aspect ratios, then refinement).

No file access and no device choice here: callers pass tensors on the device they want.
A box is `(x1, y1, x2, y2)` in picture pixels, exclusive ends, as SadTalker's `ox1, oy1, ox2, oy2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .resize import RESIZE_COEF_SCALE, combine_rows
from .seamless_clone import MIN_BOX_PX, Box, clip_box

COARSE_SIDE_PX = 64  # the box search's first look: the picture's short side at this many pixels
COARSE_RATIO = 1.1  # its steps in box size and aspect ratio
COARSE_MAX_ASPECT = 2.5  # widest and tallest boxes considered (faces clipped by the picture's edge)


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
    out = combine_rows(top, bottom, b0.view(b0.shape[0], -1, 1, 1), b1.view(b1.shape[0], -1, 1, 1))
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
