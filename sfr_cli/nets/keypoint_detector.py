"""Canonical 3D keypoints of the source face (SadTalker's ``KPDetector``, without jacobians)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AntiAliasInterpolation2d, KPHourglass, make_coordinate_grid


class KPDetector(nn.Module):
    """Image ``(B, 3, H, W) float32 in [0, 1]`` -> keypoints ``(B, num_kp, 3) float32`` in [-1, 1].

    Each keypoint is the expectation of the grid coordinates under a softmax heatmap over a
    ``(reshape_depth, h, w)`` volume, sharpened by ``temperature``.
    """

    def __init__(self, block_expansion, feature_channel, num_kp, image_channel, max_features,
                 reshape_channel, reshape_depth, num_blocks, temperature, scale_factor=1.0):
        super().__init__()
        self.predictor = KPHourglass(block_expansion, in_features=image_channel, reshape_features=reshape_channel,
                                     reshape_depth=reshape_depth, num_blocks=num_blocks, max_features=max_features)
        self.kp = nn.Conv3d(self.predictor.out_filters, num_kp, kernel_size=3, padding=1)
        self.temperature = temperature
        self.scale_factor = scale_factor
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(image_channel, scale_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.scale_factor != 1:
            image = self.down(image)
        prediction = self.kp(self.predictor(image))
        b, k = prediction.shape[:2]
        heatmap = F.softmax(prediction.view(b, k, -1) / self.temperature, dim=2).view(prediction.shape)
        grid = make_coordinate_grid(prediction.shape[2:], heatmap.dtype, heatmap.device)
        return (heatmap.unsqueeze(-1) * grid).sum(dim=(2, 3, 4))
