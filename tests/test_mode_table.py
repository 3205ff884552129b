"""sfr_cli/modes.py: the one table of SadTalker's preprocess modes agrees with the configs, the
checkpoint names and the command line that use it."""

import pytest

from sfr_cli.checkpoints import find_checkpoints
from sfr_cli.cli import render
from sfr_cli.config import config_path, load_config, resolve_config
from sfr_cli.errors import ConfigError, SfrError
from sfr_cli.modes import MODE_NAMES, UnknownModeError, describe_coeff_count, get_mode, modes_taking


def test_sadtalkers_five_modes_in_its_order():
    assert MODE_NAMES == ("crop", "resize", "extcrop", "full", "extfull")
    assert [get_mode(n).pastes_back for n in MODE_NAMES] == [False, False, False, True, True]
    assert [get_mode(n).extended_crop for n in MODE_NAMES] == [False, False, True, False, True]


@pytest.mark.parametrize("name", MODE_NAMES)
def test_each_mode_picks_a_config_whose_mapping_takes_its_coefficients(name):
    mode = get_mode(name)
    for family in ("facerender", "tiny"):
        config = load_config(config_path(family, name))
        assert config.mapping.coeff_nc == mode.coeff_count
        assert config.path.name == f"{family}{'_still' if mode.coeff_count == 73 else ''}.yaml"
    assert resolve_config("tiny", name).mapping.coeff_nc == mode.coeff_count


@pytest.mark.parametrize("name", MODE_NAMES)
def test_each_mode_finds_the_mapping_file_sadtalker_names(name, tiny_checkpoints):
    expected = "mapping_00109-model.pth.tar" if name in ("full", "extfull") else "mapping_00229-model.pth.tar"
    assert get_mode(name).mapping_file == expected
    assert find_checkpoints(tiny_checkpoints, preprocess=name).mapping.name == expected


def test_coefficient_counts_name_their_modes():
    assert describe_coeff_count(70) == "crop/resize/extcrop" and describe_coeff_count(73) == "full/extfull"
    assert modes_taking(64) == ()


def test_an_unknown_mode_is_a_clear_error_for_users_and_for_library_callers():
    for bad in ("Full", "fullscreen", "", None):
        with pytest.raises(UnknownModeError, match="is not one of crop, resize, extcrop, full, extfull"):
            get_mode(bad)
    assert issubclass(UnknownModeError, SfrError) and issubclass(UnknownModeError, ValueError)
    with pytest.raises(ConfigError):
        resolve_config("tiny", "full-ish")


def test_the_command_line_offers_exactly_the_table():
    option = next(p for p in render.params if p.name == "preprocess")
    assert tuple(option.type.choices) == MODE_NAMES
