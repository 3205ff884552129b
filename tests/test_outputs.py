"""sfr_cli/outputs.py: temporaries beside their targets, leftovers of killed runs, and which paths may
be outputs (never an input, never a non-regular file, an existing one only with overwrite)."""

import json
import os
import subprocess
import sys
import time

import pytest

from sfr_cli.errors import MediaError
from sfr_cli import outputs
from sfr_cli.outputs import (JobInput, OutputBusy, OutputClaim, OutputExists, atomic_path, check_folder_holds_no_input,
                             check_output, commit_path, dead_temporaries, host_name, lock_path, remove_leftovers,
                             remove_leftovers_in, rename_noreplace, temporary_path)


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
def test_temporary_names_carry_host_pid_and_start_time_beside_the_target(tmp_path):
    path = temporary_path(tmp_path / "out.mp4", ".mp4")
    assert path.parent == tmp_path
    assert path.name == f".out.mp4.sfr-tmp-{host_name()}-{os.getpid()}-{own_start()}.mp4"
    assert host_name()[0].isalpha() or host_name()[0] == "_"


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
    here = host_name()
    names = {
        "dead": f".clip.mp4.sfr-tmp-{here}-{dead}-123.mp4",
        "dead_without_host": f".clip.mp4.sfr-tmp-{dead}-123.mp4",  # sfr before hosts were named: this host
        "reused_pid": f".clip.mp4.sfr-tmp-{here}-{os.getpid()}-1.mp4",  # our PID, another start: a dead writer
        "dead_folder": f".clip.mp4.sfr-tmp-{here}-{dead}-123",  # a frames folder's temporary
        "live": f".clip.mp4.sfr-tmp-{here}-{os.getpid()}-{own_start()}.mp4",  # this process, still writing
        "pid_only": f".clip.mp4.sfr-tmp-{dead}.mp4",  # never shipped: not an sfr name, never removed
        "other_target": f".other.mp4.sfr-tmp-{here}-{dead}-123.mp4",
        "not_ours": ".clip.mp4.sfr-tmp-notapid.mp4",
    }
    for key, name in names.items():
        if key == "dead_folder":
            (tmp_path / name).mkdir()
            (tmp_path / name / "000000.png").write_bytes(b"partial")
        else:
            (tmp_path / name).write_bytes(b"partial")
    removed = remove_leftovers(target)
    gone = ("dead", "dead_without_host", "reused_pid", "dead_folder")
    assert sorted(p.name for p in removed) == sorted(names[k] for k in gone)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(names[k] for k in names if k not in gone)
    assert remove_leftovers(target) == []


@needs_proc
def test_another_hosts_temporary_is_never_a_leftover(tmp_path, monkeypatch):
    """Shared storage: a live writer on host B names its temporary with B; on host A its PID means nothing
    (dead, or another process), so A must keep it. Simulated by a name with another host's token, whose
    PID is dead here and whose start matches nothing."""
    dead = dead_pid()
    other = tmp_path / f".clip.mp4.sfr-tmp-otherhost_b-{dead}-123.mp4"
    other.write_bytes(b"being written on host B")
    folder = tmp_path / f".frames.sfr-tmp-otherhost_b-{os.getpid()}-1"
    folder.mkdir()
    assert remove_leftovers(tmp_path / "clip.mp4") == [] and remove_leftovers(tmp_path / "frames") == []
    assert other.exists() and folder.exists()
    # the same names are judged dead once this host is host B (its writer's PID is gone there)
    monkeypatch.setattr(outputs, "host_name", lambda: "otherhost_b")
    assert remove_leftovers(tmp_path / "clip.mp4") == [other]
    assert remove_leftovers(tmp_path / "frames") == [folder]


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


def test_rename_noreplace_never_replaces(tmp_path):
    source, target = tmp_path / "tmp", tmp_path / "out.mp4"
    source.write_text("new")
    target.write_text("theirs")
    assert rename_noreplace(source, target) is False
    assert target.read_text() == "theirs" and source.read_text() == "new"
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "nowhere")
    assert rename_noreplace(source, tmp_path / "dangling.mp4") is False
    assert rename_noreplace(source, tmp_path / "free.mp4") is True
    assert (tmp_path / "free.mp4").read_text() == "new" and not source.exists()
    folder = tmp_path / "folder.tmp"
    folder.mkdir()
    assert rename_noreplace(folder, tmp_path / "free.mp4") is False
    assert rename_noreplace(folder, tmp_path / "frames") is True and (tmp_path / "frames").is_dir()


def test_rename_noreplace_falls_back_to_a_hard_link(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_renameat2_noreplace", lambda source, target: None)  # old kernel or libc
    test_rename_noreplace_never_replaces(tmp_path)


def test_commit_path_replaces_only_with_overwrite(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_text("appeared meanwhile")
    temporary = temporary_path(target, ".mp4")
    temporary.write_text("ours")
    with pytest.raises(OutputExists, match=r"out\.mp4: exists \(another run wrote it while this one rendered\); "
                                           "pass --overwrite"):
        commit_path(temporary, target, overwrite=False)
    assert target.read_text() == "appeared meanwhile"
    commit_path(temporary, target, overwrite=True)
    assert target.read_text() == "ours" and not temporary.exists()


def test_a_claimed_output_is_busy_for_a_second_claim_and_free_after_release(tmp_path):
    target = tmp_path / "q.mp4"
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with OutputClaim(tmp_path / "real" / "q.mp4") as claim:
        data = json.loads(claim.path.read_text())
        assert (data["host"], data["pid"]) == (host_name(), os.getpid())
        with pytest.raises(OutputBusy, match=rf"q\.mp4: another sfr run is writing it \(host {host_name()}, "
                                             rf"pid {os.getpid()}, since "):
            OutputClaim(tmp_path / "alias" / "q.mp4").acquire()  # the same file through a symlinked folder
        assert outputs.live_holder(tmp_path / "alias" / "q.mp4").pid == os.getpid()
        OutputClaim(target).acquire().release()  # another output: free
    assert not claim.path.exists() and outputs.live_holder(tmp_path / "real" / "q.mp4") is None
    OutputClaim(tmp_path / "alias" / "q.mp4").acquire().release()


def write_lock(target, host, pid, start, age_seconds=0.0):
    path = lock_path(target)
    path.write_text(json.dumps({"host": host, "pid": pid, "start": start, "since": time.time() - age_seconds}))
    os.utime(path, (time.time() - age_seconds,) * 2)
    return path


@needs_proc
def test_a_dead_runs_lock_is_taken_over_and_another_hosts_live_lock_is_not(tmp_path):
    target = tmp_path / "clip.mp4"
    write_lock(target, host_name(), dead_pid(), "123")  # kill -9 on this host
    with OutputClaim(target) as claim:
        assert json.loads(claim.path.read_text())["pid"] == os.getpid()
    write_lock(target, "otherhost_b", dead_pid(), "123", age_seconds=5)  # alive on host B, refreshed lately
    with pytest.raises(OutputBusy, match="host otherhost_b"):
        OutputClaim(target).acquire()
    assert outputs.live_holder(target).host == "otherhost_b"
    write_lock(target, "otherhost_b", 1, "123", age_seconds=outputs.LOCK_STALE_SECONDS + 5)  # B died long ago
    assert outputs.live_holder(target) is None
    OutputClaim(target).acquire().release()
    assert not lock_path(target).exists()


def test_a_flocked_lock_is_live_whatever_it_says(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    target = tmp_path / "clip.mp4"
    path = write_lock(target, host_name(), dead_pid(), "123", age_seconds=outputs.LOCK_STALE_SECONDS + 5)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(path)!r}); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        with pytest.raises(OutputBusy):
            OutputClaim(target).acquire()
    finally:
        holder.kill()
        holder.wait()
    OutputClaim(target).acquire().release()


def test_a_lock_left_empty_by_a_run_killed_taking_it_is_taken_over(tmp_path):
    """A run killed between creating the lock file and writing its holder leaves it empty: busy for a
    moment (a live run writes its holder at once), then taken over, not held for the stale-lock time."""
    target = tmp_path / "clip.mp4"
    lock = outputs.lock_path(target)
    lock.write_bytes(b"")
    with pytest.raises(outputs.OutputBusy, match="starting now"):
        outputs.OutputClaim(target).acquire()
    aged = time.time() - 2 * outputs.LOCK_WRITE_GRACE_SECONDS
    os.utime(lock, (aged, aged))
    claim = outputs.OutputClaim(target).acquire()
    try:
        assert outputs.live_holder(target).pid == os.getpid()
    finally:
        claim.release()
