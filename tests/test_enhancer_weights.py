"""RestoreFormer.pth and RealESRGAN_x2plus.pth through the enhance stage's one weights code
(`stages.enhance`: found where GFPGANv1.4.pth is, checked before any model loads, loaded strictly, written
at random from the registries)."""

import shutil

import pytest
import torch

from sfr_cli.errors import CheckpointError
from sfr_cli.nets.rrdbnet import RRDBNet, TINY_RRDBNET_CONFIG
from sfr_cli.nets.rrdbnet import random_state_dict as rrdb_random
from sfr_cli.stages import enhance


def check(name: str, folder):
    """The check `plan` runs for `name` (a restorer's or a background enhancer's) on `folder`'s files."""
    if "realesrgan" in name:
        enhance.check_background_weights(name, enhance.find_background_weights(name, folder))
    else:
        enhance.check_weights(name, enhance.find_weights(name, folder))


def test_tiny_files_check_and_load_into_their_nets(tiny_optional_enhancer_weights):
    folder = tiny_optional_enhancer_weights
    for part, name, file_name in (("restorer", "restoreformer-tiny", "RestoreFormer.pth"),
                                  ("background", "realesrgan-tiny", "RealESRGAN_x2plus.pth")):
        check(name, folder)
        net = enhance.load_part(part, name, folder / file_name)
        assert not net.training and all(not p.requires_grad for p in net.parameters())
        stored = torch.load(folder / file_name, weights_only=True)
        assert list(stored) == ["params_ema"]
        assert all(torch.equal(net.state_dict()[k], v) for k, v in stored["params_ema"].items())
    assert enhance.find_weights("restoreformer-tiny", folder).restorer == folder / "RestoreFormer.pth"


def test_params_is_taken_when_there_is_no_params_ema(tiny_optional_enhancer_weights, tmp_path):
    state_dict = torch.load(tiny_optional_enhancer_weights / "RealESRGAN_x2plus.pth", weights_only=True)["params_ema"]
    torch.save({"params": state_dict}, tmp_path / "RealESRGAN_x2plus.pth")
    check("realesrgan-tiny", tmp_path)
    net = enhance.load_part("background", "realesrgan-tiny", tmp_path / "RealESRGAN_x2plus.pth")
    assert torch.equal(net.conv_last.bias, state_dict["conv_last.bias"])


def test_a_missing_file_names_the_file_the_folders_and_what_to_do(tmp_path):
    with pytest.raises(CheckpointError) as error:
        enhance.find_background_weights("realesrgan", tmp_path / "a")
    message = str(error.value)
    assert "RealESRGAN_x2plus.pth" in message and str(tmp_path / "a") in message
    assert "--enhancer-dir" in message and "sfr checkpoints random" in message
    with pytest.raises(CheckpointError, match=r"RestoreFormer\.pth"):
        enhance.find_weights("restoreformer", tmp_path / "a")


@pytest.mark.parametrize("name, other", [("restoreformer", "restoreformer-tiny"), ("realesrgan", "realesrgan-tiny")])
def test_the_other_variants_file_is_named(tiny_optional_enhancer_weights, name, other):
    with pytest.raises(CheckpointError, match=f"these are weights of the {other} (background )?enhancer: pass "
                                              f"--[a-z-]*enhancer {other}"):
        check(name, tiny_optional_enhancer_weights)


def test_the_other_nets_file_is_refused(tiny_optional_enhancer_weights, tmp_path):
    shutil.copytree(tiny_optional_enhancer_weights, tmp_path / "w")
    shutil.copy(tiny_optional_enhancer_weights / "RealESRGAN_x2plus.pth", tmp_path / "w" / "RestoreFormer.pth")
    with pytest.raises(CheckpointError, match=r"RestoreFormer\.pth.*restoreformer-tiny enhancer"):
        check("restoreformer-tiny", tmp_path / "w")


def test_truncated_foreign_and_unsafe_files_are_refused(tiny_optional_enhancer_weights, tmp_path):
    data = (tiny_optional_enhancer_weights / "RealESRGAN_x2plus.pth").read_bytes()
    path = tmp_path / "RealESRGAN_x2plus.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        check("realesrgan-tiny", tmp_path)

    torch.save({"params_ema": {"conv.weight": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match="realesrgan background enhancer"):
        check("realesrgan", tmp_path)

    net = RRDBNet(**TINY_RRDBNET_CONFIG)
    state_dict = rrdb_random(net, 1)
    state_dict["conv_first.weight"] = state_dict["conv_first.weight"].to(torch.int32)
    torch.save({"params_ema": state_dict}, path)
    with pytest.raises(CheckpointError, match="conv_first.weight"):
        check("realesrgan-tiny", tmp_path)

    torch.save({"params_ema": rrdb_random(net, 1), "extra": torch.nn.ReLU()}, path)
    with pytest.raises(CheckpointError, match="never runs code"):
        check("realesrgan-tiny", tmp_path)

    torch.save({"model": rrdb_random(net, 1)}, path)
    with pytest.raises(CheckpointError, match="'params_ema' or 'params'"):
        check("realesrgan-tiny", tmp_path)


def test_a_file_is_checked_again_when_it_changes(tiny_optional_enhancer_weights, tmp_path):
    path = tmp_path / "RealESRGAN_x2plus.pth"
    shutil.copy(tiny_optional_enhancer_weights / "RealESRGAN_x2plus.pth", path)
    check("realesrgan-tiny", tmp_path)
    shutil.copy(tiny_optional_enhancer_weights / "RestoreFormer.pth", path)
    with pytest.raises(CheckpointError):
        check("realesrgan-tiny", tmp_path)
