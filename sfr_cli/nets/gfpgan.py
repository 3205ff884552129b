"""GFPGAN v1 "clean" (``GFPGANv1Clean``): a U-Net whose bottleneck gives the StyleGAN2 decoder its latents
and whose up path gives it SFT conditions; the face restorer of SadTalker's ``--enhancer gfpgan``.

Attribute names follow gfpgan's ``gfpganv1_clean_arch.py``: the attribute path is the checkpoint key of
``GFPGANv1.4.pth`` (stored as ``{'params_ema': state_dict}``). ``toRGB`` and ``stylegan_decoder.style_mlp``
are in the checkpoint but unused at inference (``return_rgb=False``, ``input_is_latent=True``).

Faces are aligned ``512 x 512`` crops. sfr keeps them RGB: upstream GFPGANer takes a BGR crop, flips it to RGB
for the net (``img2tensor(bgr2rgb=True)``) and flips the result back (``tensor2img(rgb2bgr=True)``); the net
itself sees and returns RGB, so ``restore_faces`` takes and returns RGB and no flip happens anywhere.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import random_draws as draws
from .stylegan2 import LEAKY_SLOPE, StyleGAN2GeneratorCSFT, stylegan_channels

FACE_SIZE_PX = 512
# GFPGANer(arch='clean', channel_multiplier=2): the module of GFPGANv1.4.pth
GFPGANER_CLEAN_CONFIG = dict(out_size=512, num_style_feat=512, channel_multiplier=2, num_mlp=8,
                             input_is_latent=True, different_w=True, narrow=1, sft_half=True)
# The same architecture at small widths (decoder 16..2 channels, U-Net 8..1), still 512 px in and out:
# for fast tests and demos with random weights.
TINY_GFPGAN_CONFIG = dict(GFPGANER_CLEAN_CONFIG, num_style_feat=16, narrow=1 / 32, num_mlp=2)
CHECKPOINT_NAME = "GFPGANv1.4.pth"  # names the random streams, as make_enhancer_checkpoints.py does

# Random-weight recipe (make_enhancer_checkpoints.py's, so that outputs are sane at any width)
RANDOM_TO_RGB_GAIN = 0.12  # the summed RGB levels stay inside the final clamp to [-1, 1]
RANDOM_MODULATION_GAIN = 0.3
RANDOM_CONDITION_GAIN = 0.3
RANDOM_NOISE_STRENGTH = (0.1, 0.3)
RANDOM_BIAS_STD = 0.02
RANDOM_STYLE_BIAS_STD = 0.05


class ResBlock(nn.Module):
    """Residual block with a bilinear 2x resize (``mode='down'``: half, ``'up'``: double) between its convs;
    the 1x1 ``skip`` sees the resized input. ``(N, in, H, W) -> (N, out, H', W')``."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "down"):
        super().__init__()
        if mode not in ("down", "up"):
            raise ValueError(f"ResBlock mode must be 'down' or 'up', got {mode!r}")
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.scale_factor = 0.5 if mode == "down" else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), negative_slope=LEAKY_SLOPE)
        out = F.interpolate(out, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), negative_slope=LEAKY_SLOPE)
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        return out + self.skip(x)


class GFPGANv1Clean(nn.Module):
    """GFPGAN: ``(N, 3, S, S)`` float RGB in [-1, 1] -> restored ``(N, 3, S, S)`` float RGB, about [-1, 1]
    (unclamped), ``S = out_size``.

    Hyper-parameters as upstream (``decoder_load_path`` / ``fix_decoder`` are training options, left out):
    ``GFPGANER_CLEAN_CONFIG`` builds GFPGANv1.4's module, ``TINY_GFPGAN_CONFIG`` the same at small widths.
    ``noise``: None uses the decoder's stored buffers; else ``num_layers`` (15 at 512 px) tensors
    broadcastable to ``(N, 1, r, r)``, e.g. from ``stylegan2.draw_noise``.
    """

    def __init__(self, out_size: int, num_style_feat: int = 512, channel_multiplier: float = 1, num_mlp: int = 8,
                 input_is_latent: bool = False, different_w: bool = False, narrow: float = 1,
                 sft_half: bool = False):
        super().__init__()
        self.out_size = out_size
        self.input_is_latent = input_is_latent
        self.different_w = different_w
        self.num_style_feat = num_style_feat
        channels = stylegan_channels(channel_multiplier, narrow * 0.5)  # the U-Net has half the decoder's widths
        self.log_size = int(math.log(out_size, 2))
        if 2 ** self.log_size != out_size or self.log_size < 3:
            raise ValueError(f"out_size must be a power of two >= 8, got {out_size}")

        self.conv_body_first = nn.Conv2d(3, channels[f"{out_size}"], 1)
        in_channels = channels[f"{out_size}"]
        self.conv_body_down = nn.ModuleList()
        for i in range(self.log_size, 2, -1):
            out_channels = channels[f"{2 ** (i - 1)}"]
            self.conv_body_down.append(ResBlock(in_channels, out_channels, mode="down"))
            in_channels = out_channels
        self.final_conv = nn.Conv2d(in_channels, channels["4"], 3, 1, 1)

        in_channels = channels["4"]
        self.conv_body_up = nn.ModuleList()
        for i in range(3, self.log_size + 1):
            out_channels = channels[f"{2 ** i}"]
            self.conv_body_up.append(ResBlock(in_channels, out_channels, mode="up"))
            in_channels = out_channels
        self.toRGB = nn.ModuleList(nn.Conv2d(channels[f"{2 ** i}"], 3, 1) for i in range(3, self.log_size + 1))

        linear_out_channel = (self.log_size * 2 - 2) * num_style_feat if different_w else num_style_feat
        self.final_linear = nn.Linear(channels["4"] * 4 * 4, linear_out_channel)
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(out_size=out_size, num_style_feat=num_style_feat,
                                                       num_mlp=num_mlp, channel_multiplier=channel_multiplier,
                                                       narrow=narrow, sft_half=sft_half)
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        for i in range(3, self.log_size + 1):
            out_channels = channels[f"{2 ** i}"]
            sft_out_channels = out_channels if sft_half else out_channels * 2
            for conditions in (self.condition_scale, self.condition_shift):
                conditions.append(nn.Sequential(
                    nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.LeakyReLU(LEAKY_SLOPE),
                    nn.Conv2d(out_channels, sft_out_channels, 3, 1, 1)))

    def forward(self, x: torch.Tensor, noise: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.out_size or x.shape[3] != self.out_size:
            raise ValueError(f"GFPGAN takes (N, 3, {self.out_size}, {self.out_size}) faces, got {tuple(x.shape)}")
        unet_skips = []
        feat = F.leaky_relu(self.conv_body_first(x), negative_slope=LEAKY_SLOPE)
        for down in self.conv_body_down:
            feat = down(feat)
            unet_skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), negative_slope=LEAKY_SLOPE)

        style_code = self.final_linear(feat.reshape(feat.size(0), -1))
        if self.different_w:
            style_code = style_code.view(style_code.size(0), -1, self.num_style_feat)

        conditions = []
        for skip, up, scale, shift in zip(unet_skips, self.conv_body_up, self.condition_scale,
                                          self.condition_shift):
            feat = up(feat + skip)
            conditions.append(scale(feat))
            conditions.append(shift(feat))
        return self.stylegan_decoder(style_code, conditions, noise=noise, input_is_latent=self.input_is_latent)


# --------------------------------------------------------------------------------------------------
# uint8 faces in and out, as GFPGANer.enhance
# --------------------------------------------------------------------------------------------------
def _input_table() -> torch.Tensor:
    """uint8 level -> net input, float32, as GFPGANer: ``crop / 255.`` in float64, ``.float()``, then
    torchvision's ``normalize(0.5, 0.5)`` in float32: ``(x - 0.5) / 0.5``."""
    levels = (torch.arange(256, dtype=torch.float64) / 255.0).to(torch.float32)
    return (levels - 0.5) / 0.5


def faces_to_input(faces_rgb: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W) uint8`` RGB faces -> ``(N, 3, H, W) float32`` in [-1, 1], bit for bit as GFPGANer."""
    if faces_rgb.dtype != torch.uint8 or faces_rgb.dim() != 4 or faces_rgb.shape[1] != 3:
        raise ValueError(f"faces must be (N, 3, H, W) uint8, got {tuple(faces_rgb.shape)} {faces_rgb.dtype}")
    return _input_table().to(faces_rgb.device)[faces_rgb.long()]


def output_to_faces(image: torch.Tensor) -> torch.Tensor:
    """Net output ``(N, 3, H, W)`` float -> ``(N, 3, H, W) uint8``, as basicsr's ``tensor2img(min_max=(-1,
    1))``: float32, clamp to [-1, 1], ``(x + 1) / 2``, ``* 255.0``, round half to even, to uint8."""
    unit = (image.float().clamp(-1.0, 1.0) + 1.0) / 2.0
    return (unit * 255.0).round().to(torch.uint8)


@torch.no_grad()
def restore_faces(net: GFPGANv1Clean, faces_rgb: torch.Tensor,
                  noise: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """GFPGANer's per-face restoration, batched: aligned faces ``(N, 3, 512, 512) uint8 RGB`` -> restored
    ``(N, 3, 512, 512) uint8 RGB`` on the same device (run where ``net`` and ``faces_rgb`` are).

    Channel order: RGB in and out (upstream's BGR crop / BGR result are these with the channels flipped).
    ``noise``: None for the stored noise buffers (reproducible; what the golden uses), or per-face noise from
    ``stylegan2.draw_noise(net, seed_or_generator, N, device)`` (upstream draws fresh noise per face).
    The net runs in the dtype of its parameters (or under the caller's autocast); fp32 is the reference.
    """
    x = faces_to_input(faces_rgb).to(net.conv_body_first.weight.dtype)
    return output_to_faces(net(x, noise=noise))


def _random_tensor(key: str, shape, rng) -> torch.Tensor:
    """One tensor of the random-weight recipe (see ``random_state_dict``)."""
    leaf = key.rsplit(".", 1)[-1]
    if key.startswith("stylegan_decoder.noises.") or key == "stylegan_decoder.constant_input.weight":
        return draws.normal(rng, shape, 1.0)
    if re.fullmatch(r"stylegan_decoder\.(style_conv1|style_convs\.\d+)\.weight", key):
        return draws.uniform(rng, shape, *RANDOM_NOISE_STRENGTH)
    if re.fullmatch(r"stylegan_decoder\.(style_conv1|style_convs\.\d+|to_rgb1|to_rgbs\.\d+)\.bias", key):
        return draws.normal(rng, shape, RANDOM_STYLE_BIAS_STD)
    if key.endswith("modulated_conv.modulation.weight"):
        return draws.normal(rng, shape, RANDOM_MODULATION_GAIN / math.sqrt(shape[1]))
    if key.endswith("modulated_conv.modulation.bias"):
        return torch.ones(shape)  # the real init: unit modulation
    if key.endswith("modulated_conv.weight"):  # (1, out, in, k, k)
        gain = RANDOM_TO_RGB_GAIN if "to_rgb" in key else 1.0
        return draws.normal(rng, shape, gain / math.sqrt(math.prod(shape[2:])))
    condition = re.fullmatch(r"condition_(scale|shift)\.\d+\.(0|2)\.(weight|bias)", key)
    if condition:
        kind, index, leaf = condition.groups()
        if leaf == "weight":
            gain = draws.LEAKY_RELU_GAIN if index == "0" else RANDOM_CONDITION_GAIN
            return draws.normal(rng, shape, gain / math.sqrt(draws.fan_in(shape)))
        if index == "2" and kind == "scale":
            return torch.ones(shape)  # conditions about 1 +- 0.3 (scale) and 0 +- 0.3 (shift)
        return draws.normal(rng, shape, RANDOM_BIAS_STD)
    if leaf == "bias":
        return draws.normal(rng, shape, RANDOM_BIAS_STD)
    if re.fullmatch(r"conv_body_(down|up)\.\d+\.conv2\.weight", key):
        gain = draws.LEAKY_RELU_GAIN / math.sqrt(2.0)  # conv2 + skip keep the scale of each
    elif re.fullmatch(r"conv_body_(down|up)\.\d+\.skip\.weight", key):
        gain = 1.0 / math.sqrt(2.0)
    elif key.startswith("toRGB.") or key == "final_linear.weight":
        gain = 1.0
    else:  # followed by a LeakyReLU (style_mlp, U-Net convs)
        gain = draws.LEAKY_RELU_GAIN
    return draws.normal(rng, shape, gain / math.sqrt(draws.fan_in(shape)))


def random_state_dict(net: GFPGANv1Clean, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic, well-conditioned random float32 weights for ``net``'s state dict (any widths).

    Each tensor from its own numpy PCG64 stream keyed by ``(seed, crc32("GFPGANv1.4.pth:" + key))``, with the
    recipe of ``make_enhancer_checkpoints.py``: N(0, gain^2 / fan_in) weights (gain sqrt(2/1.04) before a
    LeakyReLU, 1 otherwise; ResBlock conv2 and skip / sqrt(2)), biases N(0, 0.02^2); SFT conditions
    ~ 1 +- 0.3 (scale) and 0 +- 0.3 (shift); modulation 0.3 x the real init, bias 1; modulated conv weights
    N(0, 1/fan_in), to_rgb x 0.12; StyleConv / to_rgb biases N(0, 0.05^2); constant input and stored noise
    N(0, 1); noise strengths U(0.1, 0.3). For the full-size net these are that script's values.
    """
    return draws.draw_state_dict(net, seed, CHECKPOINT_NAME, _random_tensor)
