"""RestoreFormer: the face restorer of SadTalker's ``--enhancer RestoreFormer`` (gfpgan 1.3.8's
``RestoreFormer()``, built by ``GFPGANer(arch='RestoreFormer')``).

A VQ autoencoder with cross-attention: the encoder takes the aligned face down to a 16 x 16 latent, each
latent position is replaced by its nearest entry of a learned codebook (1024 x 256), and the decoder
builds the face back up; at 16 x 16 its attention blocks take their queries from the encoder's features
(``MultiHeadAttnBlock(x, y)``: keys and values from the decoder's own ``x``, queries from the encoder's
``y``), so the degraded face steers which code features are used where. GroupNorm (32 groups, eps 1e-6)
and swish everywhere, as upstream.

Attribute names follow gfpgan's ``restoreformer_arch.py``: the attribute path is the checkpoint key of
``RestoreFormer.pth`` (``{'params_ema': state_dict}``). Training-only parts are left out: dropout (0, an
identity), the timestep embedding (none: ``temb_channels=0``), the VQ loss and perplexity.

Faces are aligned ``512 x 512`` RGB crops in [-1, 1] in, RGB about [-1, 1] out (unclamped), exactly like
GFPGAN's: ``nets.gfpgan.faces_to_input`` / ``output_to_faces`` are GFPGANer's pre- and post-processing
for both restorers (``restore_faces`` here).
"""

from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import random_draws as draws

FACE_SIZE_PX = 512
GROUPNORM_EPS = 1e-6
# GFPGANer(arch='RestoreFormer') builds RestoreFormer() with its defaults: the module of RestoreFormer.pth
RESTOREFORMER_CONFIG = dict(n_embed=1024, embed_dim=256, ch=64, ch_mult=(1, 2, 2, 4, 4, 8), num_res_blocks=2,
                            attn_resolutions=(16,), resolution=512, z_channels=256, head_size=8, norm_groups=32)
# The same architecture at test widths, still 512 px in and out with a 16 x 16 latent: 8-32 channels in
# GroupNorms of 4 groups, one ResnetBlock per level, a 64 x 16 codebook.
TINY_RESTOREFORMER_CONFIG = dict(n_embed=64, embed_dim=16, ch=8, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1,
                                 attn_resolutions=(16,), resolution=512, z_channels=16, head_size=2,
                                 norm_groups=4)


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``, written as upstream's ``nonlinearity`` (not F.silu, which rounds differently)."""
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=GROUPNORM_EPS, affine=True)


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """A 3x3 stride-2 conv after one zero row and column at the bottom and right (upstream's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    """``x + conv2(swish(norm2(conv1(swish(norm1(x))))))``; a 1x1 ``nin_shortcut`` when the widths differ."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class MultiHeadAttnBlock(nn.Module):
    """Multi-head attention over the H*W positions of a map, added to its input.

    ``forward(x)``: self-attention of ``norm1(x)``. ``forward(x, y)``: queries from ``norm2(y)`` (the encoder's
    features), keys and values from ``norm1(x)``. ``head_size`` is upstream's name for the number of heads;
    each head has ``channels / head_size`` channels (channel ``c`` belongs to head ``c // att_size``).
    """

    def __init__(self, channels: int, head_size: int, norm_groups: int):
        super().__init__()
        if channels % head_size:
            raise ValueError(f"{channels} channels do not split into {head_size} heads")
        self.head_size = head_size
        self.att_size = channels // head_size
        self.norm1 = group_norm(channels, norm_groups)
        self.norm2 = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1, 1, 0)
        self.k = nn.Conv2d(channels, channels, 1, 1, 0)
        self.v = nn.Conv2d(channels, channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        h_ = self.norm1(x)
        y = h_ if y is None else self.norm2(y)
        b, c, h, w = x.shape
        heads, att = self.head_size, self.att_size
        # (b, heads, h*w, att) queries and values, (b, heads, att, h*w) keys, as upstream lays them out
        q = self.q(y).reshape(b, heads, att, h * w).transpose(2, 3)
        k = self.k(h_).reshape(b, heads, att, h * w)
        v = self.v(h_).reshape(b, heads, att, h * w).transpose(2, 3)
        # upstream scales the queries (by int(att) ** -0.5, in their dtype) before the product
        weights = F.softmax(torch.matmul(q * int(att) ** -0.5, k), dim=3)
        out = torch.matmul(weights, v)  # (b, heads, h*w, att)
        out = out.permute(0, 2, 1, 3).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(out)


class _Level(nn.Module):
    """One resolution of the encoder or decoder: ``block`` (ResnetBlocks), ``attn`` (one attention block per
    ResnetBlock at the attention resolutions, else empty) and ``downsample`` / ``upsample`` where upstream has one."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Middle(nn.Module):
    def __init__(self, channels: int, head_size: int, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1 = MultiHeadAttnBlock(channels, head_size, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_groups)


class MultiHeadEncoder(nn.Module):
    """``(N, 3, R, R)`` -> the latent ``(N, z_channels, R / 2^(L-1), R / 2^(L-1))`` (``L = len(ch_mult)``) and the
    two feature maps the decoder's attention reads: ``block_<L-1>_atten`` (after ``mid.block_1``) and
    ``mid_atten`` (after ``mid.block_2``), both ``(N, ch * ch_mult[-1], r, r)``."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, head_size: int, norm_groups: int):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        res = resolution
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for level in range(self.num_resolutions):
            stage = _Level()
            block_in, block_out = ch * in_mult[level], ch * ch_mult[level]
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, norm_groups))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(MultiHeadAttnBlock(block_in, head_size, norm_groups))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = _Middle(block_in, head_size, norm_groups)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)  # double_z=False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid.block_1(h)
        features = {f"block_{self.num_resolutions - 1}_atten": h}
        h = self.mid.block_2(self.mid.attn_1(h))
        features["mid_atten"] = h
        return self.conv_out(swish(self.norm_out(h))), features


class MultiHeadDecoderTransformer(nn.Module):
    """The latent ``(N, z_channels, r, r)`` and the encoder's features -> ``(N, out_ch, R, R)``; its middle
    attention reads ``mid_atten``, its attention blocks at the lowest resolution ``block_<L-1>_atten``."""

    def __init__(self, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int, head_size: int,
                 norm_groups: int):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Middle(block_in, head_size, norm_groups)
        levels = []
        for level in reversed(range(self.num_resolutions)):
            stage = _Level()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, norm_groups))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(MultiHeadAttnBlock(block_in, head_size, norm_groups))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)  # indexed by level, like the encoder's `down`
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_1(h)
        h = self.mid.attn_1(h, features["mid_atten"])
        h = self.mid.block_2(h)
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    # upstream looks the queries up by this level's name; the encoder stores only the
                    # lowest level's, which is where the attention resolutions are
                    h = stage.attn[i](h, features[f"block_{level}_atten"])
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """The codebook ``embedding.weight (n_e, e_dim)`` and the nearest-code lookup."""

    def __init__(self, n_e: int, e_dim: int):
        super().__init__()
        self.n_e, self.e_dim = n_e, e_dim
        self.embedding = nn.Embedding(n_e, e_dim)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """``z (N, e_dim, h, w)`` -> the index of the nearest codebook entry per position, ``(N, h, w) int64``.

        As upstream: squared distances ``|z|^2 + |e|^2 - 2 z.e`` in z's dtype, in that form and order
        (``sum(z^2) + sum(e^2) - 2 * (z @ e.T)``), and their argmin (the first on a tie)."""
        n, _, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim)
        codebook = self.embedding.weight
        distances = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(codebook ** 2, dim=1)
                     - 2 * torch.matmul(flat, codebook.t()))
        return distances.argmin(dim=1).reshape(n, h, w)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``z (N, e_dim, h, w)`` -> ``(z_q (N, e_dim, h, w), codes (N, h, w) int64)``.

        ``z_q`` is upstream's straight-through value ``z + (e[code] - z)``: equal to the code up to one float
        rounding, and computed so, to keep upstream's bits (its one-hot matmul picks ``e[code]`` exactly)."""
        codes = self.nearest_codes(z)
        chosen = self.embedding.weight[codes].permute(0, 3, 1, 2)
        return z + (chosen - z), codes


class RestoreFormer(nn.Module):
    """RestoreFormer: ``(N, 3, R, R)`` float RGB in [-1, 1] -> restored ``(N, 3, R, R)`` float RGB, about [-1, 1]
    (unclamped), ``R = resolution`` (512).

    Hyper-parameters as upstream's (training switches left out) plus ``norm_groups`` (upstream's GroupNorm
    always has 32; the tiny config needs fewer). ``RESTOREFORMER_CONFIG`` builds RestoreFormer.pth's module,
    ``TINY_RESTOREFORMER_CONFIG`` the same at small widths. No device choice, no file access.
    """

    def __init__(self, n_embed: int = 1024, embed_dim: int = 256, ch: int = 64, out_ch: int = 3,
                 ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), in_channels: int = 3, resolution: int = 512,
                 z_channels: int = 256, head_size: int = 8, norm_groups: int = 32):
        super().__init__()
        self.resolution = resolution
        self.encoder = MultiHeadEncoder(ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution,
                                        z_channels, head_size, norm_groups)
        self.decoder = MultiHeadDecoderTransformer(ch, out_ch, ch_mult, num_res_blocks, attn_resolutions,
                                                   resolution, z_channels, head_size, norm_groups)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """Faces -> (quantized latent ``(N, embed_dim, r, r)``, codes ``(N, r, r) int64``, encoder features)."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"RestoreFormer takes (N, 3, {self.resolution}, {self.resolution}) faces, got "
                             f"{tuple(x.shape)}")
        latent, features = self.encoder(x)
        quantized, codes = self.quantize(self.quant_conv(latent))
        return quantized, codes, features

    def decode(self, quantized: torch.Tensor, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized), features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized, _, features = self.encode(x)
        return self.decode(quantized, features)


@torch.no_grad()
def restore_faces(net: RestoreFormer, faces_rgb: torch.Tensor, return_codes: bool = False):
    """GFPGANer(arch='RestoreFormer')'s per-face restoration, batched: aligned faces ``(N, 3, 512, 512) uint8
    RGB`` -> restored ``(N, 3, 512, 512) uint8 RGB`` on the same device; with ``return_codes`` also the
    codebook indices ``(N, 16, 16) int64``. Pre- and post-processing are GFPGAN's (see the module docstring).
    RestoreFormer draws no random numbers."""
    from .gfpgan import faces_to_input, output_to_faces

    x = faces_to_input(faces_rgb).to(net.encoder.conv_in.weight.dtype)
    quantized, codes, features = net.encode(x)
    faces = output_to_faces(net.decode(quantized, features))
    return (faces, codes) if return_codes else faces


# Random weights (make_enhancer_checkpoints.py's recipe): GroupNorm affine near identity; gains that keep
# activations at their scale through GroupNorm + swish and residual sums; `quant_conv` built so that latent
# channel 0 is 25 + an image-driven part, and a codebook of two live codes (+-20 along channel 0) and the
# others far away in channels 1.. only, so each position's nearest code is a clear choice.
CHECKPOINT_NAME = "RestoreFormer.pth"  # names the random streams, as the reference script does
RANDOM_SWISH_GAIN = 1.68  # 1 / sqrt(E[swish(x)^2]) for x ~ N(0, 1)
RANDOM_RESIDUAL_GAIN, RANDOM_OUT_GAIN = 0.5, 0.5
RANDOM_Z0_GAIN, RANDOM_Z0_BIAS = 10.0, 25.0
RANDOM_CODE_NORM, RANDOM_DEAD_NORM = 20.0, 112.0
RANDOM_BIAS_STD = 0.02


def _random_codebook(shape: Tuple[int, ...], rng) -> torch.Tensor:
    import numpy as np

    count, dim = shape
    out = np.zeros(shape, np.float32)
    out[0, 0], out[1, 0] = RANDOM_CODE_NORM, -RANDOM_CODE_NORM
    dead = rng.standard_normal((count - 2, dim - 1)).astype(np.float32)
    dead *= np.float32(RANDOM_DEAD_NORM) / np.linalg.norm(dead, axis=1, keepdims=True).astype(np.float32)
    out[2:, 1:] = dead
    return torch.from_numpy(out)


def _random_tensor(key: str, shape: Tuple[int, ...], rng) -> torch.Tensor:
    owner, _, leaf = key.rpartition(".")
    if re.search(r"norm(1|2|_out)?$", owner):
        return draws.uniform(rng, shape, 0.8, 1.2) if leaf == "weight" else draws.normal(rng, shape, 0.05)
    if key == "quantize.embedding.weight":
        return _random_codebook(shape, rng)
    if leaf == "bias":
        out = draws.normal(rng, shape, RANDOM_BIAS_STD)
        if key == "quant_conv.bias":
            out[0] = RANDOM_Z0_BIAS
        return out
    if key.endswith(".conv1.weight") or key == "encoder.conv_out.weight":
        gain = RANDOM_SWISH_GAIN  # after GroupNorm + swish
    elif key == "decoder.conv_out.weight":
        gain = RANDOM_OUT_GAIN
    elif key.endswith(".conv2.weight"):
        gain = RANDOM_RESIDUAL_GAIN * RANDOM_SWISH_GAIN
    elif key.endswith("proj_out.weight"):
        gain = RANDOM_RESIDUAL_GAIN
    else:  # conv_in, q/k/v, shortcuts, up/downsampling, 1x1s
        gain = 1.0
    weight = draws.normal(rng, shape, gain / math.sqrt(draws.fan_in(shape)))
    if key == "quant_conv.weight":
        weight[0] *= RANDOM_Z0_GAIN
    if key in ("encoder.conv_out.weight", "quant_conv.weight", "decoder.conv_out.weight"):
        weight = draws.zero_sum(weight)
    return weight


def random_state_dict(net: RestoreFormer, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic, well-conditioned random float32 weights for ``net``'s state dict (any widths; the
    reference script's values at full size), each tensor from the stream ``"RestoreFormer.pth:<key>"``."""
    return draws.draw_state_dict(net, seed, CHECKPOINT_NAME, _random_tensor)
