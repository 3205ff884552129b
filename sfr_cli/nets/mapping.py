"""SadTalker's ``MappingNet``: a 27-frame window of 3DMM coefficients to head pose and expression."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

WINDOW_FRAMES = 27
LEAKY_SLOPE_MAPPING = 0.1


class MappingNet(nn.Module):
    """Windows ``(B, coeff_nc, 27) float32`` -> dict of ``yaw``, ``pitch``, ``roll`` ``(B, num_bins)``
    bin logits, ``t`` ``(B, 3)`` and ``exp`` ``(B, 3 * num_kp)``. ``B`` counts frames."""

    def __init__(self, coeff_nc, descriptor_nc, layer, num_kp, num_bins):
        super().__init__()
        self.coeff_nc = coeff_nc
        self.layer = layer
        self.first = nn.Sequential(nn.Conv1d(coeff_nc, descriptor_nc, kernel_size=7, padding=0, bias=True))
        for i in range(layer):
            setattr(self, f"encoder{i}", nn.Sequential(
                nn.LeakyReLU(LEAKY_SLOPE_MAPPING),
                nn.Conv1d(descriptor_nc, descriptor_nc, kernel_size=3, padding=0, dilation=3)))
        self.fc_roll = nn.Linear(descriptor_nc, num_bins)
        self.fc_pitch = nn.Linear(descriptor_nc, num_bins)
        self.fc_yaw = nn.Linear(descriptor_nc, num_bins)
        self.fc_t = nn.Linear(descriptor_nc, 3)
        self.fc_exp = nn.Linear(descriptor_nc, 3 * num_kp)

    def forward(self, windows: torch.Tensor) -> Dict[str, torch.Tensor]:
        if windows.dim() != 3 or windows.shape[1] != self.coeff_nc:
            raise ValueError(f"mapping net takes (frames, {self.coeff_nc}, {WINDOW_FRAMES}) windows, "
                             f"got {tuple(windows.shape)}")
        out = self.first(windows)
        for i in range(self.layer):
            out = getattr(self, f"encoder{i}")(out) + out[:, :, 3:-3]
        out = out.mean(dim=2)
        return {"yaw": self.fc_yaw(out), "pitch": self.fc_pitch(out), "roll": self.fc_roll(out),
                "t": self.fc_t(out), "exp": self.fc_exp(out)}
