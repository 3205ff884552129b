"""One render job from paths to files: check every input, load the model, stream frames into the sinks.

The order is the point. Everything a user can get wrong (config, coefficients, source image, ffmpeg,
audio, output location, checkpoint files) is checked before any network loads, so a mistake costs
seconds, not a model load. Then frames stream from the engine through a small bounded queue to a
writer thread that feeds the MP4 and/or the PNG frames: rendering the next batch overlaps with encoding,
and memory stays flat whatever the clip length. On any failure or interrupt both sinks are aborted:
no partial MP4, no temporary files, no ffmpeg left running.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import coeffs, media, outputs
from .config import resolve_config
from .errors import ConfigError, MediaError, RenderError
from .progress import Reporter

QUEUE_FRAMES = 8  # frames between the renderer and the writer thread
QUEUE_POLL_SECONDS = 0.1
STOP_WAIT_SECONDS = 5.0  # how long a stopping writer may take to finish its frame before ffmpeg is killed
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
             (config_file, "--config")]
    return [outputs.JobInput(Path(path), role) for path, role in named if path is not None]


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


def render_job(job: RenderJob, reporter: Reporter) -> RenderReport:
    """Check everything, load the model, render `job` into its MP4 and/or PNG frames; return a report.

    Raises SfrError kinds for anything the user can fix; nothing is left at the outputs on failure.
    """
    notes: List[str] = []

    def note(message: str) -> None:
        notes.append(message)
        reporter.note(message)

    # 1. Everything checkable, cheapest first; nothing here imports torch.
    if job.size_px not in SIZES_PX:
        raise ConfigError(f"size {job.size_px} px is not supported; SadTalker renders 256 or 512")
    if job.batch_size is not None and job.batch_size < 1:
        raise RenderError(f"batch size {job.batch_size}: must be at least 1 (or auto)")
    media.check_fps(job.fps)
    coeffs.check_expression_scale(job.expression_scale)
    output, frames_dir = output_paths(job)
    if job.audio is not None and output is None:
        raise MediaError(f"{job.audio}: --audio needs an MP4 output; add -o/--output PATH.mp4")
    config = resolve_config(job.config, job.preprocess)
    inputs = job_inputs(job, config.path)
    check_outputs(output, frames_dir, inputs, overwrite=job.overwrite, note=note)

    driving = coeffs.read_coefficients(job.coeffs)
    if job.source_coeffs is not None:
        source_row = coeffs.read_source_coefficients(job.source_coeffs)
    else:
        first = driving[0] if driving.ndim == 2 else driving[0, :, coeffs.SEMANTIC_RADIUS]
        source_row = np.array(first, dtype=np.float32)
        note(f"source coefficients: first frame of {job.coeffs} (pass --source-coeffs for the source's own)")
    semantics = coeffs.prepare_semantics(driving, source_row, preprocess=job.preprocess, still=job.still,
                                         expression_scale=job.expression_scale)
    frame_count = semantics.frame_count
    yaw, pitch, roll = (_pose(d, frame_count) for d in (job.yaw, job.pitch, job.roll))
    image = media.read_source_image(job.source, job.size_px)

    ffmpeg = None
    if output is not None:
        ffmpeg = media.find_ffmpeg()
        media.check_output_writable(output)
        if job.audio is not None:
            audio = media.probe_audio(job.audio, ffmpeg)
            video_seconds = frame_count / job.fps
            if audio.duration_seconds is not None and audio.duration_seconds < video_seconds - 0.1:
                note(f"{job.audio}: {audio.duration_seconds:.2f} s of audio for {video_seconds:.2f} s of video; "
                     "the end is silent")

    from . import checkpoints  # torch from here on

    files = checkpoints.find_checkpoints(job.checkpoint_dir, size_px=job.size_px, preprocess=job.preprocess,
                                         checkpoint=job.checkpoint, mapping=job.mapping)
    found = [outputs.JobInput(files.renderer, "renderer checkpoint"),
             outputs.JobInput(files.mapping, "mapping checkpoint")]
    check_outputs(output, frames_dir, found, overwrite=True)  # the files found in --checkpoint-dir
    from .engine import Engine, EngineOptions, check_precision, configure_torch, peak_rss_mib, resolve_device

    device = resolve_device(job.device)
    check_precision(job.precision, device)  # an unavailable device or precision fails here
    configure_torch(device)
    compile_decoder = job.compile and device.type == "cuda"
    if job.compile and not compile_decoder:
        note(f"--compile is ignored on {device.type}: torch.compile speeds up CUDA renders only")

    # 2. The model.
    reporter.loading(f"loading {files.renderer.name} and {files.mapping.name} ({config.name})")
    nets = checkpoints.load_networks(config, files)
    engine = Engine(nets, EngineOptions(device=job.device, precision=job.precision, batch_size=job.batch_size,
                                        compile=compile_decoder))
    state = engine.prepare_source(image, semantics.source_window())
    reporter.finish()
    note(f"{frame_count} frames on {engine.device}, {engine.precision}, batch size {engine.batch_size or 'auto'}")

    # 3. Frames: engine -> bounded queue -> writer thread -> MP4 and/or PNG frames.
    started = time.perf_counter()
    written = _stream(engine, state, semantics, yaw, pitch, roll, reporter, output, frames_dir, ffmpeg, job)
    seconds = time.perf_counter() - started
    reporter.finish()

    stats = engine.stats
    batch_sizes = stats.batch_sizes or [engine.batch_size]  # CUDA auto decides in render()
    return RenderReport(
        output=output,
        frames_dir=frames_dir,
        frames=written,
        seconds=seconds,
        frames_per_second=written / seconds if seconds > 0 else 0.0,
        peak_rss_mib=round(stats.peak_rss_mib or peak_rss_mib(), 1),
        peak_cuda_mib=round(stats.peak_cuda_mib, 1) if engine.device.type == "cuda" else None,
        device=str(engine.device),
        precision=engine.precision,
        batch_size=int(max(batch_sizes)),
        notes=notes,
    )


def _stream(engine, state, semantics, yaw, pitch, roll, reporter: Reporter, output: Optional[Path],
            frames_dir: Optional[Path], ffmpeg: Optional[str], job: RenderJob) -> int:
    """Render every frame into the sinks; commit them only when all frames are in. Returns the frame count."""
    frame_count = semantics.frame_count
    sinks: list = []
    mp4 = png = writer = None
    try:
        if output is not None:
            mp4 = media.Mp4Writer(output, width_px=job.size_px, height_px=job.size_px, fps=job.fps,
                                  audio=job.audio, frame_count=frame_count, ffmpeg=ffmpeg)
            sinks.append(mp4)
        if frames_dir is not None:
            png = media.PngFrameWriter(frames_dir, replace_existing=job.overwrite)
            sinks.append(png)
        writer = FrameWriterThread(sinks)
        reporter.start(frame_count)
        for frame in engine.render(state, semantics, yaw=yaw, pitch=pitch, roll=roll, progress=reporter.advance):
            writer.put(frame)
        written = writer.finish()
        if written != frame_count:
            raise RenderError(f"the engine yielded {written} frames for {frame_count} coefficient frames")
        if mp4 is not None:
            mp4.close()
        if png is not None:
            png.close()
        return written
    except BaseException:
        # Ctrl-C, SIGTERM, an engine or ffmpeg failure: stop the writer, leave nothing behind, propagate.
        if writer is not None:
            writer.stop(unblock=mp4.abort if mp4 is not None else None)
        for sink in sinks:
            sink.abort()
        raise


class FrameWriterThread:
    """Feeds frames from a bounded queue to the sinks in a background thread.

    `put` blocks while the queue is full (so memory stays flat) and re-raises the writer's error, if any,
    in the caller's thread; `finish` waits for the last frame; `stop` ends the thread whatever happened.
    """

    _DONE = object()

    def __init__(self, sinks):
        self._sinks = sinks
        self._queue: "queue.Queue" = queue.Queue(maxsize=QUEUE_FRAMES)
        self._stopping = threading.Event()
        self.error: Optional[BaseException] = None
        self.frames_written = 0
        self._thread = threading.Thread(target=self._run, name="sfr-frame-writer", daemon=True)
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

