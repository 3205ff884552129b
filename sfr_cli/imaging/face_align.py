"""Face alignment geometry of the face enhancer (facexlib's FaceRestoreHelper, as GFPGAN drives it),
exact to the OpenCV 4.14 calls it makes:

- `similarity_lmeds`: `cv2.estimateAffinePartial2D(landmarks, template, method=cv2.LMEDS)[0]`, the 4-dof
  similarity from a face's 5 landmarks to the FFHQ template (LMeDS over random point pairs drawn with
  cv::RNG's fixed seed, then Levenberg-Marquardt on the inliers);
- `invert_affine`: `cv2.invertAffineTransform`;
- `warp_affine`: `cv2.warpAffine(..., INTER_LINEAR, BORDER_CONSTANT)`, bit for bit for uint8 and float64
  images (float32: within one float32 ulp), batched, on any device, for the whole output or one
  sub-rectangle of it (`warp_footprint` gives the rectangle outside which the warp is all border);
- `align_matrices` and `align_faces`: the matrices and the aligned 512 x 512 crops (`align_warp_face`).

No file access and no device choice: tensors stay where the caller put them. Affine matrices are float64
`(N, 2, 3)` and map source pixels to destination pixels, as OpenCV's (without WARP_INVERSE_MAP). Images
are `(B, C, H, W)`; every channel is treated alike, except that a constant border has one value a channel.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

# facexlib's FFHQ template: the 5 landmarks (eyes, nose tip, mouth corners) of a 512 x 512 aligned face.
FFHQ_TEMPLATE_512 = (
    (192.98138, 239.94708),
    (318.90277, 240.1936),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)
FACE_SIZE_PX = 512
# align_warp_face's constant border, written for facexlib's BGR frames; sfr's frames are RGB
ALIGN_BORDER_BGR = (135, 133, 132)
ALIGN_BORDER_RGB = tuple(reversed(ALIGN_BORDER_BGR))

# cv::warpAffine (INTER_LINEAR): source positions in fixed point, AB_BITS for the per-row and per-column
# terms, rounded to INTER_BITS (1/32 px) for the bilinear table; uint8 taps sum to 1 << REMAP_COEF_BITS.
AB_BITS = 10
INTER_BITS = 5
INTER_TAB_SIZE = 1 << INTER_BITS
REMAP_COEF_BITS = 15
# the uint8 taps are products of 5-bit weights times 32: the 15-bit sum drops to a 10-bit one
_TAP_SHIFT = 2 * INTER_BITS
_SHORT_MIN, _SHORT_MAX = -(1 << 15), (1 << 15) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1

# cv::estimateAffinePartial2D(LMEDS) defaults and LMeDSPointSetRegistrator's constants
LMEDS_CONFIDENCE = 0.99
LMEDS_MAX_ITERS = 2000
LMEDS_OUTLIER_RATIO = 0.45
LMEDS_MODEL_POINTS = 2
REFINE_ITERS = 10
RNG_SEED = (1 << 64) - 1  # RNG rng((uint64)-1)
RNG_COEFF = 4164903690  # CV_RNG_COEFF
FLT_EPSILON = 1.1920928955078125e-07
DBL_EPSILON = 2.220446049250313e-16

Box = Tuple[int, int, int, int]  # (x0, y0, x1, y1) in output pixels, exclusive ends


def face_template(face_size_px: int = FACE_SIZE_PX) -> torch.Tensor:
    """The FFHQ template scaled to `face_size_px` (crop_ratio (1, 1)): `(5, 2) float64`, CPU."""
    return torch.tensor(FFHQ_TEMPLATE_512, dtype=torch.float64) * (face_size_px / 512.0)


# --------------------------------------------------------------------------------------------------
# estimateAffinePartial2D(method=LMEDS)
# --------------------------------------------------------------------------------------------------
class _CvRng:
    """cv::RNG: multiply-with-carry on a 64-bit state; `uniform(a, b)` is `a + next() % (b - a)`."""

    def __init__(self, state: int = RNG_SEED):
        self.state = state

    def next(self) -> int:
        self.state = ((self.state & 0xFFFFFFFF) * RNG_COEFF + (self.state >> 32)) & 0xFFFFFFFFFFFFFFFF
        return self.state & 0xFFFFFFFF

    def uniform(self, low: int, high: int) -> int:
        return low if low == high else self.next() % (high - low) + low


def _lmeds_iterations(confidence: float, outlier_ratio: float, model_points: int, max_iters: int) -> int:
    """RANSACUpdateNumIters, as LMeDS sizes its search: 13 pair draws for the defaults."""
    num = math.log(max(1.0 - confidence, 2.2250738585072014e-308))
    denom = 1.0 - (1.0 - outlier_ratio) ** model_points
    if denom < 2.2250738585072014e-308:
        return 0
    denom = math.log(denom)
    if denom >= 0 or -num >= max_iters * -denom:
        return max_iters
    return round(num / denom)  # cvRound: half to even, as Python's round


def _pair_similarity(src: Sequence[Tuple[float, float]], dst: Sequence[Tuple[float, float]]):
    """AffinePartial2DEstimatorCallback::runKernel: the similarity through two point pairs, in double.
    Returns (a, b, tx, ty) of `[[a, -b, tx], [b, a, ty]]`, or None for coincident points (OpenCV divides by
    zero there and the model's errors are never the smallest median)."""
    (x1, y1), (x2, y2) = src
    (u1, v1), (u2, v2) = dst
    norm = (x1 - x2) * (x1 - x2) + (y1 - y2) * (y1 - y2)
    if norm == 0:
        return None
    d = 1.0 / norm
    s0 = d * ((u1 - u2) * (x1 - x2) + (v1 - v2) * (y1 - y2))
    s1 = d * ((v1 - v2) * (x1 - x2) - (u1 - u2) * (y1 - y2))
    s2 = d * ((v1 - v2) * (x1 * y2 - x2 * y1) - (u1 * y2 - u2 * y1) * (y1 - y2) - (u1 * x2 - u2 * x1) * (x1 - x2))
    s3 = d * (-(u1 - u2) * (x1 * y2 - x2 * y1) - (v1 * x2 - v2 * x1) * (x1 - x2) - (v1 * y2 - v2 * y1) * (y1 - y2))
    return s0, s1, s2, s3


def _squared_errors(model, src32: torch.Tensor, dst32: torch.Tensor) -> torch.Tensor:
    """Affine2DEstimatorCallback::computeError: the model cast to float32, residuals in float32, left to
    right. `(n,) float32`."""
    a, b, tx, ty = (torch.tensor(v, dtype=torch.float64).to(torch.float32) for v in model)
    x, y = src32[:, 0], src32[:, 1]
    ex = ((a * x + (-b) * y) + tx) - dst32[:, 0]
    ey = ((b * x + a * y) + ty) - dst32[:, 1]
    return ex * ex + ey * ey


def _solve_eig(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """cv::solve(..., DECOMP_EIG) for a symmetric matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ ((vectors.T @ rhs) / values)


def _refine_similarity(params: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                       max_iters: int = REFINE_ITERS) -> torch.Tensor:
    """OpenCV's LMSolver (a port of Balda's LMSolve) on AffinePartial2DRefineCallback's residuals.

    params: (a, b, tx, ty) float64; src, dst: `(n, 2) float64` (the inliers). Returns refined params.
    """
    count = src.shape[0]
    jac = torch.zeros(2 * count, 4, dtype=torch.float64)
    jac[0::2, 0], jac[0::2, 1], jac[0::2, 2] = src[:, 0], -src[:, 1], 1.0
    jac[1::2, 0], jac[1::2, 1], jac[1::2, 3] = src[:, 1], src[:, 0], 1.0

    def residuals(h: torch.Tensor) -> torch.Tensor:
        xi = h[0] * src[:, 0] - h[1] * src[:, 1] + h[2]
        yi = h[1] * src[:, 0] + h[0] * src[:, 1] + h[3]
        return torch.stack([xi - dst[:, 0], yi - dst[:, 1]], 1).reshape(-1)

    x = params.clone()
    r = residuals(x)
    total = float(r @ r)
    normal = jac.T @ jac  # the Jacobian does not depend on the parameters
    grad = jac.T @ r
    damping = normal.diagonal().clone()
    lam, lam_c = 1.0, 0.75
    iteration = 0
    while True:
        step = _solve_eig(normal + torch.diag(lam * damping), grad)
        trial = x - step
        r_trial = residuals(trial)
        total_trial = float(r_trial @ r_trial)
        predicted = float(step @ (-(normal @ step) + 2 * grad))
        ratio = (total - total_trial) / (predicted if abs(predicted) > DBL_EPSILON else 1.0)
        if ratio > 0.75:
            lam *= 0.5
            if lam < lam_c:
                lam = 0.0
        elif ratio < 0.25:
            t = float(step @ grad)
            nu = (total_trial - total) / (t if abs(t) > DBL_EPSILON else 1.0) + 2
            nu = min(max(nu, 2.0), 10.0)
            if lam == 0:
                inverse_diag = torch.linalg.inv(normal).diagonal().abs()
                lam = lam_c = 1.0 / max(DBL_EPSILON, float(inverse_diag.max()))
                nu *= 0.5
            lam *= nu
        if total_trial < total:
            total, x, r = total_trial, trial, r_trial
            grad = jac.T @ r
        iteration += 1
        if not (iteration < max_iters and float(step.abs().max()) >= FLT_EPSILON
                and float(r.abs().max()) >= FLT_EPSILON):
            return x


def similarity_lmeds(points, template=None) -> torch.Tensor:
    """`cv2.estimateAffinePartial2D(points, template, method=cv2.LMEDS)[0]` (OpenCV 4.14 defaults).

    points: the face's landmarks, `(n, 2)` (n >= 2; 5 for facexlib), any float dtype or a nested
    sequence; template: the matching destination points (default: `face_template()`). Both are first
    cast to float32, as OpenCV does. Returns the `(2, 3) float64` CPU matrix `[[a, -b, tx], [b, a, ty]]`
    mapping points to template. Raises ValueError where OpenCV returns no matrix.

    Steps: LMeDS draws 13 pairs with cv::RNG(-1), keeps the pair model with the smallest median squared
    error (float32 errors, strict `<`), takes as inliers the points within 2.5 * 1.4826 * (1 + 5 / (n - 2))
    * sqrt(median) (at least 0.001), and refines (a, b, tx, ty) on them with 10 Levenberg-Marquardt steps.
    """
    src32 = torch.as_tensor(points).detach().to("cpu", torch.float32).reshape(-1, 2)
    dst32 = (face_template() if template is None else torch.as_tensor(template)).detach().to(
        "cpu", torch.float32).reshape(-1, 2)
    count = src32.shape[0]
    if count != dst32.shape[0] or count < LMEDS_MODEL_POINTS:
        raise ValueError(f"similarity_lmeds needs matching point sets of 2 or more, got {count} and {dst32.shape[0]}")
    src = [tuple(map(float, p)) for p in src32]
    dst = [tuple(map(float, p)) for p in dst32]
    if count == LMEDS_MODEL_POINTS:
        best = _pair_similarity(src, dst)
        if best is None:
            raise ValueError("similarity_lmeds: the two points coincide")
        return _similarity_matrix(best)

    rng = _CvRng()
    iterations = max(_lmeds_iterations(LMEDS_CONFIDENCE, LMEDS_OUTLIER_RATIO, LMEDS_MODEL_POINTS,
                                       LMEDS_MAX_ITERS), 3)
    best, best_median = None, math.inf
    for _ in range(iterations):
        first = rng.uniform(0, count)
        second = rng.uniform(0, count)
        while second == first:
            second = rng.uniform(0, count)
        # haveCollinearPoints cannot reject a pair: two points are never collinear with a third
        model = _pair_similarity([src[first], src[second]], [dst[first], dst[second]])
        if model is None:
            continue
        median = float(torch.sort(_squared_errors(model, src32, dst32)).values[count // 2])
        if median < best_median:
            best, best_median = model, median
    if best is None:
        raise ValueError("similarity_lmeds: no point pair gives a model (all points coincide?)")
    sigma = 2.5 * 1.4826 * (1 + 5.0 / (count - LMEDS_MODEL_POINTS)) * math.sqrt(best_median)
    sigma = max(sigma, 0.001)
    threshold = torch.tensor(sigma * sigma, dtype=torch.float64).to(torch.float32)
    inliers = _squared_errors(best, src32, dst32) <= threshold
    if int(inliers.sum()) < LMEDS_MODEL_POINTS:
        raise ValueError("similarity_lmeds: fewer than 2 inliers")
    refined = _refine_similarity(torch.tensor(best, dtype=torch.float64), src32[inliers].double(),
                                 dst32[inliers].double())
    return _similarity_matrix(tuple(float(v) for v in refined))


def align_matrices(landmarks: torch.Tensor, face_size_px: int = FACE_SIZE_PX) -> torch.Tensor:
    """align_warp_face's matrices for N faces: landmarks `(N, 5, 2)` (x, y in frame pixels) ->
    `(N, 2, 3) float64` CPU, each `similarity_lmeds` to `face_template(face_size_px)`."""
    template = face_template(face_size_px)
    if landmarks.shape[0] == 0:
        return torch.zeros(0, 2, 3, dtype=torch.float64)
    return torch.stack([similarity_lmeds(points, template) for points in landmarks])


def _similarity_matrix(params) -> torch.Tensor:
    a, b, tx, ty = params
    return torch.tensor([[a, -b, tx], [b, a, ty]], dtype=torch.float64)


def invert_affine(matrices: torch.Tensor) -> torch.Tensor:
    """`cv2.invertAffineTransform` in float64, same operation order: `(..., 2, 3)` -> `(..., 2, 3)` float64.
    A singular matrix gives zeros in its linear part, as OpenCV's."""
    m = matrices.to(torch.float64)
    det = m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    inv_det = torch.where(det != 0, 1.0 / torch.where(det != 0, det, torch.ones_like(det)), torch.zeros_like(det))
    a11 = m[..., 1, 1] * inv_det
    a22 = m[..., 0, 0] * inv_det
    a12 = -m[..., 0, 1] * inv_det
    a21 = -m[..., 1, 0] * inv_det
    b1 = -a11 * m[..., 0, 2] - a12 * m[..., 1, 2]
    b2 = -a21 * m[..., 0, 2] - a22 * m[..., 1, 2]
    return torch.stack([torch.stack([a11, a12, b1], -1), torch.stack([a21, a22, b2], -1)], -2)


# --------------------------------------------------------------------------------------------------
# warpAffine(INTER_LINEAR, BORDER_CONSTANT)
# --------------------------------------------------------------------------------------------------
def _coordinate_device(device: torch.device) -> torch.device:
    """The fixed-point positions need float64 and int64: on the images' device unless it lacks float64."""
    return torch.device("cpu") if device.type == "mps" else device


def _round_to_int(values: torch.Tensor) -> torch.Tensor:
    """saturate_cast<int>(double): round half to even, clamped to int32."""
    return torch.round(values).clamp_(_INT_MIN, _INT_MAX).to(torch.int64)


def _source_positions(matrices: torch.Tensor, box: Box, device: torch.device):
    """WarpAffineInvoker's fixed-point source positions for the output pixels of `box`.

    matrices: `(N, 2, 3)` forward. Returns int64 `(N, h, w)` tensors: the top-left source pixel (ix, iy)
    (saturated to short, as OpenCV stores them) and the 1/32 px fractions (fx, fy) in [0, 32).
    """
    x0, y0, x1, y1 = box
    inv = invert_affine(matrices.to(device))
    xs = torch.arange(x0, x1, dtype=torch.float64, device=device)
    ys = torch.arange(y0, y1, dtype=torch.float64, device=device)
    scale = float(1 << AB_BITS)
    round_delta = (1 << AB_BITS) // INTER_TAB_SIZE // 2
    a_delta = _round_to_int(inv[:, 0, 0, None] * xs * scale)  # (N, w)
    b_delta = _round_to_int(inv[:, 1, 0, None] * xs * scale)
    row_x = _round_to_int((inv[:, 0, 1, None] * ys + inv[:, 0, 2, None]) * scale) + round_delta  # (N, h)
    row_y = _round_to_int((inv[:, 1, 1, None] * ys + inv[:, 1, 2, None]) * scale) + round_delta
    fixed_x = (row_x[:, :, None] + a_delta[:, None, :]) >> (AB_BITS - INTER_BITS)
    fixed_y = (row_y[:, :, None] + b_delta[:, None, :]) >> (AB_BITS - INTER_BITS)
    ix = (fixed_x >> INTER_BITS).clamp_(_SHORT_MIN, _SHORT_MAX)
    iy = (fixed_y >> INTER_BITS).clamp_(_SHORT_MIN, _SHORT_MAX)
    return ix, iy, fixed_x & (INTER_TAB_SIZE - 1), fixed_y & (INTER_TAB_SIZE - 1)


def _border_tensor(border_value, channels: int, dtype, device) -> torch.Tensor:
    values = [float(border_value)] * channels if isinstance(border_value, (int, float)) else [
        float(v) for v in border_value][:channels]
    if len(values) < channels:
        values += [0.0] * (channels - len(values))  # cv::Scalar has zeros past what was given
    border = torch.tensor(values, dtype=torch.float64)
    if dtype == torch.uint8:
        border = torch.round(border).clamp_(0, 255)  # saturate_cast<uchar>
    return border.to(dtype=dtype, device=device).view(1, channels, 1)


def warp_affine(images: torch.Tensor, matrices: torch.Tensor, out_h: int, out_w: int,
                border_value: Union[float, Sequence[float]] = 0, box: Optional[Box] = None,
                image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`cv2.warpAffine(image, M, (out_w, out_h), flags=INTER_LINEAR, borderMode=BORDER_CONSTANT,
    borderValue=border_value)` for each matrix.

    images: `(B, C, H, W)` uint8 (bit-exact), float64 (bit-exact) or float32 (within one ulp: OpenCV's
    single-channel float path sums in another order). matrices: `(N, 2, 3)`, source -> destination,
    float64 (other dtypes are cast to it). image_index: `(N,)` int64, which image each matrix warps
    (default: matrix n warps image n, N == B). box: `(x0, y0, x1, y1)`, the part of the `out_h x out_w`
    output to compute (default: all of it); the result equals that slice of the full warp.
    Returns `(N, C, y1 - y0, x1 - x0)` in the images' dtype, on their device.

    Each output pixel samples the source at `M^-1 (x, y)` rounded to 1/32 px (AB_BITS fixed point).
    uint8: the four 5-bit weight products (summing to 1024) times the pixels, plus 512, shifted right by 10
    (OpenCV's 15-bit table with its rounding). float: the float32 weights times the pixels, summed in order
    in the image's dtype. A neighbour outside the source takes the border value; a pixel whose four
    neighbours are all outside is the border value.
    """
    if images.dim() != 4 or images.dtype not in (torch.uint8, torch.float32, torch.float64):
        raise ValueError(f"warp_affine takes (B, C, H, W) uint8/float32/float64, got {tuple(images.shape)} "
                         f"{images.dtype}")
    if matrices.dim() != 3 or matrices.shape[1:] != (2, 3):
        raise ValueError(f"warp_affine takes (N, 2, 3) matrices, got {tuple(matrices.shape)}")
    batch, channels, src_h, src_w = images.shape
    count = matrices.shape[0]
    device = images.device
    if image_index is None:
        if count != batch:
            raise ValueError(f"warp_affine: {count} matrices for {batch} images; pass image_index")
        image_index = torch.arange(batch)
    x0, y0, x1, y1 = box if box is not None else (0, 0, out_w, out_h)
    if not (0 <= x0 <= x1 <= out_w and 0 <= y0 <= y1 <= out_h):
        raise ValueError(f"warp_affine: box {(x0, y0, x1, y1)} is not inside the {out_w}x{out_h} output")
    height, width = y1 - y0, x1 - x0
    if count == 0 or height == 0 or width == 0:
        return images.new_zeros((count, channels, height, width))

    coord_device = _coordinate_device(device)
    ix, iy, fx, fy = _source_positions(matrices.to(coord_device, torch.float64), (x0, y0, x1, y1), coord_device)
    ix, iy, fx, fy = (t.to(device).reshape(count, 1, -1) for t in (ix, iy, fx, fy))
    frame_offset = image_index.to(device=device, dtype=torch.int64).view(count, 1, 1) * (channels * src_h * src_w)
    channel_offset = torch.arange(channels, device=device, dtype=torch.int64).view(1, channels, 1) * (src_h * src_w)
    flat = images.reshape(-1)
    border = _border_tensor(border_value, channels, images.dtype, device)

    def corner(dy: int, dx: int) -> torch.Tensor:
        x, y = ix + dx, iy + dy
        inside = (x >= 0) & (x < src_w) & (y >= 0) & (y < src_h)
        index = frame_offset + channel_offset + (y.clamp(0, src_h - 1) * src_w + x.clamp(0, src_w - 1))
        return torch.where(inside, flat[index], border)

    if images.dtype == torch.uint8:
        gx, gy = INTER_TAB_SIZE - fx, INTER_TAB_SIZE - fy
        weights = ((gx * gy).to(torch.int32), (fx * gy).to(torch.int32), (gx * fy).to(torch.int32),
                   (fx * fy).to(torch.int32))
        total = corner(0, 0).to(torch.int32) * weights[0]
        total += corner(0, 1).to(torch.int32) * weights[1]
        total += corner(1, 0).to(torch.int32) * weights[2]
        total += corner(1, 1).to(torch.int32) * weights[3]
        out = ((total + (1 << (_TAP_SHIFT - 1))) >> _TAP_SHIFT).clamp_(0, 255).to(torch.uint8)
    else:
        step = 1.0 / INTER_TAB_SIZE  # BilinearTab_f: (1 - x) and x in float32, their products exact
        wx = (fx.to(torch.float32) * step, 1 - fx.to(torch.float32) * step)
        wy = (fy.to(torch.float32) * step, 1 - fy.to(torch.float32) * step)
        dtype = images.dtype
        out = corner(0, 0) * (wx[1] * wy[1]).to(dtype)
        out = out + corner(0, 1) * (wx[0] * wy[1]).to(dtype)
        out = out + corner(1, 0) * (wx[1] * wy[0]).to(dtype)
        out = out + corner(1, 1) * (wx[0] * wy[0]).to(dtype)
    all_outside = (ix >= src_w) | (ix + 1 < 0) | (iy >= src_h) | (iy + 1 < 0)
    out = torch.where(all_outside, border, out)
    return out.reshape(count, channels, height, width)


def warp_footprint(matrices: torch.Tensor, src_h: int, src_w: int, out_h: int, out_w: int) -> torch.Tensor:
    """For each forward matrix `(N, 2, 3)`, the output box `(x0, y0, x1, y1)` outside which `warp_affine`
    of an `src_h x src_w` source is pure border (every source neighbour outside): `(N, 4)` int64, CPU,
    clipped to the output (an empty box has x0 == x1 or y0 == y1).

    A pixel reads the source only if its position lies in [-1, src_w) x [-1, src_h); the box bounds that
    square's image under M, widened by one pixel plus the 1/32 px rounding of the positions.
    """
    m = matrices.detach().to("cpu", torch.float64)
    corners = torch.tensor([[-1.0, -1.0], [src_w, -1.0], [-1.0, src_h], [src_w, src_h]], dtype=torch.float64)
    mapped = corners @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]  # (N, 4, 2)
    margin = 1 + (m[:, :, :2].abs().sum(-1) / INTER_TAB_SIZE).ceil()  # (N, 2): x and y
    low = torch.floor(mapped.min(1).values - margin)
    high = torch.ceil(mapped.max(1).values + margin) + 1
    limits = torch.tensor([out_w, out_h], dtype=torch.float64)
    low = torch.minimum(torch.maximum(low, torch.zeros(2, dtype=torch.float64)), limits)
    high = torch.minimum(torch.maximum(high, low), limits)
    return torch.cat([low, high], 1).to(torch.int64)


def align_faces(frames: torch.Tensor, matrices: torch.Tensor, frame_index: torch.Tensor,
                face_size_px: int = FACE_SIZE_PX,
                border_value: Sequence[float] = ALIGN_BORDER_RGB) -> torch.Tensor:
    """facexlib's align_warp_face for every face: frames `(B, 3, H, W) uint8 RGB`, affine matrices
    `(N, 2, 3) float64` (from `similarity_lmeds`), frame_index `(N,)` int64 (the frame of each face).
    Returns the aligned crops `(N, 3, face_size_px, face_size_px) uint8 RGB`, grey (132, 133, 135)
    where the crop runs past the frame."""
    return warp_affine(frames, matrices, face_size_px, face_size_px, border_value, image_index=frame_index)
