"""`--enhancer` on `sfr render` and `sfr batch`, and `sfr enhance`, end to end with tiny weights."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from sfr_cli.cli import sfr
from sfr_cli.media import count_video_frames, find_ffmpeg, probe_audio

from conftest import assert_user_error, read_png_frames

OPTIONAL_FILES = ("RestoreFormer.pth", "RealESRGAN_x2plus.pth")  # written by the stage at seeds 14 and 39


@pytest.fixture
def golden(reference_dir):
    return reference_dir / "golden-crop"


def render_args(golden, checkpoints, *extra):
    return ["render", "--coeffs", str(golden / "coeffs.mat"), "--source", str(golden / "source.png"),
            "--source-coeffs", str(golden / "source_coeffs.mat"), "--config", "tiny", "--checkpoint-dir",
            str(checkpoints), "--device", "cpu", *extra]


@pytest.mark.heavy
def test_render_with_the_enhancer_writes_the_frames_the_renderer_yields(runner, golden, tiny_checkpoints,
                                                                        tiny_enhancer_weights, tmp_path):
    from sfr_cli import Renderer

    result = runner.invoke(sfr, render_args(golden, tiny_checkpoints, "--enhancer", "gfpgan-tiny", "--enhancer-dir",
                                            str(tiny_enhancer_weights), "--frames-dir", str(tmp_path / "f"), "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["enhancer"] == "gfpgan-tiny" and report["enhancer_noise_seed"] is None
    written = read_png_frames(tmp_path / "f")
    renderer = Renderer(checkpoint_dir=tiny_checkpoints, config="tiny", device="cpu")
    yielded = np.stack(list(renderer.frames(golden / "coeffs.mat", golden / "source.png",
                                            source_coeffs=golden / "source_coeffs.mat", enhancer="gfpgan-tiny",
                                            enhancer_dir=tiny_enhancer_weights)))
    assert written.shape == (4, 512, 512, 3)
    np.testing.assert_array_equal(written, yielded)


@pytest.mark.heavy
def test_random_noise_reports_its_seed_and_replays(runner, golden, tiny_checkpoints, tiny_enhancer_weights, tmp_path):
    common = ("--enhancer", "gfpgan-tiny", "--enhancer-dir", str(tiny_enhancer_weights), "--enhancer-noise", "random")
    first = runner.invoke(sfr, render_args(golden, tiny_checkpoints, *common, "--frames-dir", str(tmp_path / "a"),
                                           "--json"))
    assert first.exit_code == 0, first.output
    seed = json.loads(first.stdout)["enhancer_noise_seed"]
    again = runner.invoke(sfr, render_args(golden, tiny_checkpoints, *common, "--enhancer-seed", str(seed),
                                           "--frames-dir", str(tmp_path / "b")))
    assert again.exit_code == 0, again.output
    assert f"--enhancer-seed {seed}" in again.stderr
    np.testing.assert_array_equal(read_png_frames(tmp_path / "a"), read_png_frames(tmp_path / "b"))


def test_missing_enhancer_weights_fail_before_the_model_loads(runner, golden, tiny_checkpoints, tmp_path, no_model_load,
                                                              monkeypatch):
    monkeypatch.delenv("SFR_ENHANCER_DIR", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(sfr, render_args(golden, tiny_checkpoints, "--enhancer", "gfpgan", "-o", str(out / "x.mp4")))
    assert_user_error(result, out, "GFPGANv1.4.pth", "searched", "--enhancer-dir")


@pytest.mark.heavy
def test_batch_rows_choose_their_enhancer(runner, golden, tiny_checkpoints, tiny_enhancer_weights, tmp_path):
    manifest = tmp_path / "clips.csv"
    manifest.write_text("coeffs,source,source_coeffs,frames_dir,enhancer,enhancer_upscale\n"
                        f"{golden / 'coeffs.mat'},{golden / 'source.png'},{golden / 'source_coeffs.mat'},plain,,\n"
                        f"{golden / 'coeffs.mat'},{golden / 'source.png'},{golden / 'source_coeffs.mat'},big,gfpgan-tiny,\n"
                        f"{golden / 'coeffs.mat'},{golden / 'source.png'},{golden / 'source_coeffs.mat'},same,gfpgan-tiny,1\n")
    result = runner.invoke(sfr, ["batch", str(manifest), "--config", "tiny", "--checkpoint-dir", str(tiny_checkpoints),
                                 "--enhancer-dir", str(tiny_enhancer_weights), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    shapes = {name: read_png_frames(tmp_path / name).shape for name in ("plain", "big", "same")}
    assert shapes == {"plain": (4, 256, 256, 3), "big": (4, 512, 512, 3), "same": (4, 256, 256, 3)}


@pytest.mark.heavy
def test_enhance_a_video_keeps_its_sound_as_it_is(runner, golden, tiny_checkpoints, tiny_enhancer_weights, reference_dir,
                                                  tmp_path):
    video = tmp_path / "clip.mp4"
    made = runner.invoke(sfr, render_args(golden, tiny_checkpoints, "-o", str(video), "--audio",
                                          str(reference_dir / "sample_speech_24k_mono.wav")))
    assert made.exit_code == 0, made.output
    out = tmp_path / "clip_enhanced.mp4"
    result = runner.invoke(sfr, ["enhance", "--input", str(video), "-o", str(out), "--enhancer", "gfpgan-tiny",
                                 "--enhancer-dir", str(tiny_enhancer_weights), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert "copied as it is" not in result.stderr  # --json: no notes
    report = json.loads(result.stdout)
    assert report["frames"] == 4 and report["output"] == str(out)
    assert count_video_frames(out) == 4 and probe_audio(out).codec == "aac"
    ffmpeg = find_ffmpeg()
    size = subprocess.run([ffmpeg, "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert "512x512" in size
    copied = subprocess.run([ffmpeg, "-hide_banner", "-i", str(video), "-i", str(out), "-map", "0:a", "-map", "1:a",
                             "-c", "copy", "-f", "framemd5", "-"], capture_output=True, text=True)
    packets = {"0": [], "1": []}  # framemd5 lines: stream, dts, pts, duration, size, md5
    for line in copied.stdout.splitlines():
        if line and not line.startswith("#"):
            fields = [f.strip() for f in line.split(",")]
            packets[fields[0]].append(fields[-1])
    assert packets["0"] and packets["0"] == packets["1"]  # the same AAC packets: not encoded again


@pytest.mark.heavy
def test_enhance_refuses_an_existing_output_and_a_missing_input(runner, tiny_enhancer_weights, reference_dir, tmp_path):
    frames = reference_dir / "golden-enhance" / "frames"
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken.mp4").write_bytes(b"keep")
    args = ["enhance", "--enhancer", "gfpgan-tiny", "--enhancer-dir", str(tiny_enhancer_weights), "--device", "cpu"]
    result = runner.invoke(sfr, args + ["--input", str(frames), "-o", str(out / "taken.mp4")])
    assert result.exit_code == 1 and "exists; pass --overwrite" in result.stderr and "Traceback" not in result.output
    assert (out / "taken.mp4").read_bytes() == b"keep"
    shutil.rmtree(out)
    out.mkdir()
    missing = runner.invoke(sfr, args + ["--input", str(tmp_path / "nothing.mp4"), "--frames-dir", str(out / "f")])
    assert_user_error(missing, out, "not found")
    plain = runner.invoke(sfr, args + ["--input", str(frames), "--frames-dir", str(out / "f"), "--enhancer-upscale", "1"])
    assert plain.exit_code == 0, plain.output
    assert read_png_frames(out / "f").shape == (4, 256, 256, 3)


def test_enhance_refuses_an_output_another_live_run_holds(runner, tiny_enhancer_weights, reference_dir, tmp_path):
    from sfr_cli.outputs import OutputClaim

    target = tmp_path / "clip.mp4"
    holder = OutputClaim(target).acquire()  # another run, rendering into it right now
    try:
        result = runner.invoke(sfr, ["enhance", "--input", str(reference_dir / "golden-enhance" / "frames"), "-o",
                                     str(target), "--enhancer", "gfpgan-tiny", "--enhancer-dir",
                                     str(tiny_enhancer_weights), "--device", "cpu"])
    finally:
        holder.release()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "another sfr run" in result.stderr and not target.exists()


@pytest.mark.heavy
def test_enhance_writes_mp4s_only_and_creates_their_folder(runner, tiny_enhancer_weights, reference_dir, tmp_path):
    """As `sfr render -o`: a name not ending in .mp4 is refused before any model loads; a missing folder is
    created."""
    frames = reference_dir / "golden-enhance" / "frames"
    args = ["enhance", "--input", str(frames), "--enhancer", "gfpgan-tiny", "--enhancer-dir",
            str(tiny_enhancer_weights), "--device", "cpu", "--enhancer-upscale", "1"]
    out = tmp_path / "out"
    out.mkdir()
    refused = runner.invoke(sfr, args + ["-o", str(out / "clip.avi")])
    assert_user_error(refused, out, ".mp4")
    made = runner.invoke(sfr, args + ["-o", str(out / "new" / "clip.mp4")])
    assert made.exit_code == 0, made.output
    assert count_video_frames(out / "new" / "clip.mp4") == 4


@pytest.mark.heavy
def test_checkpoints_random_writes_every_restorers_weights_at_the_configs_widths(runner, tiny_enhancer_weights,
                                                                                 tiny_optional_enhancer_weights,
                                                                                 tmp_path):
    """`sfr checkpoints random --enhancer` reads the one list of enhancers (stages.restorers) and background
    enhancers (stages.backgrounds): for a tiny config the tiny variants' files, the same as the stage's own
    writers at the reference seeds (14; 39 for Real-ESRGAN)."""
    import torch

    from sfr_cli.stages import enhance as enhance_stage

    folder = tmp_path / "ck"
    result = runner.invoke(sfr, ["checkpoints", "random", str(folder), "--config", "tiny", "--enhancer"])
    assert result.exit_code == 0, result.output
    files = enhance_stage.find_weights("gfpgan-tiny", folder)
    enhance_stage.check_weights("gfpgan-tiny", files)
    enhance_stage.check_weights("restoreformer-tiny", enhance_stage.find_weights("restoreformer-tiny", folder))
    background = enhance_stage.find_background_weights("realesrgan-tiny", folder)
    enhance_stage.check_background_weights("realesrgan-tiny", background)
    for path in [*files.paths(), background, folder / "RestoreFormer.pth"]:
        written = torch.load(path, weights_only=True)
        reference = tiny_optional_enhancer_weights if path.name in OPTIONAL_FILES else tiny_enhancer_weights
        expected = torch.load(reference / path.name, weights_only=True)
        flat = (lambda d: d.get("params_ema", d))
        assert flat(written).keys() == flat(expected).keys(), path.name
        assert all(torch.equal(flat(written)[k], flat(expected)[k]) for k in flat(expected)), path.name
