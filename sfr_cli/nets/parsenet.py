"""facexlib's ParseNet (from PSFRGAN) and the parse-based soft face mask of facexlib's FaceRestoreHelper
(``paste_faces_to_input_image`` with ``use_parse=True``), as SadTalker's ``--enhancer gfpgan`` uses them.

Attribute names follow facexlib's ``parsing/parsenet.py``: the attribute path is the key of
``parsing_parsenet.pth`` (a flat state dict). ``out_img_conv`` is in the checkpoint but its output is unused.

The mask, per restored face (``512 x 512``): ParseNet on the RGB face normalized to [-1, 1]; argmax over the
19 classes; each class painted 0 or 255 by ``MASK_COLORMAP``; two ``cv2.GaussianBlur(mask, (101, 101), 11)``
in float64 (separable, border ``BORDER_REFLECT_101``); a 10 px border set to 0; divided by 255. The result
is in [0, 1], float64 as upstream.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import random_draws as draws

PARSE_SIZE_PX = 512
PARSING_CLASSES = 19
# FaceRestoreHelper's paste-back: 255 where the class belongs to the face (skin, brows, eyes, ears, nose,
# mouth, lips, ...), 0 for background (0), class 14 and classes 16-18.
MASK_COLORMAP = (0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0)
MASK_LEVEL = 255.0
MASK_BLUR_KSIZE = 101
MASK_BLUR_SIGMA = 11.0
MASK_BLUR_PASSES = 2
MASK_BORDER_PX = 10
LEAKY_SLOPE = 0.2
CHECKPOINT_NAME = "parsing_parsenet.pth"  # names the random streams, as make_enhancer_checkpoints.py does

# init_parsing_model('parsenet'): ParseNet(in_size=512, out_size=512, parsing_ch=19), other arguments default
FACEXLIB_PARSENET_CONFIG = dict(in_size=512, out_size=512, min_feat_size=32, base_ch=64, parsing_ch=19,
                                res_depth=10, ch_range=(32, 256))
# The same architecture at small widths, still 512 px in and out: for fast tests and demos.
TINY_PARSENET_CONFIG = dict(FACEXLIB_PARSENET_CONFIG, base_ch=4, res_depth=2, ch_range=(4, 8))

# Random-weight recipe (make_enhancer_checkpoints.py's)
RANDOM_MASK_GAIN = 3.0  # out_mask_conv: argmax picks among several classes, in regions
RANDOM_MASK_BIAS_STD = 0.3
RANDOM_RESIDUAL_GAMMA = (0.05, 0.15)  # the last BatchNorm of each residual branch: stays near the shortcut
RANDOM_BIAS_STD = 0.02


class NormLayer(nn.Module):
    """BatchNorm (``norm_type='bn'``, as ``self.norm``) or nothing (``'none'``)."""

    def __init__(self, channels: int, norm_type: str = "bn"):
        super().__init__()
        norm_type = norm_type.lower()
        if norm_type == "bn":
            self.norm = nn.BatchNorm2d(channels, affine=True)
        elif norm_type == "none":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"ParseNet norm_type must be 'bn' or 'none', got {norm_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ReluLayer(nn.Module):
    """LeakyReLU(0.2) (``relu_type='leakyrelu'``) or nothing (``'none'``), as ``self.func``."""

    def __init__(self, channels: int, relu_type: str = "none"):
        super().__init__()
        relu_type = relu_type.lower()
        if relu_type == "leakyrelu":
            self.func = nn.LeakyReLU(LEAKY_SLOPE)
        elif relu_type == "none":
            self.func = nn.Identity()
        else:
            raise ValueError(f"ParseNet relu_type must be 'LeakyReLU' or 'none', got {relu_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.func(x)


class ConvLayer(nn.Module):
    """[nearest 2x up] -> reflection pad -> conv (stride 2 for ``scale='down'``) -> norm -> activation.
    A conv followed by BatchNorm has no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, scale: str = "none",
                 norm_type: str = "none", relu_type: str = "none", bias: bool = True):
        super().__init__()
        self.norm_type = norm_type
        if norm_type == "bn":
            bias = False
        self.upsample = scale == "up"
        stride = 2 if scale == "down" else 1
        self.reflection_pad = nn.ReflectionPad2d(int(math.ceil((kernel_size - 1.0) / 2)))
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride, bias=bias)
        self.relu = ReluLayer(out_channels, relu_type)
        self.norm = NormLayer(out_channels, norm_type=norm_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.relu(self.norm(self.conv2d(self.reflection_pad(x))))


class ResidualBlock(nn.Module):
    """``shortcut_func(x) + conv2(conv1(x))``; the shortcut is the identity when neither the size nor the
    width changes, else a plain 3x3 ``ConvLayer`` (no norm, no activation)."""

    def __init__(self, c_in: int, c_out: int, relu_type: str = "leakyrelu", norm_type: str = "bn",
                 scale: str = "none"):
        super().__init__()
        if scale == "none" and c_in == c_out:
            self.shortcut_func = nn.Identity()
        else:
            self.shortcut_func = ConvLayer(c_in, c_out, 3, scale)
        scale_conf = {"down": ("none", "down"), "up": ("up", "none"), "none": ("none", "none")}[scale]
        self.conv1 = ConvLayer(c_in, c_out, 3, scale_conf[0], norm_type=norm_type, relu_type=relu_type)
        self.conv2 = ConvLayer(c_out, c_out, 3, scale_conf[1], norm_type=norm_type, relu_type="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_func(x) + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """Face parsing: ``(N, 3, in_size, in_size)`` float RGB in [-1, 1] -> ``(mask_logits (N, parsing_ch,
    out_size, out_size), image (N, 3, out_size, out_size))``. Eval mode (BatchNorm running statistics).

    Widths: ``base_ch`` at full size, doubled per down step (``log2(in_size / min_feat_size)`` of them),
    clipped to ``ch_range``; ``res_depth`` residual blocks at ``min_feat_size``. ``FACEXLIB_PARSENET_CONFIG``
    builds facexlib's module, ``TINY_PARSENET_CONFIG`` the same at small widths.
    """

    def __init__(self, in_size: int = 128, out_size: int = 128, min_feat_size: int = 32, base_ch: int = 64,
                 parsing_ch: int = PARSING_CLASSES, res_depth: int = 10, relu_type: str = "LeakyReLU",
                 norm_type: str = "bn", ch_range: Tuple[int, int] = (32, 256)):
        super().__init__()
        self.in_size = in_size
        self.res_depth = res_depth
        min_ch, max_ch = ch_range

        def ch_clip(x: int) -> int:
            return max(min_ch, min(x, max_ch))

        min_feat_size = min(in_size, min_feat_size)
        down_steps = int(math.log2(in_size // min_feat_size))
        up_steps = int(math.log2(out_size // min_feat_size))
        act = dict(norm_type=norm_type, relu_type=relu_type)

        encoder: List[nn.Module] = [ConvLayer(3, base_ch, 3)]
        head_ch = base_ch
        for _ in range(down_steps):
            encoder.append(ResidualBlock(ch_clip(head_ch), ch_clip(head_ch * 2), scale="down", **act))
            head_ch *= 2
        body = [ResidualBlock(ch_clip(head_ch), ch_clip(head_ch), **act) for _ in range(res_depth)]
        decoder = []
        for _ in range(up_steps):
            decoder.append(ResidualBlock(ch_clip(head_ch), ch_clip(head_ch // 2), scale="up", **act))
            head_ch //= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*body)
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = ConvLayer(ch_clip(head_ch), 3)
        self.out_mask_conv = ConvLayer(ch_clip(head_ch), parsing_ch)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's output at ``out_size``, shared by both heads."""
        feat = self.encoder(x)
        return self.decoder(feat + self.body(feat))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.features(x)
        return self.out_mask_conv(x), self.out_img_conv(x)

    def mask_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)[0]`` without the unused image head: ``(N, parsing_ch, out_size, out_size)``."""
        return self.out_mask_conv(self.features(x))


# --------------------------------------------------------------------------------------------------
# OpenCV's GaussianBlur (float64, BORDER_REFLECT_101), batched
# --------------------------------------------------------------------------------------------------
def gaussian_kernel(ksize: int, sigma: float) -> torch.Tensor:
    """``cv2.getGaussianKernel(ksize, sigma, CV_64F)`` as ``(ksize,) float64``: ``exp(-x^2 / (2 sigma^2))``
    at ``x = i - (ksize - 1) / 2``, normalized to sum 1 (for ``sigma > 0``)."""
    if ksize < 1 or ksize % 2 == 0 or sigma <= 0:
        raise ValueError(f"Gaussian kernel needs an odd ksize >= 1 and sigma > 0, got {ksize}, {sigma}")
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) * 0.5
    taps = torch.exp(x * x * (-0.5 / (sigma * sigma)))
    return taps / taps.sum()


def reflect_101(index: torch.Tensor, size: int) -> torch.Tensor:
    """OpenCV's ``borderInterpolate(..., BORDER_REFLECT_101)``: ``gfedcb|abcdefgh|gfedcba``, repeated for
    indices more than one length outside."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)


def blur_matrix(size: int, kernel: torch.Tensor) -> torch.Tensor:
    """The ``(size, size)`` matrix ``B`` of a 1-D filter with reflect-101 borders: ``out = B @ x``.
    Taps that reflect onto the same source pixel add up."""
    radius = (kernel.numel() - 1) // 2
    rows = torch.arange(size).unsqueeze(1).expand(size, kernel.numel())
    cols = reflect_101(rows + torch.arange(-radius, radius + 1).unsqueeze(0), size)
    matrix = torch.zeros(size, size, dtype=kernel.dtype)
    matrix.index_put_((rows.reshape(-1), cols.reshape(-1)), kernel.repeat(size), accumulate=True)
    return matrix


def gaussian_blur(images: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """``cv2.GaussianBlur(image, (ksize, ksize), sigma)`` (sigmaY = sigmaX, BORDER_REFLECT_101) for every
    image of ``(..., H, W)``, in the images' dtype (float64 to match OpenCV on float64 images to ~1e-15).

    Separable: the rows filtered along W, then the columns along H, each as a matrix product with the
    reflect-folded kernel (exact in exact arithmetic; float64 rounding differs from OpenCV's loop only in the
    order of the sums). Any device and batch shape.
    """
    if not images.is_floating_point() or images.dim() < 2:
        raise ValueError(f"gaussian_blur takes (..., H, W) float images, got {tuple(images.shape)} {images.dtype}")
    kernel = gaussian_kernel(ksize, sigma)
    height, width = images.shape[-2:]
    along_w = blur_matrix(width, kernel).to(device=images.device, dtype=images.dtype)
    along_h = along_w if height == width else blur_matrix(height, kernel).to(images.device, images.dtype)
    return along_h @ (images @ along_w.transpose(0, 1))


def face_parse_mask(parse_logits: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The soft face mask from ParseNet's logits ``(N, parsing_ch, H, W)`` -> ``(N, H, W)`` in [0, 1]
    (``dtype``: float64 as upstream; float32 where a device lacks float64). Upstream's steps exactly:
    argmax, ``MASK_COLORMAP``, two Gaussian blurs (101 x 101, sigma 11, reflect-101), a 10 px border zeroed,
    divided by 255."""
    if parse_logits.dim() != 4 or parse_logits.shape[1] != len(MASK_COLORMAP):
        raise ValueError(f"parse logits must be (N, {len(MASK_COLORMAP)}, H, W), got {tuple(parse_logits.shape)}")
    # torch's argmax (first maximum wins, as upstream), over a channels-last copy: twice as fast on a CPU
    labels = parse_logits.permute(0, 2, 3, 1).contiguous().argmax(dim=-1)
    colormap = torch.tensor(MASK_COLORMAP, dtype=dtype, device=labels.device)
    mask = colormap[labels]
    for _ in range(MASK_BLUR_PASSES):
        mask = gaussian_blur(mask, MASK_BLUR_KSIZE, MASK_BLUR_SIGMA)
    border = MASK_BORDER_PX
    mask[..., :border, :] = 0
    mask[..., -border:, :] = 0
    mask[..., :, :border] = 0
    mask[..., :, -border:] = 0
    return mask / MASK_LEVEL


def _input_table() -> torch.Tensor:
    """uint8 level -> ParseNet input, float32, as FaceRestoreHelper: ``face.astype('float32') / 255.`` (a
    float32 division), then ``normalize(0.5, 0.5)``: ``(x - 0.5) / 0.5``."""
    return (torch.arange(256, dtype=torch.float32) / 255.0 - 0.5) / 0.5


def faces_to_input(faces_rgb: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W) uint8`` RGB faces -> ParseNet's input ``(N, 3, H, W) float32`` in [-1, 1], bit for bit
    as FaceRestoreHelper."""
    if faces_rgb.dtype != torch.uint8 or faces_rgb.dim() != 4 or faces_rgb.shape[1] != 3:
        raise ValueError(f"faces must be (N, 3, H, W) uint8, got {tuple(faces_rgb.shape)} {faces_rgb.dtype}")
    return _input_table().to(faces_rgb.device)[faces_rgb.long()]


@torch.no_grad()
def face_masks(parse_net: ParseNet, restored_rgb: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The paste-back masks of restored faces: ``(N, 3, 512, 512) uint8 RGB`` (``restore_faces``' output) ->
    ``(N, 512, 512)`` in [0, 1], ``dtype`` float64 by default (upstream's), on the faces' device.

    Channel order: RGB (upstream hands ParseNet the BGR face flipped to RGB). Upstream first resizes the face
    to 512 x 512, a copy for GFPGAN's 512 px faces; other sizes are refused here.
    """
    if parse_net.training:
        raise ValueError("face_masks needs ParseNet in eval mode (BatchNorm running statistics): call .eval()")
    if tuple(restored_rgb.shape[2:]) != (parse_net.in_size, parse_net.in_size):
        raise ValueError(f"ParseNet takes {parse_net.in_size} px faces, got {tuple(restored_rgb.shape[2:])}")
    x = faces_to_input(restored_rgb).to(parse_net.encoder[0].conv2d.weight.dtype)
    logits = parse_net.mask_logits(x)
    return face_parse_mask(logits.float(), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------------
def random_state_dict(net: ParseNet, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic, well-conditioned random weights for ``net``'s state dict (any widths).

    Each tensor from its own numpy PCG64 stream keyed by ``(seed, crc32("parsing_parsenet.pth:" + key))``, with
    the recipe of ``make_enhancer_checkpoints.py``: eval BatchNorm (weight U(0.8, 1.2), bias and running_mean
    N(0, 0.05^2), running_var U(0.8, 1.25); the residual branch's last one, ``conv2``, weight U(0.05, 0.15)),
    convs N(0, gain^2 / fan_in) with gain sqrt(2/1.04) before BatchNorm and 1 otherwise, out_mask_conv gain 3
    and class biases N(0, 0.3^2), other biases N(0, 0.02^2), ``num_batches_tracked`` 0. For the full-size net
    these are that script's values.
    """
    template = net.state_dict()
    norm_owners = {key.rsplit(".", 1)[0] for key in template if key.endswith(".running_var")}
    out = {}
    for key, like in template.items():
        shape = tuple(like.shape)
        owner, _, leaf = key.rpartition(".")
        if not like.is_floating_point():  # num_batches_tracked
            out[key] = torch.zeros(shape, dtype=like.dtype)
            continue
        rng = draws.stream(seed, f"{CHECKPOINT_NAME}:{key}")
        if owner in norm_owners:
            gamma = RANDOM_RESIDUAL_GAMMA if owner.endswith(".conv2.norm.norm") else (0.8, 1.2)
            out[key] = draws.batch_norm_tensor(rng, leaf, shape, gamma)
        elif key == "out_mask_conv.conv2d.bias":
            out[key] = draws.normal(rng, shape, RANDOM_MASK_BIAS_STD)
        elif leaf == "bias":
            out[key] = draws.normal(rng, shape, RANDOM_BIAS_STD)
        else:
            if key == "out_mask_conv.conv2d.weight":
                gain = RANDOM_MASK_GAIN
            elif re.search(r"\.conv[12]\.conv2d\.weight$", key):  # before BatchNorm (+ LeakyReLU)
                gain = draws.LEAKY_RELU_GAIN
            else:  # shortcut, first and output convs
                gain = 1.0
            out[key] = draws.normal(rng, shape, gain / math.sqrt(draws.fan_in(shape)))
    return out


def class_counts(parse_logits: torch.Tensor) -> List[List[int]]:
    """Pixels per class of each face's argmax, ``N`` lists of ``parsing_ch`` counts (golden meta's
    ``parse_class_counts``)."""
    labels = parse_logits.argmax(dim=1)
    return [torch.bincount(face.reshape(-1), minlength=parse_logits.shape[1]).tolist() for face in labels]

