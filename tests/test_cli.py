"""`sfr` through Click's CliRunner: user errors end in `Error: ...` and exit 1 (usage errors exit 2),
with no traceback and nothing left at or beside the output; happy paths print only the result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import scipy.io

from sfr_cli.cli import sfr

from conftest import DEMO_COEFFS, SOURCE, assert_user_error, one_torch_thread, render_args

REPO = Path(__file__).resolve().parents[1]
SFR = [sys.executable, "-c", "from sfr_cli.cli import main; main()"]


class Marker:
    """Unpickling this creates a file: proof that a loader ran code from a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------------------
# Coefficients and source


@pytest.mark.parametrize("case, needle", [
    ("columns", "64 columns"),
    ("mat-key", "coeff_3dmm"),
    ("nan", "NaN"),
    ("zero-frames", "zero frames"),
    ("unreadable-mat", "not a readable MATLAB"),
    ("missing", "no such coefficient file"),
])
def test_bad_coefficients(runner, tmp_path, out_dir, tiny_checkpoints, no_model_load, case, needle):
    rows = np.load(DEMO_COEFFS)[:4]
    path = tmp_path / ("bad.mat" if case in ("mat-key", "unreadable-mat") else "bad.npy")
    if case == "columns":
        np.save(path, rows[:, :64])
    elif case == "mat-key":
        scipy.io.savemat(path, {"coeffs": rows})
    elif case == "nan":
        rows = rows.copy()
        rows[2, 5] = np.nan
        np.save(path, rows)
    elif case == "zero-frames":
        np.save(path, np.zeros((0, 70), np.float32))
    elif case == "unreadable-mat":
        path.write_bytes(b"MATLAB 5.0 MAT-file, but not really" + bytes(range(256)))
    result = runner.invoke(sfr, render_args(path, out_dir, tiny_checkpoints))
    assert_user_error(result, out_dir, needle, path.name)


def test_pickled_npy_is_never_unpickled(runner, tmp_path, out_dir, tiny_checkpoints, no_model_load):
    marker = tmp_path / "unpickled-marker"
    path = tmp_path / "evil.npy"
    np.save(path, np.array([Marker(marker)], dtype=object), allow_pickle=True)
    assert not marker.exists()
    result = runner.invoke(sfr, render_args(path, out_dir, tiny_checkpoints))
    assert_user_error(result, out_dir, "pickled", "evil.npy")
    assert not marker.exists()


def test_source_not_an_image(runner, tmp_path, coeffs_npy, out_dir, tiny_checkpoints, no_model_load):
    fake = tmp_path / "face.png"
    fake.write_text("not a picture")
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    args[args.index("--source") + 1] = str(fake)
    assert_user_error(runner.invoke(sfr, args), out_dir, "face.png", "not an image")


def test_full_mode_with_70_column_source_coeffs(runner, coeffs_npy, out_dir, tiny_checkpoints, no_model_load):
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tiny_checkpoints, "--preprocess", "full"))
    assert_user_error(result, out_dir, "73", "--source-coeffs")


def test_config_that_does_not_fit_the_mode(runner, coeffs_npy, out_dir, tiny_checkpoints, no_model_load):
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    args[args.index("--config") + 1] = "tiny_still"
    assert_user_error(runner.invoke(sfr, args), out_dir, "tiny_still.yaml", "coeff_nc is 73")


def test_unknown_config_name(runner, coeffs_npy, out_dir, tiny_checkpoints, no_model_load):
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    args[args.index("--config") + 1] = "tinyy"
    assert_user_error(runner.invoke(sfr, args), out_dir, "tinyy", "built-in names")


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def test_missing_checkpoint_folder(runner, tmp_path, coeffs_npy, out_dir, no_model_load):
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tmp_path / "nope"))
    assert_user_error(result, out_dir, "nope", "checkpoint folder not found")


def test_missing_mapping_file(runner, tmp_path, coeffs_npy, out_dir, tiny_checkpoints, no_model_load):
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(tiny_checkpoints / "facevid2vid_00189-model.pth.tar", folder)
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, folder))
    assert_user_error(result, out_dir, "mapping_00229-model.pth.tar", "not found")


def test_truncated_checkpoint(runner, tmp_path, coeffs_npy, out_dir, tiny_checkpoints):
    folder = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, folder)
    renderer = folder / "facevid2vid_00189-model.pth.tar"
    data = renderer.read_bytes()
    renderer.write_bytes(data[: len(data) // 2])
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, folder))
    assert_user_error(result, out_dir, "facevid2vid_00189-model.pth.tar", "truncated")


def test_checkpoint_with_pickled_objects_is_refused(runner, tmp_path, coeffs_npy, out_dir, tiny_checkpoints):
    import torch

    folder = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, folder)
    marker = tmp_path / "unpickled-marker"
    torch.save({"generator": {"weight": Marker(marker)}, "kp_detector": {}},
               folder / "facevid2vid_00189-model.pth.tar")
    assert not marker.exists()
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, folder))
    assert_user_error(result, out_dir, "facevid2vid_00189-model.pth.tar", "pickled objects", "never runs code")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# ffmpeg, audio, outputs, options


@pytest.mark.parametrize("broken", ["missing", "exits-1"])
def test_ffmpeg_failure_is_reported_before_models_load(runner, tmp_path, coeffs_npy, out_dir, tiny_checkpoints,
                                                       no_model_load, monkeypatch, broken):
    exe = tmp_path / "ffmpeg"
    if broken == "exits-1":
        exe.write_text("#!/bin/sh\necho 'ffmpeg: broken build' >&2\nexit 1\n")
        exe.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(exe))
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tiny_checkpoints))
    # no_model_load: found before any model loads; and from the binary's own answer, not a timeout
    said = "ffmpeg: broken build" if broken == "exits-1" else "ffmpeg not found at"
    assert_user_error(result, out_dir, str(exe), said)
    assert "did not answer" not in result.stderr


def test_missing_audio(runner, tmp_path, coeffs_npy, out_dir, tiny_checkpoints, no_model_load):
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tiny_checkpoints, "--audio",
                                            str(tmp_path / "speech.wav")))
    assert_user_error(result, out_dir, "speech.wav", "audio file not found")


@pytest.mark.heavy
def test_output_folder_missing_is_created_as_frames_dir_and_batch_do(runner, tmp_path, coeffs_npy, out_dir,
                                                                      tiny_checkpoints):
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    args[args.index("-o") + 1] = str(out_dir / "a" / "b" / "clip.mp4")
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert [p.name for p in (out_dir / "a" / "b").iterdir()] == ["clip.mp4"]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    args[args.index("-o") + 1] = str(a_file / "clip.mp4")
    assert_user_error(runner.invoke(sfr, args), None, str(a_file), "cannot inspect the output path")


def test_output_folder_not_writable(runner, tmp_path, coeffs_npy, out_dir, tiny_checkpoints, no_model_load):
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints)
    if os.geteuid() == 0:  # root writes anywhere a permission bit forbids; /proc refuses everyone
        target = Path("/proc/sfr-test-clip.mp4")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "clip.mp4"
    args[args.index("-o") + 1] = str(target)
    assert_user_error(runner.invoke(sfr, args), out_dir, str(target), "not writable")
    assert not target.exists()


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-3"),
                                           ("--batch-size", "many"), ("--yaw", "0,left,10"),
                                           ("--pitch", "nan"), ("--size", "300")])
def test_usage_errors_exit_2(runner, coeffs_npy, out_dir, tiny_checkpoints, no_model_load, option, value):
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tiny_checkpoints, option, value))
    assert_user_error(result, out_dir, option, exit_code=2)


@pytest.mark.heavy
def test_debug_shows_the_traceback(tmp_path, out_dir, tiny_checkpoints):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 64), np.float32))
    for args in (["--debug", *render_args(bad, out_dir, tiny_checkpoints)],
                 [*render_args(bad, out_dir, tiny_checkpoints), "--debug"]):
        result = subprocess.run(SFR + args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "CoefficientsError" in result.stderr
        assert "64 columns" in result.stderr
    result = subprocess.run(SFR + render_args(bad, out_dir, tiny_checkpoints), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: ") and result.stdout == ""


def test_version(runner):
    from sfr_cli import __version__

    result = runner.invoke(sfr, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


# ---------------------------------------------------------------------------------------------------
# Happy paths


def test_render_mp4_with_audio_prints_only_the_path(runner, coeffs_npy, out_dir, tiny_checkpoints):
    speech = REPO / "demo" / "speech.wav"
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tiny_checkpoints, "--audio", str(speech)))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out_dir / 'clip.mp4'}\n"
    assert sorted(p.name for p in out_dir.iterdir()) == ["clip.mp4"]

    again = out_dir / "again.mp4"
    args = render_args(coeffs_npy, out_dir, tiny_checkpoints, "--json", "--device", "cpu")
    args[args.index("-o") + 1] = str(again)
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {"output", "frames_dir", "frames", "seconds", "frames_per_second", "peak_rss_mib",
                           "peak_cuda_mib", "device", "precision", "batch_size"}
    assert report["output"] == str(again) and report["frames_dir"] is None
    assert report["frames"] == 4 and report["device"] == "cpu" and report["precision"] == "fp32"
    assert report["batch_size"] == 2 and report["frames_per_second"] == pytest.approx(4 / report["seconds"], rel=0.01)  # both rounded
    assert report["peak_rss_mib"] > 100, "torch alone holds more than 100 MiB: the figure is not in MiB"
    assert result.stderr == ""


@pytest.mark.heavy
def test_frames_dir_alone_writes_pngs_and_no_mp4(runner, tmp_path, coeffs_npy, tiny_checkpoints, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    frames = tmp_path / "frames"
    args = ["render", "--coeffs", str(coeffs_npy), "--source", str(SOURCE), "--frames-dir", str(frames),
            "--checkpoint-dir", str(tiny_checkpoints), "--config", "tiny", "--quiet", "--yaw", "0,20,-10"]
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{frames}\n"
    assert sorted(p.name for p in frames.iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert not list(tmp_path.glob("*.mp4"))
    with Image.open(frames / "000000.png") as image:
        assert image.size == (256, 256) and image.mode == "RGB"


@pytest.mark.heavy
def test_default_output_is_the_coefficient_stem_here(runner, tmp_path, coeffs_npy, tiny_checkpoints, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["render", "--coeffs", str(coeffs_npy), "--source", str(SOURCE), "--checkpoint-dir",
            str(tiny_checkpoints), "--config", "tiny", "--quiet"]
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == "clip.mp4\n"
    assert sorted(p.name for p in work.iterdir()) == ["clip.mp4"]


@pytest.mark.parametrize("layout, renderer", [("pth", "facevid2vid_00189-model.pth.tar"),
                                              ("safetensors", "SadTalker_V0.0.2_256.safetensors")])
def test_checkpoints_random_and_inspect(runner, tmp_path, layout, renderer):
    folder = tmp_path / "ck"
    with one_torch_thread():
        result = runner.invoke(sfr, ["checkpoints", "random", str(folder), "--config", "tiny", "--layout", layout])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{folder}\n"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [renderer, "mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar"])

    result = runner.invoke(sfr, ["checkpoints", "inspect", str(folder / renderer), "--config", "tiny"])
    assert result.exit_code == 0, result.output
    assert f"{layout} layout" in result.stdout and "generator" in result.stdout
    assert "kp_detector" in result.stdout and "fits tiny.yaml" in result.stdout

    result = runner.invoke(sfr, ["checkpoints", "inspect", str(folder / "mapping_00229-model.pth.tar"),
                                 "--config", "tiny"])
    assert result.exit_code == 0, result.output
    assert "takes 70 coefficients" in result.stdout and "fits tiny.yaml" in result.stdout

    result = runner.invoke(sfr, ["checkpoints", "inspect", str(folder / "mapping_00109-model.pth.tar"),
                                 "--config", "tiny_still"])
    assert result.exit_code == 0, result.output
    assert "takes 73 coefficients" in result.stdout and "fits tiny_still.yaml" in result.stdout


def test_inspect_73_mapping_under_70_config_names_key_and_shapes(runner, tiny_checkpoints):
    path = tiny_checkpoints / "mapping_00109-model.pth.tar"
    result = runner.invoke(sfr, ["checkpoints", "inspect", str(path), "--config", "tiny"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "first.0.weight" in result.stderr and "73" in result.stderr and "70" in result.stderr
    assert "mapping_00109-model.pth.tar" in result.stderr


@pytest.mark.heavy
def test_inspect_tiny_weights_under_full_size_config(runner, tiny_checkpoints):
    path = tiny_checkpoints / "facevid2vid_00189-model.pth.tar"
    result = runner.invoke(sfr, ["checkpoints", "inspect", str(path)])
    assert result.exit_code == 1
    assert "facerender.yaml" in result.stderr and "shape" in result.stderr


# ---------------------------------------------------------------------------------------------------
# Interrupts


def ffmpeg_processes():
    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


@pytest.mark.heavy
def test_interrupt_mid_render_leaves_nothing(runner, tmp_path, coeffs_npy, out_dir, tiny_checkpoints,
                                             monkeypatch):
    from sfr_cli import engine

    original = engine.Engine.launch_clips  # the one render loop (every render's batches come from it)

    def interrupted(self, *args, **kwargs):
        handed_out = 0
        for batch in original(self, *args, **kwargs):
            if handed_out + len(batch.owners) > 2:
                raise KeyboardInterrupt
            handed_out += len(batch.owners)
            yield batch

    monkeypatch.setattr(engine.Engine, "launch_clips", interrupted)
    frames = out_dir / "frames"
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tiny_checkpoints, "--frames-dir", str(frames),
                                            "--audio", str(REPO / "demo" / "speech.wav")))
    assert result.exit_code == 130, result.output
    assert "Interrupted" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in out_dir.iterdir()) == []
    assert ffmpeg_processes() == []


@pytest.mark.slow  # a long end-to-end run (processes started and killed): `make test`, not test-fast
def test_sigterm_mid_render_leaves_nothing(tmp_path, out_dir, tiny_checkpoints):
    long_clip = tmp_path / "long.npy"
    np.save(long_clip, np.tile(np.load(DEMO_COEFFS), (8, 1)))  # 600 frames: far longer than the test waits
    frames = out_dir / "frames"
    args = render_args(long_clip, out_dir, tiny_checkpoints, "--frames-dir", str(frames), "--quiet")
    process = subprocess.Popen(SFR + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # frames go into a temporary folder beside the target until the set is complete: wait for the first
        while not any(out_dir.glob(f".{frames.name}.sfr-tmp/*.png")):
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        ffmpeg = [p for p in psutil.Process(process.pid).children(recursive=True) if "ffmpeg" in p.name()]
        assert ffmpeg, "ffmpeg should be encoding while frames are written"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr and stdout == ""
    assert sorted(p.name for p in out_dir.iterdir()) == []
    gone, alive = psutil.wait_procs(ffmpeg, timeout=5)
    assert alive == []


@pytest.mark.heavy
def test_writer_failure_mid_render_is_an_error_and_leaves_nothing(runner, coeffs_npy, out_dir, tiny_checkpoints,
                                                                  monkeypatch):
    from sfr_cli import media
    from sfr_cli.errors import MediaError

    original = media.Mp4Writer.write

    def failing(self, frame):
        if self.frames_written == 2:
            raise MediaError(f"{self.path}: ffmpeg stopped taking frames after 2")
        original(self, frame)

    monkeypatch.setattr(media.Mp4Writer, "write", failing)
    frames = out_dir / "frames"
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tiny_checkpoints, "--frames-dir", str(frames)))
    assert_user_error(result, out_dir, "clip.mp4", "stopped taking frames")
    assert ffmpeg_processes() == []


def test_readme_lists_every_render_option():
    from sfr_cli.cli import render

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    options = [opt for param in render.params for opt in (*param.opts, *param.secondary_opts)]
    missing = [opt for opt in options if f"`{opt}" not in readme and f" {opt}`" not in readme
               and f"{opt} " not in readme]
    assert not missing, f"README.md does not describe {missing}"


@pytest.mark.heavy
def test_bench_json(runner):
    result = runner.invoke(sfr, ["bench", "--config", "tiny", "--frames", "2", "--device", "cpu", "--no-plain",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (run,) = report["runs"]
    assert report["frames"] == run["frames"] == 2 and run["name"] == "sfr"
    assert run["frames_per_second"] == pytest.approx(2 / run["seconds"])


def test_precision_the_device_cannot_do(runner, coeffs_npy, out_dir, tiny_checkpoints, no_model_load):
    result = runner.invoke(sfr, render_args(coeffs_npy, out_dir, tiny_checkpoints, "--device", "cpu",
                                            "--precision", "fp16"))
    assert_user_error(result, out_dir, "fp16")


def test_frames_dir_holding_old_frames(runner, tmp_path, coeffs_npy, tiny_checkpoints, no_model_load):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "000000.png").write_bytes(b"old")
    args = ["render", "--coeffs", str(coeffs_npy), "--source", str(SOURCE), "--frames-dir", str(frames),
            "--checkpoint-dir", str(tiny_checkpoints), "--config", "tiny"]
    assert_user_error(runner.invoke(sfr, args), None, "frames", "already holds 1 frame")
    assert (frames / "000000.png").read_bytes() == b"old"
