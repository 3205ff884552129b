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
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from . import media
from .errors import RenderError
from .jobs import PreparedJob, RenderJob, RenderReport, prepare_job
from .progress import Reporter

QUEUE_FRAMES = 8  # frames between the renderer and the writer thread
QUEUE_POLL_SECONDS = 0.1
STOP_WAIT_SECONDS = 5.0  # how long a stopping writer may take to finish its frame before ffmpeg is killed
COMMITS_IN_FLIGHT = 2  # clips whose ffmpeg may still be finishing while the next clip renders

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



def render_job(job: RenderJob, reporter: Reporter, models=None) -> RenderReport:
    """Check everything, load the model, render `job` into its MP4 and/or PNG frames; return a report.

    `models` gives the engine and the source work (`FreshModels` by default: load for this job only;
    a `Renderer` passes its cache). Raises SfrError kinds for anything the user can fix; nothing is
    left at the outputs on failure.
    """
    # 1. Everything checkable, cheapest first; no model loads.
    return render_prepared(prepare_job(job, reporter.note, claim=True), reporter, models)


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
            group[index].release()  # committed or failed: its outputs are free again
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
                                            pad_odd=True, replace_existing=job.overwrite)
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

