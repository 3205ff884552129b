"""`sfr render --paste-into/--crop-box` and `sfr crop-box` end to end with tiny weights and the shared
golden-paste inputs (a 640x1024 original, SadTalker's crop of it, 3 frames of full-mode coefficients)."""

import json

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from sfr_cli.cli import sfr
from sfr_cli.imaging import seamless_clone

from conftest import assert_user_error

BOX = (150, 120, 450, 426)


@pytest.fixture
def golden(reference_dir):
    return reference_dir / "golden-paste"


def full_args(golden, checkpoints, out, *extra):
    return ["render", "--coeffs", str(golden / "coeffs.mat"), "--source", str(golden / "crop.png"),
            "--source-coeffs", str(golden / "source_coeffs.mat"), "--preprocess", "full", "--config", "tiny",
            "--checkpoint-dir", str(checkpoints), "--batch-size", "2", "--device", "cpu", *extra]


def read_frames(folder):
    return np.stack([iio.imread(p)[..., :3] for p in sorted(folder.glob("*.png"))])


def video_size(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return tuple(meta["size"])


@pytest.mark.heavy
def test_paste_into_finds_the_box_and_blends_every_frame(runner, tmp_path, golden, tiny_checkpoints):
    plain = runner.invoke(sfr, full_args(golden, tiny_checkpoints, None, "--frames-dir", str(tmp_path / "face")))
    assert plain.exit_code == 0, plain.output
    args = full_args(golden, tiny_checkpoints, None, "--paste-into", str(golden / "original.png"),
                     "-o", str(tmp_path / "full.mp4"), "--frames-dir", str(tmp_path / "full"))
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert "crop box 150,120,450,426 (exact)" in result.stderr
    assert result.stdout.strip() == str(tmp_path / "full.mp4")
    faces = read_frames(tmp_path / "face")
    pasted = read_frames(tmp_path / "full")
    original = iio.imread(golden / "original.png")[..., :3]
    assert pasted.shape == (3, 1024, 640, 3)
    expected = seamless_clone.clone_into_picture(torch.from_numpy(faces), torch.from_numpy(original), BOX).numpy()
    np.testing.assert_array_equal(pasted, expected)
    # outside the box nothing moves; inside, the face changed the picture
    outside = np.ones(original.shape[:2], bool)
    outside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = False
    assert (pasted[:, outside] == original[outside]).all()
    assert (pasted[:, ~outside] != original[~outside]).any()
    assert video_size(tmp_path / "full.mp4") == (640, 1024)


@pytest.mark.heavy
def test_crop_box_alone_gives_sadtalker_aspect_frames(runner, tmp_path, golden, tiny_checkpoints):
    args = full_args(golden, tiny_checkpoints, None, "--crop-box", "150,120,450,426",
                     "--frames-dir", str(tmp_path / "aspect"))
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert read_frames(tmp_path / "aspect").shape == (3, 261, 256, 3)  # (256, int(256 * 306 / 300))
    assert "--paste-into" not in result.stderr  # the box given, the note about pasting is not needed


@pytest.mark.heavy
def test_full_mode_without_picture_says_how_sadtalker_ends(runner, tmp_path, golden, tiny_checkpoints):
    args = full_args(golden, tiny_checkpoints, None, "--frames-dir", str(tmp_path / "f"))
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert "--paste-into" in result.stderr


@pytest.mark.heavy
def test_odd_picture_keeps_its_size_in_pngs_and_pads_the_mp4(runner, tmp_path, golden, tiny_checkpoints):
    odd = tmp_path / "odd.png"
    iio.imwrite(odd, iio.imread(golden / "original.png")[:1023, :639, :3])
    out = tmp_path / "out"
    out.mkdir()
    args = full_args(golden, tiny_checkpoints, None, "--paste-into", str(odd), "-o", str(out / "odd.mp4"),
                     "--frames-dir", str(out / "frames"))
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert "639x1023 frames: the MP4 repeats the last column and row" in result.stderr
    assert read_frames(out / "frames").shape == (3, 1023, 639, 3)
    assert video_size(out / "odd.mp4") == (640, 1024)


@pytest.mark.heavy
def test_picture_without_the_crop_fails_before_the_model(runner, tmp_path, golden, tiny_checkpoints,
                                                         reference_dir, no_model_load):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    args = full_args(golden, tiny_checkpoints, None, "--paste-into", str(reference_dir / "sample_face_640x896.png"),
                     "-o", str(out / "clip.mp4"))
    assert_user_error(runner.invoke(sfr, args), out, "does not contain the crop", "--crop-box")


@pytest.mark.parametrize("box, needle", [("1,2,3", "four integers"), ("10,10,5,40", "x2 must exceed"),
                                         ("a,b,c,d", "four integers")])
def test_bad_crop_box_is_a_usage_error(runner, tmp_path, golden, tiny_checkpoints, no_model_load,  # noqa: F811
                                       box, needle):
    out = tmp_path / "out"
    out.mkdir()
    args = full_args(golden, tiny_checkpoints, None, "--crop-box", box, "-o", str(out / "clip.mp4"))
    assert_user_error(runner.invoke(sfr, args), out, needle, exit_code=2)


@pytest.mark.parametrize("box", ["700,0,900,200", "-300,-300,1,1"])
def test_crop_box_outside_the_picture(runner, tmp_path, golden, tiny_checkpoints, no_model_load, box):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    args = full_args(golden, tiny_checkpoints, None, "--paste-into", str(golden / "original.png"),
                     "--crop-box", box, "-o", str(out / "clip.mp4"))
    assert_user_error(runner.invoke(sfr, args), out, "lies outside the 640x1024 picture")


def test_missing_paste_picture(runner, tmp_path, golden, tiny_checkpoints, no_model_load):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    args = full_args(golden, tiny_checkpoints, None, "--paste-into", str(tmp_path / "nope.png"),
                     "-o", str(out / "clip.mp4"))
    assert_user_error(runner.invoke(sfr, args), out, "nope.png", "not found")


@pytest.mark.heavy
def test_crop_box_command(runner, golden, reference_dir):
    result = runner.invoke(sfr, ["crop-box", "--source", str(golden / "crop.png"),
                                 "--original", str(golden / "original.png")])
    assert result.exit_code == 0, result.output
    assert result.stdout == "150,120,450,426\n"
    result = runner.invoke(sfr, ["crop-box", "--source", str(golden / "crop.png"),
                                 "--original", str(golden / "original.png"), "--json"])
    assert json.loads(result.stdout) == {"box": list(BOX), "exact": True, "mean_abs_levels": 0.0,
                                         "max_abs_levels": 0}
    result = runner.invoke(sfr, ["crop-box", "--source", str(golden / "crop.png"),
                                 "--original", str(reference_dir / "sample_face_640x896.png")])
    assert_user_error(result, None, "does not contain the crop", "--crop-box")


@pytest.mark.heavy
@pytest.mark.parametrize("how", ["paste_into", "crop_box"])
def test_renderer_frames_are_what_render_frames_dir_writes(runner, tmp_path, golden, tiny_checkpoints, how):
    """One path for frames: the API yields the pasted (or aspect-resized) frames `sfr render` writes, not
    the 256x256 faces."""
    from sfr_cli import Renderer

    extra = (["--paste-into", str(golden / "original.png")] if how == "paste_into"
             else ["--crop-box", ",".join(map(str, BOX))])
    result = runner.invoke(sfr, full_args(golden, tiny_checkpoints, None, *extra, "--frames-dir", str(tmp_path / "f")))
    assert result.exit_code == 0, result.output
    written = read_frames(tmp_path / "f")
    options = dict(paste_into=golden / "original.png") if how == "paste_into" else dict(crop_box=BOX)
    renderer = Renderer(checkpoint_dir=tiny_checkpoints, config="tiny", device="cpu", batch_size=2)
    yielded = np.stack(list(renderer.frames(golden / "coeffs.mat", golden / "crop.png", preprocess="full",
                                            source_coeffs=golden / "source_coeffs.mat", **options)))
    assert yielded.shape == written.shape == ((3, 1024, 640, 3) if how == "paste_into" else (3, 261, 256, 3))
    np.testing.assert_array_equal(yielded, written)
