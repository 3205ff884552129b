"""SadTalker's preprocess modes, one row each: what every other module needs to know about a mode.

SadTalker crops the source face one of five ways before fitting 3DMM coefficients. The mode decides
how many coefficients a frame has (70, or 73 with the source's 3 crop parameters appended), which
config family and mapping net render them, and whether SadTalker pastes the rendered face back into
the full source image. Ask this table; never test a mode's name (``"full" in preprocess``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from .errors import ConfigError

CROP_COEFFS = 70  # 64 expression + 6 pose
FULL_COEFFS = 73  # CROP_COEFFS + the source's 3 crop parameters
COEFF_COUNTS = (CROP_COEFFS, FULL_COEFFS)
MAPPING_CROP = "mapping_00229-model.pth.tar"
MAPPING_FULL = "mapping_00109-model.pth.tar"
STILL_CONFIG_SUFFIX = "_still"  # facerender.yaml (70) / facerender_still.yaml (73)


@dataclass(frozen=True)
class Mode:
    """One of SadTalker's ``--preprocess`` modes.

    ``coeff_count``: columns per coefficient frame (70 or 73). ``config_suffix``: appended to a
    built-in config family name (``facerender`` -> ``facerender_still``). ``mapping_file``: the mapping
    net's file in SadTalker's checkpoints folder. ``pastes_back``: SadTalker pastes the rendered crop
    back into the full source image. ``extended_crop``: the crop is SadTalker's extended one, so the
    paste-back box is the crop box alone (``paste_pic(..., extended_crop=True)``).
    """

    name: str
    coeff_count: int
    config_suffix: str
    mapping_file: str
    pastes_back: bool
    extended_crop: bool


MODES: Dict[str, Mode] = {mode.name: mode for mode in (
    Mode("crop", CROP_COEFFS, "", MAPPING_CROP, pastes_back=False, extended_crop=False),
    Mode("resize", CROP_COEFFS, "", MAPPING_CROP, pastes_back=False, extended_crop=False),
    Mode("extcrop", CROP_COEFFS, "", MAPPING_CROP, pastes_back=False, extended_crop=True),
    Mode("full", FULL_COEFFS, STILL_CONFIG_SUFFIX, MAPPING_FULL, pastes_back=True, extended_crop=False),
    Mode("extfull", FULL_COEFFS, STILL_CONFIG_SUFFIX, MAPPING_FULL, pastes_back=True, extended_crop=True),
)}
MODE_NAMES: Tuple[str, ...] = tuple(MODES)  # in SadTalker's order, for click.Choice
DEFAULT_MODE = "crop"


class UnknownModeError(ConfigError, ValueError):
    """A preprocess name that is none of SadTalker's modes: a user's mistake (SfrError) when it comes from
    a command line or manifest, a ValueError to library callers."""


def get_mode(name: str) -> Mode:
    """The mode called ``name``; raises ConfigError naming the known modes for anything else."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise UnknownModeError(f"preprocess mode {name!r} is not one of {', '.join(MODE_NAMES)}") from None


def modes_taking(coeff_count: int) -> Tuple[Mode, ...]:
    """The modes whose coefficient frames have ``coeff_count`` columns (none for other counts)."""
    return tuple(mode for mode in MODES.values() if mode.coeff_count == coeff_count)


def describe_coeff_count(coeff_count: int) -> str:
    """``"crop/resize/extcrop"`` for 70, ``"full/extfull"`` for 73: the modes a mapping net serves."""
    return "/".join(mode.name for mode in modes_taking(coeff_count)) or f"no mode ({coeff_count} coefficients)"


def mode_for_coeff_count(coeff_count: int) -> Mode:
    """The first (default) mode taking ``coeff_count`` columns: crop for 70, full for 73."""
    found = modes_taking(coeff_count)
    if not found:
        raise ConfigError(f"{coeff_count} coefficients per frame: SadTalker's modes take "
                          f"{CROP_COEFFS} ({describe_coeff_count(CROP_COEFFS)}) or "
                          f"{FULL_COEFFS} ({describe_coeff_count(FULL_COEFFS)})")
    return found[0]
