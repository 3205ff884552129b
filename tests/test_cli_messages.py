"""Issue 17, point 11 for `sfr render`: an MP4 is named .mp4, a missing output folder is created (and
removed again when the render fails), and weights of another config say which --config they need."""

import pytest
from click.testing import CliRunner

from sfr_cli.cli import sfr

from conftest import assert_user_error, render_args


@pytest.mark.parametrize("name", ["x.png", "x.avi", "x.mkv", "x.mov", "noext", "x.mp4.part"])
def test_an_output_not_named_mp4_is_refused_before_the_model_loads(coeffs_npy, out_dir, tiny_checkpoints,
                                                                   no_model_load, name):
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    args[args.index("-o") + 1] = str(out_dir / name)
    result = CliRunner().invoke(sfr, args)
    assert_user_error(result, out_dir, f"{out_dir / name}: the video output must be named *.mp4", "--frames-dir")


@pytest.mark.heavy
def test_upper_case_mp4_is_an_mp4(coeffs_npy, out_dir, tiny_checkpoints):
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    args[args.index("-o") + 1] = str(out_dir / "X.MP4")
    result = CliRunner().invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert [p.name for p in out_dir.iterdir()] == ["X.MP4"]


def test_a_manifest_row_not_named_mp4_fails_alone(tmp_path, coeffs_npy, tiny_checkpoints):
    from conftest import SOURCE

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"coeffs,source,output\n{coeffs_npy},{SOURCE},o/x.avi\n{coeffs_npy},{SOURCE},o/y.mp4\n")
    result = CliRunner().invoke(sfr, ["batch", str(manifest), "--dry-run", "--config", "tiny", "--checkpoint-dir",
                                      str(tiny_checkpoints)])
    assert result.exit_code == 1
    assert "Error: row 1: " in result.stderr and "must be named *.mp4" in result.stderr
    assert "1 to do" in result.stdout


@pytest.mark.heavy
def test_created_output_folders_are_removed_when_the_render_fails(coeffs_npy, out_dir, tiny_checkpoints,
                                                                 monkeypatch):
    from sfr_cli import media
    from sfr_cli.errors import MediaError

    def failing(self, frame):
        raise MediaError(f"{self.path}: ffmpeg stopped taking frames after 0")

    monkeypatch.setattr(media.Mp4Writer, "write", failing)
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    args[args.index("-o") + 1] = str(out_dir / "a" / "b" / "clip.mp4")
    assert_user_error(CliRunner().invoke(sfr, args), out_dir, "stopped taking frames")  # out_dir left empty


def test_tiny_weights_without_config_tiny_say_to_pass_it(coeffs_npy, out_dir, tiny_checkpoints):
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    config = args.index("--config")
    del args[config:config + 2]
    result = CliRunner().invoke(sfr, args)
    assert_user_error(result, out_dir, "has shape", "facerender.yaml expects",
                      "these are weights of the tiny config: pass --config tiny")


def test_weights_of_no_known_config_ask_which_config_made_them(coeffs_npy, out_dir, tiny_checkpoints, tmp_path):
    import yaml

    from sfr_cli.config import CONFIG_DIR

    data = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    data["model_params"]["generator_params"]["block_expansion"] *= 2
    other = tmp_path / "wider.yaml"
    other.write_text(yaml.safe_dump(data))
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    args[args.index("--config") + 1] = str(other)
    result = CliRunner().invoke(sfr, args)
    assert_user_error(result, out_dir, "has shape", "these are weights of the tiny config: pass --config tiny")
