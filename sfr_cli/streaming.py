"""The one pipeline: frame source -> stage chain on the device -> one copy to the host -> sinks.

Every command runs frames this way: `sfr render`, `sfr batch`, the `Renderer` and `sfr bench` with the
engine as the frame source (`stream_frames`), `sfr enhance` with frames that already exist, decoded from
a video or read from a folder (`decoded_batches`). A frame source yields batches on the render device
(`engine.DeviceFrames`); `StageLane` runs each clip's stage chain on them and brings the frames to the
host once; `_stream` hands each job's frames to its own sinks (`media.ClipSinks`: a bounded queue and a
writer thread, so producing the next batch overlaps with encoding and memory stays flat whatever the
clip length) and commits or fails each job alone. On any failure or interrupt a job's sinks are
aborted: no partial MP4, no temporary files, no ffmpeg left running. Jobs sharing a model and a source
face run as one group (`render_prepared_group`): one stream of batches spanning the clips.
"""
from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .jobs import PreparedJob, RenderJob, RenderReport, prepare_job
from .media import ClipSinks
from .models import load_group
from .progress import Reporter
from .stages import stage_reports

COMMITS_IN_FLIGHT = 2  # clips whose ffmpeg may still be finishing while the next clip renders
CPU_ENHANCE_BATCH = 4  # frames per stage call of `sfr enhance` on a CPU
CUDA_ENHANCE_BATCH = 16


def render_job(job: RenderJob, reporter: Reporter, models) -> RenderReport:
    """Check everything, load the model, render `job` into its MP4 and/or PNG frames; return a report.

    `models` gives the engine, the source work and the stages' weights (`models.ModelCache`). Raises
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
    from .engine import ClipMotion, peak_rss_mib

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
    clips = [ClipMotion(p.semantics, p.yaw, p.pitch, p.roll) for p in group]
    chains = [p.stages for p in group]

    def frames(skip: set):
        return stream_frames(engine, state, clips, chains, reporter.advance, skip)

    with contextlib.closing(_stream(group, frames)) as outcomes:
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


def run_chains(batches: Iterator, device, chains: Sequence[Sequence], progress=None, skip=None,
               after_batch: Optional[Callable[[], None]] = None) -> Iterator[Tuple[int, Union[np.ndarray, Exception]]]:
    """Every frame of a frame source's `batches` (`engine.DeviceFrames` on `device`, each frame owned by a
    clip), each through its clip's stage chain (`chains[clip]`), on the host: `(clip index, (H, W, 3)
    uint8 frame)` in order, or once `(clip index, error)` when that clip's stages failed (its later frames
    are dropped). `progress(n)` hears of every batch handed out; `skip` (a set the caller may grow) names
    clips whose frames are no longer wanted; `after_batch()` runs after each batch. The frame source's
    errors propagate. The one path for frames: every command's."""
    skip = skip if skip is not None else set()
    lane = StageLane(device)
    for batch in batches:
        for index, frames in lane.run(batch, chains, set(skip)):
            if isinstance(frames, Exception):
                skip.add(index)
                yield index, frames
                continue
            for frame in frames:
                yield index, frame
        if after_batch is not None:
            after_batch()
        if progress is not None:
            progress(len(batch.owners))


def stream_frames(engine, state, clips: Sequence, chains: Sequence[Sequence], progress=None, skip=None
                  ) -> Iterator[Tuple[int, Union[np.ndarray, Exception]]]:
    """`run_chains` with the engine as the frame source: every frame of `clips` (`engine.ClipMotion`s sharing
    `state`). `sfr render`, `sfr batch`, `Renderer.frames` and `sfr bench`."""
    return run_chains(engine.launch_clips(state, clips), engine.device, chains, progress, skip, engine.record_memory)


def decoded_batches(source, device, batch_size: int) -> Iterator:
    """Frames that already exist as a frame source: `source` (`media.FrameSource`, a video or a folder of
    pictures) read `batch_size` frames at a time, each batch on `device` as one clip's (`DeviceFrames`,
    owner 0). `sfr enhance`."""
    import torch

    from .engine import DeviceFrames

    pending: List[np.ndarray] = []
    for frame in source.frames():
        pending.append(frame)
        if len(pending) == batch_size:
            yield DeviceFrames(torch.from_numpy(np.stack(pending)).to(device), [0] * len(pending))
            pending = []
    if pending:
        yield DeviceFrames(torch.from_numpy(np.stack(pending)).to(device), [0] * len(pending))


def render_enhance(prepared, reporter: Reporter, models) -> RenderReport:
    """`sfr enhance`: see `_render_enhance`; the outputs' claims end with it, however it ends."""
    try:
        return _render_enhance(prepared, reporter, models)
    finally:
        prepared.release()


def _render_enhance(prepared, reporter: Reporter, models) -> RenderReport:
    """`sfr enhance`: a checked `enhance_jobs.PreparedEnhance`'s frames, decoded in batches (the frame source),
    through its stages on the device and into its sinks: the same lane and sinks as a render's. Nothing
    is left at the outputs on failure or interrupt; memory stays flat (frames are read, enhanced and
    written a batch at a time)."""
    import torch

    from .engine import configure_torch, peak_rss_mib, resolve_device

    job = prepared.job
    device = resolve_device(job.device)
    configure_torch(device)
    reporter.loading(f"loading the frame stages ({', '.join(stage.name for stage in prepared.stages) or 'none'})")
    for stage in prepared.stages:
        stage.load(device, models)
    reporter.finish()
    batch = job.batch_size or (CUDA_ENHANCE_BATCH if device.type == "cuda" else CPU_ENHANCE_BATCH)
    details = "".join(f", {stage.describe()}" for stage in prepared.stages if hasattr(stage, "describe"))
    reporter.note(f"{prepared.frame_count} frames of {prepared.source.width_px}x{prepared.source.height_px} "
                  f"on {device}: {batch} frames read at a time{details}")
    reporter.start(prepared.frame_count, "enhancing")

    def frames(skip: set):
        return run_chains(decoded_batches(prepared.source, device, batch), device, [prepared.stages],
                          reporter.advance, skip)

    try:
        with contextlib.closing(_stream([prepared], frames)) as outcomes:
            (_, written, seconds), = list(outcomes)
    finally:
        reporter.finish()
    if isinstance(written, BaseException):
        raise written
    if written != prepared.frame_count:  # a decoded video's count is an estimate (joined, looped streams)
        reporter.note(f"{written} frames decoded and enhanced ({prepared.frame_count} counted beforehand)")
    return RenderReport(
        output=prepared.output, frames_dir=prepared.frames_dir, frames=written, seconds=seconds,
        frames_per_second=written / seconds if seconds > 0 else 0.0, peak_rss_mib=round(peak_rss_mib(), 1),
        peak_cuda_mib=round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None,
        device=str(device), precision="fp32", batch_size=batch, notes=prepared.notes,
        stages=stage_reports(prepared.stages))


@dataclass
class _JobInFlight:
    """A checked job while a stream writes it: its sinks while open, frames written, whether it is settled,
    when its frames began and ended."""

    prepared: PreparedJob
    sinks: Optional["ClipSinks"] = None
    written: int = 0
    settled: bool = False
    begun: float = 0.0  # the previous job's last frame (or the stream's start)
    ended: float = 0.0  # its last frame, its failure, or its commit's end


def _stream(group: Sequence, frames_of: Callable[[set], Iterator[Tuple[int, Union[np.ndarray, Exception]]]]
            ) -> Iterator[Tuple[int, Union[int, Exception], float]]:
    """Hand the frames of the jobs of `group` (`frames_of(skip)`: `(job index, frame or its stages'
    error)`, as `run_chains` yields them; `skip` names jobs whose frames are no longer wanted) to each
    job's `ClipSinks`; yield `(index, frames written, seconds)` when a job is committed, `(index, error,
    seconds)` when it fails, in job order (see `render_prepared_group`). A job is a `jobs.PreparedJob`
    or an `enhance_jobs.PreparedEnhance` (what `open_sinks` reads).

    A job's sinks open with its first frame. After its last, its commit (the writer draining, ffmpeg
    finishing the file) runs in the background while the next job's frames render and encode, so
    neither the engine nor the GPU waits for the encoder between clips; at most
    `COMMITS_IN_FLIGHT` commits run at once (then the oldest is waited for)."""
    jobs = [_JobInFlight(prepared) for prepared in group]
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

    frames = frames_of(skip)
    try:
        while True:
            try:
                index, frame = next(frames)
            except StopIteration:
                break
            except Exception as exc:  # the frame source failed: every job not yet written fails with it
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
                    job.sinks = open_sinks(job.prepared)
                job.sinks.put(frame)
            except Exception as exc:  # this job's sinks (ffmpeg died, a disk filled): it alone fails
                settle(index, exc)
            else:
                job.written += 1
                if job.written == job.prepared.frame_count and job.prepared.exact_count:
                    settle(index)  # (an estimated count: the job ends with the frame source)
            yield from ready(COMMITS_IN_FLIGHT)
        for index, job in enumerate(jobs):  # a job the engine gave too few frames (or none): commit says so
            if not job.settled:
                try:
                    if job.sinks is None:
                        job.sinks = open_sinks(job.prepared)
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


def open_sinks(prepared) -> ClipSinks:
    """The sinks a checked job writes (a `PreparedJob` or `PreparedEnhance`): its MP4 and/or frames
    folder, at its frames' size, with its rate and sound; a count checked at the commit only where the
    job's count is exact (`exact_count`: a render's, not a decoded video's estimate)."""
    width_px, height_px = prepared.frame_size
    return ClipSinks(output=prepared.output, frames_dir=prepared.frames_dir, width_px=width_px, height_px=height_px,
                     frame_count=prepared.frame_count, fps=prepared.fps, audio=prepared.audio, ffmpeg=prepared.ffmpeg,
                     overwrite=prepared.job.overwrite, audio_copy=prepared.audio_copy,
                     exact_count=prepared.exact_count)
