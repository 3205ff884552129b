"""Building blocks shared by the keypoint detector, dense motion network and generator.

All blocks keep SadTalker's attribute names (``conv``, ``norm``, ``pool`` ...) so their state dicts
load SadTalker's checkpoints unchanged. Batch norms run with running statistics (eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE_SPADE = 0.2  # SPADE resnet blocks and the decoder's last activation
INSTANCE_NORM_EPS = 1e-5


def make_coordinate_grid(spatial_size, dtype=torch.float32, device=None) -> torch.Tensor:
    """Grid of normalised coordinates, ``(D, H, W, 3)`` holding ``(x, y, z)`` in [-1, 1]."""
    d, h, w = spatial_size

    def axis(n):
        return 2 * (torch.arange(n, dtype=dtype, device=device) / (n - 1)) - 1

    z, y, x = torch.meshgrid(axis(d), axis(h), axis(w), indexing="ij")
    return torch.stack([x, y, z], dim=-1)


class SameBlock2d(nn.Module):
    """Conv, batch norm, ReLU (or LeakyReLU with slope 0.01); resolution kept."""

    def __init__(self, in_features, out_features, kernel_size=3, padding=1, lrelu=False):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.ac = nn.LeakyReLU() if lrelu else nn.ReLU()

    def forward(self, x):
        return self.ac(self.norm(self.conv(x)))


class DownBlock2d(nn.Module):
    """Conv 3x3, batch norm, ReLU, 2x2 average pool."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))

    def forward(self, x):
        return self.pool(F.relu(self.norm(self.conv(x))))


class DownBlock3d(nn.Module):
    """Conv 3x3x3, batch norm, ReLU, average pool over height and width only."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_features, affine=True)
        self.pool = nn.AvgPool3d(kernel_size=(1, 2, 2))

    def forward(self, x):
        return self.pool(F.relu(self.norm(self.conv(x))))


class UpBlock3d(nn.Module):
    """Nearest 2x upsampling of height and width, conv 3x3x3, batch norm, ReLU."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=(1, 2, 2))
        return F.relu(self.norm(self.conv(x)))


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (norm, ReLU, conv) twice, plus the input."""

    def __init__(self, features):
        super().__init__()
        self.conv1 = nn.Conv3d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(features, features, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm3d(features, affine=True)
        self.norm2 = nn.BatchNorm3d(features, affine=True)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


def hourglass_width(block_expansion, max_features, level):
    """Channels at ``level`` of an hourglass: ``min(max_features, block_expansion * 2**level)``."""
    return min(max_features, block_expansion * 2 ** level)


class Encoder(nn.Module):
    """Hourglass encoder: ``num_blocks`` DownBlock3d; returns every level, input first."""

    def __init__(self, block_expansion, in_features, num_blocks, max_features):
        super().__init__()
        widths = [in_features] + [hourglass_width(block_expansion, max_features, i + 1) for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(DownBlock3d(widths[i], widths[i + 1]) for i in range(num_blocks))

    def forward(self, x):
        levels = [x]
        for block in self.down_blocks:
            levels.append(block(levels[-1]))
        return levels


class Decoder(nn.Module):
    """Hourglass decoder: UpBlock3d per level with skip concatenation, then conv, norm, ReLU."""

    def __init__(self, block_expansion, in_features, num_blocks, max_features):
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            factor = 1 if i == num_blocks - 1 else 2
            blocks.append(UpBlock3d(factor * hourglass_width(block_expansion, max_features, i + 1),
                                    hourglass_width(block_expansion, max_features, i)))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, levels):
        levels = list(levels)
        out = levels.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), levels.pop()], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))


class KPHourglass(nn.Module):
    """2D encoder, 1x1 conv reshaped to a 3D volume of depth ``reshape_depth``, 3D decoder."""

    def __init__(self, block_expansion, in_features, reshape_features, reshape_depth, num_blocks, max_features):
        super().__init__()
        self.down_blocks = nn.Sequential()
        for i in range(num_blocks):
            fin = in_features if i == 0 else hourglass_width(block_expansion, max_features, i)
            self.down_blocks.add_module(f"down{i}", DownBlock2d(fin, hourglass_width(block_expansion, max_features, i + 1)))
        top = hourglass_width(block_expansion, max_features, num_blocks)
        self.conv = nn.Conv2d(top, reshape_features, kernel_size=1)
        self.up_blocks = nn.Sequential()
        for i in range(num_blocks):
            self.up_blocks.add_module(f"up{i}", UpBlock3d(hourglass_width(block_expansion, max_features, num_blocks - i),
                                                          hourglass_width(block_expansion, max_features, num_blocks - i - 1)))
        self.reshape_depth = reshape_depth
        self.out_filters = hourglass_width(block_expansion, max_features, 0)

    def forward(self, x):
        out = self.conv(self.down_blocks(x))
        b, c, h, w = out.shape
        return self.up_blocks(out.view(b, c // self.reshape_depth, self.reshape_depth, h, w))


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur then stride: band-limited downsampling by ``scale`` (the kernel is a checkpoint buffer)."""

    def __init__(self, channels, scale):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1
        self.ka = size // 2
        self.kb = self.ka - 1 if size % 2 == 0 else self.ka
        coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
        kernel = g[:, None] * g[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, size, size).clone())
        self.groups = channels
        self.stride = int(1 / scale)

    def forward(self, x):
        out = F.pad(x, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, weight=self.weight, groups=self.groups)
        return out[:, :, :: self.stride, :: self.stride]


class SpectralNormConv2d(nn.Conv2d):
    """Conv2d whose weight is ``weight_orig / sigma``, ``sigma = u . (W v)`` from the stored ``weight_u``,
    ``weight_v`` (spectral norm at inference: no power iteration). State-dict keys match
    ``torch.nn.utils.spectral_norm``: ``weight_orig``, ``weight_u``, ``weight_v`` (and ``bias``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        weight = self.weight
        del self.weight
        self.weight_orig = nn.Parameter(weight.detach())
        out_channels = weight.shape[0]
        self.register_buffer("weight_u", torch.zeros(out_channels))
        self.register_buffer("weight_v", torch.zeros(weight[0].numel()))

    def normalised_weight(self) -> torch.Tensor:
        matrix = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        sigma = torch.dot(self.weight_u, torch.mv(matrix, self.weight_v))
        return self.weight_orig / sigma

    def forward(self, x):
        return self._conv_forward(x, self.normalised_weight(), self.bias)


class SPADE(nn.Module):
    """Spatially-adaptive norm: instance-normalised ``x`` scaled by ``1 + gamma`` and shifted by
    ``beta``, both predicted from the segmentation map resized (nearest) to ``x``'s resolution."""

    def __init__(self, norm_nc, label_nc, hidden=128):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False, eps=INSTANCE_NORM_EPS)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)

    def forward(self, x, segmap):
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """Two SPADE-normalised, spectral-normed 3x3 convs plus a (learned when widths differ) shortcut."""

    def __init__(self, fin, fout, label_nc, hidden=128):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = SpectralNormConv2d(fin, fmiddle, kernel_size=3, padding=1)
        self.conv_1 = SpectralNormConv2d(fmiddle, fout, kernel_size=3, padding=1)
        if self.learned_shortcut:
            self.conv_s = SpectralNormConv2d(fin, fout, kernel_size=1, bias=False)
        self.norm_0 = SPADE(fin, label_nc, hidden)
        self.norm_1 = SPADE(fmiddle, label_nc, hidden)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, hidden)

    def forward(self, x, seg):
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), LEAKY_SLOPE_SPADE))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), LEAKY_SLOPE_SPADE))
        return x_s + dx
