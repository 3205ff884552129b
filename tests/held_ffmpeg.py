"""An ffmpeg that holds one encode mid-clip until its parent dies: kill tests wait for that event instead of
sleeping a fixed time, so a faster machine cannot finish the render before the kill lands.

`held_ffmpeg_env(folder, encode=K, frames=F)` returns the environment for an `sfr` subprocess whose
ffmpeg (IMAGEIO_FFMPEG_EXE) is this script: every run is the real ffmpeg, except the K-th encode (a run
reading frames from stdin), which gets F frames, then writes `folder/held` and takes no more; sfr then
blocks on its next frame, mid-clip. When sfr dies (kill -9), the held run ends its input, so the real
ffmpeg finishes its partial file as an orphaned ffmpeg does; if the holder itself is killed (sfr's abort),
the real ffmpeg dies with it (the kernel's parent-death signal).
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.02


def held_ffmpeg_env(folder: Path, *, encode: int = 1, frames: int = 1) -> dict:
    """The environment for an sfr subprocess whose `encode`-th ffmpeg encode holds after `frames` frames;
    `folder / "held"` appears once it holds."""
    from sfr_cli.media import find_ffmpeg

    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "ffmpeg"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "IMAGEIO_FFMPEG_EXE": str(shim), "SFR_TEST_REAL_FFMPEG": find_ffmpeg(),
            "SFR_TEST_HOLD_DIR": str(folder), "SFR_TEST_HOLD_ENCODE": str(encode),
            "SFR_TEST_HOLD_FRAMES": str(frames)}


def wait_until_held(folder: Path, process: subprocess.Popen, timeout_seconds: float = 300.0) -> None:
    """Wait for the held encode (the render is then mid-clip, blocked); fail if `process` ends first."""
    deadline = time.monotonic() + timeout_seconds
    while not (folder / "held").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the held encode never started"
        time.sleep(POLL_SECONDS)


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(args) -> None:
    real = os.environ["SFR_TEST_REAL_FFMPEG"]
    folder = Path(os.environ["SFR_TEST_HOLD_DIR"])
    if not ("-i" in args and args[args.index("-i") + 1] == "-"):
        os.execv(real, [real, *args])  # not an encode: the real ffmpeg, as it is
    number = 1
    while True:  # which encode this is, counted atomically across processes
        try:
            os.close(os.open(folder / f"encode-{number}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            number += 1
    if number != int(os.environ["SFR_TEST_HOLD_ENCODE"]):
        os.execv(real, [real, *args])
    width, height = (int(v) for v in args[args.index("-s") + 1].split("x"))
    parent = os.getppid()
    encoder = subprocess.Popen([real, *args], stdin=subprocess.PIPE, preexec_fn=_die_with_parent)
    remaining = int(os.environ["SFR_TEST_HOLD_FRAMES"]) * width * height * 3
    while remaining:
        chunk = sys.stdin.buffer.read1(min(remaining, 1 << 16))
        if not chunk:
            break
        encoder.stdin.write(chunk)
        remaining -= len(chunk)
    encoder.stdin.flush()
    (folder / "held").write_text(str(os.getpid()))
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    encoder.stdin.close()
    sys.exit(encoder.wait())


if __name__ == "__main__":
    main(sys.argv[1:])
