"""One render job from paths to files: check every input, load the model, stream frames into the sinks.

The order is the point. Everything a user can get wrong (config, coefficients, source image, ffmpeg,
audio, output location, checkpoint files) is checked before any network loads, so a mistake costs
seconds, not a model load. Then frames stream from the engine through a small bounded queue to a
writer thread that feeds the MP4 and/or the PNG frames: rendering the next batch overlaps with encoding,
and memory stays flat whatever the clip length. On any failure or interrupt both sinks are aborted:
no partial MP4, no temporary files, no ffmpeg left running. Jobs sharing a model and a source face can
run as one group (`render_prepared_group`): one stream of batches spanning the clips, each job with its
own sinks, committed or failed alone.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import coeffs, media, outputs, pasteback
from .config import resolve_config
from .errors import ConfigError, MediaError, RenderError
from .modes import get_mode
from .progress import Reporter

QUEUE_FRAMES = 8  # frames between the renderer and the writer thread
QUEUE_POLL_SECONDS = 0.1
STOP_WAIT_SECONDS = 5.0  # how long a stopping writer may take to finish its frame before ffmpeg is killed
COMMITS_IN_FLIGHT = 2  # clips whose ffmpeg may still be finishing while the next clip renders
SIZES_PX = (256, 512)


@dataclass(frozen=True)
class RenderJob:
    """Everything `sfr render` takes. Paths may be str or Path; None means "not given"."""

    coeffs: Path
    source: Path
    source_coeffs: Optional[Path] = None
    output: Optional[Path] = None  # the MP4; None with frames_dir = frames only, None without = <coeffs stem>.mp4
    frames_dir: Optional[Path] = None
    audio: Optional[Path] = None
    fps: float = 25.0
    checkpoint_dir: Optional[Path] = None  # None: $SFR_CHECKPOINT_DIR or ./checkpoints
    checkpoint: Optional[Path] = None
    mapping: Optional[Path] = None
    config: Optional[str] = None  # a built-in name (facerender, tiny, ...) or a YAML path; None: facerender
    size_px: int = 256
    preprocess: str = "crop"
    still: bool = False
    expression_scale: float = 1.0
    yaw: Optional[Tuple[float, ...]] = None  # degrees, swept over the clip as SadTalker's --input_yaw
    pitch: Optional[Tuple[float, ...]] = None
    roll: Optional[Tuple[float, ...]] = None
    batch_size: Optional[int] = None  # None: the engine picks from free memory
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False  # CUDA only; ignored with a note on the CPU
    overwrite: bool = False  # replace an existing MP4 / earlier frames in frames_dir
    paste_into: Optional[Path] = None  # the original picture: frames are pasted back into it (its size)
    crop_box: Optional[Tuple[int, int, int, int]] = None  # x1,y1,x2,y2 in it; None with paste_into: found


@dataclass
class RenderReport:
    """What a finished job wrote and how it went. `seconds` covers rendering and encoding (model load
    excluded); `frames_per_second` is frames / seconds."""

    output: Optional[Path]
    frames_dir: Optional[Path]
    frames: int
    seconds: float
    frames_per_second: float
    peak_rss_mib: Optional[float]
    peak_cuda_mib: Optional[float]
    device: str
    precision: str
    batch_size: int
    notes: List[str] = field(default_factory=list)

    def to_json(self) -> str:
        """One JSON object (no notes): output, frames_dir, frames, seconds, frames_per_second, peak_rss_mib,
        peak_cuda_mib, device, precision, batch_size."""
        data = asdict(self)
        data.pop("notes")
        for key in ("output", "frames_dir"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["seconds"] = round(self.seconds, 3)
        data["frames_per_second"] = round(self.frames_per_second, 3)
        return json.dumps(data)


# ---------------------------------------------------------------------------------------------------
# Checks that run before anything loads


def output_paths(job: RenderJob) -> Tuple[Optional[Path], Optional[Path]]:
    """(MP4 path or None, frames folder or None): `<coeffs stem>.mp4` here when neither is given."""
    output = Path(job.output) if job.output is not None else None
    frames_dir = Path(job.frames_dir) if job.frames_dir is not None else None
    if output is None and frames_dir is None:
        output = Path(Path(job.coeffs).stem + ".mp4")
    return output, frames_dir


def job_inputs(job: RenderJob, config_file: Optional[Path] = None) -> List[outputs.JobInput]:
    """The files `job` reads that the user named, with their options (the config's YAML too)."""
    named = [(job.coeffs, "--coeffs"), (job.source, "--source"), (job.source_coeffs, "--source-coeffs"),
             (job.audio, "--audio"), (job.checkpoint, "--checkpoint"), (job.mapping, "--mapping"),
             (config_file, "--config"), (job.paste_into, "--paste-into")]
    return [outputs.JobInput(Path(path), role) for path, role in named
            if path is not None and not isinstance(path, np.ndarray)]  # the API's arrays are no files


def check_outputs(output: Optional[Path], frames_dir: Optional[Path], inputs: Sequence[outputs.JobInput], *,
                  overwrite: bool, note=None) -> None:
    """Refuse outputs that are inputs, not regular files, or already there (unless `overwrite`); with
    `note`, first remove the leftovers of killed earlier runs for these outputs and say so."""
    if output is not None:
        if note is not None:
            removed = outputs.remove_leftovers(output)
            if removed:
                note(outputs.describe_leftovers(output, removed))
        outputs.check_output(output, inputs, overwrite=overwrite)
    if output is not None and frames_dir is not None:
        outputs.check_output_not_in_folder(output, frames_dir, media.is_frame_name)
    if frames_dir is not None:
        if note is not None:
            removed = outputs.remove_leftovers_in(frames_dir, media.is_frame_name)
            if removed:
                note(outputs.describe_leftovers(frames_dir, removed))
        outputs.check_folder_holds_no_input(frames_dir, inputs, media.is_frame_name)
        media.check_frames_dir(frames_dir, overwrite=overwrite)


def _pose(degrees: Optional[Sequence[float]], frame_count: int) -> Optional[np.ndarray]:
    return None if degrees is None else coeffs.camera_pose_sequence(degrees, frame_count)


# ---------------------------------------------------------------------------------------------------
# The job


@dataclass
class PreparedJob:
    """A job after every check, before any model: what `render_prepared` streams and `Renderer.frames`
    yields. `image` is the source `(3, S, S) float32 in [0, 1]`; `output`/`frames_dir` are where it will
    write (both None for frames kept in memory); `files` are the checkpoint files found."""

    job: RenderJob
    config: object  # config.ModelConfig
    files: object  # checkpoints.CheckpointFiles
    semantics: object  # coeffs.Semantics
    image: np.ndarray
    yaw: Optional[np.ndarray]
    pitch: Optional[np.ndarray]
    roll: Optional[np.ndarray]
    output: Optional[Path]
    frames_dir: Optional[Path]
    ffmpeg: Optional[str]
    compile_decoder: bool
    notes: List[str]
    transform: object = None  # pasteback's plan (full-mode paste-back into a picture), or None

    @property
    def frame_count(self) -> int:
        return self.semantics.frame_count


class FreshModels:
    """The plain model source: load the networks for this one job, prepare its source, keep nothing.
    `renderer.ModelCache` is the one that keeps models and source work between jobs."""

    def engine(self, prepared: PreparedJob):
        from . import checkpoints
        from .engine import Engine, EngineOptions, configure_torch, resolve_device

        job = prepared.job
        configure_torch(resolve_device(job.device))
        nets = checkpoints.load_networks(prepared.config, prepared.files)
        return Engine(nets, EngineOptions(device=job.device, precision=job.precision, batch_size=job.batch_size,
                                          compile=prepared.compile_decoder))

    def source_state(self, engine, prepared: PreparedJob):
        return engine.prepare_source(prepared.image, prepared.semantics.source_window())


def read_driving(value) -> Tuple[np.ndarray, str]:
    """Coefficients from a file path, or an `(N, 70|73)` / `(N, C, 27)` array; (array, name for messages)."""
    if isinstance(value, np.ndarray):
        return coeffs.check_coefficients(value, "coefficients array"), "the coefficients array"
    return coeffs.read_coefficients(value), str(value)


SOURCE_IMAGES_KEPT = 8  # resized source images kept per process (a 256 px one is 0.75 MiB)
_source_images: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()


def read_source(value, size_px: int) -> np.ndarray:
    """The source face from an image path, or an `(H, W, 3)` RGB array (uint8, or float in [0, 1]).
    A file read before (same path, size and modification time) comes from a small LRU (as a copy): a
    batch checks each row, then renders it, often with one face for many clips."""
    if isinstance(value, np.ndarray):
        return media.source_from_array(value, size_px)
    try:
        info = os.stat(value)
        key = (os.path.abspath(value), info.st_size, info.st_mtime_ns, size_px)
    except OSError:
        key = None  # read_source_image says what is wrong
    if key in _source_images:
        _source_images.move_to_end(key)
        return _source_images[key].copy()
    image = media.read_source_image(value, size_px)
    if key is not None:
        _source_images[key] = image.copy()
        while len(_source_images) > SOURCE_IMAGES_KEPT:
            _source_images.popitem(last=False)
    return image


def prepare_job(job: RenderJob, note=None, *, in_memory: bool = False, folder_created: bool = False) -> PreparedJob:
    """Every check `sfr render` makes, cheapest first, loading no model; raises SfrError kinds. With
    `in_memory` the job writes no files (the caller keeps its frames). `note(message)` hears notes.
    `folder_created`: the caller creates the MP4's folder before rendering (`sfr batch`), so a missing
    one is fine when it can be created."""
    notes: List[str] = []

    def noted(message: str) -> None:
        notes.append(message)
        if note is not None:
            note(message)

    if job.size_px not in SIZES_PX:
        raise ConfigError(f"size {job.size_px} px is not supported; SadTalker renders 256 or 512")
    if job.batch_size is not None and job.batch_size < 1:
        raise RenderError(f"batch size {job.batch_size}: must be at least 1 (or auto)")
    media.check_fps(job.fps)
    coeffs.check_expression_scale(job.expression_scale)
    if in_memory:
        output = frames_dir = None
    elif isinstance(job.coeffs, np.ndarray) and job.output is None and job.frames_dir is None:
        raise MediaError("coefficients given as an array: name the output (output= or frames_dir=)")
    else:
        output, frames_dir = output_paths(job)
    if job.audio is not None and output is None:
        raise MediaError(f"{job.audio}: --audio needs an MP4 output; add -o/--output PATH.mp4")
    config = resolve_config(job.config, job.preprocess)
    inputs = job_inputs(job, config.path)
    check_outputs(output, frames_dir, inputs, overwrite=job.overwrite, note=noted)

    driving, driving_name = read_driving(job.coeffs)
    if job.source_coeffs is not None:
        source_row = coeffs.read_source_coefficients(job.source_coeffs)
    else:
        first = driving[0] if driving.ndim == 2 else driving[0, :, coeffs.SEMANTIC_RADIUS]
        source_row = np.array(first, dtype=np.float32)
        noted(f"source coefficients: first frame of {driving_name} (pass --source-coeffs for the source's own)")
    semantics = coeffs.prepare_semantics(driving, source_row, preprocess=job.preprocess, still=job.still,
                                         expression_scale=job.expression_scale)
    frame_count = semantics.frame_count
    yaw, pitch, roll = (_pose(d, frame_count) for d in (job.yaw, job.pitch, job.roll))
    image = read_source(job.source, job.size_px)
    mode = get_mode(job.preprocess)
    transform = pasteback.plan(Path(job.source), job.size_px, job.paste_into, job.crop_box, mode.pastes_back,
                               mode.extended_crop, mode.name, noted) if not isinstance(job.source, np.ndarray) else None
    frame_width, frame_height = transform.output_size if transform is not None else (job.size_px, job.size_px)
    if output is not None and (frame_width % 2 or frame_height % 2):
        noted(f"{frame_width}x{frame_height} frames: the MP4 repeats the last "
              f"{'column' if frame_width % 2 else 'row'}{' and row' if frame_width % 2 and frame_height % 2 else ''} "
              "(H.264 yuv420p needs even sizes); PNG frames keep the exact size")

    ffmpeg = None
    if output is not None:
        ffmpeg = media.find_ffmpeg()
        media.check_output_writable(output, folder_created=folder_created)
        if job.audio is not None:
            audio = media.probe_audio(job.audio, ffmpeg)
            video_seconds = frame_count / job.fps
            if audio.duration_seconds is not None and audio.duration_seconds < video_seconds - 0.1:
                noted(f"{job.audio}: {audio.duration_seconds:.2f} s of audio for {video_seconds:.2f} s of video; "
                      "the end is silent")

    from . import checkpoints  # torch from here on

    files = checkpoints.find_checkpoints(job.checkpoint_dir, size_px=job.size_px, preprocess=job.preprocess,
                                         checkpoint=job.checkpoint, mapping=job.mapping)
    found = [outputs.JobInput(files.renderer, "renderer checkpoint"),
             outputs.JobInput(files.mapping, "mapping checkpoint")]
    check_outputs(output, frames_dir, found, overwrite=True)  # the files found in --checkpoint-dir
    from .engine import check_precision, resolve_device

    device = resolve_device(job.device)
    check_precision(job.precision, device)  # an unavailable device or precision fails here
    compile_decoder = job.compile and device.type == "cuda"
    if job.compile and not compile_decoder:
        noted(f"--compile is ignored on {device.type}: torch.compile speeds up CUDA renders only")
    return PreparedJob(job=job, config=config, files=files, semantics=semantics, image=image, yaw=yaw,
                       pitch=pitch, roll=roll, output=output, frames_dir=frames_dir, ffmpeg=ffmpeg,
                       compile_decoder=compile_decoder, notes=notes, transform=transform)


def render_job(job: RenderJob, reporter: Reporter, models=None) -> RenderReport:
    """Check everything, load the model, render `job` into its MP4 and/or PNG frames; return a report.

    `models` gives the engine and the source work (`FreshModels` by default: load for this job only;
    a `Renderer` passes its cache). Raises SfrError kinds for anything the user can fix; nothing is
    left at the outputs on failure.
    """
    # 1. Everything checkable, cheapest first; no model loads.
    return render_prepared(prepare_job(job, reporter.note), reporter, models)


def render_prepared(prepared: PreparedJob, reporter: Reporter, models=None) -> RenderReport:
    """Steps 2 and 3 of `render_job` for a job `prepare_job` has checked: a group of one."""
    (_, outcome), = render_prepared_group([prepared], reporter, models)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def render_prepared_group(group: Sequence[PreparedJob], reporter: Reporter, models=None
                          ) -> Iterator[Tuple[int, Union[RenderReport, Exception]]]:
    """Render checked jobs that share one engine and one source state (the same model files and
    settings, the same face and source coefficients: the caller groups them, `renderer.pack_key`) as one
    stream of batches, each job into its own sinks.

    Yields, in job order, `(index in group, RenderReport)` once a job's outputs are committed (after
    its last frame; the commit overlaps the next job's frames), or `(index, error)` when it fails: its
    sinks failing fails it alone, nothing left at its outputs, and the others go on; the model, the
    source work or the engine failing fails every job not yet committed. Ctrl-C and other
    BaseExceptions abort every open sink and propagate. A job's `seconds` run from the previous job's
    last frame (or the stream's start) to the end of its commit: rendering and encoding its frames
    (commits overlap the next job a little). Close the generator (or run it to the end) to release open
    sinks early.
    """
    from .engine import peak_rss_mib

    if not group:
        return
    models = models if models is not None else FreshModels()
    first = group[0]
    files = first.files

    # 2. The model (loaded, or found in the caller's cache) and the source work.
    reporter.loading(f"loading {files.renderer.name} and {files.mapping.name} ({first.config.name})")
    try:
        engine = models.engine(first)
        state = models.source_state(engine, first)
    except Exception as exc:
        reporter.finish()
        for index in range(len(group)):
            yield index, exc
        return
    for prepared in group:
        if prepared.transform is not None:
            prepared.transform.bind(engine.device)  # the blend runs on the render device, in its own stage thread
    reporter.finish()
    for prepared in group:
        prepared.notes.append(f"{prepared.frame_count} frames on {engine.device}, {engine.precision}, "
                              f"batch size {engine.batch_size or 'auto'}")
    total = sum(prepared.frame_count for prepared in group)
    reporter.note(group[0].notes[-1] if len(group) == 1 else f"{total} frames of {len(group)} clips sharing one "
                  f"source on {engine.device}, {engine.precision}, batch size {engine.batch_size or 'auto'}")

    # 3. Frames: engine -> bounded queue -> writer thread -> MP4 and/or PNG frames, per job.
    reporter.start(total)
    with contextlib.closing(_stream(engine, state, group, reporter.advance)) as outcomes:
        for index, outcome, seconds in outcomes:
            if isinstance(outcome, BaseException):
                yield index, outcome
                continue
            prepared, stats = group[index], engine.stats
            batch_sizes = stats.batch_sizes or [engine.batch_size]  # CUDA auto decides in render_clips()
            yield index, RenderReport(
                output=prepared.output,
                frames_dir=prepared.frames_dir,
                frames=outcome,
                seconds=seconds,
                frames_per_second=outcome / seconds if seconds > 0 else 0.0,
                peak_rss_mib=round(stats.peak_rss_mib or peak_rss_mib(), 1),
                peak_cuda_mib=round(stats.peak_cuda_mib, 1) if engine.device.type == "cuda" else None,
                device=str(engine.device),
                precision=engine.precision,
                batch_size=int(max(batch_sizes)),
                notes=prepared.notes,
            )
    reporter.finish()


def _stream(engine, state, group: Sequence[PreparedJob], progress
            ) -> Iterator[Tuple[int, Union[int, Exception], float]]:
    """Render the jobs of `group` as one stream into each job's `ClipSinks`; yield `(index, frames
    written, seconds)` when a job is committed, `(index, error, seconds)` when it fails, in job order
    (see `render_prepared_group`). A job's seconds run from the previous job's last frame (or the
    stream's start) to its commit's end.

    A job's sinks open with its first frame. After its last, its commit (the writer draining, ffmpeg
    finishing the file) runs in the background while the next job's frames render and encode, so
    neither the engine nor the GPU waits for the encoder between clips; at most
    `COMMITS_IN_FLIGHT` commits run at once (then the oldest is waited for)."""
    from .engine import Clip

    clips = [Clip(p.semantics, p.yaw, p.pitch, p.roll) for p in group]
    open_sinks: Dict[int, ClipSinks] = {}
    settling: "collections.deque[Tuple[int, Optional[ClipSinks], object]]" = collections.deque()  # job order
    counts = [0] * len(group)
    settled = [False] * len(group)
    begun = [time.perf_counter()] * len(group)  # when each job's frames began: the previous job's last frame
    ended = [0.0] * len(group)  # when each job's last frame (or its failure) came

    def ready(limit: int) -> Iterator[Tuple[int, Union[int, Exception], float]]:
        """Hand out the settled jobs at the front; a commit still running holds back the jobs behind it,
        unless more than `limit` are waiting."""
        while settling:
            index, sinks, outcome = settling[0]
            if sinks is not None:
                if sinks.committing and len(settling) <= limit:
                    return
                outcome, ended[index] = sinks.result(), sinks.committed_at
            settling.popleft()
            yield index, outcome, ended[index] - begun[index]

    def settle(index: int, sinks: Optional[ClipSinks], error: Optional[Exception] = None) -> None:
        """The job is over: commit its sinks in the background or, on `error`, abort them."""
        settled[index] = True
        open_sinks.pop(index, None)
        ended[index] = time.perf_counter()
        if index + 1 < len(group):
            begun[index + 1] = ended[index]
        if error is None:
            sinks.commit_in_background()
        elif sinks is not None:
            sinks.abort()
        settling.append((index, sinks if error is None else None, error))

    frames = engine.render_clips(state, clips, progress=progress)
    try:
        while True:
            try:
                index, frame = next(frames)
            except StopIteration:
                break
            except Exception as exc:  # the engine failed: every job not yet written fails with it
                for index in range(len(group)):
                    if not settled[index]:
                        settle(index, open_sinks.get(index), exc)
                break
            if settled[index]:
                continue  # a job whose sinks failed: its frames go nowhere
            sinks = open_sinks.get(index)
            try:
                if sinks is None:
                    sinks = open_sinks[index] = ClipSinks(group[index])
                sinks.put(frame)
            except Exception as exc:  # this job's sinks (ffmpeg died, a disk filled): it alone fails
                settle(index, sinks, exc)
            else:
                counts[index] += 1
                if counts[index] == group[index].frame_count:
                    settle(index, sinks)
            yield from ready(COMMITS_IN_FLIGHT)
        for index in range(len(group)):  # a job the engine gave too few frames (or none): commit says so
            if not settled[index]:
                try:
                    settle(index, open_sinks.get(index) or ClipSinks(group[index]))
                except Exception as exc:
                    settle(index, open_sinks.get(index), exc)
        yield from ready(0)
    except BaseException:
        # Ctrl-C, SIGTERM, the consumer closing this generator: stop every writer, leave nothing behind
        # (a job whose last frame is in finishes its commit: its files are complete).
        for sinks in list(open_sinks.values()) + [sinks for _, sinks, _ in settling if sinks is not None]:
            sinks.abort()
        raise
    finally:
        frames.close()


class ClipSinks:
    """One job's outputs while its frames stream: the MP4 and/or PNG writers fed by a writer thread (and,
    with paste-back, a stage thread transforming frames before it: rendering, blending and encoding
    overlap, each queue bounded). `commit` after the last frame checks the count and commits the files
    (`commit_in_background` does it in a thread of its own); `abort` on any failure or interrupt stops
    the threads and ffmpeg and leaves nothing behind."""

    def __init__(self, prepared: PreparedJob):
        job, transform = prepared.job, prepared.transform
        self.frame_count = prepared.frame_count
        width_px, height_px = transform.output_size if transform is not None else (job.size_px, job.size_px)
        self._sinks: list = []
        self._mp4 = self._png = self._writer = self._stage = self._committer = None
        self._outcome: Union[int, Exception, None] = None
        self.committed_at = 0.0  # perf_counter() when the background commit ended
        try:
            if prepared.output is not None:
                self._mp4 = media.Mp4Writer(prepared.output, width_px=width_px, height_px=height_px, fps=job.fps,
                                            audio=job.audio, frame_count=self.frame_count, ffmpeg=prepared.ffmpeg,
                                            pad_odd=True)
                self._sinks.append(self._mp4)
            if prepared.frames_dir is not None:
                self._png = media.PngFrameWriter(prepared.frames_dir, replace_existing=job.overwrite)
                self._sinks.append(self._png)
            self._writer = self._feed = FrameWriterThread(self._sinks)
            if transform is not None:
                self._stage = self._feed = FrameWriterThread([_TransformSink(transform, self._writer)],
                                                             name="sfr-paste-back")
        except BaseException:
            self.abort()
            raise

    def put(self, frame: np.ndarray) -> None:
        """Hand on one `(S, S, 3) uint8` frame; raises the writer's error, if any."""
        self._feed.put(frame)

    def commit(self) -> int:
        """Wait for the last frame to be written, check the count, commit the files; returns the count."""
        if self._stage is not None:
            self._stage.finish()
        written = self._writer.finish()
        if written != self.frame_count:
            raise RenderError(f"the engine yielded {written} frames for {self.frame_count} coefficient frames")
        if self._mp4 is not None:
            self._mp4.close()
        if self._png is not None:
            self._png.close()
        return written

    def commit_in_background(self) -> None:
        """Start `commit` in its own thread; `result` waits for it. On failure its files are removed."""
        self._committer = threading.Thread(target=self._run_commit, name="sfr-commit", daemon=True)
        self._committer.start()

    def _run_commit(self) -> None:
        try:
            self._outcome = self.commit()
        except Exception as exc:  # handed to the caller's thread by result(), never dropped
            self._release()
            self._outcome = exc
        self.committed_at = time.perf_counter()

    @property
    def committing(self) -> bool:
        return self._committer is not None and self._committer.is_alive()

    def result(self) -> Union[int, Exception]:
        """After `commit_in_background`: wait; the frames written, or the error (nothing left behind)."""
        self._committer.join()
        return self._outcome

    def abort(self) -> None:
        """Stop the threads and ffmpeg and remove every file written. A commit under way is waited for
        (its ffmpeg killed if it hangs past STOP_WAIT_SECONDS): it ends complete or leaves nothing."""
        if self._committer is not None:
            self._committer.join(timeout=STOP_WAIT_SECONDS)
            if self._committer.is_alive() and self._mp4 is not None:
                self._mp4.abort()
            self._committer.join()
            return
        self._release()

    def _release(self) -> None:
        # the writer first: a stage blocked handing it a frame then fails and ends
        if self._writer is not None:
            self._writer.stop(unblock=self._mp4.abort if self._mp4 is not None else None)
        if self._stage is not None:
            self._stage.stop()
        for sink in self._sinks:
            sink.abort()


class _TransformSink:
    """A stage thread's sink: transform each frame and hand it on to the next thread."""

    def __init__(self, transform, downstream: "FrameWriterThread"):
        self._transform = transform
        self._downstream = downstream

    def write(self, frame) -> None:
        for out in self._transform([frame]):
            self._downstream.put(out)


class FrameWriterThread:
    """Feeds frames from a bounded queue to the sinks in a background thread.

    `put` blocks while the queue is full (so memory stays flat) and re-raises the writer's error, if any,
    in the caller's thread; `finish` waits for the last frame; `stop` ends the thread whatever happened.
    """

    _DONE = object()

    def __init__(self, sinks, name: str = "sfr-frame-writer"):
        self._sinks = sinks
        self._queue: "queue.Queue" = queue.Queue(maxsize=QUEUE_FRAMES)
        self._stopping = threading.Event()
        self.error: Optional[BaseException] = None
        self.frames_written = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    frame = self._queue.get(timeout=QUEUE_POLL_SECONDS)
                except queue.Empty:
                    continue
                if frame is self._DONE:
                    return
                for sink in self._sinks:
                    sink.write(frame)
                self.frames_written += 1
        except BaseException as exc:  # handed to the caller's thread by put/finish, never dropped
            self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if not self._thread.is_alive():
            raise RuntimeError("the frame writer thread stopped unexpectedly")

    def put(self, frame) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(frame, timeout=QUEUE_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def finish(self) -> int:
        self.put(self._DONE)
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.frames_written

    def stop(self, unblock=None) -> None:
        """End the thread after its current frame; if it is stuck in a sink, call `unblock` (kills ffmpeg)."""
        self._stopping.set()
        self._thread.join(timeout=STOP_WAIT_SECONDS)
        if self._thread.is_alive() and unblock is not None:
            unblock()
        self._thread.join()

