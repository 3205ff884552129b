"""sfr_cli/outputs.py: temporaries beside their targets, leftovers of killed runs, and which paths may
be outputs (never an input, never a non-regular file, an existing one only with overwrite)."""

import os
import subprocess
import sys
import time

import pytest

from sfr_cli.errors import MediaError
from sfr_cli.outputs import (JobInput, atomic_path, check_folder_holds_no_input, check_output, dead_temporaries,
                             remove_leftovers, remove_leftovers_in, temporary_path)


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def own_start() -> str:
    with open(f"/proc/{os.getpid()}/stat", "rb") as handle:
        return handle.read().rpartition(b")")[2].split()[19].decode()


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="process start times come from /proc")


@needs_proc
def test_temporary_names_carry_pid_and_start_time_beside_the_target(tmp_path):
    path = temporary_path(tmp_path / "out.mp4", ".mp4")
    assert path.parent == tmp_path
    assert path.name == f".out.mp4.sfr-tmp-{os.getpid()}-{own_start()}.mp4"


def test_atomic_path_commits_on_success_and_removes_on_failure(tmp_path):
    target = tmp_path / "weights.pth"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]
    with atomic_path(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]


@needs_proc
def test_only_dead_writers_leftovers_for_this_target_are_removed(tmp_path):
    target = tmp_path / "clip.mp4"
    dead = dead_pid()
    names = {
        "dead": f".clip.mp4.sfr-tmp-{dead}-123.mp4",
        "dead_old_style": f".clip.mp4.sfr-tmp-{dead}.mp4",
        "reused_pid": f".clip.mp4.sfr-tmp-{os.getpid()}-1.mp4",  # our PID, another start: a dead writer
        "live": f".clip.mp4.sfr-tmp-{os.getpid()}-{own_start()}.mp4",  # this process, still writing
        "live_old_style": f".clip.mp4.sfr-tmp-{os.getppid()}.mp4",
        "other_target": f".other.mp4.sfr-tmp-{dead}-123.mp4",
        "not_ours": f".clip.mp4.sfr-tmp-notapid.mp4",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    removed = remove_leftovers(target)
    assert sorted(p.name for p in removed) == sorted(names[k] for k in ("dead", "dead_old_style", "reused_pid"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(names[k] for k in ("live", "live_old_style", "other_target", "not_ours"))
    assert remove_leftovers(target) == []


@needs_proc
def test_a_zombie_writer_counts_as_dead(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        child_stat = f"/proc/{child.pid}/stat"
        for _ in range(200):  # wait until it has exited but is not reaped
            with open(child_stat, "rb") as handle:
                fields = handle.read().rpartition(b")")[2].split()
            if fields[0] == b"Z":
                break
            time.sleep(0.01)
        leftover = tmp_path / f".000001.png.sfr-tmp-{child.pid}-{fields[19].decode()}"
        leftover.write_bytes(b"")
        assert dead_temporaries(tmp_path, lambda name: name == "000001.png") == [leftover]
        assert remove_leftovers_in(tmp_path, lambda name: name.endswith(".png")) == [leftover]
    finally:
        child.wait()


@pytest.fixture
def job(tmp_path):
    face = tmp_path / "face.png"
    face.write_bytes(b"png")
    coeffs = tmp_path / "coeffs.npy"
    coeffs.write_bytes(b"npy")
    return tmp_path, [JobInput(face, "--source"), JobInput(coeffs, "--coeffs")]


def test_an_output_that_is_an_input_is_refused_naming_both(job):
    folder, inputs = job
    (folder / "sub").mkdir()
    (folder / "link.mp4").symlink_to(folder / "face.png")
    os.link(folder / "coeffs.npy", folder / "hard.mp4")
    cases = [(folder / "face.png", "face.png"), (folder / "sub" / ".." / "coeffs.npy", "coeffs.npy"),
             (folder / "link.mp4", "face.png"), (folder / "hard.mp4", "coeffs.npy")]
    for output, input_name in cases:
        with pytest.raises(MediaError) as info:
            check_output(output, inputs, overwrite=True)
        message = str(info.value)
        assert message.startswith(f"{output}: the output would replace") and input_name in message
        assert ("--source" if input_name == "face.png" else "--coeffs") in message
    assert (folder / "face.png").read_bytes() == b"png" and (folder / "coeffs.npy").read_bytes() == b"npy"


def test_an_existing_output_needs_overwrite(job):
    folder, inputs = job
    old = folder / "old.mp4"
    old.write_bytes(b"video")
    with pytest.raises(MediaError, match=r"old\.mp4: exists; pass --overwrite to replace it"):
        check_output(old, inputs)
    check_output(old, inputs, overwrite=True)
    dangling = folder / "dangling.mp4"
    dangling.symlink_to(folder / "nowhere.mp4")
    with pytest.raises(MediaError, match="exists; pass --overwrite"):
        check_output(dangling, inputs)
    check_output(folder / "new.mp4", inputs)


def test_outputs_that_are_not_regular_files_are_refused_whatever_the_flags(job):
    folder, inputs = job
    fifo = folder / "pipe.mp4"
    os.mkfifo(fifo)
    (folder / "to-fifo.mp4").symlink_to(fifo)
    for path in (fifo, folder / "to-fifo.mp4"):
        with pytest.raises(MediaError, match="is a FIFO, not a regular file; sfr writes only regular files"):
            check_output(path, inputs, overwrite=True)
    with pytest.raises(MediaError, match="is a folder; give a file name for the output"):
        check_output(folder, inputs, overwrite=True)


def test_a_frames_folder_never_holds_an_input_under_a_frame_name(tmp_path):
    source = tmp_path / "000000.png"
    source.write_bytes(b"png")
    is_frame = lambda name: name == "000000.png"  # noqa: E731
    with pytest.raises(MediaError, match="000000.png, the --source input"):
        check_folder_holds_no_input(tmp_path / "x" / "..", [JobInput(source, "--source")], is_frame)
    check_folder_holds_no_input(tmp_path / "frames", [JobInput(source, "--source")], is_frame)
