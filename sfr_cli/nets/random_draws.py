"""Seeded random draws for test weights: one numpy PCG64 stream per tensor, keyed by ``(seed,
crc32(name))``, so a tensor's values depend only on the seed and its name (never on which other tensors
exist or in what order they are drawn), and are the same on every machine.

The enhancer nets' ``random_state_dict`` use these with the names the reference script
(``make_enhancer_checkpoints.py``) uses, ``"<file name>:<key>"``, so a full-size net gets that script's values.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, Sequence

import torch

# LeakyReLU(0.2)'s gain: activations keep their scale through conv + LeakyReLU with N(0, gain^2 / fan_in)
LEAKY_RELU_GAIN = math.sqrt(2.0 / (1 + 0.2 ** 2))


def stream(seed: int, name: str):
    """The numpy ``Generator`` (PCG64) of tensor ``name`` under ``seed``."""
    import numpy as np

    return np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))


def normal(rng, shape: Sequence[int], std: float) -> torch.Tensor:
    """``N(0, std^2)`` float32, drawn as float32 standard normals times float32 ``std``."""
    import numpy as np

    return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(std))


def uniform(rng, shape: Sequence[int], low: float, high: float) -> torch.Tensor:
    """``U(low, high)`` drawn in float64, stored as float32."""
    import numpy as np

    return torch.from_numpy(rng.uniform(low, high, tuple(shape)).astype(np.float32))


def fan_in(shape: Sequence[int]) -> int:
    """Inputs per output unit: ``in x kernel area`` for a conv or linear weight, the length of a vector."""
    return math.prod(shape[1:]) if len(shape) > 1 else int(shape[0])


def batch_norm_tensor(rng, leaf: str, shape: Sequence[int], gamma_range=(0.8, 1.2)) -> torch.Tensor:
    """An eval-mode BatchNorm tensor: weight ``U(gamma_range)``, bias and running_mean ``N(0, 0.05^2)``,
    running_var ``U(0.8, 1.25)``."""
    if leaf == "weight":
        return uniform(rng, shape, *gamma_range)
    if leaf in ("bias", "running_mean"):
        return normal(rng, shape, 0.05)
    if leaf == "running_var":
        return uniform(rng, shape, 0.8, 1.25)
    raise KeyError(f"not a BatchNorm tensor: {leaf}")


def zero_sum(weight: torch.Tensor) -> torch.Tensor:
    """Each output unit's filter minus its mean over the fan-in (a constant input then gives just the
    bias), in float32 numpy arithmetic as the reference script."""
    array = weight.numpy()
    mean = array.reshape(array.shape[0], -1).mean(axis=1).reshape((-1,) + (1,) * (array.ndim - 1))
    return torch.from_numpy(array - mean)


def draw_state_dict(net: torch.nn.Module, seed: int, file_name: str,
                    draw_tensor: Callable[[str, tuple, object], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``net``'s state dict of random float32 tensors: each key's ``draw_tensor(key, shape, rng)`` from its own
    stream ``"<file_name>:<key>"`` under ``seed`` (the reference script's naming), checked against the
    module's shape."""
    out = {}
    for key, like in net.state_dict().items():
        tensor = draw_tensor(key, tuple(like.shape), stream(seed, f"{file_name}:{key}")).contiguous()
        if tuple(tensor.shape) != tuple(like.shape):
            raise AssertionError(f"{key}: drew {tuple(tensor.shape)}, module has {tuple(like.shape)}")
        out[key] = tensor
    return out
