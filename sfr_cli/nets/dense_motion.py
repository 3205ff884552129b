"""SadTalker's ``DenseMotionNetwork``: sparse keypoint motion to a dense 3D warp and an occlusion map."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Hourglass, make_coordinate_grid

KP_VARIANCE = 0.01
MASK_FLOOR = 1e-3  # mask weights below this are zeroed, as SadTalker does


def keypoint_heatmaps(kp: torch.Tensor, spatial_size) -> torch.Tensor:
    """Gaussians around keypoints ``(B, K, 3)`` on a ``(D, H, W)`` grid -> ``(B, K, D, H, W)``."""
    grid = make_coordinate_grid(spatial_size, kp.dtype, kp.device)
    diff = grid.view(1, 1, *grid.shape) - kp.view(kp.shape[0], kp.shape[1], 1, 1, 1, 3)
    return torch.exp(-0.5 * (diff ** 2).sum(-1) / KP_VARIANCE)


class DenseMotionNetwork(nn.Module):
    """Predicts, for each driving frame, a dense warp of the source's 3D features.

    The work is split so that what depends only on the source runs once: ``prepare_source`` compresses
    the source features and draws the source heatmaps; ``motion`` takes that and driving keypoints.
    """

    def __init__(self, block_expansion, num_blocks, max_features, num_kp, feature_channel, reshape_depth,
                 compress, estimate_occlusion_map=False):
        super().__init__()
        self.hourglass = Hourglass(block_expansion=block_expansion, in_features=(num_kp + 1) * (compress + 1),
                                   max_features=max_features, num_blocks=num_blocks)
        self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(compress, affine=True)
        if estimate_occlusion_map:
            self.occlusion = nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1, kernel_size=7, padding=3)
        else:
            self.occlusion = None
        self.num_kp = num_kp

    def prepare_source(self, feature: torch.Tensor, kp_source: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Source features ``(1, C, D, H, W)`` and keypoints ``(1, K, 3)`` -> what every frame reuses."""
        compressed = F.relu(self.norm(self.compress(feature)))
        return {"compressed": compressed, "kp_source": kp_source,
                "heatmap_source": keypoint_heatmaps(kp_source.to(compressed.dtype), feature.shape[2:])}

    def motion(self, source: Dict[str, torch.Tensor], kp_driving: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Driving keypoints ``(B, K, 3) float32`` -> ``deformation (B, D, H, W, 3)`` (sampling grid into
        the source volume) and ``occlusion_map (B, 1, H, W)`` in [0, 1] (absent without occlusion)."""
        compressed, kp_source = source["compressed"], source["kp_source"]
        b = kp_driving.shape[0]
        _, c, d, h, w = compressed.shape
        k1 = self.num_kp + 1
        dtype = compressed.dtype

        identity = make_coordinate_grid((d, h, w), kp_driving.dtype, kp_driving.device).view(1, 1, d, h, w, 3)
        to_source = identity - kp_driving.view(b, self.num_kp, 1, 1, 1, 3) + kp_source.view(-1, self.num_kp, 1, 1, 1, 3)
        sparse_motion = torch.cat([identity.expand(b, 1, d, h, w, 3), to_source], dim=1).to(dtype)

        features = compressed.unsqueeze(1).expand(b, k1, c, d, h, w).reshape(b * k1, c, d, h, w)
        deformed = F.grid_sample(features, sparse_motion.view(b * k1, d, h, w, 3), align_corners=False)
        deformed = deformed.view(b, k1, c, d, h, w)

        heatmap = keypoint_heatmaps(kp_driving.to(dtype), (d, h, w)) - source["heatmap_source"]
        heatmap = torch.cat([heatmap.new_zeros(b, 1, d, h, w), heatmap], dim=1).unsqueeze(2)
        prediction = self.hourglass(torch.cat([heatmap, deformed], dim=2).view(b, -1, d, h, w))

        mask = F.softmax(self.mask(prediction), dim=1).unsqueeze(2)
        mask = torch.where(mask < MASK_FLOOR, torch.zeros_like(mask), mask)
        deformation = (sparse_motion.permute(0, 1, 5, 2, 3, 4) * mask).sum(dim=1).permute(0, 2, 3, 4, 1)

        out = {"deformation": deformation}
        if self.occlusion is not None:
            out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction.reshape(b, -1, h, w)))
        return out

    def forward(self, feature: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor):
        """The plain per-call path: ``feature (B, C, D, H, W)``, keypoints ``(B, K, 3)``."""
        return self.motion(self.prepare_source(feature, kp_source), kp_driving)
