"""The weight files of the enhancer's optional nets: RestoreFormer (SadTalker's `--enhancer RestoreFormer`)
and Real-ESRGAN x2plus (`--background_enhancer realesrgan`). Finding, checking, loading, random writing.

| variant | file | module |
|---|---|---|
| `restoreformer` | `RestoreFormer.pth` | `RestoreFormer()` (gfpgan's defaults) |
| `restoreformer-tiny` | `RestoreFormer.pth` | the same at test widths |
| `realesrgan` | `RealESRGAN_x2plus.pth` | `RRDBNet(3, 3, num_feat=64, num_block=23, num_grow_ch=32, scale=2)` |
| `realesrgan-tiny` | `RealESRGAN_x2plus.pth` | the same at test widths |

Both files are `torch.save({'params_ema': state_dict})`; the upstream loaders take `params_ema`, else
`params`, strictly, and so does sfr. Files are read with `torch.load(weights_only=True)` (memory-mapped):
no code in a file runs. `check_weights` compares every key, shape and kind of dtype with the net built on
the meta device (no memory, no init) before any model loads, and says what a wrong file is (the other
variant's, the other net's, truncated, foreign).

Random weights follow `../shared/reference/make_enhancer_checkpoints.py`'s recipe (its `--help`), each
tensor from its own stream keyed by `(seed, "<file>:<key>")`; the full-size variants get that script's
values.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import torch
from torch import nn

from .errors import CheckpointError
from .nets import random_draws as draws

RESTOREFORMER_FILE = "RestoreFormer.pth"
REALESRGAN_FILE = "RealESRGAN_x2plus.pth"
CHECKPOINT_WRAPPERS = ("params_ema", "params")  # GFPGANer's and RealESRGANer's rule: params_ema, else params


@dataclass(frozen=True)
class Variant:
    """One buildable net: its weights file name, the option that selects it, and how to build it."""

    name: str
    file_name: str
    option: str  # the CLI option that names it, for messages
    build: Callable[[], nn.Module]


def _restoreformer(tiny: bool) -> Callable[[], nn.Module]:
    def build():
        from .nets.restoreformer import RESTOREFORMER_CONFIG, TINY_RESTOREFORMER_CONFIG, RestoreFormer

        return RestoreFormer(**(TINY_RESTOREFORMER_CONFIG if tiny else RESTOREFORMER_CONFIG))
    return build


def _rrdbnet(tiny: bool) -> Callable[[], nn.Module]:
    def build():
        from .nets.rrdbnet import REALESRGAN_X2PLUS_CONFIG, TINY_RRDBNET_CONFIG, RRDBNet

        return RRDBNet(**(TINY_RRDBNET_CONFIG if tiny else REALESRGAN_X2PLUS_CONFIG))
    return build


VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("restoreformer", RESTOREFORMER_FILE, "--enhancer", _restoreformer(False)),
    Variant("restoreformer-tiny", RESTOREFORMER_FILE, "--enhancer", _restoreformer(True)),
    Variant("realesrgan", REALESRGAN_FILE, "--background-enhancer", _rrdbnet(False)),
    Variant("realesrgan-tiny", REALESRGAN_FILE, "--background-enhancer", _rrdbnet(True)),
)}


def variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise CheckpointError(f"unknown net {name!r}; use {', '.join(VARIANTS)}") from None


def build_net(name: str) -> nn.Module:
    """Variant `name`'s module with untrained weights, in eval mode, without gradients (no I/O). Under
    `with torch.device('meta')` it costs nothing."""
    return variant(name).build().eval().requires_grad_(False)


def find_weights(name: str, folders: Iterable) -> Path:
    """The first of `folders` holding variant `name`'s file; a CheckpointError naming the file, the
    folders searched and what to do when none does."""
    spec = variant(name)
    folders = [Path(f) for f in folders]
    for folder in folders:
        if (folder / spec.file_name).is_file():
            return folder / spec.file_name
    raise CheckpointError(
        f"{spec.option} {name} needs {spec.file_name}; searched {', '.join(map(str, folders)) or 'no folder'}. "
        "Put it beside GFPGANv1.4.pth (SadTalker's gfpgan/weights) or pass --enhancer-dir DIR, or write random "
        "ones with `sfr checkpoints random DIR --enhancer`")


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The state dict inside `path`: its `params_ema`, else its `params` (a flat dict of tensors is taken as
    it is). Memory-mapped, `weights_only`. Raises CheckpointError for anything else."""
    from .checkpoints import _torch_load

    path = Path(path)
    data = _torch_load(path, f"{RESTOREFORMER_FILE} and {REALESRGAN_FILE} ({{'params_ema': state_dict}})")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    for wrapper in CHECKPOINT_WRAPPERS:
        if wrapper in data:
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        found = ", ".join(sorted(map(str, data))[:5]) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not a state dict of tensors under 'params_ema' or 'params' (found: "
                              f"{found or 'nothing'})")
    return dict(data)


def _mismatch(name: str, state_dict: Mapping[str, torch.Tensor]) -> str:
    """What keeps `state_dict` from loading strictly into variant `name`'s module (built on the meta
    device), or "" when it fits: a missing or extra key, a shape, a dtype other than floating point."""
    with torch.device("meta"):
        expected = build_net(name).state_dict()
    for key, like in expected.items():
        if key not in state_dict:
            count = sum(k not in state_dict for k in expected)
            return f"{count} of {name}'s {len(expected)} keys are missing, first '{key}'"
        found = state_dict[key]
        if tuple(found.shape) != tuple(like.shape):
            return f"{key} has shape {list(found.shape)} but {name} expects {list(like.shape)}"
        if not found.is_floating_point():
            return f"{key} has dtype {found.dtype}, {name} expects floating point ({like.dtype})"
    extra = [k for k in state_dict if k not in expected]
    if extra:
        return f"{len(extra)} key(s) that {name} does not have, first '{extra[0]}'"
    return ""


def _check_state_dict(name: str, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointError unless `state_dict` fits variant `name` exactly; name the variant it fits
    instead when one does."""
    problem = _mismatch(name, state_dict)
    if not problem:
        return
    spec = variant(name)
    for other in VARIANTS.values():
        if other.name != name and not _mismatch(other.name, state_dict):
            if other.file_name == spec.file_name:
                hint = f"these are weights of {other.name}: pass {other.option} {other.name}"
            else:
                hint = f"this file holds {other.file_name}'s weights ({other.name}), not {spec.file_name}'s"
            break
    else:
        hint = f"this is not {spec.file_name} as its release holds it: download it again, or pass its folder"
    raise CheckpointError(f"{path}: {problem}; {hint}")


def check_weights(name: str, path) -> None:
    """Every key, shape and dtype kind of `path` against variant `name`'s module built on the meta device;
    the file is memory-mapped, not loaded. Raises CheckpointError (missing, truncated, foreign, or another
    variant's file, which it names). A file that passed unchanged (path, size, mtime) is not read again."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); {variant(name).option} {name} "
                              f"needs {variant(name).file_name}") from exc
    _checked(name, os.path.abspath(path), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _checked(name: str, path: str, size: int, mtime_ns: int) -> None:
    """`check_weights` once per (variant, file as it is on disk); a failure is not kept."""
    _check_state_dict(name, read_state_dict(path), Path(path))


def load_net(name: str, path) -> nn.Module:
    """Variant `name`'s module filled from `path`, strictly (keys, shapes, finite values), float32, in eval
    mode without gradients, on the CPU (the file's tensors taken as they are: no random init thrown away)."""
    from .checkpoints import _load_into

    path = Path(path)
    state_dict = read_state_dict(path)
    _check_state_dict(name, state_dict, path)
    with torch.device("meta"):
        net = build_net(name)
    _load_into(net, state_dict, str(path), f"the {name} net")
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Random weights (make_enhancer_checkpoints.py's recipe)
# --------------------------------------------------------------------------------------------------
RRDB_CONV5_GAIN, RRDB_BODY_GAIN, RRDB_LAST_GAIN, RRDB_LAST_BIAS = 0.3, 0.015, 1.0, 0.5
SWISH_GAIN = 1.68  # 1 / sqrt(E[swish(x)^2]) for x ~ N(0, 1)
RF_RESIDUAL_GAIN, RF_OUT_GAIN = 0.5, 0.5
RF_Z0_GAIN, RF_Z0_BIAS = 10.0, 25.0  # latent channel 0 carries the code choice
RF_CODE_NORM, RF_DEAD_NORM = 20.0, 112.0  # two live codes +-20 along channel 0; the rest far away
BIAS_STD = 0.02


def _zero_sum(weight: torch.Tensor) -> torch.Tensor:
    """Each output unit's filter minus its mean over the fan-in (a constant input then gives just the
    bias), in float32 numpy arithmetic as the reference script."""
    array = weight.numpy()
    mean = array.reshape(array.shape[0], -1).mean(axis=1).reshape((-1,) + (1,) * (array.ndim - 1))
    return torch.from_numpy(array - mean)


def _rrdb_tensor(key: str, shape: Tuple[int, ...], rng) -> torch.Tensor:
    """Zero-sum filters, so a flat input gives a flat 0.5 output and the image's structure drives the
    rest; small dense-block and trunk gains so 23 RRDBs stay a mild change of their input."""
    if key.endswith(".bias"):
        return torch.full(shape, RRDB_LAST_BIAS) if key == "conv_last.bias" else draws.normal(rng, shape, BIAS_STD)
    if re.fullmatch(r"body\.\d+\.rdb\d\.conv[1-4]\.weight", key) or key in ("conv_up1.weight", "conv_up2.weight",
                                                                             "conv_hr.weight"):
        gain = draws.LEAKY_RELU_GAIN
    elif key.endswith(".conv5.weight"):
        gain = RRDB_CONV5_GAIN
    elif key == "conv_body.weight":
        gain = RRDB_BODY_GAIN
    elif key == "conv_last.weight":
        gain = RRDB_LAST_GAIN
    else:  # conv_first
        gain = 1.0
    return _zero_sum(draws.normal(rng, shape, gain / math.sqrt(draws.fan_in(shape))))


def _codebook(shape: Tuple[int, ...], rng) -> torch.Tensor:
    """Two live codes (+-RF_CODE_NORM along latent channel 0) and the others of norm RF_DEAD_NORM in
    channels 1.. only, which never win: each position's nearest code is a clear choice."""
    import numpy as np

    count, dim = shape
    out = np.zeros(shape, np.float32)
    out[0, 0], out[1, 0] = RF_CODE_NORM, -RF_CODE_NORM
    dead = rng.standard_normal((count - 2, dim - 1)).astype(np.float32)
    dead *= np.float32(RF_DEAD_NORM) / np.linalg.norm(dead, axis=1, keepdims=True).astype(np.float32)
    out[2:, 1:] = dead
    return torch.from_numpy(out)


def _restoreformer_tensor(key: str, shape: Tuple[int, ...], rng) -> torch.Tensor:
    """GroupNorm affine near identity; gains that keep activations at their scale through GroupNorm +
    swish and residual sums; `quant_conv` built so that latent channel 0 is 25 + an image-driven part."""
    owner, _, leaf = key.rpartition(".")
    if re.search(r"norm(1|2|_out)?$", owner):
        return draws.uniform(rng, shape, 0.8, 1.2) if leaf == "weight" else draws.normal(rng, shape, 0.05)
    if key == "quantize.embedding.weight":
        return _codebook(shape, rng)
    if leaf == "bias":
        out = draws.normal(rng, shape, BIAS_STD)
        if key == "quant_conv.bias":
            out[0] = RF_Z0_BIAS
        return out
    if key.endswith(".conv1.weight") or key == "encoder.conv_out.weight":
        gain = SWISH_GAIN  # after GroupNorm + swish
    elif key == "decoder.conv_out.weight":
        gain = RF_OUT_GAIN
    elif key.endswith(".conv2.weight"):
        gain = RF_RESIDUAL_GAIN * SWISH_GAIN
    elif key.endswith("proj_out.weight"):
        gain = RF_RESIDUAL_GAIN
    else:  # conv_in, q/k/v, shortcuts, up/downsampling, 1x1s
        gain = 1.0
    weight = draws.normal(rng, shape, gain / math.sqrt(draws.fan_in(shape)))
    if key == "quant_conv.weight":
        weight[0] *= RF_Z0_GAIN
    if key in ("encoder.conv_out.weight", "quant_conv.weight", "decoder.conv_out.weight"):
        weight = _zero_sum(weight)
    return weight


def random_state_dict(name: str, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic, well-conditioned random float32 weights for variant `name` (the reference script's
    values for the full-size variants). No I/O."""
    spec = variant(name)
    recipe = _restoreformer_tensor if spec.file_name == RESTOREFORMER_FILE else _rrdb_tensor
    with torch.device("meta"):
        expected = build_net(name).state_dict()
    out = {}
    for key, like in expected.items():
        tensor = recipe(key, tuple(like.shape), draws.stream(seed, f"{spec.file_name}:{key}"))
        if tuple(tensor.shape) != tuple(like.shape):
            raise AssertionError(f"{key}: drew {tuple(tensor.shape)}, the module has {tuple(like.shape)}")
        out[key] = tensor.contiguous()
    return out


def write_random_weights(out_dir, name: str, seed: int) -> Path:
    """Write variant `name`'s random weights as `{'params_ema': state_dict}` under its file name in `out_dir`
    (atomically: a temporary beside it, renamed when complete); returns the path."""
    from .outputs import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / variant(name).file_name
    state_dict = random_state_dict(name, seed)
    with atomic_path(path) as temporary:
        torch.save({"params_ema": state_dict}, temporary)
    return path


def variants_of(file_name: str) -> List[str]:
    """The variants whose weights live in `file_name`."""
    return [v.name for v in VARIANTS.values() if v.file_name == file_name]
