"""Files in and out: the source image, PNG frames, and the one-pass ffmpeg MP4 (with audio).

Frames at this boundary are `(H, W, 3) uint8 RGB`. Every output is written under a temporary name
beside its target and renamed only once it is complete, so a failure or Ctrl-C never leaves a
partial file where the user expects a result. ffmpeg is imageio-ffmpeg's bundled binary (or the one
named by `IMAGEIO_FFMPEG_EXE`), always run with an argument list, and its stderr tail goes into
every error it causes.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import threading
from fractions import Fraction
from pathlib import Path
from typing import Deque, List, Optional, Sequence, Union

import imageio_ffmpeg
import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from sfr_cli.errors import MediaError
from sfr_cli.outputs import atomic_path, probe_writable, remove_quietly, temporary_path

PathLike = Union[str, "os.PathLike[str]"]

FFMPEG_ENV_VAR = "IMAGEIO_FFMPEG_EXE"
FFMPEG_VERSION_TIMEOUT_SECONDS = 10.0
FFMPEG_PROBE_TIMEOUT_SECONDS = 30.0
FFMPEG_COUNT_TIMEOUT_SECONDS = 300.0
STDERR_TAIL_LINES = 15
STDERR_KEEP_BYTES = 64 * 1024
PNG_INDEX_DIGITS = 6
PNG_COMPRESS_LEVEL = 3
FRAME_FILE = re.compile(r"\d{6}\.png")  # 000000.png, 000001.png, ...
DEFAULT_CRF = 18
MAX_FPS = 1000.0  # beyond any real video; inf overflowed the rate fraction
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_MAX = 65535

# Channel counts of the layout names ffmpeg prints in `Stream #0:0: Audio: ..., 24000 Hz, mono, ...`.
CHANNELS_PER_LAYOUT = {
    "mono": 1, "stereo": 2, "binaural": 2, "downmix": 2, "2.1": 3, "3.0": 3, "3.0(back)": 3,
    "4.0": 4, "quad": 4, "quad(side)": 4, "3.1": 4, "5.0": 5, "5.0(side)": 5, "4.1": 5,
    "5.1": 6, "5.1(side)": 6, "6.0": 6, "6.0(front)": 6, "3.1.2": 6, "hexagonal": 6,
    "6.1": 7, "6.1(back)": 7, "6.1(front)": 7, "7.0": 7, "7.0(front)": 7,
    "7.1": 8, "7.1(wide)": 8, "7.1(wide-side)": 8, "5.1.2": 8, "5.1.2(back)": 8, "7.1(top)": 8,
    "octagonal": 8, "cube": 8, "5.1.4": 10, "5.1.4(back)": 10, "7.1.2": 10, "7.1.4": 12,
    "7.2.3": 12, "9.1.4": 14, "9.1.6": 16, "hexadecagonal": 16, "22.2": 24,
}


# ---------------------------------------------------------------------------------------------
# Source image
# ---------------------------------------------------------------------------------------------


def read_source_image(path: PathLike, size_px: int) -> np.ndarray:
    """Read a source face as SadTalker does: RGB, resized to size_px x size_px, channels first.

    Returns `(3, size_px, size_px) float32 in [0, 1]`. Any Pillow image is made RGB first
    (palette, grayscale, RGBA, CMYK ... through Pillow's `convert("RGB")`, which drops alpha
    without compositing). 16-bit grayscale images keep their precision: they are scaled by 1/65535
    as `img_as_float32` does. Other wide modes (32-bit integer "I", float "F") go through Pillow's
    conversion to 8-bit RGB, which clips to [0, 255]. EXIF orientation is not applied (SadTalker
    does not apply it either).
    """
    image_hwc = _read_rgb_float32(Path(path))
    resized = resize_image(image_hwc, size_px, size_px)
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def _read_rgb_float32(path: Path) -> np.ndarray:
    """Read any Pillow image as `(H, W, 3) float32 in [0, 1]`, exactly like `img_as_float32`."""
    if not path.exists():
        raise MediaError(f"{path}: source image not found")
    if path.is_dir():
        raise MediaError(f"{path}: is a folder; give a source image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                raise MediaError(f"{path}: source image has zero size ({image.width}x{image.height})")
            if image.mode in SIXTEEN_BIT_MODES:
                gray = np.asarray(image).astype(np.uint16)
                scaled = np.multiply(gray, 1.0 / SIXTEEN_BIT_MAX, dtype=np.float32)
                return np.repeat(scaled[:, :, None], 3, axis=2)
            rgb = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError as exc:
        raise MediaError(f"{path}: not an image Pillow can read (PNG, JPEG, ...)") from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{path}: image is too large to read safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: cannot read the source image, it may be truncated or corrupt ({exc})") from exc
    # Same arithmetic as skimage's img_as_float32 on uint8: one float32 multiply by 1/255.
    return np.multiply(rgb, 1.0 / 255, dtype=np.float32)


def resize_image(image: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """Resize `(H, W, C) float32` to `(height_px, width_px, C) float32`, as skimage does by default.

    Reproduces `skimage.transform.resize(image, (height_px, width_px, C))` on a float32 image:
    a Gaussian anti-aliasing filter when an axis shrinks (sigma = max(0, (in/out - 1) / 2) per axis),
    bilinear `ndimage.zoom` with grid_mode, numpy's 'reflect' padding (ndimage's 'mirror'), and the
    result clipped to the input's [min, max]. Needs neither scikit-image nor a copy of its code.
    """
    if image.ndim != 3 or image.dtype != np.float32:
        raise ValueError(f"expected (H, W, C) float32, got {image.shape} {image.dtype}")
    if height_px <= 0 or width_px <= 0:
        raise ValueError(f"output size must be positive, got {height_px}x{width_px}")
    input_shape = image.shape
    output_shape = (height_px, width_px, input_shape[2])
    factors = np.divide(input_shape, output_shape)
    if any(out < inp for out, inp in zip(output_shape, input_shape)):
        sigma = np.maximum(0, (factors - 1) / 2)
        filtered = ndimage.gaussian_filter(image, sigma, mode="mirror", cval=0)
    else:
        filtered = image
    zoom = [1 / factor for factor in factors]
    out = ndimage.zoom(filtered, zoom, order=1, mode="mirror", cval=0, grid_mode=True)
    np.clip(out, image.min(), image.max(), out=out)
    return out


# ---------------------------------------------------------------------------------------------
# Frames and atomic writes
# ---------------------------------------------------------------------------------------------


def _check_frame(frame: np.ndarray, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Return `frame` as a C-contiguous `(H, W, 3) uint8` array, or raise ValueError (a caller bug)."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        got = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"a frame must be an (H, W, 3) uint8 RGB array, got {got}")
    if shape is not None and tuple(frame.shape) != tuple(shape):
        raise ValueError(f"a frame must be {tuple(shape)}, got {frame.shape}")
    return np.ascontiguousarray(frame)


def write_png(path: PathLike, frame: np.ndarray) -> Path:
    """Write one `(H, W, 3) uint8 RGB` frame as a lossless PNG, atomically (temp name, then rename)."""
    target = Path(path)
    pixels = _check_frame(frame)
    try:
        with atomic_path(target) as temporary:
            Image.fromarray(pixels, "RGB").save(temporary, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    except OSError as exc:
        raise MediaError(f"{target}: cannot write PNG frame ({exc})") from exc
    return target


class _Sink:
    """A writer used in a `with` block: closed (committed) on success, aborted (removed) on any error."""

    def close(self):
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class PngFrameWriter(_Sink):
    """Writes frames as `000000.png`, `000001.png`, ... in one folder, each one atomically.

    Use as a context manager: leaving the block with an exception calls `abort()`, which removes the
    frames this writer wrote (and the folder, if this writer created it and it is left empty). With
    `replace_existing`, frames already in the folder are removed first.
    """

    def __init__(self, directory: PathLike, replace_existing: bool = False):
        self.directory = Path(directory)
        self.paths: List[Path] = []
        self._created_dirs = _missing_dirs(self.directory)
        self._shape: Optional[tuple] = None
        if self.directory.exists() and not self.directory.is_dir():
            raise MediaError(f"{self.directory}: exists and is not a folder; cannot write PNG frames there")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if replace_existing:  # --overwrite: old frames go, so none can mix with the new ones
                for old in existing_frames(self.directory):
                    os.remove(old)
        except OSError as exc:
            raise MediaError(f"{self.directory}: cannot create the frames folder ({exc})") from exc

    @property
    def frames_written(self) -> int:
        return len(self.paths)

    def write(self, frame: np.ndarray) -> Path:
        """Write the next `(H, W, 3) uint8 RGB` frame; every frame must have the first one's size."""
        pixels = _check_frame(frame, self._shape)
        self._shape = pixels.shape
        path = self.directory / f"{len(self.paths):0{PNG_INDEX_DIGITS}d}.png"
        write_png(path, pixels)
        self.paths.append(path)
        return path

    def close(self) -> List[Path]:
        """Finish; the frames stay. Returns their paths in order."""
        return list(self.paths)

    def abort(self) -> None:
        """Remove every frame this writer wrote, and the folders it created if they are left empty."""
        for path in self.paths:
            remove_quietly(path)
        self.paths.clear()
        for folder in reversed(self._created_dirs):
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


def check_output_writable(path: PathLike) -> None:
    """Raise MediaError unless a file can be created at `path` (its folder exists and is writable)."""
    target = Path(path)
    if target.is_dir():
        raise MediaError(f"{target}: is a folder; give a file name for the output")
    folder = target.absolute().parent
    if not folder.is_dir():
        raise MediaError(f"{target}: output folder {folder} does not exist; create it first")
    probe_writable(folder, f"{target}: output folder {folder} is not writable")


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
    existing = frames_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MediaError(f"{frames_dir}: {existing} is not a folder; cannot create the frames folder")
    probe_writable(existing, f"{frames_dir}: cannot write in {existing}")


# ---------------------------------------------------------------------------------------------
# ffmpeg
# ---------------------------------------------------------------------------------------------


def _stderr_tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    """The last `lines` non-empty lines of ffmpeg's stderr (progress lines end in \\r, not \\n)."""
    kept = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return "\n".join(kept[-lines:])


def find_ffmpeg() -> str:
    """Return the ffmpeg executable after checking that `ffmpeg -version` runs (within seconds).

    Honours `IMAGEIO_FFMPEG_EXE`, then imageio-ffmpeg's bundled binary, then a system ffmpeg.
    """
    hint = f"install imageio-ffmpeg (pip install imageio-ffmpeg) or set {FFMPEG_ENV_VAR} to an ffmpeg binary"
    exe = os.environ.get(FFMPEG_ENV_VAR)
    if not exe:
        try:
            exe = imageio_ffmpeg.get_ffmpeg_exe()
        except RuntimeError as exc:
            raise MediaError(f"ffmpeg not found; {hint}") from exc
    try:
        result = subprocess.run(
            [exe, "-version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=FFMPEG_VERSION_TIMEOUT_SECONDS,
        )
    except FileNotFoundError as exc:
        raise MediaError(f"ffmpeg not found at {exe}; {hint}") from exc
    except PermissionError as exc:
        raise MediaError(f"ffmpeg at {exe} is not executable; {hint}") from exc
    except subprocess.TimeoutExpired as exc:
        waited = f"{FFMPEG_VERSION_TIMEOUT_SECONDS:g} s"
        raise MediaError(f"ffmpeg at {exe} did not answer -version within {waited}; {hint}") from exc
    except OSError as exc:
        raise MediaError(f"ffmpeg at {exe} cannot run ({exc}); {hint}") from exc
    if result.returncode != 0:
        output = (result.stderr + result.stdout).decode("utf-8", "replace")
        raise MediaError(f"ffmpeg at {exe} failed (exit {result.returncode}); {hint}:\n{_stderr_tail(output)}")
    return exe


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What ffmpeg says about an audio file's first audio stream."""

    path: Path
    sample_rate_hz: int
    channels: Optional[int]  # None when ffmpeg names a channel layout sfr does not know
    duration_seconds: Optional[float]  # None when the container does not say


def probe_audio(path: PathLike, ffmpeg: Optional[str] = None) -> AudioInfo:
    """Check that ffmpeg can open `path` and that it holds audio; return its rate, channels, duration."""
    source = Path(path)
    if not source.is_file():
        raise MediaError(f"{source}: audio file not found")
    exe = ffmpeg or find_ffmpeg()
    try:
        result = subprocess.run(
            [exe, "-hide_banner", "-nostdin", "-i", str(source)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=FFMPEG_PROBE_TIMEOUT_SECONDS,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MediaError(f"{source}: ffmpeg could not inspect the audio ({exc})") from exc
    # Without an output file ffmpeg always exits 1; what matters is what it printed about the input.
    stderr = result.stderr.decode("utf-8", "replace")
    if "Input #0" not in stderr:
        raise MediaError(f"{source}: ffmpeg cannot read this audio file:\n{_stderr_tail(stderr)}")
    stream = re.search(r"Stream #0:\d+[^:]*: Audio: [^\n]*", stderr)
    if stream is None:
        raise MediaError(f"{source}: has no audio stream")
    rate = re.search(r",\s*(\d+) Hz", stream.group(0))
    if rate is None:
        raise MediaError(f"{source}: ffmpeg reports no sample rate for the audio:\n{stream.group(0)}")
    return AudioInfo(
        path=source,
        sample_rate_hz=int(rate.group(1)),
        channels=_parse_channels(stream.group(0)),
        duration_seconds=_parse_duration(stderr),
    )


def _parse_channels(stream_line: str) -> Optional[int]:
    """Channel count from `..., 24000 Hz, mono, s16, ...` or `..., 48000 Hz, 3 channels, ...`."""
    after_rate = re.search(r"\d+ Hz,\s*([^,]+)", stream_line)
    if after_rate is None:
        return None
    layout = after_rate.group(1).strip()
    counted = re.fullmatch(r"(\d+) channels(?: \(.*\))?", layout)
    if counted:
        return int(counted.group(1))
    return CHANNELS_PER_LAYOUT.get(layout)


def _parse_duration(stderr: str) -> Optional[float]:
    match = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", stderr)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def count_video_frames(path: PathLike, ffmpeg: Optional[str] = None) -> int:
    """Count the frames of the first video stream of `path` by remuxing it to nowhere (fast, no decode)."""
    exe = ffmpeg or find_ffmpeg()
    command = [exe, "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=FFMPEG_COUNT_TIMEOUT_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MediaError(f"{path}: ffmpeg could not count the video frames ({exc})") from exc
    stderr = result.stderr.decode("utf-8", "replace")
    counts = re.findall(r"frame=\s*(\d+)", stderr)
    if result.returncode != 0 or not counts:
        raise MediaError(f"{path}: ffmpeg could not read back the video:\n{_stderr_tail(stderr)}")
    return int(counts[-1])


class _StderrDrain:
    """Reads a pipe in a background thread, keeping only its last bytes, so ffmpeg never blocks on it."""

    def __init__(self, pipe):
        self._pipe = pipe
        self._chunks: Deque[bytes] = collections.deque()
        self._kept = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sfr-ffmpeg-stderr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._pipe.read1(4096)
            if not chunk:
                return
            with self._lock:
                self._chunks.append(chunk)
                self._kept += len(chunk)
                while self._kept > STDERR_KEEP_BYTES and len(self._chunks) > 1:
                    self._kept -= len(self._chunks.popleft())

    def finish(self) -> str:
        """Wait for the pipe to close (the process has exited) and return the kept text."""
        self._thread.join()
        self._pipe.close()
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")


def check_fps(fps: float) -> float:
    """Return `fps` as a float, or raise MediaError unless 0 < fps <= MAX_FPS."""
    value = float(fps)
    if not 0 < value <= MAX_FPS:
        raise MediaError(f"fps {value:g}: must be above 0 and at most {MAX_FPS:g}")
    return value


class Mp4Writer(_Sink):
    """Encodes streamed frames to an H.264 MP4 with one ffmpeg process, muxing audio in the same pass.

    Frames `(height_px, width_px, 3) uint8 RGB` go to ffmpeg's stdin as raw rgb24; the video is
    libx264 yuv420p at `crf`, with `+faststart`. With `audio`, its first audio stream is encoded
    as AAC at its own sample rate and channel count; when `frame_count` is given the audio is cut
    to `frame_count / fps` seconds (audio shorter than the video is kept as it is; without
    `frame_count` a longer audio is not cut). Everything is written to `.NAME.sfr-tmp-PID-START.mp4` beside
    `path`; `close()` renames it to `path` only when ffmpeg succeeded and the file holds exactly
    the frames written. On any failure, `abort()`, or an exception inside the `with` block, ffmpeg
    is killed and the temporary file removed; nothing appears at `path`. Failures in `write()`
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
    ):
        self.path = Path(path)
        self.width_px = int(width_px)
        self.height_px = int(height_px)
        self.fps = float(fps)
        self.audio = Path(audio) if audio is not None else None
        self.frame_count = frame_count
        self.frames_written = 0
        if self.width_px <= 0 or self.height_px <= 0:
            raise MediaError(f"{self.path}: video size must be positive, got {self.width_px}x{self.height_px}")
        if self.width_px % 2 or self.height_px % 2:
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
        check_output_writable(self.path)
        self._ffmpeg = ffmpeg or find_ffmpeg()
        self._temporary = temporary_path(self.path, ".mp4")
        self._shape = (self.height_px, self.width_px, 3)
        self._closed = False
        self._proc = self._start(crf)
        self._stderr = _StderrDrain(self._proc.stderr)

    def _command(self, crf: int) -> List[str]:
        rate = Fraction(self.fps).limit_denominator(1001)
        command = [
            self._ffmpeg, "-hide_banner", "-loglevel", "warning", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width_px}x{self.height_px}",
            "-r", f"{rate.numerator}/{rate.denominator}", "-i", "-",
        ]  # fmt: skip
        if self.audio is not None:
            if self.frame_count is not None:
                command += ["-t", f"{self.frame_count / self.fps:.6f}"]
            command += ["-i", str(self.audio)]
        command += ["-map", "0:v:0"]
        if self.audio is not None:
            command += ["-map", "1:a:0", "-c:a", "aac"]
        command += [
            "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", "-f", "mp4", str(self._temporary),
        ]  # fmt: skip
        return command

    def _start(self, crf: int) -> subprocess.Popen:
        try:
            return subprocess.Popen(
                self._command(crf),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # Ctrl-C reaches Python only; Python then stops ffmpeg, so the outcome is ours to decide.
                start_new_session=(os.name == "posix"),
            )
        except OSError as exc:
            raise MediaError(f"{self.path}: cannot start ffmpeg at {self._ffmpeg} ({exc})") from exc

    def write(self, frame: np.ndarray) -> None:
        """Send one `(height_px, width_px, 3) uint8 RGB` frame to ffmpeg."""
        if self._closed:
            raise ValueError("write() on a closed Mp4Writer")
        pixels = _check_frame(frame, self._shape)
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
            os.replace(self._temporary, self.path)
        except OSError as exc:
            self._fail(f"cannot move the finished video into place ({exc})", stderr)
        self._closed = True
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

    def _fail(self, reason: str, stderr: Optional[str] = None) -> None:
        """Abort and raise MediaError with `reason` and ffmpeg's stderr tail."""
        if stderr is None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            stderr = self._stderr.finish()
        self.abort()
        tail = _stderr_tail(stderr)
        raise MediaError(f"{self.path}: {reason}" + (f"; ffmpeg said:\n{tail}" if tail else ""))
