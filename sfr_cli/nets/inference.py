"""Inference-time rewrites that keep the math: the one place where trained modules are reshaped for speed.

Everything here is exact algebra on the weights (differences are float rounding only), and each rewrite
is covered by a parity test against the plain modules. The rewrites never touch the modules they are
given: they work on a ``detached_copy`` (new module objects and tensors sharing the originals' storage,
which is only ever read) and return it, so a caller's loaded networks stay as loaded.

- spectral norm folded into plain conv weights (``weight_orig / sigma`` computed once);
- batch norm (running statistics) folded into the convolution before it;
- SPADE: the hidden convs (``mlp_shared``) of every SPADE that reads the same segmentation map at the
  same resolution run as one wide conv; ``mlp_gamma``/``mlp_beta`` run as one conv with ``1 +`` folded
  into the gamma bias; ``norm_0``/``norm_s`` share one instance norm of ``x``; the learned shortcut's
  1x1 conv is folded into its ``mlp_beta`` (one 3x3 conv with the shortcut's fewer output channels);
- a 3x3 conv of a nearest-upsampled map is computed at the low resolution with per-phase kernels
  (the upsampled map is piecewise constant, so most taps of the 3x3 window read the same pixel).
"""

from __future__ import annotations

import copy
import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (INSTANCE_NORM_EPS, LEAKY_SLOPE_SPADE, DownBlock2d, DownBlock3d, SameBlock2d,
                     SpectralNormConv2d, SPADEResnetBlock, UpBlock3d, Decoder)
from .generator import OcclusionAwareSPADEGenerator, SPADEDecoder


def detached_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` made of new module objects whose parameters and buffers are new tensors
    sharing the originals' storage (no weight is copied). Replacing, moving or converting its tensors
    leaves ``module`` untouched; writing into them in place would not, and nothing here does."""
    memo = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        detached = tensor.detach()
        memo[id(tensor)] = nn.Parameter(detached, requires_grad=False) if isinstance(tensor, nn.Parameter) else detached
    return copy.deepcopy(module, memo)


@torch.no_grad()
def fold_batch_norm(conv: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Make ``conv`` compute ``norm(conv(x))`` (eval-mode statistics); the caller drops ``norm``.

    The per-channel scale and shift are computed in float64; the weights are scaled in their own dtype
    (one rounding, as the unfolded path's multiply has). ``conv`` gets new weight and bias tensors: the
    old ones may be shared with the caller's module (``detached_copy``) and are not written.
    """
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight = nn.Parameter(conv.weight * scale.to(conv.weight.dtype).view(shape), requires_grad=False)
    new_bias = ((bias - norm.running_mean.double()) * scale + norm.bias.double()).to(conv.weight.dtype)
    conv.bias = nn.Parameter(new_bias, requires_grad=False)


def _plain_conv(conv: SpectralNormConv2d) -> nn.Conv2d:
    with torch.no_grad():
        weight = conv.normalised_weight()
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                      dilation=conv.dilation, bias=conv.bias is not None)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain.to(weight.device)


def _cat_convs(convs: Sequence[nn.Conv2d], bias_offsets: Sequence[float] = ()) -> nn.Conv2d:
    """One conv whose output channels are the given convs' outputs, concatenated."""
    first = convs[0]
    fused = nn.Conv2d(first.in_channels, sum(c.out_channels for c in convs), first.kernel_size,
                      padding=first.padding, bias=True)
    offsets = list(bias_offsets) + [0.0] * (len(convs) - len(bias_offsets))
    with torch.no_grad():
        fused.weight.copy_(torch.cat([c.weight for c in convs]))
        fused.bias.copy_(torch.cat([c.bias + o for c, o in zip(convs, offsets)]))
    return fused.to(first.weight.device)


class UpsampledConv3x3(nn.Module):
    """``conv3x3(nearest_upsample(x, factor))`` (zero padding 1) computed at ``x``'s resolution.

    An output pixel at phase ``(a, b)`` of its ``factor x factor`` cell reads, through its 3x3 window,
    only the low-resolution pixels at row offsets ``floor((a + dy) / factor)`` for ``dy`` in -1, 0, 1
    (and likewise for columns). Taps that read the same pixel are summed into one weight, so each phase
    is a small conv on ``x``. Phases whose offset patterns agree share their conv.
    """

    def __init__(self, conv: nn.Conv2d, factor: int):
        super().__init__()
        self.factor = factor
        patterns = [tuple(sorted({(a + d) // factor for d in (-1, 0, 1)})) for a in range(factor)]
        self.row_patterns = patterns
        unique = sorted(set(patterns))
        self.unique = unique
        weight = conv.weight.detach().double()
        kernels = {}
        for rows in unique:
            for cols in unique:
                k = torch.zeros(weight.shape[0], weight.shape[1], len(rows), len(cols), dtype=torch.float64,
                                device=weight.device)
                kernels[(rows, cols)] = k
        for a in range(factor):
            for b in range(factor):
                rows, cols = patterns[a], patterns[b]
                k = torch.zeros_like(kernels[(rows, cols)])
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        k[:, :, rows.index((a + dy) // factor), cols.index((b + dx) // factor)] += weight[:, :, dy + 1, dx + 1]
                kernels[(rows, cols)] = k  # identical for every phase with this pattern
        self.keys = list(kernels)
        for i, key in enumerate(self.keys):
            self.register_buffer(f"kernel_{i}", kernels[key].to(conv.weight.dtype))
        self.register_buffer("bias", conv.bias.detach().clone())

    def forward(self, x):
        b, c, h, w = x.shape
        f = self.factor
        padded = F.pad(x, (1, 1, 1, 1))
        results = {}
        for i, (rows, cols) in enumerate(self.keys):
            kernel = getattr(self, f"kernel_{i}")
            top, left = rows[0] + 1, cols[0] + 1
            window = padded[:, :, top: top + h + len(rows) - 1, left: left + w + len(cols) - 1]
            results[(rows, cols)] = F.conv2d(window, kernel.to(x.dtype), self.bias.to(x.dtype))
        channels = self.bias.shape[0]
        if _is_channels_last(x):  # interleave the phases in NHWC: whole channel vectors move, no transposes
            out = x.new_empty(b, h, f, w, f, channels)
            for a in range(f):
                for bb in range(f):
                    out[:, :, a, :, bb, :] = results[(self.row_patterns[a], self.row_patterns[bb])].permute(0, 2, 3, 1)
            return out.view(b, h * f, w * f, channels).permute(0, 3, 1, 2)
        out = x.new_empty(b, channels, h, f, w, f)
        for a in range(f):
            for bb in range(f):
                out[:, :, :, a, :, bb] = results[(self.row_patterns[a], self.row_patterns[bb])]
        return out.view(b, -1, h * f, w * f)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _instance_norm_fp32(x):
    """Instance statistics in fp32 whatever the compute precision (bf16 means lose detail).

    ``F.instance_norm`` reshapes to batch norm and so copies an NHWC (channels-last) tensor to NCHW and
    back; for NHWC the same arithmetic is written out, which keeps the layout."""
    if not _is_channels_last(x):
        return F.instance_norm(x.float(), eps=INSTANCE_NORM_EPS).to(x.dtype)
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
    return ((xf - mean) * torch.rsqrt(var + INSTANCE_NORM_EPS)).to(x.dtype)


class FusedSPADEResnetBlock(nn.Module):
    """``SPADEResnetBlock`` with folded spectral norms and fused SPADE convs.

    ``forward(x, actv)`` takes the block's hidden activations (``relu(mlp_shared(seg))`` of each of its
    SPADEs, concatenated along channels), which the decoder computes for several blocks at once.
    """

    def __init__(self, block: SPADEResnetBlock):
        super().__init__()
        self.learned_shortcut = block.learned_shortcut
        norms = [block.norm_0, block.norm_1] + ([block.norm_s] if block.learned_shortcut else [])
        self.hidden = norms[0].mlp_shared[0].out_channels
        self.shared_convs = [n.mlp_shared[0] for n in norms]
        self.modulation = nn.ModuleList(_cat_convs([n.mlp_gamma, n.mlp_beta], bias_offsets=[1.0])
                                        for n in norms[:2])
        self.conv_0 = _plain_conv(block.conv_0)
        self.conv_1 = _plain_conv(block.conv_1)
        if block.learned_shortcut:
            # conv_s is 1x1 and linear: conv_s(n * g + b) = conv_s(n * g) + (conv_s o mlp_beta)(actv), and
            # conv_s o mlp_beta is one 3x3 conv straight to conv_s's (fewer) output channels.
            self.conv_s = _plain_conv(block.conv_s)
            beta = block.norm_s.mlp_beta
            mix = self.conv_s.weight.detach()[:, :, 0, 0].double()
            shortcut_beta = nn.Conv2d(beta.in_channels, mix.shape[0], 3, padding=1).to(mix.device)
            with torch.no_grad():
                shortcut_beta.weight.copy_(torch.einsum("oc,chij->ohij", mix, beta.weight.double()))
                shortcut_beta.bias.copy_(mix @ beta.bias.double())
            self.shortcut_modulation = _cat_convs([block.norm_s.mlp_gamma, shortcut_beta], bias_offsets=[1.0])
            self.shortcut_channels = block.norm_s.mlp_gamma.out_channels

    def _modulate(self, normalized, actv, index):
        scale_shift = self.modulation[index](actv[:, index * self.hidden:(index + 1) * self.hidden])
        scale, shift = scale_shift.chunk(2, dim=1)
        return torch.addcmul(shift, normalized, scale)

    def _shortcut(self, x_norm, actv):
        scale_shift = self.shortcut_modulation(actv[:, 2 * self.hidden:3 * self.hidden])
        scale, shift = scale_shift.split([self.shortcut_channels, scale_shift.shape[1] - self.shortcut_channels], 1)
        return self.conv_s(x_norm * scale) + shift

    def forward(self, x, actv):
        x_norm = _instance_norm_fp32(x)
        x_s = self._shortcut(x_norm, actv) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self._modulate(x_norm, actv, 0), LEAKY_SLOPE_SPADE))
        dx_norm = _instance_norm_fp32(dx)
        dx = self.conv_1(F.leaky_relu(self._modulate(dx_norm, actv, 1), LEAKY_SLOPE_SPADE))
        return x_s + dx


class FusedSPADEDecoder(nn.Module):
    """``SPADEDecoder`` with every SPADE hidden conv at one resolution run as one conv."""

    def __init__(self, decoder: SPADEDecoder):
        super().__init__()
        self.fc = decoder.fc
        self.middle = nn.ModuleList(FusedSPADEResnetBlock(b) for b in decoder.middle_blocks())
        self.up_0 = FusedSPADEResnetBlock(decoder.up_0)
        self.up_1 = FusedSPADEResnetBlock(decoder.up_1)
        self.conv_img = decoder.conv_img
        self.shared_middle = _cat_convs([c for b in self.middle for c in b.shared_convs])
        self.shared_up_0 = UpsampledConv3x3(_cat_convs(self.up_0.shared_convs), 2)
        self.shared_up_1 = UpsampledConv3x3(_cat_convs(self.up_1.shared_convs), 4)
        for block in [*self.middle, self.up_0, self.up_1]:
            del block.shared_convs

    def forward(self, seg):
        x = self.fc(seg)
        actv = F.relu(self.shared_middle(seg))
        width = actv.shape[1] // len(self.middle)
        for i, block in enumerate(self.middle):
            x = block(x, actv[:, i * width:(i + 1) * width])
        x = self.up_0(F.interpolate(x, scale_factor=2.0), F.relu(self.shared_up_0(seg)))
        x = self.up_1(F.interpolate(x, scale_factor=2.0), F.relu(self.shared_up_1(seg)))
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, LEAKY_SLOPE_SPADE)))


def _fold_conv_norm_blocks(module: nn.Module) -> None:
    """Fold ``norm`` into ``conv`` in every conv-then-norm block below ``module``."""
    for block in module.modules():
        if isinstance(block, (SameBlock2d, DownBlock2d, DownBlock3d, UpBlock3d, Decoder)):
            if isinstance(block.norm, nn.modules.batchnorm._BatchNorm):
                fold_batch_norm(block.conv, block.norm)
                block.norm = nn.Identity()


def optimize_generator(generator: OcclusionAwareSPADEGenerator) -> OcclusionAwareSPADEGenerator:
    """The loaded generator rewritten for inference (see the module docstring), as a new module;
    ``generator`` itself is left as it was."""
    generator = detached_copy(generator)
    _fold_conv_norm_blocks(generator)
    if isinstance(generator.decoder, SPADEDecoder):
        generator.decoder = FusedSPADEDecoder(generator.decoder)
    return generator.eval().requires_grad_(False)


def optimize_kp_detector(kp_detector: nn.Module) -> nn.Module:
    """The keypoint detector with its batch norms folded, as a new module; ``kp_detector`` is left as it was."""
    kp_detector = detached_copy(kp_detector)
    _fold_conv_norm_blocks(kp_detector)
    return kp_detector.eval().requires_grad_(False)
