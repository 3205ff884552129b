"""YAML configs: SadTalker's files load unchanged, typos are refused, shape rules are checked."""

import pytest
import yaml

from sfr_cli.config import CONFIG_DIR, config_path, load_config, parse_config
from sfr_cli.errors import ConfigError


def test_default_configs_are_sadtalkers():
    crop, full = load_config(CONFIG_DIR / "facerender.yaml"), load_config(CONFIG_DIR / "facerender_still.yaml")
    assert crop.mapping.coeff_nc == 70 and full.mapping.coeff_nc == 73
    assert crop.generator.decoder_params.out_channels == 64 and crop.generator.decoder_params.spade_hidden == 128
    assert crop.common.num_kp == 15 and crop.generator.dense_motion_params.compress == 4
    assert config_path(None, "full").name == "facerender_still.yaml"
    assert config_path(None, "extcrop").name == "facerender.yaml"


def test_tiny_is_the_same_architecture_smaller():
    tiny = load_config(CONFIG_DIR / "tiny.yaml")
    assert tiny.mapping.coeff_nc == 70 and load_config(CONFIG_DIR / "tiny_still.yaml").mapping.coeff_nc == 73
    assert tiny.generator.block_expansion < 64


def raw(name="facerender.yaml"):
    return yaml.safe_load((CONFIG_DIR / name).read_text())


def test_unknown_keys_are_refused_with_their_path():
    data = raw()
    data["model_params"]["generator_params"]["num_resblock"] = 6
    with pytest.raises(ConfigError, match="unknown key model_params.generator_params.num_resblock"):
        parse_config(data)


@pytest.mark.parametrize("section, key, value, message", [
    ("mapping_params", "coeff_nc", 64, "coeff_nc is 64"),
    ("common_params", "estimate_jacobian", True, "estimate_jacobian: true is not supported"),
    ("kp_detector_params", "reshape_channel", 1000, "reshape_channel must be 16384"),
    ("generator_params", "num_resblocks", "six", "must be a whole number"),
    ("mapping_params", "num_kp", 10, "differs from common_params.num_kp"),
])
def test_impossible_models_are_refused(section, key, value, message):
    data = raw()
    data["model_params"][section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_missing_key_and_bad_files(tmp_path):
    data = raw()
    del data["model_params"]["mapping_params"]["layer"]
    with pytest.raises(ConfigError, match="missing key model_params.mapping_params.layer"):
        parse_config(data)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_params: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_training_sections_of_a_sadtalker_style_yaml_are_accepted_and_ignored():
    data = raw()
    data["train_params"] = {"num_epochs": 100, "lr_generator": 2e-4}
    data["dataset_params"] = {"root_dir": "data"}
    assert parse_config(data).mapping.coeff_nc == 70
    data["training"] = {}
    with pytest.raises(ConfigError, match="unknown key training"):
        parse_config(data)
