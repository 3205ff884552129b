"""SadTalker's ``OcclusionAwareSPADEGenerator``: source image + keypoints to a rendered frame."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import LEAKY_SLOPE_SPADE, DownBlock2d, ResBlock3d, SameBlock2d, SPADEResnetBlock
from .dense_motion import DenseMotionNetwork

MIDDLE_BLOCKS = 6


class SPADEDecoder(nn.Module):
    """Warped 2D features ``(B, C, h, w)`` -> image ``(B, 3, 4h, 4w)`` in [0, 1].

    SadTalker fixes ``C = 256``, 64 output and 128 hidden channels; sfr takes them as arguments.
    """

    def __init__(self, in_channels=256, out_channels=64, hidden=128):
        super().__init__()
        ic, oc = in_channels, out_channels
        self.fc = nn.Conv2d(ic, 2 * ic, 3, padding=1)
        for i in range(MIDDLE_BLOCKS):
            setattr(self, f"G_middle_{i}", SPADEResnetBlock(2 * ic, 2 * ic, ic, hidden))
        self.up_0 = SPADEResnetBlock(2 * ic, ic, ic, hidden)
        self.up_1 = SPADEResnetBlock(ic, oc, ic, hidden)
        self.conv_img = nn.Conv2d(oc, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def middle_blocks(self):
        return [getattr(self, f"G_middle_{i}") for i in range(MIDDLE_BLOCKS)]

    def forward(self, feature):
        seg = feature
        x = self.fc(feature)
        for block in self.middle_blocks():
            x = block(x, seg)
        x = self.up_0(self.up(x), seg)
        x = self.up_1(self.up(x), seg)
        x = self.conv_img(F.leaky_relu(x, LEAKY_SLOPE_SPADE))
        return torch.sigmoid(x)


class OcclusionAwareSPADEGenerator(nn.Module):
    """Encodes the source into a 3D feature volume, warps it by the dense motion between source and
    driving keypoints, masks occluded parts and decodes with SPADE.

    ``encode_source`` holds everything that depends only on the source; ``render`` the per-frame rest.
    ``forward`` is the plain path (source recomputed per call), kept as the reference for parity tests.
    """

    def __init__(self, image_channel, feature_channel, num_kp, block_expansion, max_features, num_down_blocks,
                 reshape_channel, reshape_depth, num_resblocks, estimate_occlusion_map=False,
                 dense_motion_params=None, decoder_out_channels=64, decoder_hidden=128):
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, feature_channel=feature_channel,
                                                       estimate_occlusion_map=estimate_occlusion_map,
                                                       **dense_motion_params)
        self.first = SameBlock2d(image_channel, block_expansion, kernel_size=3, padding=1)
        down = []
        for i in range(num_down_blocks):
            down.append(DownBlock2d(min(max_features, block_expansion * 2 ** i),
                                    min(max_features, block_expansion * 2 ** (i + 1))))
        self.down_blocks = nn.ModuleList(down)
        self.second = nn.Conv2d(min(max_features, block_expansion * 2 ** num_down_blocks), max_features, kernel_size=1)
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))
        warped = block_expansion * 2 ** num_down_blocks
        self.third = SameBlock2d(max_features, warped, kernel_size=3, padding=1, lrelu=True)
        self.fourth = nn.Conv2d(warped, warped, kernel_size=1)
        self.decoder = SPADEDecoder(warped, decoder_out_channels, decoder_hidden)

    def encode_source(self, source_image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> 3D features ``(B, reshape_channel, reshape_depth, h, w)``."""
        out = self.first(source_image)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        b, _, h, w = out.shape
        return self.resblocks_3d(out.view(b, self.reshape_channel, self.reshape_depth, h, w))

    def warp(self, feature_3d: torch.Tensor, motion: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Warp the source volume and flatten its depth: ``(B, C*D, h, w)`` after ``third``/``fourth``
        and the occlusion mask. ``feature_3d`` may have batch 1 (shared by every frame)."""
        deformation = motion["deformation"]
        b, d, h, w, _ = deformation.shape
        if feature_3d.shape[2:] != (d, h, w):
            grid = F.interpolate(deformation.permute(0, 4, 1, 2, 3), size=feature_3d.shape[2:], mode="trilinear")
            deformation = grid.permute(0, 2, 3, 4, 1)
        source = feature_3d.expand(b, *feature_3d.shape[1:])
        out = F.grid_sample(source, deformation.to(feature_3d.dtype), align_corners=False)
        out = self.fourth(self.third(out.reshape(b, -1, *out.shape[3:])))
        occlusion = motion.get("occlusion_map")
        if occlusion is not None:
            if occlusion.shape[2:] != out.shape[2:]:
                occlusion = F.interpolate(occlusion, size=out.shape[2:], mode="bilinear")
            out = out * occlusion
        return out

    def forward(self, source_image, kp_driving, kp_source):
        feature_3d = self.encode_source(source_image)
        motion = self.dense_motion_network(feature_3d, kp_driving, kp_source)
        return {"prediction": self.decoder(self.warp(feature_3d, motion)), **motion}
