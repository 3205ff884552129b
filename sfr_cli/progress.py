"""How a render tells the user how far it got: a small reporter protocol, a Rich reporter, a silent one.

The engine and the streaming runtime call a `Reporter`; they never import Rich. Everything a reporter shows goes
to stderr, so stdout carries results only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.status import Status
from rich.text import Text


@runtime_checkable
class Reporter(Protocol):
    """What a render reports. Counts are frames, never batches."""

    def loading(self, message: str) -> None:
        """Show `message` with a spinner while something without a frame count runs (checkpoints load)."""

    def start(self, total_frames: int, description: str = "rendering") -> None:
        """Begin counting: `total_frames` frames will be rendered (`description`: what is done to them)."""

    def advance(self, frames: int) -> None:
        """`frames` more frames are done (a whole batch at once is fine)."""

    def note(self, message: str) -> None:
        """One line of information for the user, e.g. "source coefficients: first frame of coeffs.mat"."""

    def finish(self) -> None:
        """Stop any live display. Safe to call more than once."""


class SilentReporter:
    """A reporter that shows nothing (for `--quiet`, `--json` and tests)."""

    def loading(self, message: str) -> None:
        pass

    def start(self, total_frames: int, description: str = "rendering") -> None:
        pass

    def advance(self, frames: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self) -> "SilentReporter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finish()
        return False


class FramesPerSecondColumn(ProgressColumn):
    """Renders the task's speed as `12.3 frames/s` (or `? frames/s` before there is a measure)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        shown = "?" if speed is None else f"{speed:.1f}"
        return Text(f"{shown} frames/s", style="progress.data.speed")


class RichReporter:
    """A reporter drawing on stderr: a spinner while loading, then a bar counting frames.

    The bar shows frames done/total, frames per second, elapsed time and the time left. As a
    context manager it stops the live display on the way out, exceptions included.
    """

    def __init__(self, console: Optional[Console] = None):
        self.console = console if console is not None else Console(stderr=True)
        self._status: Optional[Status] = None
        self._progress: Optional[Progress] = None
        self._task_id = None
        self._lines: Optional[ProgressLines] = None

    def loading(self, message: str) -> None:
        if self._status is None:
            self._status = Status(message, console=self.console)
            self._status.start()
        else:
            self._status.update(message)

    def start(self, total_frames: int, description: str = "rendering") -> None:
        self._stop_status()
        self._stop_progress()
        if not self.console.is_terminal:  # a log file, nohup, CI: no live bar, a line every few seconds
            self._lines = ProgressLines(total_frames, description, self.console)
            return
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("frames"),
            FramesPerSecondColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._progress.start()
        self._task_id = self._progress.add_task(description, total=total_frames)

    def advance(self, frames: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task_id, frames)
        if self._lines is not None:
            self._lines.advance(frames)

    def note(self, message: str) -> None:
        # While a live display runs, Rich prints this above it.
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)  # one line, for logs

    def finish(self) -> None:
        self._stop_status()
        self._stop_progress()

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def _stop_progress(self) -> None:
        if self._lines is not None:
            self._lines.finish()
        self._lines = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task_id = None

    def __enter__(self) -> "RichReporter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finish()
        return False


PROGRESS_SECONDS_ENV = "SFR_PROGRESS_SECONDS"
PROGRESS_SECONDS = 10.0  # between two progress lines when stderr is no terminal


def progress_interval_seconds() -> float:
    """Seconds between progress lines in a log: `$SFR_PROGRESS_SECONDS` (0: a line per batch), else 10."""
    import os

    try:
        return max(0.0, float(os.environ.get(PROGRESS_SECONDS_ENV, PROGRESS_SECONDS)))
    except ValueError:
        return PROGRESS_SECONDS


class ProgressLines:
    """Progress for a stderr that is no terminal: one plain line every `progress_interval_seconds()` (and at
    the last frame), e.g. `rendering: 120/750 frames, 3.1 frames/s, ETA 3 min 23 s`."""

    def __init__(self, total_frames: int, description: str, console: Console):
        import time

        self._clock = time.monotonic
        self.total = total_frames
        self.done = 0
        self.description = description
        self.console = console
        self.interval = progress_interval_seconds()
        self._started = self._last = self._clock()
        self._shown = 0  # frames done at the last line

    def advance(self, frames: int) -> None:
        self.done += frames
        now = self._clock()
        if now - self._last < self.interval and self.done < self.total:
            return
        self._last = now
        self._print(now)

    def finish(self) -> None:
        """The last count, unless a line already showed it (a failed or interrupted run included)."""
        if self.done != self._shown:
            self._print(self._clock())

    def _print(self, now: float) -> None:
        self._shown = self.done
        elapsed = now - self._started
        speed = self.done / elapsed if elapsed > 0 else 0.0
        left = f"{_duration((self.total - self.done) / speed)}" if speed > 0 else "?"
        self.console.print(f"{self.description}: {self.done}/{self.total} frames, {speed:.1f} frames/s, ETA {left}",
                           markup=False, highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class BatchProgress:
    """What `sfr batch` shows on stderr: clips done/failed/total, frames per second, ETA and the clip in
    flight on a live bar when stderr is a terminal; one line per settled clip when it is not (a log file,
    CI); nothing when `quiet`. Rows arrive as `batch.RowResult`s (status, row, output, frames, seconds, error).
    """

    def __init__(self, console: Optional[Console] = None, quiet: bool = False):
        self.console = console if console is not None else Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._progress: Optional[Progress] = None
        self._task_id = None
        self._total = 0
        self._settled = 0
        self._failed = 0
        self._in_flight: dict = {}

    def begin(self, total_clips: int, total_frames: int) -> None:
        self._total = total_clips
        if not self.live:
            return
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("frames"), FramesPerSecondColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console)
        self._progress.start()
        self._task_id = self._progress.add_task(self._describe(), total=max(total_frames, 1))

    def _describe(self) -> str:
        flight = ", ".join(sorted(self._in_flight.values()))[:60]
        done = self._settled - self._failed
        return f"clips {done}/{self._total} done, {self._failed} failed" + (f" | {flight}" if flight else "")

    def started(self, task) -> None:
        self._in_flight[task.row] = Path(str(task.job.coeffs)).name
        if self._progress is not None:
            self._progress.update(self._task_id, description=self._describe())

    def settled(self, result, frames: int = 0) -> None:
        self._settled += 1
        self._failed += result.status == "failed"
        self._in_flight.pop(result.row, None)
        if self._progress is not None:
            self._progress.update(self._task_id, advance=frames, description=self._describe())
        if self.quiet:
            return
        where = result.output or result.frames_dir or result.coeffs
        if result.status == "failed":
            self.console.print(f"[{self._settled}/{self._total}] failed: {result.error}", markup=False,
                               highlight=False, soft_wrap=True)
        elif not self.live or result.status == "done":
            # a packed row's `seconds` run from the group's start; its own are `render_seconds`
            seconds = result.render_seconds if result.render_seconds is not None else result.seconds
            detail = f" ({result.frames} frames, {seconds:.1f} s)" if result.status == "done" else ""
            self.console.print(f"[{self._settled}/{self._total}] {result.status} {where}{detail}", markup=False,
                               highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        """One line about the batch itself (a worker died, its row is retried), above a live bar."""
        if not self.quiet:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class TransferProgress:
    """What `sfr checkpoints download` shows on stderr: one bar per file (bytes done/total, speed, time
    left), starting from what a resumed file already holds; notes above it; nothing when `quiet`."""

    def __init__(self, console: Optional[Console] = None, quiet: bool = False):
        self.console = console if console is not None else Console(stderr=True)
        self.quiet = quiet
        self._progress: Optional[Progress] = None
        self._task_id = None

    def start(self, name: str, total_bytes: Optional[int], done_bytes: int = 0) -> None:
        self.finish()
        if self.quiet:
            return
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=self.console)
        self._progress.start()
        self._task_id = self._progress.add_task(name, total=total_bytes, completed=done_bytes)

    def advance(self, count_bytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task_id, count_bytes)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task_id = None
