"""Head pose and keypoint geometry: bin logits to degrees, rotation matrices, driven keypoints.

Always float32, whatever precision the generator runs in: reduced precision here freezes head motion.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

DEGREES_PER_BIN = 3
DEGREE_OFFSET = 99
SADTALKER_PI = 3.14  # SadTalker converts degrees with 3.14, not math.pi; frames depend on it


def headpose_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """Bin logits ``(B, num_bins)`` -> expected angle ``(B,)`` in degrees (3 degrees a bin, from -99)."""
    probabilities = F.softmax(logits.float(), dim=1)
    bins = torch.arange(logits.shape[1], dtype=torch.float32, device=logits.device)
    return torch.sum(probabilities * bins, 1) * DEGREES_PER_BIN - DEGREE_OFFSET


def rotation_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Angles ``(B,)`` in degrees -> ``(B, 3, 3)`` = R_pitch(x) @ R_yaw(y) @ R_roll(z)."""
    yaw, pitch, roll = (a / 180 * SADTALKER_PI for a in (yaw, pitch, roll))
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def stack(rows):
        return torch.stack([torch.stack(r, dim=1) for r in rows], dim=1)

    pitch_mat = stack([[one, zero, zero],
                       [zero, torch.cos(pitch), -torch.sin(pitch)],
                       [zero, torch.sin(pitch), torch.cos(pitch)]])
    yaw_mat = stack([[torch.cos(yaw), zero, torch.sin(yaw)],
                     [zero, one, zero],
                     [-torch.sin(yaw), zero, torch.cos(yaw)]])
    roll_mat = stack([[torch.cos(roll), -torch.sin(roll), zero],
                      [torch.sin(roll), torch.cos(roll), zero],
                      [zero, zero, one]])
    return pitch_mat @ yaw_mat @ roll_mat


def transform_keypoints(kp_canonical: torch.Tensor, pose: Dict[str, torch.Tensor],
                        yaw: Optional[torch.Tensor] = None, pitch: Optional[torch.Tensor] = None,
                        roll: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Canonical keypoints ``(B, K, 3)`` posed by the mapping net's output -> ``(B, K, 3)`` float32.

    Rotation from the predicted angles (or the given ``yaw``/``pitch``/``roll`` in degrees, ``(B,)``,
    which replace them; a NaN keeps that frame's predicted angle, so clips with and without given angles
    share a batch), then the vertical part of the translation (SadTalker zeroes x and z), then the
    per-keypoint expression offsets.
    """
    kp = kp_canonical.float()
    angles = [headpose_to_degrees(pose[name]) if given is None
              else torch.where(torch.isnan(given), headpose_to_degrees(pose[name]), given.float())
              for name, given in (("yaw", yaw), ("pitch", pitch), ("roll", roll))]
    rot = rotation_matrix(*angles)
    rotated = torch.einsum("bmp,bkp->bkm", rot, kp)
    t = pose["t"].float()
    t = torch.stack([torch.zeros_like(t[:, 0]), t[:, 1], torch.zeros_like(t[:, 2])], dim=1)
    expression = pose["exp"].float().view(kp.shape[0], -1, 3)
    return rotated + t.unsqueeze(1) + expression
