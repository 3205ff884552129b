"""`sfr batch` and the Renderer: manifests, bad rows, shards, resume after kill -9, worker processes, Ray,
and the Python API, all on tiny random weights and clips of a few frames."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from PIL import Image

from sfr_cli import batch as batching
from sfr_cli import batch_plan
from sfr_cli import manifest as manifests
from sfr_cli.cli import sfr
from sfr_cli.errors import SfrError
from sfr_cli.jobs import RenderJob

from conftest import run_batch, tiny
from held_ffmpeg import held_ffmpeg_env, wait_until_held

FRAMES = 3  # per clip: enough to be a clip, few enough to stay fast on a busy 2-core machine
CLIPS = 3


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A folder with CLIPS coefficient files (FRAMES frames each, one of FRAMES + 1) and two faces."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(7)
    for index in range(CLIPS):
        frames = FRAMES + (index == 1)
        np.save(folder / f"clip{index}.npy", (rng.standard_normal((frames, 70)) * 0.1).astype(np.float32))
    for name in ("face_a.png", "face_b.png"):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def write_csv(path: Path, rows, header="coeffs,source,frames_dir"):
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return path


def frame_rows(clips: Path, out: str, relative: bool = False):
    """One row per clip writing PNG frames (exact pixels to compare) to <out>/<n>; absolute paths unless
    `relative` (then relative to a manifest in `clips`)."""
    faces = ("face_a.png", "face_b.png")
    where = "" if relative else f"{clips}/"
    return [f"{where}clip{i}.npy,{where}{faces[i % 2]},{out}/{i}" for i in range(CLIPS)]


def report_lines(path: Path):
    """The report's lines; a last line cut by a kill is skipped."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def read_frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


@pytest.fixture(scope="module")
def reference_frames(clips, tiny_checkpoints):
    """Each clip rendered by `sfr render --frames-dir`, one process-like call per clip: the frames every
    other path (batch in-process, workers, Ray, the Python API) must reproduce exactly."""
    frames = {}
    faces = ("face_a.png", "face_b.png")
    for index in range(CLIPS):
        out = clips / "reference" / str(index)
        result = CliRunner().invoke(sfr, ["render", "--coeffs", str(clips / f"clip{index}.npy"), "--source",
                                          str(clips / faces[index % 2]), "--frames-dir", str(out), "--quiet",
                                          *tiny(tiny_checkpoints)])
        assert result.exit_code == 0, result.output
        frames[index] = read_frames(out)
    return frames


# ---------------------------------------------------------------------------------------------------
# Manifests


def test_csv_manifest_quoting_relative_paths_and_bad_rows(tmp_path):
    manifest = tmp_path / "sub" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text('coeffs,source,yaw,fps,output\n'
                        'a.mat,face.png,"0,20,-10",30,out/a.mp4\n'
                        '\n'
                        '"b c.npy",/abs/face.png,,,\n'
                        'd.npy,face.png,0,20,too,many\n'
                        'e.npy,,,,\n')
    rows = manifests.read_manifest(manifest)
    assert [row.number for row in rows] == [1, 2, 3, 4]
    first = rows[0]
    assert first.error is None
    assert first.values["coeffs"] == str(manifest.parent / "a.mat")
    assert first.values["output"] == str(manifest.parent / "out" / "a.mp4")
    assert first.values["yaw"] == "0,20,-10"
    job = batch_plan.row_job(first, batch_plan.BatchDefaults(RenderJob(coeffs=Path("."), source=Path("."))))
    assert job.yaw == (0.0, 20.0, -10.0) and job.fps == 30.0
    assert rows[1].values["coeffs"] == str(manifest.parent / "b c.npy")
    assert rows[1].values["source"] == "/abs/face.png"
    assert "cells for 5 columns" in rows[2].error
    assert "needs coeffs and source" in rows[3].error


def test_jsonl_manifest_lists_strings_and_bad_lines(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"coeffs": "a.npy", "source": "f.png", "yaw": [0, 20], "still": true}\n'
                        '{"coeffs": "b.npy", "source": "f.png", "pitch": "5,-5", "expression_scale": 1.5}\n'
                        'not json\n'
                        '["a list"]\n')
    rows = manifests.read_manifest(manifest)
    defaults = batch_plan.BatchDefaults(RenderJob(coeffs=Path("."), source=Path(".")),
                                      output_dir=tmp_path / "o")
    first, second = (batch_plan.row_job(row, defaults) for row in rows[:2])
    assert first.yaw == (0.0, 20.0) and first.still is True
    assert first.output == tmp_path / "o" / "a.mp4"  # <output-dir>/<coeffs stem>.mp4
    assert second.pitch == (5.0, -5.0) and second.expression_scale == 1.5
    assert "not a JSON object" in rows[2].error
    assert "not a JSON object" in rows[3].error  # an unknown key fails the manifest: test_batch_rows.py


def test_a_rows_missing_source_comes_from_the_command_line(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["a.npy", "b.npy"], header="coeffs")
    rows = manifests.read_manifest(manifest, default_source="face.png")
    assert [row.values["source"] for row in rows] == ["face.png", "face.png"]  # as given, not re-based
    assert all(row.error is None for row in rows)
    assert "needs coeffs and source" in manifests.read_manifest(manifest)[0].error


def test_a_bad_option_value_gets_sfr_renders_message(tmp_path):
    row = manifests.ManifestRow(1, {"coeffs": "a.npy", "source": "f.png", "fps": "0"})
    with pytest.raises(SfrError, match="fps"):
        batch_plan.row_job(row, batch_plan.BatchDefaults(RenderJob(coeffs=Path("."), source=Path("."))))


def test_unknown_column_is_a_usage_error(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["a.npy,f.png,x"], header="coeffs,source,colour")
    result = run_batch(manifest)
    assert result.exit_code == 2
    assert "unknown column(s) colour" in result.output


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_shards_cover_every_row_exactly_once(shards):
    rows = [manifests.ManifestRow(number, {}) for number in range(1, 11)]
    seen = [row.number for k in range(1, shards + 1) for row in manifests.select_shard(rows, (k, shards))]
    assert sorted(seen) == list(range(1, 11))
    with pytest.raises(ValueError):
        manifests.parse_shard("3/2")


def test_dry_run_checks_every_row_and_loads_nothing(clips, tiny_checkpoints, tmp_path):
    rows = frame_rows(clips, str(tmp_path / "dry")) + [f"missing.npy,{clips}/face_a.png,x"]
    manifest = write_csv(tmp_path / "m.csv", rows)
    result = run_batch(manifest, "--dry-run", "--json", "--shard", "1/1", *tiny(tiny_checkpoints))
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    statuses = {row["row"]: row["status"] for row in summary["rows"]}
    assert statuses == {1: "todo", 2: "todo", 3: "todo", 4: "failed"}
    assert "row 4:" in summary["rows"][3]["error"] and "missing.npy" in summary["rows"][3]["error"]
    assert not (tmp_path / "dry").exists() and not (tmp_path / "m.report.jsonl").exists()


def test_dry_run_accepts_mp4_folders_the_batch_would_create(clips, tiny_checkpoints, tmp_path):
    """A batch creates its MP4 folders, so --dry-run must not fail a row for a folder that does not exist
    yet (it creates nothing either); a folder that cannot be created still fails its row."""
    (tmp_path / "a-file").write_text("not a folder")
    rows = [f"{clips}/clip0.npy,{clips}/face_a.png,{tmp_path}/new/deeper/clip0.mp4",
            f"{clips}/clip1.npy,{clips}/face_b.png,{tmp_path}/a-file/clip1.mp4"]
    manifest = write_csv(tmp_path / "m.csv", rows, header="coeffs,source,output")
    result = run_batch(manifest, "--dry-run", "--json", *tiny(tiny_checkpoints))
    rows_out = json.loads(result.stdout)["rows"]
    assert [row["status"] for row in rows_out] == ["todo", "failed"], rows_out
    assert "a-file" in rows_out[1]["error"] and "not a" in rows_out[1]["error"].lower()
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.heavy
def test_bad_rows_fail_alone_and_good_rows_render_identical_frames(clips, tiny_checkpoints, reference_frames,
                                                                   tmp_path):
    out = tmp_path / "out"
    rows = frame_rows(clips, str(out), relative=True)
    rows.insert(1, f"clip0.npy,missing.png,{out}/bad")  # row 2: no such source
    rows.append(f"clip1.npy,face_a.png,{out}/0")  # row 5: the same frames folder as row 1
    manifest = write_csv(clips / "bad.csv", rows)
    result = run_batch(manifest, "--json", "--report", tmp_path / "r.jsonl", *tiny(tiny_checkpoints))
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["failed"]) == (3, 2)
    errors = {row["row"]: row["error"] for row in summary["rows"] if row["status"] == "failed"}
    assert errors[2].startswith("row 2: ") and "source image not found" in errors[2]
    assert errors[5].startswith("row 5: ") and "as row 1 does" in errors[5]
    for index in range(CLIPS):
        np.testing.assert_array_equal(read_frames(out / str(index)), reference_frames[index])
    lines = report_lines(tmp_path / "r.jsonl")
    assert sorted(line["row"] for line in lines) == [1, 2, 3, 4, 5]

    again = run_batch(manifest, "--json", "--report", tmp_path / "r.jsonl", *tiny(tiny_checkpoints))
    statuses = {row["row"]: row["status"] for row in json.loads(again.stdout)["rows"]}
    assert statuses == {1: "skipped", 2: "failed", 3: "skipped", 4: "skipped", 5: "failed"}


def test_glob_form_writes_mp4s_to_the_output_dir(clips, tiny_checkpoints, tmp_path):
    result = run_batch("--coeffs", str(clips / "clip*.npy"), "--source", clips / "face_a.png",
                       "--output-dir", tmp_path, "--quiet", *tiny(tiny_checkpoints))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    assert len(report_lines(tmp_path / batching.GLOB_REPORT_NAME)) == CLIPS


@pytest.mark.slow  # a long end-to-end run (processes started and killed): `make test`, not test-fast
def test_two_workers_render_the_same_frames(clips, tiny_checkpoints, reference_frames, tmp_path):
    out = tmp_path / "w"
    manifest = write_csv(tmp_path / "m.csv", frame_rows(clips, str(out)))
    result = run_batch(manifest, "--workers", "2", "--json", *tiny(tiny_checkpoints))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == CLIPS
    for index in range(CLIPS):
        np.testing.assert_array_equal(read_frames(out / str(index)), reference_frames[index])


@pytest.mark.slow  # a long end-to-end run (processes started and killed): `make test`, not test-fast
def test_ray_local_renders_the_same_frames(clips, tiny_checkpoints, reference_frames, tmp_path):
    pytest.importorskip("ray", reason="Ray is the 'ray' extra (make install includes it)")
    out = tmp_path / "ray"
    manifest = write_csv(tmp_path / "m.csv", frame_rows(clips, str(out)))
    result = run_batch(manifest, "--ray", "local", "--workers", "2", "--json", *tiny(tiny_checkpoints),
                       env={"SFR_RAY_CPUS": "2"})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["done"] == CLIPS
    assert {row["frames_dir"] for row in summary["rows"]} == {str(out / str(i)) for i in range(CLIPS)}
    for index in range(CLIPS):
        np.testing.assert_array_equal(read_frames(out / str(index)), reference_frames[index])


@pytest.mark.slow  # a long end-to-end run (processes started and killed): `make test`, not test-fast
def test_resume_after_kill_9(clips, tiny_checkpoints, tmp_path):
    """A real `sfr batch` process killed with SIGKILL mid-batch; the rerun finishes, renders no finished
    clip again and leaves no temporary or partial file."""
    out = tmp_path / "out"
    rows = [f"{clips}/clip{i % CLIPS}.npy,{clips}/face_a.png,{out}/{i}.mp4" for i in range(4)]
    manifest = write_csv(tmp_path / "m.csv", rows, header="coeffs,source,output")
    report = tmp_path / "m.report.jsonl"
    command = [sys.executable, "-m", "sfr_cli.cli", "batch", str(manifest), "--quiet", *tiny(tiny_checkpoints)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    # Longest first: row 2 (4 frames), then rows 1, 3, 4. The second encode (row 1) holds after its first
    # frame, so the kill lands mid-batch on any machine, with exactly row 2 done.
    hold = tmp_path / "hold"
    process = subprocess.Popen(command, env={**held_ffmpeg_env(hold, encode=2, frames=1), "PYTHONPATH": env["PYTHONPATH"]},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_held(hold, process)
        deadline = time.monotonic() + 120  # row 2 is committed while row 1 renders; its line follows
        while not (report.exists() and report.read_text().count("\n") >= 1):
            assert process.poll() is None and time.monotonic() < deadline, "row 2 was never reported"
            time.sleep(0.05)
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    psutil.wait_procs(children, timeout=30)  # the orphaned ffmpeg finishes its partial file
    finished = {line["row"] for line in report_lines(report) if line["status"] == "done"}
    assert finished == {2}, "row 2 done, row 1 held mid-clip (rows report in the order they render)"

    result = subprocess.run(command + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    statuses = {row["row"]: row["status"] for row in json.loads(result.stdout)["rows"]}
    assert {row for row, status in statuses.items() if status == "skipped"} == finished
    assert all(statuses[row] == "done" for row in set(range(1, 5)) - finished)
    assert sorted(p.name for p in out.iterdir()) == ["0.mp4", "1.mp4", "2.mp4", "3.mp4"]  # nothing else
    from sfr_cli.media import count_video_frames

    assert [count_video_frames(out / f"{i}.mp4") for i in range(4)] == [FRAMES, FRAMES + 1, FRAMES, FRAMES]


# ---------------------------------------------------------------------------------------------------
# The Python API


@pytest.mark.heavy
def test_renderer_frames_and_render_equal_sfr_render(clips, tiny_checkpoints, reference_frames, tmp_path):
    from sfr_cli import Renderer

    renderer = Renderer(checkpoint_dir=tiny_checkpoints, config="tiny", device="cpu")
    frames = np.stack(list(renderer.frames(coeffs=clips / "clip0.npy", source=str(clips / "face_a.png"))))
    assert frames.dtype == np.uint8 and frames.shape == (FRAMES, 256, 256, 3)
    np.testing.assert_array_equal(frames, reference_frames[0])

    # Arrays instead of files: the same frames.
    face = np.asarray(Image.open(clips / "face_b.png").convert("RGB"))
    report = renderer.render(coeffs=np.load(clips / "clip1.npy"), source=face, frames_dir=tmp_path / "f")
    assert report.frames == FRAMES + 1
    np.testing.assert_array_equal(read_frames(tmp_path / "f"), reference_frames[1])
    assert renderer.models.loads == 1  # the model loaded once for both clips

    renderer.render(coeffs=clips / "clip0.npy", source=clips / "face_a.png", output=tmp_path / "c.mp4")
    assert renderer.models.source_hits == 1  # face_a with clip0's first frame again: source work reused
    assert (tmp_path / "c.mp4").is_file()
    with pytest.raises(SfrError, match="source image not found"):
        renderer.render(coeffs=clips / "clip2.npy", source=clips / "nope.png", output=tmp_path / "d.mp4")


@pytest.mark.slow  # a long end-to-end run (processes started and killed): `make test`, not test-fast
def test_a_killed_workers_clip_is_retried_once_on_another_worker(clips, tiny_checkpoints, tmp_path):
    psutil = pytest.importorskip("psutil")
    from sfr_cli.jobs import RenderJob
    from sfr_cli.workers import WorkerPoolBackend

    template = RenderJob(coeffs=Path("."), source=Path("."), config="tiny", checkpoint_dir=tiny_checkpoints,
                         device="cpu")
    rows = [manifests.ManifestRow(1, {"coeffs": str(clips / "clip0.npy"), "source": str(clips / "face_a.png"),
                                     "output": str(tmp_path / "a.mp4")})]
    plan = batch_plan.plan_rows(rows, batch_plan.BatchDefaults(template))
    killed, results = [], []

    def kill_the_worker(task):
        if not killed:  # the first time the clip is handed out: SIGKILL the worker holding it
            workers = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
            for worker in workers:
                worker.kill()
            killed.extend(workers)

    notes = []
    backend = WorkerPoolBackend(batching.renderer_settings(template), workers=1)
    backend.run(plan.tasks, kill_the_worker, lambda task, result: results.append(result), note=notes.append)
    assert killed
    assert [result.status for result in results] == ["done"], results
    assert plan.tasks[0].attempts == 1
    told = f"row 1: worker {killed[0].pid} died (signal 9); retrying on another worker"
    assert notes == [told]
    assert results[0].note == f"row 1: worker {killed[0].pid} died (signal 9); retried on another worker"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # the killed worker's temporary is gone


# ---------------------------------------------------------------------------------------------------
# Nothing lost across rows, runs and kills (issue 17)


def clash_job(tmp_path, clips):
    """res/a.npy, res/c.npy (coefficients), faces/anna.png: the issue's folder."""
    (tmp_path / "res").mkdir()
    (tmp_path / "faces").mkdir()
    for name, index in (("a", 0), ("c", 2)):
        (tmp_path / "res" / f"{name}.npy").write_bytes((clips / f"clip{index}.npy").read_bytes())
    (tmp_path / "faces" / "anna.png").write_bytes((clips / "face_a.png").read_bytes())
    return tmp_path


@pytest.mark.heavy
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_rows_output_that_is_another_rows_input_fails_that_row(clips, tiny_checkpoints, tmp_path, overwrite):
    """Issue 17.1: with --overwrite row 2 destroyed row 1's coefficients; without it, it was "skipped"."""
    folder = clash_job(tmp_path, clips)
    before = (folder / "res" / "a.npy").read_bytes()
    manifest = write_csv(folder / "m.csv", ["res/a.npy,faces/anna.png,o/a.mp4", "res/c.npy,faces/anna.png,res/a.npy"],
                         header="coeffs,source,output")
    result = run_batch(manifest, "--json", *(["--overwrite"] if overwrite else []), *tiny(tiny_checkpoints))
    assert result.exit_code == 1
    rows = {row["row"]: row for row in json.loads(result.stdout)["rows"]}
    assert rows[1]["status"] == "done" and rows[2]["status"] == "failed"
    assert rows[2]["error"] == (f"row 2: writes {folder}/res/a.npy, row 1's coeffs (an input); give each row its "
                                "own output")
    assert (folder / "res" / "a.npy").read_bytes() == before
    assert sorted(p.name for p in (folder / "res").iterdir()) == ["a.npy", "c.npy"]


def test_every_output_is_checked_against_every_row_before_anything_renders(clips, tiny_checkpoints, tmp_path):
    """Issue 17.1/17.2: the same output through a symlinked folder, `..` or a hard link; a frame name in
    another row's frames folder; an input in a frames folder; the writer row fails, the reader renders."""
    folder = clash_job(tmp_path, clips)
    (folder / "real").mkdir()
    (folder / "alias").symlink_to(folder / "real")
    (folder / "inputs").mkdir()
    os.link(folder / "faces" / "anna.png", folder / "inputs" / "hard.png")
    (folder / "frames_in").mkdir()
    (folder / "frames_in" / "000000.png").write_bytes((folder / "faces" / "anna.png").read_bytes())
    rows = ["res/a.npy,faces/anna.png,real/q.mp4,",      # 1
            "res/c.npy,faces/anna.png,alias/q.mp4,",     # 2: row 1's MP4 through a symlinked folder
            "res/a.npy,faces/anna.png,,fd",              # 3: a frames folder
            "res/c.npy,faces/anna.png,fd/000001.png,",   # 4: a frame of row 3's folder
            "res/c.npy,faces/anna.png,inputs/hard.png,", # 5: a hard link of everyone's source
            "res/a.npy,frames_in/000000.png,o/x.mp4,",   # 6: reads a file in row 7's frames folder
            "res/c.npy,faces/anna.png,,frames_in",       # 7: would write over row 6's source
            "res/a.npy,faces/anna.png,sub/../real/q.mp4,"]  # 8: row 1's MP4 through ..
    manifest = write_csv(folder / "m.csv", rows, header="coeffs,source,output,frames_dir")
    result = run_batch(manifest, "--json", "--dry-run", *tiny(tiny_checkpoints))
    assert result.exit_code == 1
    summary = {row["row"]: row for row in json.loads(result.stdout)["rows"]}
    assert {n: row["status"] for n, row in summary.items()} == {
        1: "todo", 2: "failed", 3: "todo", 4: "failed", 5: "failed", 6: "todo", 7: "failed", 8: "failed"}
    assert "as row 1 does" in summary[2]["error"] and "as row 1 does" in summary[8]["error"]
    assert "row 3 writes" in summary[4]["error"] and f"{folder}/fd" in summary[4]["error"]
    assert "row 1's source (an input)" in summary[5]["error"]
    assert "frames folder" in summary[7]["error"] and "row 6's source" in summary[7]["error"]
    assert summary[3]["frames_dir"] == str(folder / "fd") and summary[7]["frames_dir"] == str(folder / "frames_in")


@pytest.mark.parametrize("report", ["m.csv", "res/a.npy", "faces/anna.png", "o/a.mp4", "fd/000002.png"])
def test_the_report_may_name_no_input_and_no_output(clips, tiny_checkpoints, tmp_path, report):
    """Issue 17.3: `--report m.csv` appended JSON to the manifest; now the batch refuses to start."""
    folder = clash_job(tmp_path, clips)
    manifest = write_csv(folder / "m.csv", ["res/a.npy,faces/anna.png,o/a.mp4,", "res/c.npy,faces/anna.png,,fd"],
                         header="coeffs,source,output,frames_dir")
    before = {p: p.read_bytes() for p in (manifest, folder / "res" / "a.npy", folder / "faces" / "anna.png")}
    result = run_batch(manifest, "--report", folder / report, *tiny(tiny_checkpoints))
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {folder / report}: ")
    assert "choose another --report PATH" in result.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert not (folder / "o" / "a.mp4").exists() and not (folder / "fd").exists()


@pytest.mark.heavy
def test_a_frames_only_row_resumes_after_kill_9(clips, tiny_checkpoints, reference_frames, tmp_path):
    """Issue 17.5: a batch killed mid-row leaves its frames in a temporary folder (and its claim); the
    rerun removes them as a dead run's, renders the row and reports its frames_dir."""
    from sfr_cli.outputs import host_name, temporary_path

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = temporary_path(out / "0")
    leftover.mkdir()
    for index in range(2):
        (leftover / f"{index:06d}.png").write_bytes(b"partial")
    (out / ".0.sfr-lock").write_text(json.dumps({"host": host_name(), "pid": dead.pid, "start": "123",
                                                 "since": time.time()}))
    manifest = write_csv(tmp_path / "m.csv", [f"{clips}/clip0.npy,{clips}/face_a.png,{out}/0"])
    result = run_batch(manifest, "--json", *tiny(tiny_checkpoints))
    assert result.exit_code == 0, result.output
    row, = json.loads(result.stdout)["rows"]
    assert row["status"] == "done" and row["frames_dir"] == str(out / "0")
    assert sorted(p.name for p in out.iterdir()) == ["0"]
    np.testing.assert_array_equal(read_frames(out / "0"), reference_frames[0])


@pytest.mark.heavy
def test_two_runs_of_one_manifest_never_render_the_same_clip_at_once(clips, tiny_checkpoints, tmp_path):
    """Issue 17.2: a row another live run is rendering is skipped (its report says by whom); once that run
    is dead its claim is taken over and the row renders."""
    out = tmp_path / "out"
    out.mkdir()
    rows = [f"{clips}/clip{i}.npy,{clips}/face_a.png,{out}/{i}.mp4" for i in range(2)]
    manifest = write_csv(tmp_path / "m.csv", rows, header="coeffs,source,output")
    code = ("import time\nfrom sfr_cli.outputs import OutputClaim\n"
            f"claim = OutputClaim({str(out / '1.mp4')!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    try:
        assert other.stdout.readline() == "held\n"
        result = run_batch(manifest, "--json", *tiny(tiny_checkpoints))
        assert result.exit_code == 0, result.output
        summary = {row["row"]: row for row in json.loads(result.stdout)["rows"]}
        assert summary[1]["status"] == "done" and summary[2]["status"] == "skipped"
        assert f"another sfr run is rendering it (host " in summary[2]["note"]
        assert f"pid {other.pid}," in summary[2]["note"] and not (out / "1.mp4").exists()
    finally:
        other.kill()
        other.wait()
    result = run_batch(manifest, "--json", *tiny(tiny_checkpoints))
    assert result.exit_code == 0, result.output
    assert [row["status"] for row in json.loads(result.stdout)["rows"]] == ["skipped", "done"]
    assert sorted(p.name for p in out.iterdir()) == ["0.mp4", "1.mp4"]


@pytest.mark.heavy
def test_a_row_whose_folder_refuses_access_fails_alone(clips, tiny_checkpoints, tmp_path, denied):
    """Issue 17.6: one row's output folder without permission aborted the whole batch with a traceback and
    no report; now that row fails with a clean message, the others render, the report is written."""
    out = tmp_path / "out"
    locked = tmp_path / "locked"
    locked.mkdir()
    rows = [f"{clips}/clip0.npy,{clips}/face_a.png,{out}/0.mp4", f"{clips}/clip1.npy,{clips}/face_a.png,{locked}/1.mp4",
            f"{clips}/clip2.npy,{clips}/face_a.png,{out}/2.mp4"]
    manifest = write_csv(tmp_path / "m.csv", rows, header="coeffs,source,output")
    denied(locked)
    result = run_batch(manifest, "--json", *tiny(tiny_checkpoints))
    assert result.exit_code == 1 and "Traceback" not in result.output
    summary = {row["row"]: row for row in json.loads(result.stdout)["rows"]}
    assert [summary[n]["status"] for n in (1, 2, 3)] == ["done", "failed", "done"]
    assert summary[2]["error"].startswith(f"row 2: {locked}") and "permission denied" in summary[2]["error"]
    assert sorted(line["row"] for line in report_lines(tmp_path / "m.report.jsonl")) == [1, 2, 3]
