"""sfr_cli/outputs.py: one lock per output, temporaries named from their targets and removed by whoever
takes the lock, and which paths may be outputs (never an input, never a non-regular file, an existing one
only with overwrite)."""

import json
import os
import subprocess
import sys
import time

import pytest

from sfr_cli.errors import MediaError
from sfr_cli import outputs
from sfr_cli.outputs import (JobInput, OutputBusy, OutputClaim, OutputExists, atomic_path, check_folder_holds_no_input,
                             check_output, commit_path, host_name, lock_path, remove_leftovers, remove_leftovers_in,
                             rename_noreplace, temporary_path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="process start times come from /proc")


def test_temporary_names_come_from_the_target_beside_it(tmp_path):
    """Hidden, in the target's folder (the final rename never crosses file systems), and the same for every
    run: only the holder of the target's lock writes it."""
    assert temporary_path(tmp_path / "out.mp4", ".mp4") == tmp_path / ".out.mp4.sfr-tmp.mp4"
    assert temporary_path(tmp_path / "frames") == tmp_path / ".frames.sfr-tmp"


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


def hold_lock(target, temporary=None):
    """Another live sfr run holding `target`'s lock (and writing `temporary`): a process, stopped by the caller."""
    code = ("import sys, time\nfrom sfr_cli.outputs import OutputClaim\n"
            f"claim = OutputClaim({str(target)!r}).acquire()\n"
            + (f"open({str(temporary)!r}, 'wb').write(b'being written')\n" if temporary else "")
            + "print('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO})
    assert holder.stdout.readline() == "held\n"
    return holder


def test_atomic_path_holds_the_targets_lock(tmp_path):
    """A writer takes its target's lock unless this process holds it (its job's): another live run's lock
    stops it before anything is written."""
    target = tmp_path / "weights.pth"
    holder = hold_lock(target)
    try:
        with pytest.raises(OutputBusy, match=f"pid {holder.pid},"):
            with atomic_path(target) as temporary:
                temporary.write_text("never")
    finally:
        holder.kill()
        holder.wait()
    assert not target.exists()
    with OutputClaim(target):  # the job's lock, held here: the writer writes under it
        with atomic_path(target) as temporary:
            temporary.write_text("ours")
        assert lock_path(target).exists()
    assert target.read_text() == "ours" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]


def test_taking_the_lock_removes_the_targets_leftovers_and_nothing_else(tmp_path):
    """Whoever takes an output's lock is its only writer, so every temporary of that target is a killed
    run's: taking the lock removes them (files, a frames folder, the names older sfr gave them) and
    `remove_leftovers` says which; other targets' temporaries and names sfr never wrote stay."""
    target = tmp_path / "clip.mp4"
    names = {
        "file": ".clip.mp4.sfr-tmp.mp4",
        "folder": ".clip.mp4.sfr-tmp",  # a frames folder's temporary
        "aside": ".clip.mp4.sfr-tmp.old",  # old frames set aside while a new set is swapped in
        "older_sfr": ".clip.mp4.sfr-tmp-somehost-4242-123.mp4",  # sfr before temporaries were named from targets
        "older_sfr_without_host": ".clip.mp4.sfr-tmp-4242-123.mp4",
        "pid_only": ".clip.mp4.sfr-tmp-4242.mp4",  # never an sfr name: never removed
        "not_ours": ".clip.mp4.sfr-tmp-notapid.mp4",
        "other_target": ".other.mp4.sfr-tmp.mp4",
        "download_part": "clip.mp4.part",  # a download's resumable part is not a temporary
    }
    for key, name in names.items():
        if key == "folder":
            (tmp_path / name).mkdir()
            (tmp_path / name / "000000.png").write_bytes(b"partial")
        else:
            (tmp_path / name).write_bytes(b"partial")
    removed = remove_leftovers(target)
    gone = ("file", "folder", "aside", "older_sfr", "older_sfr_without_host")
    assert sorted(p.name for p in removed) == sorted(names[k] for k in gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in names if k not in gone)
    assert remove_leftovers(target) == []
    (tmp_path / names["file"]).write_bytes(b"partial")
    with OutputClaim(target) as claim:  # a job's claim: what taking it removed is said once, by remove_leftovers
        assert claim.removed == [tmp_path / names["file"]]
        assert remove_leftovers(target) == [tmp_path / names["file"]] and remove_leftovers(target) == []


def test_a_live_runs_temporary_is_never_removed(tmp_path):
    """A run writing `clip.mp4` holds its lock: another run's `remove_leftovers` removes nothing, and its
    claim is refused. Once that run is killed (kill -9), the next one removes its temporary."""
    target = tmp_path / "clip.mp4"
    temporary = temporary_path(target, ".mp4")
    holder = hold_lock(target, temporary)
    try:
        assert remove_leftovers(target) == [] and temporary.read_bytes() == b"being written"
        with pytest.raises(OutputBusy):
            OutputClaim(target).acquire()
        assert temporary.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_leftovers(target) == [temporary]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the killed run's lock went with it


@needs_proc
def test_another_hosts_live_run_is_never_taken_over(tmp_path, monkeypatch):
    """Shared storage: a live run on host B holds the lock of clip.mp4 and of a frames folder, and writes
    their temporaries; on host A its PID means nothing (dead, or another process), and its flock may not
    reach A. A neither takes its locks nor removes its temporaries while B refreshes them; once they are
    stale (B died long ago), or once A judges as host B would (B's PID is dead), they are taken over."""
    dead = dead_pid()
    clip, frames = tmp_path / "clip.mp4", tmp_path / "frames"
    for target in (clip, frames):
        write_lock(target, "otherhost_b", dead, "123", age_seconds=5)
    clip_temporary = temporary_path(clip, ".mp4")
    clip_temporary.write_bytes(b"being written on host B")
    frames_temporary = temporary_path(frames)
    frames_temporary.mkdir()
    assert remove_leftovers(clip) == [] and remove_leftovers(frames) == []
    assert clip_temporary.exists() and frames_temporary.exists()
    with pytest.raises(OutputBusy, match="host otherhost_b"):
        OutputClaim(clip).acquire()
    write_lock(clip, "otherhost_b", dead, "123", age_seconds=outputs.LOCK_STALE_SECONDS + 5)
    assert remove_leftovers(clip) == [clip_temporary]
    monkeypatch.setattr(outputs, "host_name", lambda: "otherhost_b")
    assert remove_leftovers(frames) == [frames_temporary]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_proc
def test_a_zombie_holder_counts_as_dead(tmp_path):
    """A lock whose holder has exited but is not reaped yet is a dead run's: taken over, and what it left
    in its frames folder (the per-frame temporaries of older sfr too) removed."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # wait until it has exited but is not reaped
            with open(f"/proc/{child.pid}/stat", "rb") as handle:
                fields = handle.read().rpartition(b")")[2].split()
            if fields[0] == b"Z":
                break
            time.sleep(0.01)
        frames = tmp_path / "frames"
        frames.mkdir()
        write_lock(frames, host_name(), child.pid, fields[19].decode())
        leftover = frames / f".000001.png.sfr-tmp-{child.pid}-{fields[19].decode()}"
        leftover.write_bytes(b"")
        assert outputs.live_holder(frames) is None
        assert remove_leftovers_in(frames, lambda name: name.endswith(".png")) == [leftover]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"] and list(frames.iterdir()) == []
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
    write_lock(target, host_name(), os.getpid(), "1")  # its PID given to another process (this one) since
    with OutputClaim(target) as claim:
        assert json.loads(claim.path.read_text())["start"] != "1"
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


@needs_proc
def test_without_flock_the_lock_file_alone_keeps_one_run_per_output(tmp_path, monkeypatch):
    """A file system without flock: the O_EXCL lock file and its holder still refuse a second run, and a
    dead run's lock is moved aside and made anew."""
    monkeypatch.setattr(outputs, "fcntl", None)
    target = tmp_path / "clip.mp4"
    with OutputClaim(target):
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()},"):
            OutputClaim(target).acquire()
    write_lock(target, host_name(), dead_pid(), "123")
    with OutputClaim(target) as claim:
        assert json.loads(claim.path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
