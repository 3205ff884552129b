"""The StyleGAN2 decoder of GFPGAN ("clean" version, no custom CUDA ops): ``StyleGAN2GeneratorCSFT``, a
StyleGAN2 generator whose feature maps are modulated by the U-Net's spatial conditions (SFT).

Attribute names follow gfpgan's ``stylegan2_clean_arch.py`` / ``gfpganv1_clean_arch.py`` exactly, so the
attribute path is the checkpoint key (``stylegan_decoder.`` + key in GFPGANv1.4.pth).

Noise: each StyleConv adds ``weight * noise``. ``noise=None`` uses the stored buffers ``noises.noise{i}``
(``(1, 1, r, r)``, the same for every face: upstream's ``randomize_noise=False``, which is how the golden was
made); an explicit list (see ``draw_noise``) gives each face its own noise. Upstream GFPGANer draws fresh
``N(0, 1)`` noise per face per call from the global RNG, so SadTalker itself is not reproducible.

Precision: fp32 is the reference. Under fp16/bf16 autocast (or with half weights) the style modulation and
the demodulation, a sum of squares over ``in_channels * k * k`` weights, are computed in fp32, then the
modulated weights are cast to the activations' dtype for the convolution.
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2
STYLECONV_GAIN = math.sqrt(2.0)  # upstream's "* 2**0.5  # for conversion" after each modulated conv
DEMOD_EPS = 1e-8
STYLE_NORM_EPS = 1e-8
CONSTANT_SIZE_PX = 4
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")

NoiseList = Sequence[torch.Tensor]


def stylegan_channels(channel_multiplier: float, narrow: float, base: int = 512) -> dict:
    """Feature channels per resolution, as upstream: ``base * narrow`` up to 32 px, then halving per level
    times ``channel_multiplier`` (keys are resolutions as strings, as upstream spells them)."""
    return {
        "4": int(base * narrow),
        "8": int(base * narrow),
        "16": int(base * narrow),
        "32": int(base * narrow),
        "64": int(base // 2 * channel_multiplier * narrow),
        "128": int(base // 4 * channel_multiplier * narrow),
        "256": int(base // 8 * channel_multiplier * narrow),
        "512": int(base // 16 * channel_multiplier * narrow),
        "1024": int(base // 32 * channel_multiplier * narrow),
    }


def _fp32_region(device: torch.device):
    """A region where autocast is off (so the ops below run in the dtype of their inputs: fp32)."""
    if device.type in AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class NormStyleCode(nn.Module):
    """Style codes ``(N, F)`` scaled to unit mean square per code (first layer of ``style_mlp``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + STYLE_NORM_EPS)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution, one weight set per sample (a grouped convolution), no bias.

    ``forward(x (N, in, H, W), style (N, num_style_feat)) -> (N, out, H', W')`` with ``H' = 2H`` for
    ``sample_mode='upsample'`` (bilinear, before the convolution), ``H/2`` for ``'downsample'``.
    ``weight`` is ``(1, out, in, k, k)``; ``modulation`` maps the style to one scale per input channel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, sample_mode: Optional[str] = None, eps: float = DEMOD_EPS):
        super().__init__()
        if sample_mode not in (None, "upsample", "downsample"):
            raise ValueError(f"sample_mode must be None, 'upsample' or 'downsample', got {sample_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.sample_mode = sample_mode
        self.eps = eps
        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size)
                                   / math.sqrt(in_channels * kernel_size ** 2))
        self.padding = kernel_size // 2

    def modulated_weight(self, style: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``(N * out, in, k, k) float32`` from ``style (N, num_style_feat)``, computed in
        fp32 whatever the autocast state (the demodulation's sum of squares overflows fp16)."""
        n = style.shape[0]
        with _fp32_region(style.device):
            scale = F.linear(style.float(), self.modulation.weight.float(), self.modulation.bias.float())
            weight = self.weight.float() * scale.view(n, 1, self.in_channels, 1, 1)
            if self.demodulate:
                demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
                weight = weight * demod.view(n, self.out_channels, 1, 1, 1)
        return weight.view(n * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        weight = self.modulated_weight(style).to(x.dtype)
        if self.sample_mode == "upsample":
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        elif self.sample_mode == "downsample":
            x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        _, c, h, w = x.shape
        out = F.conv2d(x.reshape(1, n * c, h, w), weight, padding=self.padding, groups=n)
        return out.view(n, self.out_channels, *out.shape[2:4])


class StyleConv(nn.Module):
    """Modulated conv, times sqrt(2), plus ``weight * noise`` (``weight`` is the ``[1]`` noise strength),
    plus ``bias``, LeakyReLU(0.2). ``noise`` broadcasts to ``(N, 1, H', W')``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, sample_mode: Optional[str] = None):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, kernel_size, num_style_feat,
                                              demodulate=demodulate, sample_mode=sample_mode)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.activate = nn.LeakyReLU(negative_slope=LEAKY_SLOPE)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * STYLECONV_GAIN
        out = out + self.weight * noise
        out = out + self.bias
        return self.activate(out)


class ToRGB(nn.Module):
    """Features ``(N, C, H, W)`` -> RGB ``(N, 3, H, W)`` by a 1x1 modulated conv without demodulation, plus
    ``bias``, plus the previous level's RGB ``skip`` (bilinearly upsampled 2x when ``upsample``)."""

    def __init__(self, in_channels: int, num_style_feat: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_channels, 3, kernel_size=1, num_style_feat=num_style_feat,
                                              demodulate=False, sample_mode=None)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class ConstantInput(nn.Module):
    """The learned ``(1, C, 4, 4)`` start of the decoder, repeated over the batch."""

    def __init__(self, num_channel: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.repeat(batch, 1, 1, 1)


class StyleGAN2GeneratorCSFT(nn.Module):
    """StyleGAN2 generator with SFT conditions (GFPGAN's ``stylegan_decoder``).

    ``forward(styles, conditions, noise=None, input_is_latent=True) -> (N, 3, out_size, out_size)`` image
    (unclamped, about [-1, 1]). ``styles``: latents ``(N, num_latent, F)`` (one per layer, GFPGAN's
    ``different_w=True``) or ``(N, F)`` (repeated for every layer); with ``input_is_latent=False`` they first go
    through ``style_mlp``. ``conditions``: ``2 * (log2(out_size) - 2)`` maps, (scale, shift) per level from 8 px
    up, each ``(N, C_level // 2, r, r)`` with ``sft_half`` (else ``C_level``). ``noise``: None (the stored
    buffers) or ``num_layers`` tensors broadcastable to ``(N, 1, r, r)``.
    """

    def __init__(self, out_size: int, num_style_feat: int = 512, num_mlp: int = 8, channel_multiplier: float = 2,
                 narrow: float = 1, sft_half: bool = False):
        super().__init__()
        self.num_style_feat = num_style_feat
        self.sft_half = sft_half
        style_mlp_layers: List[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            style_mlp_layers += [nn.Linear(num_style_feat, num_style_feat, bias=True),
                                 nn.LeakyReLU(negative_slope=LEAKY_SLOPE)]
        self.style_mlp = nn.Sequential(*style_mlp_layers)

        channels = stylegan_channels(channel_multiplier, narrow)
        self.channels = channels
        self.constant_input = ConstantInput(channels["4"], size=CONSTANT_SIZE_PX)
        self.style_conv1 = StyleConv(channels["4"], channels["4"], kernel_size=3, num_style_feat=num_style_feat)
        self.to_rgb1 = ToRGB(channels["4"], num_style_feat, upsample=False)

        self.log_size = int(math.log(out_size, 2))
        if 2 ** self.log_size != out_size or self.log_size < 3:
            raise ValueError(f"out_size must be a power of two >= 8, got {out_size}")
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.num_latent = self.log_size * 2 - 2

        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            resolution = noise_resolution(layer_idx)
            self.noises.register_buffer(f"noise{layer_idx}", torch.randn(1, 1, resolution, resolution))
        in_channels = channels["4"]
        for i in range(3, self.log_size + 1):
            out_channels = channels[f"{2 ** i}"]
            self.style_convs.append(StyleConv(in_channels, out_channels, kernel_size=3,
                                              num_style_feat=num_style_feat, sample_mode="upsample"))
            self.style_convs.append(StyleConv(out_channels, out_channels, kernel_size=3,
                                              num_style_feat=num_style_feat, sample_mode=None))
            self.to_rgbs.append(ToRGB(out_channels, num_style_feat, upsample=True))
            in_channels = out_channels

    def stored_noise(self) -> List[torch.Tensor]:
        """The stored noise buffers ``noise0 .. noise{num_layers-1}``, each ``(1, 1, r, r)``."""
        return [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]

    def forward(self, styles: torch.Tensor, conditions: Sequence[torch.Tensor],
                noise: Optional[NoiseList] = None, input_is_latent: bool = True) -> torch.Tensor:
        if not input_is_latent:
            styles = self.style_mlp(styles) if styles.dim() == 2 else \
                self.style_mlp(styles.flatten(0, 1)).view_as(styles)
        latent = styles.unsqueeze(1).repeat(1, self.num_latent, 1) if styles.dim() == 2 else styles
        if latent.shape[1] < self.num_latent:
            raise ValueError(f"decoder needs {self.num_latent} latents per face, got {tuple(latent.shape)}")
        noise = self.stored_noise() if noise is None else list(noise)
        if len(noise) != self.num_layers:
            raise ValueError(f"decoder needs {self.num_layers} noise maps, got {len(noise)}")

        out = self.constant_input(latent.shape[0])
        out = self.style_conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, noise1, noise2, to_rgb in zip(self.style_convs[::2], self.style_convs[1::2],
                                                        noise[1::2], noise[2::2], self.to_rgbs):
            out = conv1(out, latent[:, i], noise=noise1)
            if i < len(conditions):  # SFT: scale and shift (half of the channels with sft_half)
                if self.sft_half:
                    out_same, out_sft = torch.split(out, int(out.size(1) // 2), dim=1)
                    out_sft = out_sft * conditions[i - 1] + conditions[i]
                    out = torch.cat([out_same, out_sft], dim=1)
                else:
                    out = out * conditions[i - 1] + conditions[i]
            out = conv2(out, latent[:, i + 1], noise=noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


def noise_resolution(layer_idx: int) -> int:
    """Side in pixels of noise map ``layer_idx``: 4, 8, 8, 16, 16, 32, 32, ..."""
    return 2 ** ((layer_idx + 5) // 2)


def draw_noise(net: nn.Module, generator_or_seed: Union[int, torch.Generator], n: int,
               device: Optional[Union[str, torch.device]] = None,
               dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
    """Fresh ``N(0, 1)`` StyleGAN2 noise for ``n`` faces: ``num_layers`` tensors ``(n, 1, r, r)``.

    ``net`` is a ``StyleGAN2GeneratorCSFT`` or a module holding one as ``stylegan_decoder`` (GFPGAN).
    Drawn face after face (all layers of face 0, then face 1, ...) from ``generator_or_seed`` (a seed makes a
    new CPU generator; a CPU generator is reproducible on every machine), so faces drawn in batches of any size
    from one generator get the same noise as drawn one by one. The result is moved to ``device`` (default: the
    generator's device).
    """
    decoder = getattr(net, "stylegan_decoder", net)
    if isinstance(generator_or_seed, torch.Generator):
        generator = generator_or_seed
    else:
        generator = torch.Generator().manual_seed(int(generator_or_seed))
    sizes = [noise_resolution(i) for i in range(decoder.num_layers)]
    target = generator.device if device is None else torch.device(device)
    if n == 0:
        return [torch.empty(0, 1, r, r, device=target, dtype=dtype) for r in sizes]
    per_face = [[torch.randn(1, 1, r, r, generator=generator, device=generator.device, dtype=torch.float32)
                 for r in sizes] for _ in range(n)]
    return [torch.cat([face[i] for face in per_face], dim=0).to(device=target, dtype=dtype)
            for i in range(len(sizes))]
