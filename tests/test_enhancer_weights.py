"""The optional enhancer nets' weight files (`sfr_cli.enhancer_weights`): RestoreFormer.pth and
RealESRGAN_x2plus.pth found, checked before any model loads, loaded strictly, and written at random."""

import shutil

import pytest
import torch

from sfr_cli import enhancer_weights as weights
from sfr_cli.errors import CheckpointError

ALL = ("restoreformer", "restoreformer-tiny", "realesrgan", "realesrgan-tiny")


def test_tiny_files_check_and_load_into_their_nets(tiny_optional_enhancer_weights):
    for name, file_name in (("restoreformer-tiny", "RestoreFormer.pth"), ("realesrgan-tiny", "RealESRGAN_x2plus.pth")):
        path = weights.find_weights(name, [tiny_optional_enhancer_weights])
        assert path == tiny_optional_enhancer_weights / file_name
        weights.check_weights(name, path)
        net = weights.load_net(name, path)
        assert not net.training and all(not p.requires_grad for p in net.parameters())
        stored = torch.load(path, weights_only=True)
        assert list(stored) == ["params_ema"]
        assert all(torch.equal(net.state_dict()[k], v) for k, v in stored["params_ema"].items())


def test_params_is_taken_when_there_is_no_params_ema(tiny_optional_enhancer_weights, tmp_path):
    state_dict = torch.load(tiny_optional_enhancer_weights / "RealESRGAN_x2plus.pth", weights_only=True)["params_ema"]
    torch.save({"params": state_dict}, tmp_path / "RealESRGAN_x2plus.pth")
    weights.check_weights("realesrgan-tiny", tmp_path / "RealESRGAN_x2plus.pth")
    net = weights.load_net("realesrgan-tiny", tmp_path / "RealESRGAN_x2plus.pth")
    assert torch.equal(net.conv_last.bias, state_dict["conv_last.bias"])


def test_a_missing_file_names_the_file_the_folders_and_what_to_do(tmp_path):
    with pytest.raises(CheckpointError) as error:
        weights.find_weights("restoreformer", [tmp_path / "a", tmp_path / "b"])
    message = str(error.value)
    assert "RestoreFormer.pth" in message and str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert "--enhancer-dir" in message and "sfr checkpoints random" in message
    with pytest.raises(CheckpointError, match=r"nope\.pth: cannot be read .*RealESRGAN_x2plus\.pth"):
        weights.check_weights("realesrgan", tmp_path / "nope.pth")


@pytest.mark.parametrize("name, other", [("restoreformer", "restoreformer-tiny"),
                                         ("realesrgan", "realesrgan-tiny")])
def test_the_other_variants_file_is_named(tiny_optional_enhancer_weights, name, other):
    path = tiny_optional_enhancer_weights / weights.variant(name).file_name
    with pytest.raises(CheckpointError, match=f"these are weights of {other}: pass --[a-z-]*enhancer {other}"):
        weights.check_weights(name, path)
    with pytest.raises(CheckpointError, match=f"weights of {other}"):
        weights.load_net(name, path)


def test_the_other_nets_file_is_named(tiny_optional_enhancer_weights, tmp_path):
    shutil.copy(tiny_optional_enhancer_weights / "RealESRGAN_x2plus.pth", tmp_path / "RestoreFormer.pth")
    with pytest.raises(CheckpointError, match=r"RestoreFormer\.pth: .*keys are missing.*holds "
                                              r"RealESRGAN_x2plus\.pth's weights \(realesrgan-tiny\)"):
        weights.check_weights("restoreformer-tiny", tmp_path / "RestoreFormer.pth")


def test_truncated_foreign_and_unsafe_files_are_refused(tiny_optional_enhancer_weights, tmp_path):
    data = (tiny_optional_enhancer_weights / "RestoreFormer.pth").read_bytes()
    (tmp_path / "RestoreFormer.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        weights.check_weights("restoreformer-tiny", tmp_path / "RestoreFormer.pth")

    torch.save({"params_ema": {"conv.weight": torch.zeros(3)}}, tmp_path / "RealESRGAN_x2plus.pth")
    with pytest.raises(CheckpointError, match="702 keys are missing.*is not RealESRGAN_x2plus.pth"):
        weights.check_weights("realesrgan", tmp_path / "RealESRGAN_x2plus.pth")

    state_dict = weights.random_state_dict("realesrgan-tiny", 1)
    state_dict["conv_first.weight"] = state_dict["conv_first.weight"].to(torch.int32)
    torch.save({"params_ema": state_dict}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match="conv_first.weight has dtype torch.int32"):
        weights.check_weights("realesrgan-tiny", tmp_path / "int.pth")

    torch.save({"params_ema": weights.random_state_dict("realesrgan-tiny", 1), "extra": torch.nn.ReLU()},
               tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="never runs code"):
        weights.check_weights("realesrgan-tiny", tmp_path / "code.pth")

    torch.save({"model": weights.random_state_dict("realesrgan-tiny", 1)}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match="'params_ema' or 'params'"):
        weights.check_weights("realesrgan-tiny", tmp_path / "wrapped.pth")


def test_a_file_is_checked_again_when_it_changes(tiny_optional_enhancer_weights, tmp_path):
    path = tmp_path / "RealESRGAN_x2plus.pth"
    shutil.copy(tiny_optional_enhancer_weights / "RealESRGAN_x2plus.pth", path)
    weights.check_weights("realesrgan-tiny", path)
    shutil.copy(tiny_optional_enhancer_weights / "RestoreFormer.pth", path)
    with pytest.raises(CheckpointError):
        weights.check_weights("realesrgan-tiny", path)


def test_unknown_variant_is_refused():
    with pytest.raises(CheckpointError, match="unknown net 'esrgan'"):
        weights.build_net("esrgan")


def test_random_weights_are_deterministic_and_per_seed():
    first = weights.random_state_dict("restoreformer-tiny", 3)
    again = weights.random_state_dict("restoreformer-tiny", 3)
    other = weights.random_state_dict("restoreformer-tiny", 4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["encoder.conv_in.weight"], other["encoder.conv_in.weight"])
    # the codebook's two live codes +-20 on latent channel 0; the rest far away in the other channels
    codebook = first["quantize.embedding.weight"]
    assert codebook[0, 0] == 20 and codebook[1, 0] == -20 and codebook[2:, 0].abs().max() == 0
    torch.testing.assert_close(codebook[2:].norm(dim=1), torch.full((62,), 112.0))


@pytest.mark.slow
@pytest.mark.parametrize("name, reference", [("realesrgan", "realesrgan_reference_weights"),
                                             ("restoreformer", "restoreformer_reference_weights")])
def test_full_size_random_weights_are_the_reference_scripts(name, reference, request):
    """`sfr checkpoints random --enhancer` writes make_enhancer_checkpoints.py's values, tensor for tensor."""
    folder = request.getfixturevalue(reference)
    spec = weights.variant(name)
    stored = torch.load(folder / spec.file_name, weights_only=True)["params_ema"]
    mine = weights.random_state_dict(name, 39 if name == "realesrgan" else 14)
    assert list(mine) == list(stored)
    assert [k for k in stored if not torch.equal(stored[k], mine[k])] == []
