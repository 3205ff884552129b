"""Random weights for the face detector (`nets.retinaface.RetinaFace`) that find faces: what `sfr checkpoints
random --enhancer` writes, and what the tests and `make demo-enhance` detect with. Each tensor comes from its
own numpy PCG64 stream, so at full width and seed 14 they are the reference weights `golden-enhance` was made
with; at test width, `TINY_SEED` is a seed screened to find faces.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Dict

import numpy as np
import torch

from .imaging.face_align import FFHQ_TEMPLATE_512
from .nets.retinaface import ANCHORS_PER_CELL, LANDMARK_POINTS, VARIANCES, RetinaFace

# Tiny random weights screened like the golden's seed: 1-3 faces on each golden face frame and on the sample
# face, none on a flat grey frame (`random_state_dict(build_retinaface(tiny=True), TINY_SEED)`).
TINY_SEED = 614

# Random weights. Each tensor comes from its own numpy PCG64 stream keyed by (seed, crc32(namespace:key)),
# the streams of ../shared/reference/make_enhancer_checkpoints.py: at full width, seed 14 gives the weights
# golden-enhance was made with. Conditioning (the script's docstring says why):
RANDOM_STREAM_NAMESPACE = "detection_Resnet50_Final.pth"
RELU_GAIN = math.sqrt(2.0)             # conv weights N(0, gain^2 / fan_in), then made zero-sum
STEM_INPUT_SCALE = 1.0 / 64.0          # body.conv1 sees raw levels minus the mean, not normalised pixels
RESIDUAL_GAMMA = (0.25, 0.45)          # bottleneck bn3 weight: residual sums grow slowly with depth
CLASS_GAIN_ON, CLASS_GAIN_OFF, HEAD_GAIN = 6.0, 0.2, 0.3
OFF_FACE_BIAS = -12.0                  # every anchor type but the two below: scores under 1e-4
FACE_BIAS = {(1, 1): -4.0, (2, 0): -2.0}   # (level, anchor) -> face logit bias: 128 px and 256 px anchors
# The active landmark heads place facexlib's FFHQ 5-point template at 1.6x the anchor size.
LANDMARK_FACE_SCALE = 1.6
HEAD_VALUES = {"ClassHead": 2, "BboxHead": 4, "LandmarkHead": 2 * LANDMARK_POINTS}


def _normal(rng, shape, std) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _zero_sum(w: np.ndarray) -> np.ndarray:
    """Each output filter minus its mean over the fan-in: it ignores a constant input."""
    return w - w.reshape(w.shape[0], -1).mean(axis=1).reshape((-1,) + (1,) * (w.ndim - 1))


def _random_head(head: str, level: int, leaf: str, shape, rng) -> np.ndarray:
    per = HEAD_VALUES[head]
    out = np.zeros(shape, np.float32)
    for anchor in range(ANCHORS_PER_CELL):
        rows = slice(anchor * per, (anchor + 1) * per)
        active = (level, anchor) in FACE_BIAS
        if leaf == "weight":
            gain = (CLASS_GAIN_ON if active else CLASS_GAIN_OFF) if head == "ClassHead" else HEAD_GAIN
            out[rows] = _zero_sum(_normal(rng, (per,) + tuple(shape[1:]), gain / math.sqrt(shape[1])))
        elif head == "ClassHead":
            out[rows] = [0.0, FACE_BIAS[(level, anchor)] if active else OFF_FACE_BIAS]
        elif head == "LandmarkHead" and active:
            template = (np.array(FFHQ_TEMPLATE_512) - 256.0) / 512.0 * LANDMARK_FACE_SCALE / VARIANCES[0]
            out[rows] = template.reshape(-1).astype(np.float32)
    return out


def random_state_dict(module: RetinaFace, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic, well-conditioned random weights for ``module`` (any width), keys without ``module.``.

    Zero-sum conv filters (a frame's mean level does not move the face logits), ``body.conv1`` scaled for raw
    levels, eval BatchNorm near identity, and heads that make two anchor types (128 px every 16 px, 256 px
    every 32 px) score a few anchors of a face-like frame above 0.97 with landmarks laid out like a face, and
    none of a flat frame. Same seed, same bytes on any machine.
    """
    template = module.state_dict()
    norms = {k.rsplit(".", 1)[0] for k in template if k.endswith(".running_var")}
    out = {}
    for key, like in template.items():
        owner, _, leaf = key.rpartition(".")
        shape = tuple(like.shape)
        if not like.is_floating_point():                       # num_batches_tracked
            out[key] = torch.zeros(shape, dtype=like.dtype)
            continue
        rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(f"{RANDOM_STREAM_NAMESPACE}:{key}".encode())]))
        head = re.fullmatch(r"(ClassHead|BboxHead|LandmarkHead)\.(\d+)\.conv1x1", owner)
        if owner in norms:
            residual = re.fullmatch(r"body\.layer\d\.\d+\.bn3", owner) is not None
            if leaf == "weight":
                value = rng.uniform(*(RESIDUAL_GAMMA if residual else (0.8, 1.2)), shape).astype(np.float32)
            elif leaf == "running_var":
                value = rng.uniform(0.8, 1.25, shape).astype(np.float32)
            else:                                               # bias, running_mean
                value = _normal(rng, shape, 0.05)
        elif head:
            value = _random_head(head.group(1), int(head.group(2)), leaf, shape, rng)
        elif leaf == "bias":
            value = _normal(rng, shape, 0.02)
        else:
            gain = RELU_GAIN * (STEM_INPUT_SCALE if key == "body.conv1.weight" else 1.0)
            value = _zero_sum(_normal(rng, shape, gain / math.sqrt(int(np.prod(shape[1:])))))
        out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out
