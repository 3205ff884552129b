"""One clip's outputs while its frames stream: a writer thread feeding the MP4 and/or PNG sinks.

`ClipSinks` opens a clip's `Mp4Writer` and/or `PngFrameWriter` and feeds them from a bounded queue in a
thread of its own (`FrameWriterThread`), so producing the next frames (a render, a decode, the frame
stages) overlaps with encoding and memory stays flat; `commit` checks the count and commits the files,
`abort` leaves nothing behind. What the frames come from is the caller's business (`streaming`).
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import RenderError
from .sinks import Mp4Writer, PngFrameWriter

QUEUE_FRAMES = 8  # frames between the producer and the writer thread
QUEUE_POLL_SECONDS = 0.1
STOP_WAIT_SECONDS = 5.0  # how long a stopping writer may take to finish its frame before ffmpeg is killed


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
                self._mp4 = Mp4Writer(output, width_px=width_px, height_px=height_px, fps=fps, audio=audio,
                                      frame_count=frame_count if exact_count else None, ffmpeg=ffmpeg, pad_odd=True,
                                      audio_copy=audio_copy, replace_existing=overwrite)
                self._sinks.append(self._mp4)
            if frames_dir is not None:
                self._png = PngFrameWriter(frames_dir, replace_existing=overwrite)
                self._sinks.append(self._png)
            self._writer = FrameWriterThread(self._sinks)
        except BaseException:
            self.abort()
            raise

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

