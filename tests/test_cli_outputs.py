"""Issue 8 through the command line: a user's files are never destroyed, and every bad number is a usage
error. Outputs that are inputs, not regular files, or already there; leftovers of a `kill -9`; numeric
options checked at parse time; --compile on the CPU."""

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

from sfr_cli.cli import sfr
from sfr_cli.config import CONFIG_DIR
from sfr_cli.media import count_video_frames
from sfr_cli.outputs import host_name

from held_ffmpeg import held_ffmpeg_env, wait_until_held
from conftest import DEMO_COEFFS, SOURCE, assert_user_error

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "demo" / "speech.wav"


@pytest.fixture
def job(tmp_path):
    """A job folder holding its own inputs: face.png, clip.npy (4 frames), speech.wav; out/ for outputs."""
    shutil.copy(SOURCE, tmp_path / "face.png")
    shutil.copy(SPEECH, tmp_path / "speech.wav")
    np.save(tmp_path / "clip.npy", np.load(DEMO_COEFFS)[:4])
    (tmp_path / "out").mkdir()
    return tmp_path


def job_args(job, output, checkpoints, *extra):
    return ["render", "--coeffs", str(job / "clip.npy"), "--source", str(job / "face.png"),
            "--audio", str(job / "speech.wav"), "-o", str(output), "--checkpoint-dir", str(checkpoints),
            "--config", "tiny", "--batch-size", "2", *extra]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("name, role", [("face.png", "--source"), ("clip.npy", "--coeffs"),
                                        ("speech.wav", "--audio")])
def test_an_output_that_is_an_input_is_refused_before_the_model_loads(runner, job, tiny_checkpoints,
                                                                       no_model_load, name, role):
    before = snapshot(job)
    for output in (job / name, job / "out" / ".." / name):
        result = runner.invoke(sfr, job_args(job, output, tiny_checkpoints, "--overwrite"))
        assert_user_error(result, job / "out", f"{output}: the output would replace", str(job / name), role)
    link = job / "out" / "link.mp4"
    link.symlink_to(job / name)
    result = runner.invoke(sfr, job_args(job, link, tiny_checkpoints, "--overwrite"))
    assert result.exit_code == 1 and str(link) in result.stderr and f"{name}, the {role} input" in result.stderr
    assert snapshot(job) == before and link.is_symlink()


def test_a_found_checkpoint_is_an_input_too(runner, job, tmp_path, tiny_checkpoints, no_model_load):
    folder = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, folder)
    target = folder / "mapping_00229-model.pth.tar"
    before = target.read_bytes()
    result = runner.invoke(sfr, job_args(job, target, folder, "--overwrite"))
    assert_user_error(result, job / "out", "mapping checkpoint input")
    assert target.read_bytes() == before


@pytest.mark.heavy
def test_an_existing_output_is_kept_unless_overwrite(runner, job, tiny_checkpoints):
    output = job / "out" / "clip.mp4"
    output.write_bytes(b"an earlier render")
    result = runner.invoke(sfr, job_args(job, output, tiny_checkpoints))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == f"Error: {output}: exists; pass --overwrite to replace it\n"
    assert output.read_bytes() == b"an earlier render"
    result = runner.invoke(sfr, job_args(job, output, tiny_checkpoints, "--overwrite", "--quiet"))
    assert result.exit_code == 0, result.output
    assert count_video_frames(output) == 4 and sorted(p.name for p in (job / "out").iterdir()) == ["clip.mp4"]


@pytest.mark.heavy
def test_overwrite_replaces_the_frames_of_an_earlier_render(runner, job, tiny_checkpoints):
    frames = job / "frames"
    frames.mkdir()
    for index in range(6):  # an earlier, longer render: none of its frames may stay
        (frames / f"{index:06d}.png").write_bytes(b"old")
    args = job_args(job, job / "out" / "clip.mp4", tiny_checkpoints, "--frames-dir", str(frames), "--quiet")
    result = runner.invoke(sfr, args)
    assert result.exit_code == 1 and "pass --overwrite to replace them" in result.stderr
    result = runner.invoke(sfr, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in frames.iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in frames.iterdir())


def test_a_frames_folder_holding_an_input_is_refused(runner, job, tiny_checkpoints, no_model_load):
    shutil.copy(job / "face.png", job / "out" / "000000.png")
    args = job_args(job, job / "clip.mp4", tiny_checkpoints, "--frames-dir", str(job / "out"), "--overwrite")
    args[args.index("--source") + 1] = str(job / "out" / "000000.png")
    result = runner.invoke(sfr, args)
    assert result.exit_code == 1 and "the --source input" in result.stderr
    assert (job / "out" / "000000.png").read_bytes() == (job / "face.png").read_bytes()


def test_an_mp4_named_like_a_frame_of_its_own_frames_folder_is_refused(runner, job, tiny_checkpoints,
                                                                        no_model_load):
    """`-o out/000000.png --frames-dir out`: the first PNG frame would replace the MP4 (or the MP4's rename
    the frame); refused before the model loads, whatever the flags, written either way."""
    for output, frames_dir in ((job / "out" / "000000.png", job / "out"),
                               (job / "out" / ".." / "out" / "000003.png", job / "out")):
        args = job_args(job, output, tiny_checkpoints, "--frames-dir", str(frames_dir), "--overwrite")
        result = runner.invoke(sfr, args)
        assert_user_error(result, job / "out", f"{output}: a PNG frame of --frames-dir")


def test_a_fifo_output_is_refused_whatever_the_flags(runner, job, tiny_checkpoints, no_model_load):
    fifo = job / "out" / "pipe.mp4"
    os.mkfifo(fifo)
    for extra in ((), ("--overwrite",)):
        result = runner.invoke(sfr, job_args(job, fifo, tiny_checkpoints, *extra))
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"{fifo}: is a FIFO, not a regular file" in result.stderr
    assert fifo.is_fifo()


def test_checkpoints_random_keeps_existing_files_unless_overwrite(runner, tmp_path):
    folder = tmp_path / "ck"
    result = runner.invoke(sfr, ["checkpoints", "random", str(folder), "--config", "tiny"])
    assert result.exit_code == 0, result.output
    first = snapshot(folder)
    result = runner.invoke(sfr, ["checkpoints", "random", str(folder), "--config", "tiny", "--seed", "1"])
    assert result.exit_code == 1 and "exists; pass --overwrite to replace it" in result.stderr
    assert snapshot(folder) == first
    result = runner.invoke(sfr, ["checkpoints", "random", str(folder), "--config", "tiny", "--seed", "1",
                                 "--overwrite"])
    assert result.exit_code == 0 and snapshot(folder).keys() == first.keys() and snapshot(folder) != first
    config = folder / "mapping_00229-model.pth.tar"
    shutil.copy(CONFIG_DIR / "tiny.yaml", tmp_path / "tiny.yaml")
    os.replace(tmp_path / "tiny.yaml", config)  # a config that sits where an output goes
    result = runner.invoke(sfr, ["checkpoints", "random", str(folder), "--config", str(config), "--overwrite"])
    assert result.exit_code == 1 and "the --config input" in result.stderr


@pytest.mark.parametrize("option, value", [
    ("--fps", "inf"), ("--fps", "nan"), ("--fps", "0"), ("--fps", "-5"), ("--fps", "1000.5"), ("--fps", "x"),
    ("--expression-scale", "nan"), ("--expression-scale", "inf"), ("--expression-scale", "-inf"),
    ("--expression-scale", "1e39"), ("--yaw", "1e308"), ("--yaw", "0,361"), ("--pitch", "-360.5"),
    ("--roll", "0,inf"),
])
def test_absurd_numbers_are_usage_errors_at_parse_time(runner, job, tiny_checkpoints, no_model_load, option,
                                                       value):
    result = runner.invoke(sfr, job_args(job, job / "out" / "clip.mp4", tiny_checkpoints, option, value))
    assert_user_error(result, job / "out", f"'{option}'", exit_code=2)


@pytest.mark.heavy
def test_the_limits_themselves_are_accepted(runner, job, tiny_checkpoints):
    args = job_args(job, job / "out" / "clip.mp4", tiny_checkpoints, "--fps", "1000", "--yaw", "-360,360",
                    "--expression-scale", "-1000", "--quiet")
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output


def test_no_numpy_warning_reaches_the_user(job, tiny_checkpoints):
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, "-m", "sfr_cli.cli", *job_args(
        job, job / "out" / "clip.mp4", tiny_checkpoints, "--yaw", "1e308")], capture_output=True, text=True,
        timeout=120, env=env)
    assert result.returncode == 2 and "Warning" not in result.stderr and "--yaw" in result.stderr


@pytest.mark.heavy
def test_compile_on_the_cpu_is_ignored_with_one_note(runner, job, tiny_checkpoints):
    result = runner.invoke(sfr, job_args(job, job / "out" / "clip.mp4", tiny_checkpoints, "--device", "cpu",
                                         "--compile"))
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "--compile" in line]
    assert notes == ["--compile is ignored on cpu: torch.compile speeds up CUDA renders only"]


@pytest.mark.heavy
def test_an_output_appearing_while_rendering_is_never_replaced(runner, job, tiny_checkpoints, monkeypatch):
    """Issue 17.2: "exists" was checked at the start only; a file that appears at -o while the job renders
    (another run finishing first) stays, and this run says so (exit 1) and leaves nothing else."""
    from sfr_cli.media import sinks

    output = job / "out" / "clip.mp4"
    counted = sinks.count_video_frames

    def count_then_another_run_finishes(path, *args):
        output.write_bytes(b"the other run's clip")
        return counted(path, *args)

    monkeypatch.setattr(sinks, "count_video_frames", count_then_another_run_finishes)
    result = runner.invoke(sfr, job_args(job, output, tiny_checkpoints, "--quiet"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{output}: exists (another run wrote it while this one rendered); pass --overwrite" in result.stderr
    assert output.read_bytes() == b"the other run's clip"
    assert sorted(p.name for p in (job / "out").iterdir()) == ["clip.mp4"]  # no temporary, no lock
    output.unlink()
    result = runner.invoke(sfr, job_args(job, output, tiny_checkpoints, "--quiet", "--overwrite"))
    assert result.exit_code == 0 and count_video_frames(output) == 4  # --overwrite: replaced at the end


def hold_claim(target):
    """Another live sfr run holding `target`'s claim: a process (started and stopped by the caller)."""
    code = ("import sys, time\nfrom sfr_cli.outputs import OutputClaim\n"
            f"claim = OutputClaim({str(target)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline() == "held\n"
    return holder


def test_an_output_another_live_run_writes_is_refused_before_the_model_loads(runner, job, tiny_checkpoints,
                                                                             no_model_load):
    """Issue 17.2: two `sfr render` to one output at once: the second says so; a dead holder's claim
    (kill -9) is taken over."""
    output = job / "out" / "clip.mp4"
    holder = hold_claim(output)
    try:
        result = runner.invoke(sfr, job_args(job, output, tiny_checkpoints, "--overwrite"))
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"{output}: another sfr run is writing it (host " in result.stderr
        assert f"pid {holder.pid}," in result.stderr and not output.exists()
    finally:
        holder.kill()
        holder.wait()
    assert (job / "out" / ".clip.mp4.sfr-lock").exists()  # the killed run's lock: judged dead next time


@pytest.mark.heavy
def test_ctrl_c_keeps_the_old_frames_of_an_overwrite(runner, job, tiny_checkpoints, monkeypatch):
    """Issue 17.4: --frames-dir old --overwrite, interrupted mid-render: the old frames are untouched (the
    new ones go to a temporary folder, swapped in only when complete); completed, they are replaced."""
    frames = job / "old"
    frames.mkdir()
    for index in range(6):
        (frames / f"{index:06d}.png").write_bytes(b"old %d" % index)
    before = snapshot(frames)
    from sfr_cli.progress import SilentReporter

    advanced = []

    def ctrl_c_after_two_frames(self, frames_done):  # the engine's progress callback, in the main thread
        advanced.append(frames_done)
        if sum(advanced) >= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SilentReporter, "advance", ctrl_c_after_two_frames)
    args = job_args(job, job / "out" / "clip.mp4", tiny_checkpoints, "--frames-dir", str(frames), "--overwrite",
                    "--quiet")
    result = runner.invoke(sfr, args)
    assert result.exit_code == 130, result.output
    assert sum(advanced) == 2 and snapshot(frames) == before
    assert sorted(p.name for p in job.iterdir()) == ["clip.npy", "face.png", "old", "out", "speech.wav"]
    assert list((job / "out").iterdir()) == []
    monkeypatch.undo()
    result = runner.invoke(sfr, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in frames.iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in frames.iterdir())
    assert sorted(p.name for p in job.iterdir()) == ["clip.npy", "face.png", "old", "out", "speech.wav"]


@pytest.mark.parametrize("option", ["-o", "--frames-dir", "--source"])
def test_a_folder_without_permission_is_a_clean_error(runner, job, tiny_checkpoints, no_model_load, denied,
                                                      option):
    """Issue 17.6: an output, frames or source folder refusing access: `Error: ...`, exit 1, no traceback."""
    locked = job / "locked"
    locked.mkdir()
    if option == "--source":
        shutil.copy(job / "face.png", locked / "face.png")
    denied(locked)
    target = {"-o": locked / "clip.mp4", "--frames-dir": locked / "frames", "--source": locked / "face.png"}[option]
    args = job_args(job, job / "out" / "clip.mp4", tiny_checkpoints)
    if option == "--frames-dir":
        args += ["--frames-dir", str(target)]
    else:
        args[args.index(option) + 1] = str(target)
    result = runner.invoke(sfr, args)
    assert_user_error(result, job / "out", str(locked))
    assert "permission" in result.stderr.lower()


@pytest.mark.slow  # two 40-frame renders in subprocesses
def test_kill_9_mid_render_then_the_same_command_leaves_only_complete_files(tmp_path, tiny_checkpoints):
    clip = tmp_path / "clip.npy"
    np.save(clip, np.tile(np.load(DEMO_COEFFS), (1, 1))[:40])
    out = tmp_path / "out"
    out.mkdir()
    output = out / "clip.mp4"
    command = [sys.executable, "-m", "sfr_cli.cli", "render", "--coeffs", str(clip), "--source", str(SOURCE),
               "-o", str(output), "--checkpoint-dir", str(tiny_checkpoints), "--config", "tiny", "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    hold = tmp_path / "hold"  # the encode holds after 5 of 40 frames: the kill lands mid-clip on any machine
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**held_ffmpeg_env(hold, encode=1, frames=5), "PYTHONPATH": str(REPO)})
    try:
        wait_until_held(hold, process)
        ffmpeg = psutil.Process(process.pid).children(recursive=True)  # the holder and the real ffmpeg
        assert any("ffmpeg" in p.name() for p in ffmpeg) and list(out.glob(".clip.mp4.sfr-tmp*"))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    psutil.wait_procs(ffmpeg, timeout=30)  # the orphaned ffmpeg ends at the end of its input
    assert sorted(p.name for p in out.iterdir()) == [".clip.mp4.sfr-lock", ".clip.mp4.sfr-tmp.mp4"]
    lock = json.loads((out / ".clip.mp4.sfr-lock").read_text())  # the killed run's: it names that run
    assert (lock["host"], lock["pid"]) == (host_name(), process.pid)
    leftovers = [".clip.mp4.sfr-tmp.mp4"]

    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{output}\n"
    lines = [line for line in again.stderr.splitlines() if "killed" in line]
    assert lines == [f"{output}: removed 1 temporary file(s) left by an earlier sfr run that was killed "
                     f"({leftovers[0]})"]
    assert [p.name for p in out.iterdir()] == ["clip.mp4"] and count_video_frames(output) == 40
