"""Frames of checked jobs from the engine through the frame stages into the sinks, threaded and bounded.

Frames stream from the engine through a small bounded queue to a writer thread that feeds the MP4 and/or
the PNG frames: rendering the next batch overlaps with encoding, and memory stays flat whatever the clip
length. On any failure or interrupt a job's sinks are aborted: no partial MP4, no temporary files, no
ffmpeg left running. Jobs sharing a model and a source face run as one group (`render_prepared_group`):
one stream of batches spanning the clips, each job with its own sinks, committed or failed alone.
"""
from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import media
from .errors import RenderError
from .jobs import PreparedJob, RenderJob, RenderReport, prepare_job
from .progress import Reporter
from .stages import stage_reports

QUEUE_FRAMES = 8  # frames between the renderer and the writer thread
QUEUE_POLL_SECONDS = 0.1
STOP_WAIT_SECONDS = 5.0  # how long a stopping writer may take to finish its frame before ffmpeg is killed
COMMITS_IN_FLIGHT = 2  # clips whose ffmpeg may still be finishing while the next clip renders

def build_engine(prepared: PreparedJob):
    """Load the networks a checked job names and build its engine (what `ModelCache.engine` keeps)."""
    from . import checkpoints
    from .engine import Engine, EngineOptions, configure_torch, resolve_device

    job = prepared.job
    configure_torch(resolve_device(job.device))
    nets = checkpoints.load_networks(prepared.config, prepared.files)
    return Engine(nets, EngineOptions(device=job.device, precision=job.precision, batch_size=job.batch_size,
                                      compile_scope="decoder" if prepared.compile_decoder else "none"))


def render_job(job: RenderJob, reporter: Reporter, models) -> RenderReport:
    """Check everything, load the model, render `job` into its MP4 and/or PNG frames; return a report.

    `models` gives the engine, the source work and the stages' weights (`renderer.ModelCache`). Raises
    SfrError kinds for anything the user can fix; nothing is left at the outputs on failure.
    """
    # 1. Everything checkable, cheapest first; no model loads.
    return render_prepared(prepare_job(job, reporter.note, claim=True, sources=models.source_images), reporter, models)


def render_prepared(prepared: PreparedJob, reporter: Reporter, models) -> RenderReport:
    """Steps 2 and 3 of `render_job` for a job `prepare_job` has checked: a group of one."""
    (_, outcome), = render_prepared_group([prepared], reporter, models)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def load_group(group: Sequence[PreparedJob], models):
    """The engine and source state a group shares, and every job's stages loaded on its device."""
    engine = models.engine(group[0])
    state = models.source_state(engine, group[0])
    for prepared in group:
        for stage in prepared.stages:
            stage.load(engine.device, models)
    return engine, state


def render_prepared_group(group: Sequence[PreparedJob], reporter: Reporter, models
                          ) -> Iterator[Tuple[int, Union[RenderReport, Exception]]]:
    """Render checked jobs that share one engine and one source state (the same model files and
    settings, the same face and source coefficients: the caller groups them, `ModelCache.pack_key`) as
    one stream of batches, each job through its own frame stages into its own sinks.

    Yields, in job order, `(index in group, RenderReport)` once a job's outputs are committed (after
    its last frame; the commit overlaps the next job's frames), or `(index, error)` when it fails: its
    stages or sinks failing fails it alone, nothing left at its outputs, and the others go on; the
    model, the source work or the engine failing fails every job not yet committed. Ctrl-C and other
    BaseExceptions abort every open sink and propagate. A job's `seconds` run from the previous job's
    last frame (or the stream's start) to the end of its commit: rendering and encoding its frames
    (commits overlap the next job a little). Close the generator (or run it to the end) to release open
    sinks early. Each job's claims on its outputs (`prepare_job(claim=True)`) are released once it settles.
    """
    try:
        yield from _render_group(group, reporter, models)
    finally:
        for prepared in group:  # the outputs' claims end with their jobs (most were released as each settled)
            prepared.release()


def _render_group(group: Sequence[PreparedJob], reporter: Reporter, models
                  ) -> Iterator[Tuple[int, Union[RenderReport, Exception]]]:
    from .engine import peak_rss_mib

    if not group:
        return
    first = group[0]
    files = first.files

    # 2. The model (loaded, or found in the caller's cache), the source work, the stages' weights.
    reporter.loading(f"loading {files.renderer.name} and {files.mapping.name} ({first.config.name})")
    try:
        engine, state = load_group(group, models)
    except Exception as exc:
        reporter.finish()
        for index in range(len(group)):
            yield index, exc
        return
    reporter.finish()
    for prepared in group:
        prepared.notes.append(f"{prepared.frame_count} frames on {engine.device}, {engine.precision}, "
                              f"batch size {engine.batch_size or 'auto'}")
    total = sum(prepared.frame_count for prepared in group)
    reporter.note(group[0].notes[-1] if len(group) == 1 else f"{total} frames of {len(group)} clips sharing one "
                  f"source on {engine.device}, {engine.precision}, batch size {engine.batch_size or 'auto'}")

    # 3. Frames: engine -> stages -> host -> bounded queue -> writer thread -> MP4 and/or PNG frames, per job.
    reporter.start(total)
    with contextlib.closing(_stream(engine, state, group, reporter.advance)) as outcomes:
        for index, outcome, seconds in outcomes:
            group[index].release()  # committed or failed: its outputs are free again
            if isinstance(outcome, BaseException):
                yield index, outcome
                continue
            prepared, stats = group[index], engine.stats
            batch_sizes = stats.batch_sizes or [engine.batch_size]
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
                stages=stage_reports(prepared.stages),
            )
    reporter.finish()


# ---------------------------------------------------------------------------------------------------
# Engine -> stages -> host


class StageLane:
    """Runs each clip's stage chain on the engine's batches and brings the frames to the host, once.

    On CUDA the chain runs on a stream of its own: it waits for the batch's `ready` event (not for
    the engine's queue), the engine's next batch, already launched, runs beside it, and the frames
    cross to pinned host memory after the last stage; only this lane waits for its copy. On a CPU the
    chain runs in line (the engine's kernels already use every core)."""

    def __init__(self, device):
        import torch

        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(self, batch, chains: Sequence[Sequence], skip) -> Iterator[Tuple[int, Union[np.ndarray, Exception]]]:
        """For each clip in `batch` (a `DeviceFrames`) not in `skip`: `(clip index, (b, H, W, 3) uint8
        frames on the host)`, or `(clip index, error)` when its chain failed."""
        import torch

        runs = _owner_runs(batch.owners)
        if self._stream is None:
            with torch.inference_mode():
                for index, lo, hi in runs:
                    if index not in skip:
                        yield index, _apply(chains[index], batch.frames[lo:hi], lambda out: out.numpy())
            return
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            if batch.ready is not None:
                self._stream.wait_event(batch.ready)
            batch.frames.record_stream(self._stream)  # the engine's memory: not reused before this lane is done
            pending = []
            for index, lo, hi in runs:
                if index not in skip:
                    pending.append((index, _apply(chains[index], batch.frames[lo:hi], self._to_pinned)))
            done = torch.cuda.Event()
            done.record(self._stream)
        done.synchronize()
        for index, out in pending:
            yield index, out if isinstance(out, Exception) else out.numpy()

    @staticmethod
    def _to_pinned(frames):
        import torch

        host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        return host


def _apply(chain: Sequence, frames, finish):
    """`frames` through `chain`, then `finish` (to the host); an Exception (not a BaseException) is returned."""
    try:
        for stage in chain:
            frames = stage(frames)
        return finish(frames.contiguous())
    except Exception as exc:  # this clip's stages failed: the caller fails this clip alone
        return exc


def _owner_runs(owners: Sequence[int]) -> List[Tuple[int, int, int]]:
    """`(clip index, start, stop)` for each run of equal owners (a batch holds clips end to end)."""
    runs: List[Tuple[int, int, int]] = []
    for position, owner in enumerate(owners):
        if runs and runs[-1][0] == owner:
            runs[-1] = (owner, runs[-1][1], position + 1)
        else:
            runs.append((owner, position, position + 1))
    return runs


def stream_frames(engine, state, clips: Sequence, chains: Sequence[Sequence], progress=None, skip=None
                  ) -> Iterator[Tuple[int, Union[np.ndarray, Exception]]]:
    """Every frame of `clips` (`engine.Clip`s sharing `state`), each through its clip's stage chain, on
    the host: `(clip index, (H, W, 3) uint8 frame)` in order, or once `(clip index, error)` when that
    clip's stages failed (its later frames are dropped). `progress(n)` hears of every batch handed out;
    `skip` (a set the caller may grow) names clips whose frames are no longer wanted. Engine errors
    propagate. The one path for frames: `sfr render`, `sfr batch`, `Renderer.frames` and `sfr bench`."""
    skip = skip if skip is not None else set()
    lane = StageLane(engine.device)
    for batch in engine.launch_clips(state, clips):
        for index, frames in lane.run(batch, chains, set(skip)):
            if isinstance(frames, Exception):
                skip.add(index)
                yield index, frames
                continue
            for frame in frames:
                yield index, frame
        engine.record_memory()
        if progress is not None:
            progress(len(batch.owners))


CPU_ENHANCE_BATCH = 4  # frames per stage call of `sfr enhance` on a CPU
CUDA_ENHANCE_BATCH = 16


def render_enhance(prepared, reporter: Reporter, models) -> RenderReport:
    """`sfr enhance`: see `_render_enhance`; the outputs' claims end with it, however it ends."""
    try:
        return _render_enhance(prepared, reporter, models)
    finally:
        prepared.release()


def _render_enhance(prepared, reporter: Reporter, models) -> RenderReport:
    """`sfr enhance`: a checked `jobs.PreparedEnhance`'s frames, read in batches, through its stages on the
    device (the same `StageLane` as a render's), into its sinks. Nothing is left at the outputs on failure
    or interrupt; memory stays flat (frames are read, enhanced and written a batch at a time)."""
    import torch

    from .engine import DeviceFrames, configure_torch, peak_rss_mib, resolve_device

    job = prepared.job
    device = resolve_device(job.device)
    configure_torch(device)
    reporter.loading(f"loading the {job.enhancer} enhancer")
    for stage in prepared.stages:
        stage.load(device, models)
    reporter.finish()
    batch = job.batch_size or (CUDA_ENHANCE_BATCH if device.type == "cuda" else CPU_ENHANCE_BATCH)
    from .stages.enhance import CUDA_FACES_PER_CALL

    faces = f"up to {CUDA_FACES_PER_CALL} faces at a time" if device.type == "cuda" else "one face at a time"
    reporter.note(f"{prepared.frame_count} frames of {prepared.source.width_px}x{prepared.source.height_px} "
                  f"on {device}: {batch} frames read at a time, {faces}")
    width_px, height_px = prepared.frame_size
    lane = StageLane(device)
    started = time.perf_counter()
    reporter.start(prepared.frame_count, "enhancing")
    sinks = ClipSinks(output=prepared.output, frames_dir=prepared.frames_dir, width_px=width_px, height_px=height_px,
                      frame_count=prepared.frame_count, fps=prepared.fps, audio=prepared.audio, ffmpeg=prepared.ffmpeg,
                      overwrite=job.overwrite, audio_copy=prepared.audio_copy, exact_count=False)
    try:
        pending: List[np.ndarray] = []

        def flush() -> None:
            frames = torch.from_numpy(np.stack(pending)).to(device)
            for _, out in lane.run(DeviceFrames(frames, [0] * len(pending)), [prepared.stages], set()):
                if isinstance(out, Exception):
                    raise out
                for frame in out:
                    sinks.put(frame)
            reporter.advance(len(pending))
            pending.clear()

        for frame in prepared.source.frames():
            pending.append(frame)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        written = sinks.commit()
    except BaseException:
        sinks.abort()
        reporter.finish()
        raise
    reporter.finish()
    if written != prepared.frame_count:
        reporter.note(f"{written} frames decoded and enhanced ({prepared.frame_count} counted beforehand)")
    seconds = time.perf_counter() - started
    return RenderReport(
        output=prepared.output, frames_dir=prepared.frames_dir, frames=written, seconds=seconds,
        frames_per_second=written / seconds if seconds > 0 else 0.0, peak_rss_mib=round(peak_rss_mib(), 1),
        peak_cuda_mib=round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None,
        device=str(device), precision="fp32", batch_size=batch, notes=prepared.notes,
        stages=stage_reports(prepared.stages))


@dataclass
class _Job:
    """One job of a stream: its sinks while open, frames written, when its frames began and ended."""

    prepared: PreparedJob
    sinks: Optional["ClipSinks"] = None
    written: int = 0
    settled: bool = False
    begun: float = 0.0  # the previous job's last frame (or the stream's start)
    ended: float = 0.0  # its last frame, its failure, or its commit's end


def _stream(engine, state, group: Sequence[PreparedJob], progress
            ) -> Iterator[Tuple[int, Union[int, Exception], float]]:
    """Render the jobs of `group` as one stream into each job's `ClipSinks`; yield `(index, frames
    written, seconds)` when a job is committed, `(index, error, seconds)` when it fails, in job order
    (see `render_prepared_group`).

    A job's sinks open with its first frame. After its last, its commit (the writer draining, ffmpeg
    finishing the file) runs in the background while the next job's frames render and encode, so
    neither the engine nor the GPU waits for the encoder between clips; at most
    `COMMITS_IN_FLIGHT` commits run at once (then the oldest is waited for)."""
    from .engine import Clip

    jobs = [_Job(prepared) for prepared in group]
    jobs[0].begun = time.perf_counter()
    settling: "collections.deque[Tuple[int, Optional[ClipSinks], object]]" = collections.deque()  # job order
    skip: set = set()

    def ready(limit: int) -> Iterator[Tuple[int, Union[int, Exception], float]]:
        """Hand out the settled jobs at the front; a commit still running holds back the jobs behind it,
        unless more than `limit` are waiting."""
        while settling:
            index, sinks, outcome = settling[0]
            job = jobs[index]
            if sinks is not None:
                if sinks.committing and len(settling) <= limit:
                    return
                outcome, job.ended = sinks.result(), sinks.committed_at
            settling.popleft()
            yield index, outcome, job.ended - job.begun

    def settle(index: int, error: Optional[Exception] = None) -> None:
        """The job is over: commit its sinks in the background or, on `error`, abort them."""
        job = jobs[index]
        job.settled = True
        skip.add(index)
        job.ended = time.perf_counter()
        if index + 1 < len(jobs):
            jobs[index + 1].begun = job.ended
        if error is None:
            job.sinks.commit_in_background()
        elif job.sinks is not None:
            job.sinks.abort()
        settling.append((index, job.sinks if error is None else None, error))
        job.sinks = None

    clips = [Clip(p.semantics, p.yaw, p.pitch, p.roll) for p in group]
    frames = stream_frames(engine, state, clips, [p.stages for p in group], progress, skip)
    try:
        while True:
            try:
                index, frame = next(frames)
            except StopIteration:
                break
            except Exception as exc:  # the engine failed: every job not yet written fails with it
                for index, job in enumerate(jobs):
                    if not job.settled:
                        settle(index, exc)
                break
            job = jobs[index]
            if job.settled:
                continue  # a job whose sinks failed: its frames go nowhere
            if isinstance(frame, Exception):  # its stages failed: it alone fails
                settle(index, frame)
                continue
            try:
                if job.sinks is None:
                    job.sinks = ClipSinks.for_job(job.prepared)
                job.sinks.put(frame)
            except Exception as exc:  # this job's sinks (ffmpeg died, a disk filled): it alone fails
                settle(index, exc)
            else:
                job.written += 1
                if job.written == job.prepared.frame_count:
                    settle(index)
            yield from ready(COMMITS_IN_FLIGHT)
        for index, job in enumerate(jobs):  # a job the engine gave too few frames (or none): commit says so
            if not job.settled:
                try:
                    if job.sinks is None:
                        job.sinks = ClipSinks.for_job(job.prepared)
                    settle(index)
                except Exception as exc:
                    settle(index, exc)
        yield from ready(0)
    except BaseException:
        # Ctrl-C, SIGTERM, the consumer closing this generator: stop every writer, leave nothing behind
        # (a job whose last frame is in finishes its commit: its files are complete).
        for sinks in [job.sinks for job in jobs if job.sinks is not None] + \
                [sinks for _, sinks, _ in settling if sinks is not None]:
            sinks.abort()
        raise
    finally:
        frames.close()


class ClipSinks:
    """One job's outputs while its frames stream: the MP4 and/or PNG writers fed by a writer thread
    (rendering and encoding overlap, the queue bounded). `commit` after the last frame checks the count
    and commits the files (`commit_in_background` does it in a thread of its own); `abort` on any
    failure or interrupt stops the thread and ffmpeg and leaves nothing behind."""

    def __init__(self, *, output: Optional[Path], frames_dir: Optional[Path], width_px: int, height_px: int,
                 frame_count: int, fps: float = 25.0, audio: Optional[Path] = None, ffmpeg: Optional[str] = None,
                 overwrite: bool = False, audio_copy: bool = False, exact_count: bool = True):
        self.frame_count = frame_count
        self.exact_count = exact_count  # False: `frame_count` is an estimate (a decoded video's), not checked
        self._sinks: list = []
        self._mp4 = self._png = self._writer = self._committer = None
        self._outcome: Union[int, Exception, None] = None
        self.committed_at = 0.0  # perf_counter() when the background commit ended
        try:
            if output is not None:
                self._mp4 = media.Mp4Writer(output, width_px=width_px, height_px=height_px, fps=fps, audio=audio,
                                            frame_count=frame_count if exact_count else None, ffmpeg=ffmpeg,
                                            pad_odd=True, audio_copy=audio_copy,
                                            replace_existing=overwrite)
                self._sinks.append(self._mp4)
            if frames_dir is not None:
                self._png = media.PngFrameWriter(frames_dir, replace_existing=overwrite)
                self._sinks.append(self._png)
            self._writer = FrameWriterThread(self._sinks)
        except BaseException:
            self.abort()
            raise

    @classmethod
    def for_job(cls, prepared: PreparedJob) -> "ClipSinks":
        """The sinks a checked job writes: its MP4 and/or frames folder, at its frames' size."""
        job = prepared.job
        width_px, height_px = prepared.frame_size
        return cls(output=prepared.output, frames_dir=prepared.frames_dir, width_px=width_px, height_px=height_px,
                   frame_count=prepared.frame_count, fps=job.fps, audio=job.audio, ffmpeg=prepared.ffmpeg,
                   overwrite=job.overwrite)

    @property
    def writer_seconds(self) -> float:
        """Seconds the writer thread spent in the sinks (encoding, PNG compression) so far."""
        return self._writer.sink_seconds if self._writer is not None else 0.0

    def put(self, frame: np.ndarray) -> None:
        """Hand on one `(H, W, 3) uint8` frame; raises the writer's error, if any."""
        self._writer.put(frame)

    def commit(self) -> int:
        """Wait for the last frame to be written, check the count, commit the files; returns the count."""
        written = self._writer.finish()
        if self.exact_count and written != self.frame_count:
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
        if self._writer is not None:
            self._writer.stop(unblock=self._mp4.abort if self._mp4 is not None else None)
        for sink in self._sinks:
            sink.abort()
        for sink in reversed(self._sinks):  # a folder the first created may have held the second's
            sink.remove_created_folders()


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
        self.sink_seconds = 0.0  # time spent in the sinks' write (the encoder's share of the work)
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
                started = time.perf_counter()
                for sink in self._sinks:
                    sink.write(frame)
                self.sink_seconds += time.perf_counter() - started
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

