"""Model configs: SadTalker's face-render YAML (``model_params``) read into frozen dataclasses.

SadTalker's own ``facerender.yaml`` and ``facerender_still.yaml`` load unchanged. Keys sfr does not
know are rejected, so a typo never silently falls back to a default. sfr adds one optional block,
``generator_params.decoder_params``, that sizes the SPADE decoder (SadTalker hard-codes it); its
defaults are SadTalker's values, which is what lets ``configs/tiny.yaml`` shrink the whole model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import yaml

from .errors import ConfigError
from .modes import CROP_COEFFS, DEFAULT_MODE, FULL_COEFFS, get_mode

# The built-in configs: inside the package in a wheel or any non-editable install (setup.py ships the
# top-level configs/ there), else the source tree's configs/ (a checkout, an editable install).
PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = PACKAGED_CONFIG_DIR if PACKAGED_CONFIG_DIR.is_dir() else Path(__file__).resolve().parent.parent / "configs"
BUILTIN_CONFIGS = ("facerender", "tiny")  # families: NAME.yaml (70 coefficients) and NAME_still.yaml (73)
DEFAULT_CONFIG = "facerender"
# Sections of facevid2vid-style training configs that say nothing about the model's shape: accepted so
# such a file loads unchanged, and ignored. Any other unknown key is an error.
TRAINING_SECTIONS = ("dataset_params", "train_params", "visualizer_params")


@dataclass(frozen=True)
class CommonParams:
    num_kp: int
    image_channel: int
    feature_channel: int
    estimate_jacobian: bool = False


@dataclass(frozen=True)
class KpDetectorParams:
    temperature: float
    block_expansion: int
    max_features: int
    scale_factor: float
    num_blocks: int
    reshape_channel: int
    reshape_depth: int


@dataclass(frozen=True)
class HeEstimatorParams:
    """Kept for SadTalker's YAML; the head-pose estimator is not needed to render from coefficients."""

    block_expansion: int
    max_features: int
    num_bins: int = 66


@dataclass(frozen=True)
class DenseMotionParams:
    block_expansion: int
    max_features: int
    num_blocks: int
    reshape_depth: int
    compress: int


@dataclass(frozen=True)
class DecoderParams:
    """SPADE decoder widths (sfr's addition; SadTalker fixes 64 output and 128 hidden channels)."""

    out_channels: int = 64
    spade_hidden: int = 128


@dataclass(frozen=True)
class GeneratorParams:
    block_expansion: int
    max_features: int
    num_down_blocks: int
    reshape_channel: int
    reshape_depth: int
    num_resblocks: int
    estimate_occlusion_map: bool
    dense_motion_params: DenseMotionParams
    decoder_params: DecoderParams = DecoderParams()


@dataclass(frozen=True)
class MappingParams:
    coeff_nc: int
    descriptor_nc: int
    layer: int
    num_kp: int
    num_bins: int


@dataclass(frozen=True)
class ModelConfig:
    common: CommonParams
    kp_detector: KpDetectorParams
    he_estimator: Optional[HeEstimatorParams]
    generator: GeneratorParams
    mapping: MappingParams
    path: Optional[Path] = None

    @property
    def name(self) -> str:
        return self.path.name if self.path else "<config>"


def config_path(name_or_path: Optional[str] = None, preprocess: str = DEFAULT_MODE) -> Path:
    """The YAML file for `--config`: a built-in family name (facerender, tiny) gives NAME.yaml, or its
    73-coefficient NAME_still.yaml sibling for full/extfull (as SadTalker picks facerender_still.yaml);
    another built-in name (e.g. tiny_still) or a path is taken as given. None means facerender.
    Raises ConfigError for a bare name that is neither built in nor a file."""
    value = name_or_path or DEFAULT_CONFIG
    bare_name = "/" not in value and os.sep not in value and not value.endswith((".yaml", ".yml"))
    if value in BUILTIN_CONFIGS:
        return CONFIG_DIR / f"{value}{get_mode(preprocess).config_suffix}.yaml"
    if bare_name and (CONFIG_DIR / f"{value}.yaml").is_file():
        return CONFIG_DIR / f"{value}.yaml"
    if bare_name and not Path(value).exists():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"{value}: no such built-in config or config file; built-in names are {names}, "
                          "or pass a YAML path")
    return Path(value)


def resolve_config(name_or_path: Optional[str], preprocess: str) -> ModelConfig:
    """Load the config for `preprocess` (see `config_path`); its mapping net must take the mode's
    coefficient count (70 crop/resize/extcrop, 73 full/extfull). Raises ConfigError."""
    path = config_path(name_or_path, preprocess)
    config = load_config(path)
    wanted = get_mode(preprocess).coeff_count
    if config.mapping.coeff_nc != wanted:
        fits = "a 73-coefficient config such as facerender_still" if wanted == 73 else "a 70-coefficient config"
        raise ConfigError(f"{path}: mapping_params.coeff_nc is {config.mapping.coeff_nc} but --preprocess "
                          f"{preprocess} needs {wanted}; use {fits}, or the mode that fits this config")
    return config


def config_pair(config: ModelConfig) -> Tuple[ModelConfig, ModelConfig]:
    """(70-coefficient, 73-coefficient) configs differing only in the mapping net's input, for writing both
    of SadTalker's mapping files from one config."""
    return (replace(config, mapping=replace(config.mapping, coeff_nc=CROP_COEFFS)),
            replace(config, mapping=replace(config.mapping, coeff_nc=FULL_COEFFS)))


def load_config(path) -> ModelConfig:
    """Read a face-render YAML file; raise ConfigError naming the file and key for anything wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, path)


def parse_config(data: Any, path: Optional[Path] = None) -> ModelConfig:
    """Build a ModelConfig from the parsed YAML mapping (``{"model_params": {...}}``)."""
    where = str(path) if path else "config"
    top = _mapping(data, where, "the top level")
    _reject_unknown(top, {"model_params", *TRAINING_SECTIONS}, where, "")
    params = _mapping(top.get("model_params"), where, "model_params")
    known = {"common_params", "kp_detector_params", "he_estimator_params", "generator_params",
             "discriminator_params", "mapping_params"}
    _reject_unknown(params, known, where, "model_params.")

    common = _build(CommonParams, params, "common_params", where)
    kp = _build(KpDetectorParams, params, "kp_detector_params", where)
    he = _build(HeEstimatorParams, params, "he_estimator_params", where) if "he_estimator_params" in params else None
    gen_raw = dict(_mapping(params.get("generator_params"), where, "model_params.generator_params"))
    dense = _build(DenseMotionParams, gen_raw, "dense_motion_params", where, "model_params.generator_params.")
    decoder = (_build(DecoderParams, gen_raw, "decoder_params", where, "model_params.generator_params.")
               if "decoder_params" in gen_raw else DecoderParams())
    gen_raw["dense_motion_params"] = dense
    gen_raw["decoder_params"] = decoder
    generator = _build(GeneratorParams, {"generator_params": gen_raw}, "generator_params", where)
    mapping = _build(MappingParams, params, "mapping_params", where)
    config = ModelConfig(common, kp, he, generator, mapping, path)
    _check_consistency(config, where)
    return config


def _mapping(value: Any, where: str, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {what} must be a mapping of keys to values")
    return value


def _reject_unknown(section: Mapping, known, where: str, prefix: str) -> None:
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key {prefix}{unknown[0]}; known keys here are "
                          f"{', '.join(sorted(known))}")


def _build(cls, parent: Mapping, key: str, where: str, prefix: str = "model_params."):
    section = _mapping(parent.get(key), where, f"{prefix}{key}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(section, fields, where, f"{prefix}{key}.")
    values = {}
    for name, field in fields.items():
        if name not in section:
            if field.default is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing key {prefix}{key}.{name}")
            continue
        value = section[name]
        expected = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: {prefix}{key}.{name} must be a whole number, not {value!r}")
        if expected == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: {prefix}{key}.{name} must be a number, not {value!r}")
        if expected == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}: {prefix}{key}.{name} must be true or false, not {value!r}")
        if expected in ("int", "float") and value <= 0:
            raise ConfigError(f"{where}: {prefix}{key}.{name} must be positive, not {value!r}")
        values[name] = float(value) if expected == "float" else value
    return cls(**values)


def _check_consistency(config: ModelConfig, where: str) -> None:
    """The shape rules the networks rely on, said in the config's own terms."""
    common, kp, gen, mapping = config.common, config.kp_detector, config.generator, config.mapping
    if common.estimate_jacobian:
        raise ConfigError(f"{where}: common_params.estimate_jacobian: true is not supported; "
                          "SadTalker's face renderer is trained without keypoint jacobians")
    if common.image_channel != 3:
        raise ConfigError(f"{where}: common_params.image_channel must be 3 (RGB)")
    if mapping.num_kp != common.num_kp:
        raise ConfigError(f"{where}: mapping_params.num_kp ({mapping.num_kp}) differs from "
                          f"common_params.num_kp ({common.num_kp})")
    if mapping.coeff_nc not in (CROP_COEFFS, FULL_COEFFS):
        raise ConfigError(f"{where}: mapping_params.coeff_nc is {mapping.coeff_nc}; SadTalker's mapping "
                          "nets take 70 (crop) or 73 (full) coefficients")
    if mapping.layer > 3:
        raise ConfigError(f"{where}: mapping_params.layer must be at most 3 (each layer shortens the "
                          "27-frame window by 6)")
    kp_top = min(kp.max_features, kp.block_expansion * 2 ** kp.num_blocks)
    if kp.reshape_channel != kp_top * kp.reshape_depth:
        raise ConfigError(f"{where}: kp_detector_params.reshape_channel must be {kp_top * kp.reshape_depth} "
                          f"(top features {kp_top} x reshape_depth {kp.reshape_depth})")
    if gen.reshape_channel * gen.reshape_depth != gen.max_features:
        raise ConfigError(f"{where}: generator_params.reshape_channel x reshape_depth must equal "
                          f"max_features ({gen.max_features})")
    if gen.reshape_channel != common.feature_channel:
        raise ConfigError(f"{where}: generator_params.reshape_channel ({gen.reshape_channel}) must equal "
                          f"common_params.feature_channel ({common.feature_channel})")
    if gen.dense_motion_params.reshape_depth != gen.reshape_depth:
        raise ConfigError(f"{where}: dense_motion_params.reshape_depth must equal generator_params.reshape_depth")
    if not 0 < kp.scale_factor <= 1:
        raise ConfigError(f"{where}: kp_detector_params.scale_factor must be in (0, 1]")
