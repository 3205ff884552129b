"""The process backends' dispatcher and the end of their processes, with real processes: a worker killed
mid-clip (its row retried, the user told), a row whose worker dies twice (it fails alone), and a driver
killed with SIGKILL (its workers, multiprocessing's resource tracker, and a local Ray instance end within
seconds). Every kill waits for an observable event (a temporary file, a child process), never for time."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from sfr_cli import batch as batching
from sfr_cli import batch_plan
from sfr_cli import manifest as manifests
from sfr_cli.jobs import RenderJob
from sfr_cli.outputs import LOCK_SUFFIX, TEMP_MARKER
from sfr_cli.watchdog import DriverWatchdog

from conftest import tiny

psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[1]
LONG_FRAMES = 300  # per clip of the kill tests: the kill lands while it renders, however fast the machine
DEADLINE_SECONDS = 120.0  # for an event to happen (a busy 2-core machine starts Ray slowly)
GONE_SECONDS = 20.0  # for a dead driver's processes to end: "within seconds", with room for a loaded machine


def wait_for(condition, what: str, seconds: float = DEADLINE_SECONDS):
    """Poll `condition` until it returns something true; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"waited {seconds:.0f} s for {what}")


def alive(process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def temporaries(folder: Path):
    return [p for p in folder.iterdir() if TEMP_MARKER in p.name] if folder.is_dir() else []


def writer_pid(temporary: Path) -> Optional[int]:
    """The PID of the process writing a temporary `.NAME.sfr-tmp.mp4`, as its target's lock `.NAME.sfr-lock`
    names it (None when the clip was finished meanwhile: lock and temporary gone)."""
    target = temporary.name[1:].rpartition(TEMP_MARKER)[0]
    try:
        return json.loads((temporary.parent / f".{target}{LOCK_SUFFIX}").read_text())["pid"]
    except FileNotFoundError:
        return None


def write_clips(folder: Path, frames, seed: int) -> Path:
    """clip<i>.npy with frames[i] frames each, and face.png."""
    rng = np.random.default_rng(seed)
    for index, count in enumerate(frames):
        np.save(folder / f"clip{index}.npy", (rng.standard_normal((count, 70)) * 0.1).astype(np.float32))
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(folder / "face.png")
    return folder


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    """Four clips of LONG_FRAMES frames (the kill tests: the batch is killed long before its end)."""
    return write_clips(tmp_path_factory.mktemp("long-clips"), [LONG_FRAMES] * 4, seed=11)


@pytest.fixture(scope="module")
def short_clips(tmp_path_factory):
    """Three clips of 6 frames (a batch that runs to its end)."""
    return write_clips(tmp_path_factory.mktemp("short-clips"), [6, 6, 6], seed=12)


def start_batch(clips: Path, out: Path, checkpoints, *options) -> subprocess.Popen:
    """`sfr batch` over the clips in `clips` writing `out`/<n>.mp4, as a real process (its own session: a
    kill or a Ctrl-C reaches it alone); stderr to out.stderr."""
    manifest = out.parent / f"{out.name}.csv"
    count = len(list(clips.glob("clip*.npy")))
    manifest.write_text("coeffs,source,output\n" + "".join(f"{clips}/clip{i}.npy,{clips}/face.png,{out}/{i}.mp4\n"
                                                          for i in range(count)))
    env = dict(os.environ, PYTHONPATH=str(REPO), SFR_RAY_CPUS="2", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "sfr_cli.cli", "batch", str(manifest), *tiny(checkpoints), *options]
    stderr = open(out.parent / f"{out.name}.stderr", "w")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            start_new_session=True)


def kill_driver_and_wait(process: subprocess.Popen, out: Path, what: str):
    """Once a clip is being written (a temporary in `out`), SIGKILL the driver; wait for every process
    below it (as they were just before the kill) to end, failing after GONE_SECONDS. Returns their
    command lines."""
    try:
        wait_for(lambda: temporaries(out) or process.poll() is not None, "a clip to start")
        assert process.poll() is None, "the batch ended before a clip was written"
        children = [p for p in psutil.Process(process.pid).children(recursive=True) if alive(p)]
        described = {p.pid: " ".join(p.cmdline()) for p in children}
        process.kill()
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + GONE_SECONDS
    while time.monotonic() < deadline and any(alive(p) for p in children):
        time.sleep(0.05)
    left = {p.pid: described[p.pid][:80] for p in children if alive(p)}
    for p in children:  # leave nothing behind, whatever the outcome
        if alive(p):
            p.kill()
    assert not left, f"{what} still running {GONE_SECONDS:.0f} s after the driver's kill -9: {left}"
    return list(described.values())


# ---------------------------------------------------------------------------------------------------
# The watchdog, on its own (fast: no models)


def test_the_watchdog_kills_what_a_killed_driver_started_and_nothing_after_a_clean_exit(tmp_path):
    """A driver process starts a child and tells a watchdog about it. Killed with SIGKILL, its child ends;
    closed cleanly, its child is left alone."""
    script = (
        "import subprocess, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from sfr_cli.watchdog import DriverWatchdog\n"
        "watchdog = DriverWatchdog()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "watchdog.watch_descendants()\n"
        "print(child.pid, flush=True)\n"
        "if sys.argv[1] == 'close':\n"
        "    watchdog.close()\n"
        "    print('closed', flush=True)\n"
        "time.sleep(600)\n")
    for ending in ("kill", "close"):
        driver = subprocess.Popen([sys.executable, "-c", script, ending], stdout=subprocess.PIPE, text=True)
        try:
            child = psutil.Process(int(driver.stdout.readline()))
            if ending == "close":
                assert driver.stdout.readline().strip() == "closed"
        finally:
            driver.kill()
            driver.wait()
        try:
            if ending == "kill":
                wait_for(lambda: not alive(child), "the dead driver's child to end", GONE_SECONDS)
            else:
                assert alive(child), "a cleanly closed watchdog must not kill anything"
        finally:
            if alive(child):
                child.kill()


def test_the_watchdog_leaves_a_reused_pid_alone():
    """A PID told to the watchdog with another start time (its process ended, the PID was reused) is not
    killed: the watchdog matches PID and start time."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        watchdog = DriverWatchdog()
        watchdog._process.stdin.write(f"{sleeper.pid} 1\n".encode())  # not its start time
        watchdog._process.stdin.close()  # as if the driver died
        watchdog._process.wait()
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------------------
# Worker processes


@pytest.mark.slow  # real worker processes started and killed: `make test`, not test-fast
def test_killing_the_driver_ends_its_worker_processes(long_clips, tiny_checkpoints, tmp_path):
    """kill -9 of `sfr batch --workers 2`: both workers and multiprocessing's resource tracker end within
    seconds (they used to stay, blocked, for minutes)."""
    out = tmp_path / "out"
    process = start_batch(long_clips, out, tiny_checkpoints, "--workers", "2", "--quiet")
    children = kill_driver_and_wait(process, out, "the workers")
    assert sum("spawn_main" in line for line in children) == 2, children
    assert any("resource_tracker" in line for line in children), children


@pytest.mark.slow  # real worker processes started and killed: `make test`, not test-fast
@pytest.mark.parametrize("backend", ["workers", "ray"])
def test_a_worker_killed_mid_clip_has_its_row_retried_and_the_user_told(backend, short_clips, tiny_checkpoints,
                                                                        tmp_path):
    """The worker writing a clip (its PID is in the clip's lock) is stopped; if its temporary is still
    there it is mid-clip, and it is killed. The row is rendered again on another worker, stderr says so, the
    report line says why, and the batch ends with every row done. (--json or --quiet would hide the line,
    as they hide the progress lines; the report keeps it.)"""
    if backend == "ray":
        pytest.importorskip("ray", reason="Ray is the 'ray' extra (make install includes it)")
    noun = "worker" if backend == "workers" else "Ray actor"
    out = tmp_path / "out"
    process = start_batch(short_clips, out, tiny_checkpoints, "--workers", "2", *(["--ray", "local"] * (backend == "ray")))
    try:
        while True:
            first = wait_for(lambda: temporaries(out) or process.poll() is not None, "a clip to start")
            assert process.poll() is None, "the batch ended before a worker could be caught mid-clip"
            pid = writer_pid(first[0])
            if pid is None:  # that clip is done: wait for the next
                continue
            os.kill(pid, signal.SIGSTOP)
            if first[0].exists():  # stopped before its clip was renamed into place: it holds the row
                break
            os.kill(pid, signal.SIGCONT)
        row = int(first[0].name[1:].split(".")[0]) + 1  # ".<n>.mp4.sfr-tmp.mp4": row n + 1
        os.kill(pid, signal.SIGKILL)
        stdout, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = (tmp_path / "out.stderr").read_text()
    assert process.returncode == 0, stderr
    # The cause: "signal 9" from a worker's exit status; Ray's own words for an actor (not our child)
    told = re.search(rf"^row {row}: {noun} {pid} died \((.+)\); retrying on another {noun}$", stderr, re.MULTILINE)
    assert told, stderr
    cause = told.group(1)
    assert backend == "ray" or cause == "signal 9"
    assert "Traceback" not in stderr
    assert stdout.strip() == "3 done, 0 skipped, 0 failed of 3 rows"
    report = [json.loads(line) for line in (tmp_path / "out.report.jsonl").read_text().splitlines()]
    notes = {line["row"]: line["note"] for line in report}
    assert notes.pop(row) == f"row {row}: {noun} {pid} died ({cause}); retried on another {noun}"
    assert set(notes.values()) == {None}
    assert sorted(p.name for p in out.iterdir()) == ["0.mp4", "1.mp4", "2.mp4"]  # no temporary left


@pytest.mark.slow  # real worker processes started and killed: `make test`, not test-fast
def test_a_row_whose_worker_dies_twice_fails_alone(tiny_checkpoints, tmp_path):
    """Each time row 1 is handed out, its worker is killed: row 1 fails with a clear message after one
    retry; row 2 renders on the next fresh worker; the user is told both times."""
    from sfr_cli.workers import WorkerPoolBackend

    clips = write_clips(tmp_path, [4, 3], seed=5)  # clip0 (row 1) is the longer
    template = RenderJob(coeffs=Path("."), source=Path("."), config="tiny", checkpoint_dir=tiny_checkpoints,
                                  device="cpu")
    rows = [manifests.ManifestRow(number, {"coeffs": str(clips / f"clip{number - 1}.npy"),
                                          "source": str(clips / "face.png"),
                                          "output": str(tmp_path / f"{number}.mp4")}) for number in (1, 2)]
    plan = batch_plan.plan_rows(rows, batch_plan.BatchDefaults(template))
    assert [task.row for task in plan.tasks] == [1, 2]  # row 1 is the longer: handed out first
    killed, results, notes = [], [], []

    def kill_row_1s_worker(task):
        if task.row == 1:
            workers = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
            assert len(workers) == 1
            workers[0].kill()
            killed.append(workers[0].pid)

    backend = WorkerPoolBackend(batching.renderer_settings(template), workers=1)
    backend.run(plan.tasks, kill_row_1s_worker, lambda task, result: results.append(result), note=notes.append)
    by_row = {result.row: result for result in results}
    assert len(killed) == 2 and sorted(by_row) == [1, 2]
    assert by_row[1].status == "failed"
    assert by_row[1].error == ("row 1: the worker rendering it died twice (signal 9); see the system log "
                               "(out of memory?)")
    assert by_row[1].note == f"row 1: worker {killed[0]} died (signal 9); retried on another worker"
    assert by_row[2].status == "done" and by_row[2].note is None
    assert notes == [f"row 1: worker {killed[0]} died (signal 9); retrying on another worker",
                     f"row 1: worker {killed[1]} died (signal 9) again; the row fails"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4" or TEMP_MARKER in p.name) == ["2.mp4"]


# ---------------------------------------------------------------------------------------------------
# A local Ray instance


@pytest.mark.slow  # a real local Ray instance started and killed: `make test`, not test-fast
def test_killing_the_driver_ends_its_local_ray_instance(long_clips, tiny_checkpoints, tmp_path):
    """kill -9 of `sfr batch --ray local`: every process the run started (GCS, raylet, dashboard and runtime
    env agents, actors, the watchdog) ends within seconds (the agents used to stay about a minute)."""
    pytest.importorskip("ray", reason="Ray is the 'ray' extra (make install includes it)")
    out = tmp_path / "out"
    process = start_batch(long_clips, out, tiny_checkpoints, "--ray", "local", "--workers", "2", "--quiet")
    children = kill_driver_and_wait(process, out, "Ray's processes")
    for name in ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent", "_RowActor"):
        assert any(name in line for line in children), (name, children)


@pytest.mark.slow  # a real local Ray instance started and interrupted: `make test`, not test-fast
def test_ctrl_c_with_ray_local_leaves_no_temporary(long_clips, tiny_checkpoints, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while actors write clips: exit 130 and
    no temporary file left (one used to stay until the next run)."""
    pytest.importorskip("ray", reason="Ray is the 'ray' extra (make install includes it)")
    out = tmp_path / "out"
    process = start_batch(long_clips, out, tiny_checkpoints, "--ray", "local", "--workers", "2", "--quiet")
    try:
        wait_for(lambda: temporaries(out) or process.poll() is not None, "a clip to start")
        assert process.poll() is None, "the batch ended before a clip was written"
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, (tmp_path / "out.stderr").read_text()
    assert [p.name for p in out.iterdir()] == []  # no temporary, no lock file
