"""ffmpeg itself: finding a binary that runs, asking it about files, starting it, keeping its stderr tail.

ffmpeg is imageio-ffmpeg's bundled binary (or the one named by `IMAGEIO_FFMPEG_EXE`), always run with
an argument list; its stderr tail goes into every error it causes.

Measured reasons this is not `imageio_ffmpeg.count_frames_and_secs` (`python scripts/measure_media.py`,
2-core Xeon, loaded): it decodes every frame (`-vf null`), where a remux (`-c copy`) counts the same
750 frames of a 256 px clip in 0.018 s instead of 0.49 s; it runs imageio-ffmpeg's binary rather than
the one `find_ffmpeg` checked; and its error carries the whole log, not a tail.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Deque, List, Optional, Union

import imageio_ffmpeg

from sfr_cli.errors import MediaError

PathLike = Union[str, "os.PathLike[str]"]

FFMPEG_ENV_VAR = "IMAGEIO_FFMPEG_EXE"
FFMPEG_VERSION_TIMEOUT_SECONDS = 10.0
FFMPEG_PROBE_TIMEOUT_SECONDS = 30.0
FFMPEG_COUNT_TIMEOUT_SECONDS = 300.0
STDERR_TAIL_LINES = 15
STDERR_KEEP_BYTES = 64 * 1024
FILE_PROTOCOL = "file:"  # ffmpeg's local-file protocol: what follows is a path, colons and all


def file_argument(path: PathLike) -> str:
    """`path` as an ffmpeg input or output argument that names a local file whatever it holds. ffmpeg
    reads a name like `take:2.wav` or `2025-01-01T10:30.mp4` as protocol `take` / `2025-01-01T10` and
    fails "Protocol not found" (for an output, after every frame was rendered); the `file:` protocol
    prefix makes it the plain file, relative or absolute."""
    return FILE_PROTOCOL + os.fspath(path)


def stderr_tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    """The last `lines` non-empty lines of ffmpeg's stderr (progress lines end in \\r, not \\n)."""
    kept = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return "\n".join(kept[-lines:])


def _run(command: List[str], timeout_seconds: float) -> subprocess.CompletedProcess:
    """Run ffmpeg to completion with no stdin, capturing stdout and stderr (bytes)."""
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_seconds)


def start_ffmpeg(command: List[str]) -> subprocess.Popen:
    """Start a long ffmpeg run that reads stdin; stderr is a pipe for `StderrDrain`. Raises OSError."""
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Ctrl-C reaches Python only; Python then stops ffmpeg, so the outcome is ours to decide.
        start_new_session=(os.name == "posix"),
    )


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
    key = _binary_key(exe)
    if key is not None and key in _ANSWERED:
        return exe  # this process asked this very binary already (a batch asks once per clip)
    try:
        result = _run([exe, "-version"], FFMPEG_VERSION_TIMEOUT_SECONDS)
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
        raise MediaError(f"ffmpeg at {exe} failed (exit {result.returncode}); {hint}:\n{stderr_tail(output)}")
    if key is not None:
        _ANSWERED.add(key)
    return exe


_ANSWERED: set = set()  # (path, size, mtime) of binaries whose -version ran in this process


def _binary_key(exe: str):
    """What identifies an ffmpeg binary file (None for a bare name found on PATH)."""
    try:
        info = os.stat(exe)
    except OSError:
        return None
    return (os.path.abspath(exe), info.st_size, info.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What ffmpeg says about an audio file's first audio stream."""

    path: Path
    codec: str  # ffmpeg's name of its codec: "aac", "pcm_s16le", ... (an MP4 can take "aac" as it is)
    duration_seconds: Optional[float]  # None when the container does not say


PROBES_KEPT = 256  # audio files whose probe is kept per process (a batch checks one WAV for many rows)
_probes: "collections.OrderedDict[tuple, AudioInfo]" = collections.OrderedDict()


def probe_audio(path: PathLike, ffmpeg: Optional[str] = None) -> AudioInfo:
    """Check that ffmpeg can open `path` (audio, or a video with sound) and that it holds audio; return its
    codec and duration. A file probed before by this process (same path, size and modification time, same
    ffmpeg) is not probed again: a 10,000-row batch with one WAV runs ffmpeg once, not once per row."""
    source = Path(path)
    if not source.is_file():
        raise MediaError(f"{source}: audio file not found")
    exe = ffmpeg or find_ffmpeg()
    try:
        info = os.stat(source)
        key = (os.path.abspath(source), info.st_size, info.st_mtime_ns, exe)
    except OSError:
        key = None
    if key in _probes:
        _probes.move_to_end(key)
        return dataclasses.replace(_probes[key], path=source)
    probed = _probe_audio(source, exe)
    if key is not None:
        _probes[key] = probed
        while len(_probes) > PROBES_KEPT:
            _probes.popitem(last=False)
    return probed


def _probe_audio(source: Path, exe: str) -> AudioInfo:
    try:
        result = _run([exe, "-hide_banner", "-nostdin", "-i", file_argument(source)], FFMPEG_PROBE_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MediaError(f"{source}: ffmpeg could not inspect the audio ({exc})") from exc
    # Without an output file ffmpeg always exits 1; what matters is what it printed about the input.
    stderr = result.stderr.decode("utf-8", "replace")
    if "Input #0" not in stderr:
        raise MediaError(f"{source}: ffmpeg cannot read this audio file:\n{stderr_tail(stderr)}")
    stream = re.search(r"Stream #0:\d+[^:]*: Audio: [^\n]*", stderr)
    if stream is None:
        raise MediaError(f"{source}: has no audio stream")
    rate = re.search(r",\s*(\d+) Hz", stream.group(0))
    if rate is None:
        raise MediaError(f"{source}: ffmpeg reports no sample rate for the audio:\n{stream.group(0)}")
    codec = re.search(r"Audio: (\w+)", stream.group(0))
    return AudioInfo(path=source, codec=codec.group(1) if codec else "", duration_seconds=_parse_duration(stderr))


def _parse_duration(stderr: str) -> Optional[float]:
    match = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", stderr)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def count_video_frames(path: PathLike, ffmpeg: Optional[str] = None) -> int:
    """Count the frames of the first video stream of `path` by remuxing it to nowhere (fast, no decode)."""
    exe = ffmpeg or find_ffmpeg()
    command = [exe, "-hide_banner", "-nostdin", "-i", file_argument(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    try:
        result = _run(command, FFMPEG_COUNT_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MediaError(f"{path}: ffmpeg could not count the video frames ({exc})") from exc
    stderr = result.stderr.decode("utf-8", "replace")
    counts = re.findall(r"frame=\s*(\d+)", stderr)
    if result.returncode != 0 or not counts:
        raise MediaError(f"{path}: ffmpeg could not read back the video:\n{stderr_tail(stderr)}")
    return int(counts[-1])


class StderrDrain:
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
