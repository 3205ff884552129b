"""Packed rendering: consecutive clips sharing a model and a source face run as one stream of batches
(`Engine.launch_clips`, `streaming.render_prepared_group`, `Renderer.render_jobs`, `sfr batch`), with
every clip's frames, files, failures and interrupts its own. Tiny random weights, clips of a few frames."""

import json
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from sfr_cli import engine as engine_module
from sfr_cli import media
from sfr_cli.errors import MediaError

from conftest import run_batch

FRAME_COUNTS = (3, 5, 2)  # with batch size 4: batches [4, 4, 2], the first two spanning clip boundaries
BATCH = 4
# Per clip: options that change the frames (each through another path of the engine: given yaw, still
# windows and predicted angles, expression scale with a given pitch only) so a frame routed to the wrong
# clip or rendered with another clip's angles cannot pass.
CLIP_OPTIONS = ({"yaw": (0.0, 20.0)}, {"still": True}, {"expression_scale": 1.5, "pitch": (-10.0,)})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Coefficient files clip0..2 (FRAME_COUNTS frames), the face's own coefficients and one face."""
    where = tmp_path_factory.mktemp("packing")
    rng = np.random.default_rng(11)
    for index, frames in enumerate(FRAME_COUNTS):
        np.save(where / f"clip{index}.npy", (rng.standard_normal((frames, 70)) * 0.2).astype(np.float32))
    np.save(where / "face_coeffs.npy", (rng.standard_normal((1, 70)) * 0.2).astype(np.float32))
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(where / "face.png")
    return where


def renderer(checkpoints, batch_size=BATCH):
    from sfr_cli import Renderer

    return Renderer(checkpoint_dir=checkpoints, config="tiny", device="cpu", batch_size=batch_size)


def jobs(r, folder: Path, out: Path, kind="frames_dir", counts=FRAME_COUNTS):
    """One job per clip, all on one face with its own source coefficients (so they share a source state)."""
    made = []
    for index in range(len(counts)):
        target = {kind: out / (f"{index}.mp4" if kind == "output" else str(index))}
        made.append(r.job(folder / f"clip{index}.npy", folder / "face.png", source_coeffs=folder / "face_coeffs.npy",
                          **CLIP_OPTIONS[index % len(CLIP_OPTIONS)], **target))
    return made


def read_frames(where: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(where.glob("*.png"))])


def leftovers(where: Path):
    return sorted(p.name for p in where.rglob("*") if ".sfr-tmp" in p.name)


def ffmpeg_processes():
    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


@pytest.fixture(scope="module")
def alone(folder, tiny_checkpoints):
    """Each clip rendered on its own, one job at a time: the frames packing must reproduce."""
    r = renderer(tiny_checkpoints)
    frames = []
    for index, job in enumerate(jobs(r, folder, folder / "alone")):
        r.render_job(job)
        frames.append(read_frames(folder / "alone" / str(index)))
    return frames


def assert_same_frames(got, want, what):
    """A CPU frame does not depend on the batch it came in (BatchPolicy): bit-identical, as
    test_engine's batch-size test asserts too."""
    np.testing.assert_array_equal(got, want, err_msg=what)


# ---------------------------------------------------------------------------------------------------
# The engine


@pytest.mark.heavy
def test_packed_clips_render_the_frames_each_clip_renders_alone(folder, tiny_checkpoints, alone):
    r = renderer(tiny_checkpoints)
    from sfr_cli.engine import ClipMotion
    from sfr_cli.jobs import prepare_job

    prepared = [prepare_job(job, in_memory=True) for job in jobs(r, folder, folder / "unused")]
    assert len({r.models.pack_key(p) for p in prepared}) == 1, "one face, one model: one packing key"
    engine = r.models.engine(prepared[0])
    state = r.models.source_state(engine, prepared[0])
    clips = [ClipMotion(p.semantics, p.yaw, p.pitch, p.roll) for p in prepared]
    tagged = list(engine.render_clips(state, clips))

    assert engine.stats.batch_sizes == [4, 4, 2]  # batches across clip boundaries, not [3, 4, 1, 2]
    assert [index for index, _ in tagged] == [i for i, n in enumerate(FRAME_COUNTS) for _ in range(n)]
    for index, want in enumerate(alone):
        got = np.stack([frame for owner, frame in tagged if owner == index])
        assert_same_frames(got, want, f"clip {index} packed vs alone")
    # the options matter: the first clip without its yaw is another clip
    unposed = np.stack([f for _, f in engine.render_clips(state, [ClipMotion(prepared[0].semantics)])])
    assert not np.array_equal(unposed, alone[0])


@pytest.mark.heavy
def test_launch_ahead_keeps_every_frame_with_its_clip(folder, tiny_checkpoints, alone):
    """CUDA's order (the next batch launched before this one is handed out), run on the CPU: the same
    tags and frames."""
    from dataclasses import replace

    from sfr_cli.engine import ClipMotion
    from sfr_cli.jobs import prepare_job

    r = renderer(tiny_checkpoints)
    prepared = [prepare_job(job, in_memory=True) for job in jobs(r, folder, folder / "unused")]
    engine = r.models.engine(prepared[0])
    engine.policy = replace(engine.policy, launch_ahead=True)
    state = r.models.source_state(engine, prepared[0])
    collected, launched = [], []
    original = engine.launch_batch

    def launch(*args, **kwargs):
        launched.append(len(collected))  # frames handed out when this batch was launched
        return original(*args, **kwargs)

    engine.launch_batch = launch
    for tagged in engine.render_clips(state, [ClipMotion(p.semantics, p.yaw, p.pitch, p.roll) for p in prepared]):
        collected.append(tagged)
    assert launched == [0, 0, 4]  # the second batch launched before the first was collected
    for index, want in enumerate(alone):
        assert_same_frames(np.stack([f for owner, f in collected if owner == index]), want, f"clip {index}")


@pytest.mark.heavy
def test_render_jobs_writes_each_clip_with_its_own_sinks(folder, tiny_checkpoints, alone, tmp_path):
    r = renderer(tiny_checkpoints)
    started = []
    outcomes = list(r.render_jobs(jobs(r, folder, tmp_path), on_start=started.append))
    assert started == [0, 1, 2]
    assert [index for index, _ in outcomes] == [0, 1, 2]
    assert [report.frames for _, report in outcomes] == list(FRAME_COUNTS)
    engine = r.models.engines[0]
    assert engine.stats.batch_sizes == [4, 4, 2]
    assert all(report.batch_size == BATCH for _, report in outcomes)
    for index, want in enumerate(alone):
        assert_same_frames(read_frames(tmp_path / str(index)), want, f"clip {index} packed vs alone")
    assert r.models.loads == 1


@pytest.mark.heavy
def test_a_clips_commit_overlaps_the_next_clips_frames(folder, tiny_checkpoints, tmp_path, monkeypatch):
    """ffmpeg finishing clip 0 does not hold up clip 1: clip 0's MP4 closes only once clip 1's frames are
    encoding (an event, with a time-out so a serial loop fails instead of hanging); reports stay in order."""
    import threading

    next_clip_encoding = threading.Event()
    waited = []
    original_write, original_close = media.Mp4Writer.write, media.Mp4Writer.close

    def write(self, frame):
        if self.path.name == "1.mp4":
            next_clip_encoding.set()
        original_write(self, frame)

    def close(self):
        if self.path.name == "0.mp4":
            waited.append(next_clip_encoding.wait(timeout=30))
        return original_close(self)

    monkeypatch.setattr(media.Mp4Writer, "write", write)
    monkeypatch.setattr(media.Mp4Writer, "close", close)
    r = renderer(tiny_checkpoints)
    outcomes = list(r.render_jobs(jobs(r, folder, tmp_path, kind="output")))
    assert waited == [True]
    assert [(index, report.frames) for index, report in outcomes] == list(enumerate(FRAME_COUNTS))
    assert [media.count_video_frames(tmp_path / f"{i}.mp4") for i in range(3)] == list(FRAME_COUNTS)


@pytest.mark.heavy
def test_groups_end_at_a_failed_check_and_at_the_size_cap(folder, tiny_checkpoints, tmp_path, monkeypatch,
                                                          packed_calls):
    from sfr_cli import renderer as renderer_module
    from sfr_cli.errors import SfrError

    monkeypatch.setattr(renderer_module, "PACK_MAX_JOBS", 2)
    r = renderer(tiny_checkpoints)
    made = jobs(r, folder, tmp_path)
    bad = r.job(folder / "clip0.npy", folder / "missing.png", frames_dir=tmp_path / "bad")
    again = r.job(folder / "clip0.npy", folder / "face.png", source_coeffs=folder / "face_coeffs.npy",
                  frames_dir=tmp_path / "again")
    outcomes = list(r.render_jobs(made + [bad, again]))
    assert [index for index, _ in outcomes] == [0, 1, 2, 3, 4]
    assert isinstance(outcomes[3][1], SfrError) and "source image not found" in str(outcomes[3][1])
    assert [report.frames for i, report in outcomes if i != 3] == [3, 5, 2, 3]
    assert packed_calls == [[3, 5], [2], [3]]  # two at most, and the failed check ends the run
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------
# sfr batch


def batch_args(checkpoints):
    return ["--config", "tiny", "--checkpoint-dir", str(checkpoints), "--device", "cpu", "--batch-size", str(BATCH)]


def write_manifest(path: Path, folder: Path, out: Path, counts=FRAME_COUNTS) -> Path:
    """Rows on one face with its own coefficients, MP4 outputs, each row with its own options."""
    lines = ["coeffs,source,source_coeffs,output,yaw,still,expression_scale"]
    for index in range(len(counts)):
        options = CLIP_OPTIONS[index % len(CLIP_OPTIONS)]
        yaw = ",".join(str(v) for v in options.get("yaw", ()))
        lines.append(f"{folder}/clip{index}.npy,{folder}/face.png,{folder}/face_coeffs.npy,{out}/{index}.mp4,"
                     f"\"{yaw}\",{str(options.get('still', False)).lower()},{options.get('expression_scale', 1.0)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def packed_calls(monkeypatch):
    """The frame count of every clip of every `launch_clips` call (spied on, still rendering)."""
    calls = []
    original = engine_module.Engine.launch_clips

    def spy(self, source, clips, **kwargs):
        calls.append([clip.frame_count for clip in clips])
        return original(self, source, clips, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "launch_clips", spy)
    return calls


@pytest.mark.heavy
def test_sfr_batch_packs_rows_sharing_a_face_and_writes_every_mp4(folder, tiny_checkpoints, tmp_path, packed_calls):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.csv", folder, out)
    result = run_batch(manifest, "--json", *batch_args(tiny_checkpoints))
    assert result.exit_code == 0, result.output
    assert packed_calls == [[5, 3, 2]]  # longest first, one packed stream
    summary = json.loads(result.stdout)
    assert summary["done"] == 3
    assert [(row["row"], row["status"], row["frames"]) for row in summary["rows"]] == [
        (1, "done", 3), (2, "done", 5), (3, "done", 2)]
    assert all(row["seconds"] > 0 and row["render_seconds"] > 0 for row in summary["rows"])
    assert [media.count_video_frames(out / f"{i}.mp4") for i in range(3)] == list(FRAME_COUNTS)
    assert sorted(p.name for p in out.iterdir()) == ["0.mp4", "1.mp4", "2.mp4"]
    lines = [json.loads(line) for line in (tmp_path / "m.report.jsonl").read_text().splitlines()]
    assert sorted(line["row"] for line in lines) == [1, 2, 3]


@pytest.mark.heavy
def test_a_clip_whose_mp4_fails_mid_group_fails_alone(folder, tiny_checkpoints, tmp_path, monkeypatch,
                                                      packed_calls):
    """Rows render longest first: 1 (5 frames) and 2 (4) and 3 (3) in one stream, batches [4, 4, 4]; the
    middle clip's ffmpeg "dies" after its first frame, while both of its batches also carry its neighbours."""
    counts = (5, 4, 3)
    rng = np.random.default_rng(5)
    for index, frames in enumerate(counts):
        np.save(tmp_path / f"clip{index}.npy", (rng.standard_normal((frames, 70)) * 0.2).astype(np.float32))
    for name in ("face.png", "face_coeffs.npy"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    out = tmp_path / "out"
    original = media.Mp4Writer.write

    def failing(self, frame):
        if self.path.name == "1.mp4" and self.frames_written == 1:
            raise MediaError(f"{self.path}: ffmpeg stopped taking frames after 1")
        original(self, frame)

    monkeypatch.setattr(media.Mp4Writer, "write", failing)
    manifest = write_manifest(tmp_path / "m.csv", tmp_path, out, counts)
    result = run_batch(manifest, "--json", *batch_args(tiny_checkpoints))
    assert result.exit_code == 1, result.output
    assert packed_calls == [[5, 4, 3]]
    rows = {row["row"]: row for row in json.loads(result.stdout)["rows"]}
    assert (rows[1]["status"], rows[2]["status"], rows[3]["status"]) == ("done", "failed", "done")
    assert rows[2]["error"].startswith("row 2: ") and "stopped taking frames" in rows[2]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["0.mp4", "2.mp4"]  # nothing at 1.mp4, no temporary file
    assert [media.count_video_frames(out / f"{i}.mp4") for i in (0, 2)] == [counts[0], counts[2]]
    assert ffmpeg_processes() == []


@pytest.mark.heavy
def test_an_engine_failure_mid_group_fails_the_clips_not_yet_written(folder, tiny_checkpoints, tmp_path,
                                                                     monkeypatch):
    """A bug in the render loop after the first clip was committed: that clip stays (complete), the
    others fail as internal errors with nothing at their outputs."""
    original = engine_module.Engine.launch_batch
    calls = []

    def broken(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # batches [4, 4, 2]: clip 0 (3 frames) committed, clip 1 one frame in
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "launch_batch", broken)
    r = renderer(tiny_checkpoints)
    outcomes = dict(r.render_jobs(jobs(r, folder, tmp_path, kind="output")))
    assert outcomes[0].frames == FRAME_COUNTS[0]
    assert all(isinstance(outcomes[i], RuntimeError) for i in (1, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.mp4"]
    assert ffmpeg_processes() == []


# ---------------------------------------------------------------------------------------------------
# Interrupts


@pytest.mark.heavy
def test_interrupt_mid_group_leaves_only_committed_clips(folder, tiny_checkpoints, tmp_path, monkeypatch):
    """Ctrl-C while the second clip streams (its MP4 and PNG frames open, the first clip committed)."""
    original = engine_module.Engine.launch_clips

    def interrupted(self, *args, **kwargs):
        handed_out = 0
        for batch in original(self, *args, **kwargs):
            if handed_out + len(batch.owners) > FRAME_COUNTS[0] + 2:
                raise KeyboardInterrupt
            handed_out += len(batch.owners)
            yield batch

    monkeypatch.setattr(engine_module.Engine, "launch_clips", interrupted)
    r = renderer(tiny_checkpoints)
    made = jobs(r, folder, tmp_path, kind="output")
    made[1] = r.job(made[1].coeffs, made[1].source, source_coeffs=made[1].source_coeffs, still=True,
                    output=tmp_path / "1.mp4", frames_dir=tmp_path / "frames1")
    settled = []
    with pytest.raises(KeyboardInterrupt):
        for index, outcome in r.render_jobs(made):
            settled.append(index)
    assert settled in ([], [0])  # clip 0's commit may still have been finishing: it completes, unreported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.mp4"]  # no temporary file, no frames folder
    assert media.count_video_frames(tmp_path / "0.mp4") == FRAME_COUNTS[0]
    assert ffmpeg_processes() == []


# ---------------------------------------------------------------------------------------------------
# Paste-back


@pytest.mark.heavy
def test_paste_back_clips_pack_like_any_other(reference_dir, tiny_checkpoints, tmp_path):
    """Full mode pasted into the original picture: each clip's paste stage blends its own frames, so
    two clips of the golden case packed at batch size 2 (batches [2, 2, 2]) equal one rendered alone."""
    golden = reference_dir / "golden-paste"
    r = renderer(tiny_checkpoints, batch_size=2)

    def job(name):
        return r.job(golden / "coeffs.mat", golden / "crop.png", source_coeffs=golden / "source_coeffs.mat",
                     preprocess="full", paste_into=golden / "original.png", crop_box=(150, 120, 450, 426),
                     frames_dir=tmp_path / name)

    r.render_job(job("alone"))
    outcomes = dict(r.render_jobs([job("a"), job("b")]))
    assert [outcomes[i].frames for i in (0, 1)] == [3, 3]
    assert r.models.engines[0].stats.batch_sizes == [2, 2, 2]
    want = read_frames(tmp_path / "alone")
    assert want.shape == (3, 1024, 640, 3)
    for name in ("a", "b"):
        assert_same_frames(read_frames(tmp_path / name), want, f"packed paste-back clip {name}")
