"""Frames out: PNG frames and the one-pass ffmpeg MP4 (with audio), each written atomically.

Frames at this boundary are `(H, W, 3) uint8 RGB`. Every output is written under a temporary name
beside its target (sfr_cli/outputs.py) and renamed only once it is complete, so a failure or Ctrl-C
never leaves a partial file where the user expects a result. A writer holds its target's lock while it
writes: its job's, or, where the caller holds none, its own.

PNG frames go through imageio (its Pillow plugin: the same bytes as Pillow at the same compression, in
the same time). The MP4 writer runs ffmpeg itself rather than through `imageio_ffmpeg.write_frames`,
for guarantees that generator cannot give (`python scripts/measure_media.py`, 2-core Xeon): it sends
ffmpeg's stderr to the terminal, so an error cannot carry ffmpeg's tail and its warnings would break
the progress display; and when the caller fails it waits for ffmpeg to encode what it has (0.73 s
after 200 frames of 256 px, leaving a playable partial file) where `Mp4Writer.abort` kills ffmpeg and
removes the file in 0.012 s. The frame-count read-back after encoding is sfr's own as well.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence, Union

import imageio.v3 as iio
import numpy as np

from sfr_cli.errors import MediaError
from sfr_cli.outputs import (OutputClaim, OutputExists, check_regular_target, claim_unless_held, commit_path,
                             probe_writable, remove_quietly, rename_noreplace, resolved, temporary_path)

from .ffmpeg import StderrDrain, count_video_frames, file_argument, find_ffmpeg, start_ffmpeg, stderr_tail

PathLike = Union[str, "os.PathLike[str]"]

PNG_INDEX_DIGITS = 6
PNG_COMPRESS_LEVEL = 3
FRAME_FILE = re.compile(r"\d{6}\.png")  # 000000.png, 000001.png, ...
DEFAULT_CRF = 18
MAX_FPS = 1000.0  # beyond any real video; inf overflowed the rate fraction
MIN_FPS = 0.01  # a frame every 100 s; the rate goes to ffmpeg as a fraction of denominator <= 1001, and
# below 1/1001 that fraction is 0/1, which ffmpeg refuses after every frame was rendered
MAX_SIDE_PX = 16384  # libx264's largest width and height (16385 is refused: "invalid width x height")
MP4_SUFFIX = ".mp4"  # the one container the writer writes (ffmpeg -f mp4)


def _check_frame(frame: np.ndarray, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Return `frame` as a C-contiguous `(H, W, 3) uint8` array, or raise ValueError (a caller bug)."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        got = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"a frame must be an (H, W, 3) uint8 RGB array, got {got}")
    if shape is not None and tuple(frame.shape) != tuple(shape):
        raise ValueError(f"a frame must be {tuple(shape)}, got {frame.shape}")
    return np.ascontiguousarray(frame)


class _Sink:
    """A writer used in a `with` block: closed (committed) on success, aborted (removed) on any error."""

    def close(self):
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    _claim: Optional[OutputClaim] = None  # the target's lock, when the writer took it itself

    def _release_claim(self) -> None:
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()

    def remove_created_folders(self) -> None:
        """Remove the folders this writer created, deepest first, while they are empty: after every writer
        of a job aborted (one writer's folder may hold another's, `-o new/x.mp4 --frames-dir new/f`)."""
        _remove_empty(getattr(self, "_created_dirs", []))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class PngFrameWriter(_Sink):
    """Writes frames as `000000.png`, `000001.png`, ... into one folder, the whole set atomically.

    The frames go to a hidden temporary folder beside the target, `.NAME.sfr-tmp`
    (symlinks in the target's path resolved), and `close()` moves the complete set into place: the
    temporary folder is renamed onto the target when the target is missing or empty; with
    `replace_existing` a target holding only frames is swapped for it (old frames removed only once the
    new set is complete); a target holding other files gets the new frames moved in one by one (then
    old frames beyond the new count removed). Without `replace_existing`, frames that appeared in the
    target meanwhile make `close()` fail (MediaError) and stay untouched. Leaving a `with` block with an
    exception calls `abort()`: the temporary folder goes, the target is never touched.
    """

    def __init__(self, directory: PathLike, replace_existing: bool = False):
        self.directory = Path(directory)
        self.replace_existing = replace_existing
        self.paths: List[Path] = []  # the frames' final paths, in order
        self._shape: Optional[tuple] = None
        self._done = False
        if self.directory.exists() and not self.directory.is_dir():
            raise MediaError(f"{self.directory}: exists and is not a folder; cannot write PNG frames there")
        self._target = resolved(self.directory)
        self._created_dirs = _missing_dirs(self._target.parent)
        self._temporary = temporary_path(self._target)
        try:
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self._claim = claim_unless_held(self._target)
            self._temporary.mkdir()
        except BaseException as exc:
            self._release_claim()
            _remove_empty(self._created_dirs)
            if isinstance(exc, OSError):
                raise MediaError(f"{self.directory}: cannot create the frames folder ({exc.strerror or exc})") from exc
            raise

    @property
    def frames_written(self) -> int:
        return len(self.paths)

    def write(self, frame: np.ndarray) -> Path:
        """Write the next `(H, W, 3) uint8 RGB` frame; every frame must have the first one's size."""
        pixels = _check_frame(frame, self._shape)
        self._shape = pixels.shape
        name = f"{len(self.paths):0{PNG_INDEX_DIGITS}d}.png"
        try:
            iio.imwrite(self._temporary / name, pixels, extension=".png", compress_level=PNG_COMPRESS_LEVEL)
        except OSError as exc:
            raise MediaError(f"{self.directory / name}: cannot write PNG frame ({exc})") from exc
        self.paths.append(self.directory / name)
        return self.paths[-1]

    def close(self) -> List[Path]:
        """Move the complete set of frames into place; returns their paths in order. On failure
        (MediaError) the new frames are removed and the target is as it was."""
        if self._done:
            return list(self.paths)
        try:
            self._commit()
        except OSError as exc:
            self.abort()
            raise MediaError(f"{self.directory}: cannot move the finished frames into place "
                             f"({exc.strerror or exc})") from exc
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._release_claim()
        return list(self.paths)

    def _commit(self) -> None:
        target, temporary = self._target, self._temporary
        if rename_noreplace(temporary, target):
            return
        if not target.is_dir():
            raise MediaError(f"{self.directory}: exists and is not a folder; cannot write PNG frames there")
        old = existing_frames(target)
        if old and not self.replace_existing:
            raise OutputExists(f"{self.directory}: {len(old)} frame(s) like {old[0].name} appeared there while "
                               "this job rendered (another run?); pass --overwrite to replace them")
        others = [name for name in os.listdir(target) if not is_frame_name(name)]
        if not others:  # empty, or only the old frames: the whole folder is swapped in
            aside = temporary_path(target, ".old") if old else None
            try:
                if aside is not None:
                    os.rename(target, aside)
                os.rename(temporary, target)  # onto an empty folder, or where the old one was
            except OSError:
                if aside is not None and not os.path.lexists(target):
                    os.rename(aside, target)  # put the old frames back, then move frame by frame
                aside = None
            else:
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
                return
        for path in self.paths:  # a folder holding other files: frame by frame
            os.replace(temporary / path.name, target / path.name)
        for path in old[len(self.paths):]:
            remove_quietly(path)
        shutil.rmtree(temporary, ignore_errors=True)

    def abort(self) -> None:
        """Remove the frames this writer wrote (its temporary folder) and the folders it created if they
        are left empty; the target folder is untouched."""
        if self._done:
            return
        self._done = True
        shutil.rmtree(self._temporary, ignore_errors=True)
        self.paths.clear()
        self._release_claim()
        _remove_empty(self._created_dirs)


def _remove_empty(created: List[Path]) -> None:
    """Remove the folders a writer created (`_missing_dirs`), deepest first, while they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break


def _missing_dirs(directory: Path) -> List[Path]:
    """The folders from the topmost missing ancestor of `directory` down to it (empty if it exists)."""
    missing = []
    current = directory.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    return list(reversed(missing))


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest ancestor that does."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_output_writable(path: PathLike, *, folder_created: bool = False) -> None:
    """Raise MediaError unless a regular file can be created at `path` (nothing or a regular file there,
    and its folder exists and is writable). With `folder_created` (a batch creates its output folders
    before rendering) a missing folder is fine when it can be created."""
    target = Path(path)
    check_regular_target(target)
    folder = target.absolute().parent
    if not folder.is_dir():
        existing = _nearest_existing(folder)
        if not folder_created or existing == folder:
            raise MediaError(f"{target}: output folder {folder} does not exist; create it first")
        if not existing.is_dir():
            raise MediaError(f"{target}: {existing} is not a folder; cannot create the output folder {folder}")
        probe_writable(existing, f"{target}: cannot create the output folder {folder} in {existing}")
        return
    probe_writable(folder, f"{target}: output folder {folder} is not writable")


def check_mp4_name(path: PathLike) -> None:
    """Raise MediaError unless `path` ends in .mp4: the writer always writes H.264 in an MP4 container,
    which under another name (x.png, x.avi, x.mkv, no extension) would mislead every player and user."""
    suffix = Path(path).suffix
    if suffix.lower() != MP4_SUFFIX:
        got = f"'{suffix}'" if suffix else "no extension"
        raise MediaError(f"{path}: the video output must be named *.mp4 (got {got}); sfr writes H.264 MP4 only. "
                         "For PNG frames use --frames-dir DIR")


def is_frame_name(name: str) -> bool:
    """Whether `name` is one of the PNG frame names a frames folder gets (000000.png, ...)."""
    return FRAME_FILE.fullmatch(name) is not None


def existing_frames(frames_dir: PathLike) -> List[Path]:
    """The PNG frames (by name) already in `frames_dir`, sorted; none when it is not a folder."""
    frames_dir = Path(frames_dir)
    if not frames_dir.is_dir():
        return []
    return sorted(p for p in frames_dir.iterdir() if is_frame_name(p.name))


def check_frames_dir(frames_dir: PathLike, overwrite: bool = False) -> None:
    """Raise MediaError unless PNG frames can go to `frames_dir`: creatable or writable, and holding no
    frames from an earlier render unless `overwrite` (old and new frames must never mix: the writer
    then removes the old ones)."""
    frames_dir = Path(frames_dir)
    if frames_dir.exists() and not frames_dir.is_dir():
        raise MediaError(f"{frames_dir}: exists and is not a folder; cannot write PNG frames there")
    old = existing_frames(frames_dir)
    if old and not overwrite:
        raise MediaError(f"{frames_dir}: already holds {len(old)} frame(s) like {old[0].name} from an earlier "
                         "render; remove them, choose another --frames-dir, or pass --overwrite to replace them")
    existing = _nearest_existing(frames_dir)
    if not existing.is_dir():
        raise MediaError(f"{frames_dir}: {existing} is not a folder; cannot create the frames folder")
    probe_writable(existing, f"{frames_dir}: cannot write in {existing}")


def check_fps(fps: float) -> float:
    """Return `fps` as a float, or raise MediaError unless MIN_FPS <= fps <= MAX_FPS."""
    value = float(fps)
    if not MIN_FPS <= value <= MAX_FPS:
        raise MediaError(f"fps {value:g}: must be above 0 (at least {MIN_FPS:g}) and at most {MAX_FPS:g}")
    return value


class Mp4Writer(_Sink):
    """Encodes streamed frames to an H.264 MP4 with one ffmpeg process, muxing audio in the same pass.

    Frames `(height_px, width_px, 3) uint8 RGB` go to ffmpeg's stdin as raw rgb24; the video is
    libx264 yuv420p at `crf`, with `+faststart`. With `audio`, its first audio stream is encoded
    as AAC at its own sample rate and channel count; when `frame_count` is given the audio is cut
    to `frame_count / fps` seconds (audio shorter than the video is kept as it is; without
    `frame_count` a longer audio is not cut). Everything is written to `.NAME.sfr-tmp.mp4`
    beside `path`; `close()` renames it to `path` only when ffmpeg succeeded and the file holds exactly
    the frames written, and, unless `replace_existing`, only if nothing appeared at `path` meanwhile
    (else OutputExists, a MediaError, and the file is removed). On any failure, `abort()`, or an exception inside the `with` block, ffmpeg
    is killed and the temporary file removed; nothing appears at `path`. With `pad_odd`, an odd
    width or height is encoded one pixel larger, the last column/row repeated (`encoded_size`).
    Failures in `write()`
    and `close()` raise MediaError with ffmpeg's stderr tail; an exception from the block is
    re-raised unchanged (so Ctrl-C stays a KeyboardInterrupt).
    """

    def __init__(
        self,
        path: PathLike,
        *,
        width_px: int,
        height_px: int,
        fps: float = 25.0,
        audio: Optional[PathLike] = None,
        frame_count: Optional[int] = None,
        ffmpeg: Optional[str] = None,
        crf: int = DEFAULT_CRF,
        pad_odd: bool = False,
        audio_copy: bool = False,
        replace_existing: bool = True,
    ):
        self.path = Path(path)
        self.replace_existing = replace_existing
        self.width_px = int(width_px)
        self.height_px = int(height_px)
        self.fps = float(fps)
        self.audio = Path(audio) if audio is not None else None
        self.audio_copy = audio_copy  # the audio stream copied as it is (AAC from an MP4), not re-encoded
        self.frame_count = frame_count
        self.frames_written = 0
        if self.width_px <= 0 or self.height_px <= 0:
            raise MediaError(f"{self.path}: video size must be positive, got {self.width_px}x{self.height_px}")
        self._pad_px = (self.height_px % 2, self.width_px % 2) if pad_odd else (0, 0)
        if (self.width_px + self._pad_px[1]) % 2 or (self.height_px + self._pad_px[0]) % 2:
            raise MediaError(
                f"{self.path}: H.264 yuv420p needs an even width and height, got {self.width_px}x{self.height_px}"
            )
        try:
            check_fps(self.fps)
        except MediaError as exc:
            raise MediaError(f"{self.path}: {exc}") from None
        if not 0 <= crf <= 51:
            raise MediaError(f"{self.path}: crf must be in 0..51, got {crf}")
        if frame_count is not None and frame_count <= 0:
            raise MediaError(f"{self.path}: frame_count must be positive, got {frame_count}")
        if self.audio is not None and not self.audio.is_file():
            raise MediaError(f"{self.audio}: audio file not found")
        check_output_writable(self.path, folder_created=True)
        self._ffmpeg = ffmpeg or find_ffmpeg()
        self._created_dirs = _missing_dirs(self.path.absolute().parent)
        try:  # as the PNG writer and `sfr batch` do; `abort` removes what it created, if left empty
            self.path.absolute().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MediaError(f"{self.path}: cannot create the output folder ({exc})") from exc
        self._temporary = temporary_path(self.path, ".mp4")
        self._shape = (self.height_px, self.width_px, 3)
        self._closed = False
        try:
            self._claim = claim_unless_held(self.path)
            self._proc = self._start(crf)
        except BaseException:
            self._release_claim()
            _remove_empty(self._created_dirs)
            raise
        self._stderr = StderrDrain(self._proc.stderr)

    @property
    def encoded_size(self) -> tuple:
        """(width, height) of the encoded video: the frames' size, made even when `pad_odd`."""
        return self.width_px + self._pad_px[1], self.height_px + self._pad_px[0]

    def _command(self, crf: int) -> List[str]:
        rate = Fraction(self.fps).limit_denominator(1001)
        command = [
            self._ffmpeg, "-hide_banner", "-loglevel", "warning", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "{}x{}".format(*self.encoded_size),
            "-r", f"{rate.numerator}/{rate.denominator}", "-i", "-",
        ]  # fmt: skip
        if self.audio is not None:
            if self.frame_count is not None:
                command += ["-t", f"{self.frame_count / self.fps:.6f}"]
            command += ["-i", file_argument(self.audio)]
        command += ["-map", "0:v:0"]
        if self.audio is not None:
            command += ["-map", "1:a:0", "-c:a", "copy" if self.audio_copy else "aac"]
        command += [
            "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", "-f", "mp4", file_argument(self._temporary),
        ]  # fmt: skip
        return command

    def _start(self, crf: int) -> subprocess.Popen:
        try:
            return start_ffmpeg(self._command(crf))
        except OSError as exc:
            raise MediaError(f"{self.path}: cannot start ffmpeg at {self._ffmpeg} ({exc})") from exc

    def write(self, frame: np.ndarray) -> None:
        """Send one `(height_px, width_px, 3) uint8 RGB` frame to ffmpeg."""
        if self._closed:
            raise ValueError("write() on a closed Mp4Writer")
        pixels = _check_frame(frame, self._shape)
        if any(self._pad_px):
            pixels = np.pad(pixels, ((0, self._pad_px[0]), (0, self._pad_px[1]), (0, 0)), mode="edge")
        try:
            self._proc.stdin.write(memoryview(pixels).cast("B"))
        except (BrokenPipeError, ValueError, OSError) as exc:
            self._fail(f"ffmpeg stopped taking frames after {self.frames_written} ({exc})")
        self.frames_written += 1

    def close(self) -> Path:
        """Finish encoding, check the frame count, and move the file to `path`. Returns `path`."""
        if self._closed:
            return self.path
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # ffmpeg already exited; its exit code and stderr say why.
        returncode = self._proc.wait()
        stderr = self._stderr.finish()
        if returncode != 0:
            self._fail(f"ffmpeg failed (exit {returncode})", stderr)
        if self.frames_written == 0:
            self._fail("no frames were written", stderr)
        if self.frame_count is not None and self.frames_written != self.frame_count:
            self._fail(f"{self.frames_written} frames were written but {self.frame_count} were announced", stderr)
        counted = count_video_frames(self._temporary, self._ffmpeg)
        if counted != self.frames_written:
            self._fail(f"the encoded file holds {counted} frames, {self.frames_written} were written", stderr)
        try:
            commit_path(self._temporary, self.path, overwrite=self.replace_existing)
        except OutputExists:
            self.abort()
            raise
        except OSError as exc:
            self._fail(f"cannot move the finished video into place ({exc})", stderr)
        self._closed = True
        self._release_claim()
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg, wait for it, and delete the temporary file. Raises nothing."""
        if self._closed:
            return
        self._closed = True
        if self._proc.poll() is None:
            self._proc.kill()
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self._proc.wait()
        self._stderr.finish()
        remove_quietly(self._temporary)
        self._release_claim()
        _remove_empty(self._created_dirs)

    def _fail(self, reason: str, stderr: Optional[str] = None) -> None:
        """Abort and raise MediaError with `reason` and ffmpeg's stderr tail."""
        if stderr is None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            stderr = self._stderr.finish()
        self.abort()
        tail = stderr_tail(stderr)
        raise MediaError(f"{self.path}: {reason}" + (f"; ffmpeg said:\n{tail}" if tail else ""))
