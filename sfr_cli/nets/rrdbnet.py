"""RRDBNet: ESRGAN's trunk of residual-in-residual dense blocks, the background upsampler of SadTalker's
``--background_enhancer realesrgan`` (Real-ESRGAN x2plus).

Attribute names follow basicsr's ``rrdbnet_arch.py``: the attribute path is the checkpoint key of
``RealESRGAN_x2plus.pth`` (stored as ``{'params_ema': state_dict}``). For scale 2 the input is first
pixel-unshuffled by 2 (``conv_first`` takes 4x the channels), the trunk runs at half the resolution, and
two nearest-neighbour 2x up-convolutions bring it to twice the input's size.

The net sees RGB in [0, 1] (RealESRGANer flips its BGR input to RGB itself, and the result back), so sfr,
whose frames are RGB, flips nothing.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import random_draws as draws

LEAKY_SLOPE = 0.2
RESIDUAL_SCALE = 0.2  # each dense block and each RRDB adds 0.2 x its branch to its input

# RealESRGANer(scale=2, model=RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32,
# scale=2)): the module of RealESRGAN_x2plus.pth
REALESRGAN_X2PLUS_CONFIG = dict(num_in_ch=3, num_out_ch=3, scale=2, num_feat=64, num_block=23, num_grow_ch=32)
# The same architecture at test widths: two RRDBs of 8 features, growth 4.
TINY_RRDBNET_CONFIG = dict(REALESRGAN_X2PLUS_CONFIG, num_feat=8, num_block=2, num_grow_ch=4)
# pixel-unshuffle factor in front of conv_first, by output scale (basicsr: none for 4, 2 for 2, 4 for 1)
UNSHUFFLE = {4: 1, 2: 2, 1: 4}


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier conv's output (concatenated);
    ``(N, num_feat, H, W) -> (N, num_feat, H, W)``, ``x + 0.2 * conv5(...)``."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), LEAKY_SLOPE))
        # the same arithmetic as basicsr's `x5 * 0.2 + x` (one rounding per product and sum)
        return self.conv5(torch.cat(features, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Three dense blocks in a row, added to the input at 0.2: ``x + 0.2 * rdb3(rdb2(rdb1(x)))``."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """``(N, num_in_ch, H, W)`` float RGB in [0, 1] -> ``(N, num_out_ch, H * s, W * s)`` float, about [0, 1]
    and unclamped (RealESRGANer clamps), ``s = scale``. For scale 2 (or 1) H and W must be even (multiples
    of 4); RealESRGANer pads its input so (``tiling.pad_to_multiple``).

    ``REALESRGAN_X2PLUS_CONFIG`` builds RealESRGAN_x2plus's module, ``TINY_RRDBNET_CONFIG`` the same at small
    widths. No device choice, no file access.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        if scale not in UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be 1, 2 or 4, got {scale}")
        self.scale = scale
        self.unshuffle = UNSHUFFLE[scale]
        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] % self.unshuffle or x.shape[3] % self.unshuffle:
            raise ValueError(f"RRDBNet (scale {self.scale}) takes (N, C, H, W) with H and W multiples of "
                             f"{self.unshuffle}, got {tuple(x.shape)}")
        # basicsr's pixel_unshuffle orders channels (c, dy, dx), as torch's does
        feat = F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), LEAKY_SLOPE))


# Random weights (make_enhancer_checkpoints.py's recipe): zero-sum filters, so a flat input gives a flat
# 0.5 output and the image's structure drives the rest; small dense-block and trunk gains so 23 RRDBs stay
# a mild change of their input.
CHECKPOINT_NAME = "RealESRGAN_x2plus.pth"  # names the random streams, as the reference script does
RANDOM_CONV5_GAIN, RANDOM_BODY_GAIN, RANDOM_LAST_GAIN, RANDOM_LAST_BIAS = 0.3, 0.015, 1.0, 0.5
RANDOM_BIAS_STD = 0.02


def _random_tensor(key: str, shape: Tuple[int, ...], rng) -> torch.Tensor:
    if key.endswith(".bias"):
        return (torch.full(shape, RANDOM_LAST_BIAS) if key == "conv_last.bias"
                else draws.normal(rng, shape, RANDOM_BIAS_STD))
    if re.fullmatch(r"body\.\d+\.rdb\d\.conv[1-4]\.weight", key) or key in ("conv_up1.weight", "conv_up2.weight",
                                                                             "conv_hr.weight"):
        gain = draws.LEAKY_RELU_GAIN
    elif key.endswith(".conv5.weight"):
        gain = RANDOM_CONV5_GAIN
    elif key == "conv_body.weight":
        gain = RANDOM_BODY_GAIN
    elif key == "conv_last.weight":
        gain = RANDOM_LAST_GAIN
    else:  # conv_first
        gain = 1.0
    return draws.zero_sum(draws.normal(rng, shape, gain / math.sqrt(draws.fan_in(shape))))


def random_state_dict(net: RRDBNet, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic, well-conditioned random float32 weights for ``net``'s state dict (any widths; the
    reference script's values at full size), each tensor from the stream ``"RealESRGAN_x2plus.pth:<key>"``."""
    return draws.draw_state_dict(net, seed, CHECKPOINT_NAME, _random_tensor)
