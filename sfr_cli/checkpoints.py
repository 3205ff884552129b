"""SadTalker's checkpoint files: finding them, loading them safely and strictly, writing random ones.

Two on-disk layouts hold the renderer (keypoint detector + generator, and SadTalker's head-pose
estimator, which sfr does not need):

- ``SadTalker_V0.0.2_<size>.safetensors``: flat keys prefixed ``kp_extractor.``, ``generator.``,
  ``he_estimator.``, beside other SadTalker sub-models' keys (ignored);
- ``facevid2vid_00189-model.pth.tar``: a torch pickle of ``{"generator": sd, "kp_detector": sd,
  "he_estimator": sd, "epoch": ..., "optimizer_*": ...}``.

The mapping net is always a torch pickle ``{"mapping": sd, ...}``: ``mapping_00229-model.pth.tar`` takes
70 coefficients (crop, resize, extcrop), ``mapping_00109-model.pth.tar`` 73 (full, extfull).

Pickles are read with ``torch.load(weights_only=True)`` and nothing else: a file that needs arbitrary
objects to load is refused, never run.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError, SfrError
from .modes import MAPPING_CROP, MAPPING_FULL, describe_coeff_count, get_mode
from .outputs import atomic_path
from .nets.generator import OcclusionAwareSPADEGenerator
from .nets.he_estimator import HEEstimator
from .nets.keypoint_detector import KPDetector
from .nets.mapping import MappingNet

RENDERER_PTH = "facevid2vid_00189-model.pth.tar"
CHECKPOINT_DIR_ENV = "SFR_CHECKPOINT_DIR"
SAFETENSORS_PREFIXES = {"kp_detector": "kp_extractor.", "generator": "generator.", "he_estimator": "he_estimator."}


def renderer_safetensors_name(size_px: int) -> str:
    return f"SadTalker_V0.0.2_{size_px}.safetensors"


@dataclass
class Networks:
    """The renderer's modules, in eval mode, on the CPU (an engine renders from its own copies)."""

    kp_detector: KPDetector
    generator: OcclusionAwareSPADEGenerator
    mapping: MappingNet
    he_estimator: Optional[HEEstimator] = None


@dataclass(frozen=True)
class CheckpointFiles:
    renderer: Path
    mapping: Path

    @property
    def layout(self) -> str:
        return "safetensors" if self.renderer.suffix == ".safetensors" else "pth"


def build_networks(config: ModelConfig, with_he_estimator: bool = False) -> Networks:
    """Modules shaped by ``config`` with untrained weights (no I/O)."""
    common, kp, gen = config.common, config.kp_detector, config.generator
    kp_detector = KPDetector(block_expansion=kp.block_expansion, feature_channel=common.feature_channel,
                             num_kp=common.num_kp, image_channel=common.image_channel,
                             max_features=kp.max_features, reshape_channel=kp.reshape_channel,
                             reshape_depth=kp.reshape_depth, num_blocks=kp.num_blocks,
                             temperature=kp.temperature, scale_factor=kp.scale_factor)
    dense = gen.dense_motion_params
    generator = OcclusionAwareSPADEGenerator(
        image_channel=common.image_channel, feature_channel=common.feature_channel, num_kp=common.num_kp,
        block_expansion=gen.block_expansion, max_features=gen.max_features, num_down_blocks=gen.num_down_blocks,
        reshape_channel=gen.reshape_channel, reshape_depth=gen.reshape_depth, num_resblocks=gen.num_resblocks,
        estimate_occlusion_map=gen.estimate_occlusion_map,
        dense_motion_params=dict(block_expansion=dense.block_expansion, num_blocks=dense.num_blocks,
                                 max_features=dense.max_features, reshape_depth=dense.reshape_depth,
                                 compress=dense.compress),
        decoder_out_channels=gen.decoder_params.out_channels, decoder_hidden=gen.decoder_params.spade_hidden)
    m = config.mapping
    mapping = MappingNet(coeff_nc=m.coeff_nc, descriptor_nc=m.descriptor_nc, layer=m.layer,
                         num_kp=m.num_kp, num_bins=m.num_bins)
    he = None
    if with_he_estimator and config.he_estimator is not None:
        h = config.he_estimator
        he = HEEstimator(block_expansion=h.block_expansion, image_channel=common.image_channel,
                         max_features=h.max_features, num_bins=h.num_bins, num_kp=common.num_kp)
    nets = Networks(kp_detector, generator, mapping, he)
    for module in _modules(nets):
        module.eval().requires_grad_(False)
    return nets


def _modules(nets: Networks) -> Iterable[nn.Module]:
    return [m for m in (nets.kp_detector, nets.generator, nets.mapping, nets.he_estimator) if m is not None]


def default_checkpoint_dir() -> Path:
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or "checkpoints")


def find_checkpoints(checkpoint_dir=None, *, size_px: int = 256, preprocess: str = "crop",
                     checkpoint=None, mapping=None) -> CheckpointFiles:
    """Resolve files as SadTalker does: the safetensors file for ``size_px`` when present, else the
    ``.pth.tar`` renderer; the mapping file by mode. Explicit ``checkpoint``/``mapping`` override."""
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir()
    needs_dir = checkpoint is None or mapping is None
    if needs_dir and not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found; pass --checkpoint-dir with SadTalker's "
                              f"checkpoints folder (or set {CHECKPOINT_DIR_ENV}), or write random weights with "
                              "`sfr checkpoints random DIR`")
    if checkpoint is not None:
        renderer = Path(checkpoint)
    else:
        safetensors_file = directory / renderer_safetensors_name(size_px)
        renderer = safetensors_file if safetensors_file.is_file() else directory / RENDERER_PTH
        if not renderer.is_file():
            raise CheckpointError(f"{directory}: holds neither {safetensors_file.name} nor {RENDERER_PTH}; "
                                  "download SadTalker's checkpoints into it or pass --checkpoint FILE")
    mapping_file = Path(mapping) if mapping is not None else directory / get_mode(preprocess).mapping_file
    for path in (renderer, mapping_file):
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
    return CheckpointFiles(renderer, mapping_file)


def read_state_dicts(path, parts: Iterable[str] = ("generator", "kp_detector", "he_estimator", "mapping")
                     ) -> Dict[str, Dict[str, torch.Tensor]]:
    """Read one checkpoint file into ``{part: state_dict}`` without running any code from it.

    Parts found: ``generator``, ``kp_detector``, ``he_estimator`` (renderer files) or ``mapping``;
    a safetensors file is read for the asked ``parts`` only.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, parts)
    data = _torch_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not SadTalker's dict of state dicts")
    parts = {k: v for k, v in data.items() if k in ("generator", "kp_detector", "he_estimator", "mapping")}
    if not parts:
        raise CheckpointError(f"{path}: no generator, kp_detector or mapping state dict inside "
                              f"(top-level keys: {', '.join(map(str, list(data)[:8]))})")
    for part, sd in parts.items():
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: '{part}' is not a state dict of tensors")
    return parts


def _torch_load(path: Path, accepted: Optional[str] = None):
    try:
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False, which a CLI user cannot and must not act on.
        raise CheckpointError(f"{path}: holds pickled objects other than tensors, code or objects that sfr will "
                              "not run; sfr never runs code from a checkpoint file. It accepts "
                              + (accepted or f"SadTalker's {renderer_safetensors_name(256)} / _512.safetensors, "
                                 f"{RENDERER_PTH}, {MAPPING_CROP} and {MAPPING_FULL}")
                              + ", or any file holding only tensors (safetensors, or torch.save of state dicts)") from exc
    except PermissionError as exc:
        raise CheckpointError(permission_denied(path)) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint, it looks truncated or corrupt "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                              "download it again") from exc


def permission_denied(path) -> str:
    """The message for a weights file this process may not read (not a corrupt one: no download helps)."""
    return f"{path}: permission denied; give sfr read access to it (chmod a+r), or copy it where sfr can read it"


def _read_safetensors(path: Path, parts: Iterable[str]) -> Dict[str, Dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    out: Dict[str, Dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            keys = list(file.keys())
            present = {part for part, prefix in SAFETENSORS_PREFIXES.items() if any(k.startswith(prefix) for k in keys)}
            if not {"generator", "kp_detector"} <= present:
                raise CheckpointError(f"{path}: no keys starting with 'generator.' and 'kp_extractor.'; "
                                      "this is not SadTalker's face-render safetensors file")
            for part in present & set(parts):
                prefix = SAFETENSORS_PREFIXES[part]
                out[part] = {k[len(prefix):]: file.get_tensor(k) for k in keys if k.startswith(prefix)}
    except PermissionError as exc:
        raise CheckpointError(permission_denied(path)) from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read as safetensors, it looks truncated or corrupt "
                              f"({exc}); download it again") from exc
    return out


def check_state_dict(module: nn.Module, state_dict: Dict[str, torch.Tensor], where: str, config_name: str) -> None:
    """Raise CheckpointError unless ``state_dict`` has exactly ``module``'s keys and shapes."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    for key, tensor in expected.items():
        if key in state_dict and tensor.dim() == 0 and tuple(state_dict[key].shape) == (1,):
            continue  # a scalar saved as a 1-element tensor (old torch; torch itself accepts it)
        if key in state_dict and tuple(state_dict[key].shape) != tuple(tensor.shape):
            found = list(state_dict[key].shape)
            hint = ""
            if key == "first.0.weight" and len(found) == 3 and found[1] in (70, 73):
                hint = (f"; this mapping net takes {found[1]} coefficients "
                        f"({describe_coeff_count(found[1])} mode), "
                        f"the config takes {tensor.shape[1]}: use the matching --preprocess or --mapping file")
            else:
                hint = _other_config_hint(module, state_dict, config_name)
            raise CheckpointError(f"{where}: {key} has shape {found} but {config_name} expects "
                                  f"{list(tensor.shape)}{hint}")
        if key in state_dict and state_dict[key].is_floating_point() != tensor.is_floating_point():
            raise CheckpointError(f"{where}: {key} has dtype {state_dict[key].dtype}, expected {tensor.dtype}")
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} key(s) that {config_name} needs, first "
                              f"'{missing[0]}'; is this a checkpoint for this model?")
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} key(s) that {config_name} does not have, first "
                              f"'{unexpected[0]}'; is this a checkpoint for this model?")


def _other_config_hint(module: nn.Module, state_dict: Dict[str, torch.Tensor], config_name: str) -> str:
    """"; these are weights of the tiny config: pass --config tiny" when every shape of `state_dict` fits
    the same part of another built-in config (built on the meta device: no memory, no I/O), else the
    general question. For a shape mismatch only; none for the enhancer's files (no --config reaches them:
    its own check names the other --enhancer)."""
    if config_name.endswith(" enhancer"):
        return ""
    from .config import BUILTIN_CONFIGS, config_path, load_config

    for family in BUILTIN_CONFIGS:
        for name in (family, f"{family}_still"):
            if name == Path(config_name).stem:
                continue
            try:
                with torch.device("meta"):
                    nets = build_networks(load_config(config_path(name)), with_he_estimator=True)
            except SfrError:
                continue
            part = next((m for m in vars(nets).values() if type(m) is type(module)), None)
            expected = part.state_dict() if part is not None else {}
            if expected and expected.keys() == state_dict.keys() and all(
                    tuple(state_dict[k].shape) == tuple(t.shape) or (t.dim() == 0 and state_dict[k].numel() == 1)
                    for k, t in expected.items()):
                return f"; these are weights of the {family} config: pass --config {family}"
    return "; weights made for another config? pass the --config they were made with (facerender, tiny or a YAML)"


def load_networks(config: ModelConfig, files: CheckpointFiles) -> Networks:
    """Build the networks for ``config`` and fill them from ``files``, strictly.

    The modules are built on the meta device and take the loaded tensors as they are (``assign``):
    no random initialisation to throw away, and no copy of memory-mapped weights.
    """
    with torch.device("meta"):
        nets = build_networks(config)
    renderer = read_state_dicts(files.renderer, parts=("generator", "kp_detector"))
    for part in ("generator", "kp_detector"):
        if part not in renderer:
            raise CheckpointError(f"{files.renderer}: no '{part}' state dict inside")
        _load_into(getattr(nets, part), renderer[part], f"{files.renderer} [{part}]", config.name)
    mapping = read_state_dicts(files.mapping)
    if "mapping" not in mapping:
        raise CheckpointError(f"{files.mapping}: no 'mapping' state dict inside; is this a mapping file?")
    _load_into(nets.mapping, mapping["mapping"], f"{files.mapping}", config.name)
    return nets


def _load_into(module: nn.Module, state_dict, where: str, config_name: str) -> None:
    check_state_dict(module, state_dict, where, config_name)
    tensors = {}
    for key, tensor in state_dict.items():
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{where}: {key} holds NaN or infinite values; the file is damaged")
            tensor = tensor.float()  # a half-precision file renders in fp32 like the rest
        tensors[key] = tensor
    module.load_state_dict(tensors, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------------
# Random weights: deterministic, well-conditioned stand-ins in SadTalker's layout (CI, demos, benches).

# Scales that keep random weights out of saturation: peaked keypoint heatmaps, head-pose logits with some
# spread, a mask and occlusion that vary, small SPADE modulation and a final sigmoid in its linear range.
RANDOM_GAINS = {
    "kp_detector.kp.weight": 40.0,
    "mapping.fc_yaw.weight": 3.0,
    "mapping.fc_pitch.weight": 3.0,
    "mapping.fc_roll.weight": 3.0,
    "generator.decoder.conv_img.weight": 2.5,
    "generator.dense_motion_network.mask.weight": 30.0,
    "generator.dense_motion_network.occlusion.weight": 10.0,
}
RANDOM_SPADE_MODULATION = 0.1


def random_state_dict(module: nn.Module, prefix: str, seed: int) -> Dict[str, torch.Tensor]:
    """Random tensors for ``module``'s state dict; each one from its own stream keyed by ``seed`` and name."""
    out: Dict[str, torch.Tensor] = {}
    template = module.state_dict()
    for key, like in template.items():
        name = prefix + key
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        owner, _, leaf = key.rpartition(".")
        own = owner + "." if owner else ""
        is_norm = (own + "running_mean") in template
        shape = like.shape
        if not like.is_floating_point():
            value = torch.zeros(shape, dtype=like.dtype)
        elif leaf == "running_mean" or (is_norm and leaf == "bias"):
            value = torch.randn(shape, generator=gen) * 0.05
        elif leaf == "running_var":
            value = torch.empty(shape).uniform_(0.8, 1.25, generator=gen)
        elif is_norm and leaf == "weight":
            value = torch.empty(shape).uniform_(0.8, 1.2, generator=gen)
        elif leaf in ("weight_u", "weight_v") or (leaf == "weight" and key.endswith("down.weight")):
            continue  # derived below / kept from the module (the fixed anti-aliasing kernel)
        else:
            weight_key = own + ("weight" if own + "weight" in template else "weight_orig")
            fan_in = math.prod(template[weight_key].shape[1:]) if len(shape) == 1 else math.prod(shape[1:])
            # The keypoint detector's ReLU hourglass loses its signal at small widths (tiny.yaml) with
            # 1/sqrt(fan_in) weights, and flat heatmaps put every keypoint at the centre: He-uniform there.
            he = prefix == "kp_detector." and len(shape) > 1
            bound = math.sqrt((6 if he else 1) / max(fan_in, 1))
            value = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        if name in RANDOM_GAINS:
            value = value * RANDOM_GAINS[name]
        if ".decoder." in name and (".mlp_gamma." in name or ".mlp_beta." in name):
            value = value * RANDOM_SPADE_MODULATION if leaf == "weight" else torch.zeros_like(value)
        out[key] = value.contiguous()
    for key, like in template.items():
        if key not in out and key.endswith("down.weight"):
            out[key] = like.clone()
        if key.endswith(".weight_orig"):
            base = key[: -len("_orig")]
            matrix = out[key].reshape(out[key].shape[0], -1).double()
            u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
            out[base + "_u"] = u[:, 0].float().contiguous()
            out[base + "_v"] = vh[0].float().contiguous()
    return {k: out[k] for k in template}


def random_checkpoint_paths(out_dir, *, layout: str = "pth", size_px: int = 256) -> List[Path]:
    """The files `write_random_checkpoints` writes into `out_dir`: both mapping files, then the renderer."""
    if layout not in ("pth", "safetensors"):
        raise CheckpointError(f"unknown checkpoint layout {layout!r}; use pth or safetensors")
    renderer = renderer_safetensors_name(size_px) if layout == "safetensors" else RENDERER_PTH
    return [Path(out_dir) / name for name in (MAPPING_CROP, MAPPING_FULL, renderer)]


def write_random_checkpoints(out_dir, config_70: ModelConfig, config_73: ModelConfig, *, layout: str = "pth",
                             seed: int = 0, size_px: int = 256) -> CheckpointFiles:
    """Write random weights under SadTalker's file names: the renderer in ``layout`` and both mapping
    files (70 and 73 coefficients). Returns the files a crop-mode render would use."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nets = build_networks(config_70, with_he_estimator=True)
    parts = {"generator": random_state_dict(nets.generator, "generator.", seed),
             "kp_detector": random_state_dict(nets.kp_detector, "kp_detector.", seed)}
    if nets.he_estimator is not None:
        parts["he_estimator"] = random_state_dict(nets.he_estimator, "he_estimator.", seed)
    for name, config, offset in ((MAPPING_CROP, config_70, 0), (MAPPING_FULL, config_73, 1)):
        mapping = build_networks(config).mapping
        _atomic_save(out_dir / name, lambda p, m=mapping, o=offset: torch.save(
            {"mapping": random_state_dict(m, "mapping.", seed + o), "epoch": 0}, p))
    if layout == "safetensors":
        flat = {SAFETENSORS_PREFIXES[part] + k: v for part, sd in parts.items() for k, v in sd.items()}
        renderer = out_dir / renderer_safetensors_name(size_px)
        _atomic_save(renderer, lambda p: save_file(flat, str(p)))
    elif layout == "pth":
        renderer = out_dir / RENDERER_PTH
        _atomic_save(renderer, lambda p: torch.save({**parts, "epoch": 0}, p))
    else:
        raise CheckpointError(f"unknown checkpoint layout {layout!r}; use pth or safetensors")
    return CheckpointFiles(renderer, out_dir / MAPPING_CROP)


def _atomic_save(path: Path, save) -> None:
    with atomic_path(path) as temporary:
        save(temporary)


# ---------------------------------------------------------------------------------------------------
# For the frame stages' weights (each stage module keeps its own files' rules and uses these)


def read_weights_file(path: Path, accepted: str):
    """What a torch file holds, memory-mapped, tensors only (a file needing code is refused, never run);
    CheckpointError naming `accepted` (the files sfr takes there) or the damage."""
    return _torch_load(path, accepted)


def load_into(module: nn.Module, state_dict, where: str, model_name: str) -> None:
    """Fill `module` from `state_dict` strictly: keys, shapes, dtypes (`check_state_dict`), finite values."""
    _load_into(module, state_dict, where, model_name)


def save_atomically(path: Path, save: Callable[[Path], None]) -> None:
    """`save(temporary)` then the temporary renamed to `path`: never a half-written weights file."""
    _atomic_save(path, save)
