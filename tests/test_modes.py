"""Every mode SadTalker's face renderer has, end to end through `sfr render` with tiny weights:
full/extfull (73 coefficients), still, expression scale, head-pose control, windowed inputs,
sources of any size and shape, and 512-pixel frames from SadTalker_V0.0.2_512.safetensors."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sfr_cli.checkpoints import write_random_checkpoints
from sfr_cli.cli import sfr
from sfr_cli.coeffs import prepare_semantics
from sfr_cli.config import CONFIG_DIR, load_config

FRAMES = 5


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    rng = np.random.default_rng(11)
    driving = (0.4 * rng.standard_normal((FRAMES, 70))).astype(np.float32)
    source = (0.4 * rng.standard_normal((1, 73))).astype(np.float32)
    np.save(folder / "coeffs.npy", driving)
    np.save(folder / "source73.npy", source)
    np.save(folder / "source70.npy", source[:, :70])
    windows = prepare_semantics(driving, source[0, :70]).windows(0, FRAMES)
    np.save(folder / "windows.npy", windows)
    np.save(folder / "windows4d.npy", windows[None])
    Image.fromarray((rng.random((96, 72, 3)) * 255).astype(np.uint8)).save(folder / "face.png")
    return folder


def render(job, tiny_checkpoints, out, *extra, coeffs="coeffs.npy", source_coeffs="source70.npy"):
    args = ["render", "--coeffs", str(job / coeffs), "--source-coeffs", str(job / source_coeffs),
            "--source", str(job / "face.png"), "--checkpoint-dir", str(tiny_checkpoints), "--config", "tiny",
            "--frames-dir", str(out), "--device", "cpu", "--quiet", *extra]
    result = CliRunner().invoke(sfr, args)
    assert result.exit_code == 0, result.output
    frames = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])
    assert frames.shape[0] == FRAMES and frames.dtype == np.uint8
    return frames


@pytest.fixture(scope="module")
def crop_frames(job, tiny_checkpoints, tmp_path_factory):
    return render(job, tiny_checkpoints, tmp_path_factory.mktemp("crop") / "f")


def differs(a, b):
    return np.abs(a.astype(int) - b.astype(int)).mean() > 0.05


def test_non_square_source_renders_square_frames(crop_frames):
    assert crop_frames.shape == (FRAMES, 256, 256, 3)
    assert crop_frames.std() > 1, "frames should not be flat"


@pytest.mark.parametrize("coeffs", ["windows.npy", "windows4d.npy"])
def test_windowed_inputs_give_the_same_frames(job, tiny_checkpoints, tmp_path, crop_frames, coeffs):
    np.testing.assert_array_equal(render(job, tiny_checkpoints, tmp_path / "f", coeffs=coeffs), crop_frames)


@pytest.mark.parametrize("preprocess", ["resize", "extcrop"])
def test_crop_family_modes_render_like_crop(job, tiny_checkpoints, tmp_path, crop_frames, preprocess):
    frames = render(job, tiny_checkpoints, tmp_path / "f", "--preprocess", preprocess)
    np.testing.assert_array_equal(frames, crop_frames)


@pytest.mark.parametrize("preprocess", ["full", "extfull"])
def test_full_modes_use_the_73_coefficient_mapping(job, tiny_checkpoints, tmp_path, crop_frames, preprocess):
    frames = render(job, tiny_checkpoints, tmp_path / "f", "--preprocess", preprocess, source_coeffs="source73.npy")
    assert differs(frames, crop_frames)


@pytest.mark.parametrize("options", [["--still"], ["--expression-scale", "0"], ["--yaw", "0,30"],
                                     ["--pitch", "-15"], ["--roll", "10,-10,5"]])
def test_each_control_changes_the_frames(job, tiny_checkpoints, tmp_path, crop_frames, options):
    assert differs(render(job, tiny_checkpoints, tmp_path / "f", *options), crop_frames)


def test_expression_scale_one_is_the_default(job, tiny_checkpoints, tmp_path, crop_frames):
    frames = render(job, tiny_checkpoints, tmp_path / "f", "--expression-scale", "1.0")
    np.testing.assert_array_equal(frames, crop_frames)


def test_512_frames_from_the_512_safetensors_file(job, tmp_path):
    folder = tmp_path / "ck512"
    write_random_checkpoints(folder, load_config(CONFIG_DIR / "tiny.yaml"), load_config(CONFIG_DIR / "tiny_still.yaml"),
                             layout="safetensors", size_px=512)
    assert (folder / "SadTalker_V0.0.2_512.safetensors").is_file()
    args = ["render", "--coeffs", str(job / "coeffs.npy"), "--source", str(job / "face.png"),
            "--checkpoint-dir", str(folder), "--config", "tiny", "--size", "512",
            "--frames-dir", str(tmp_path / "f"), "--device", "cpu", "--quiet", "--batch-size", "2"]
    result = CliRunner().invoke(sfr, args)
    assert result.exit_code == 0, result.output
    first = np.asarray(Image.open(tmp_path / "f" / "000000.png"))
    assert first.shape == (512, 512, 3)
    assert len(list((tmp_path / "f").glob("*.png"))) == FRAMES
