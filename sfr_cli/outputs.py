"""Output files: where sfr may write, and how it writes so that a user's files are never destroyed.

Every file sfr writes goes first to a hidden temporary name beside its target,
``.NAME.sfr-tmp-PID-START[SUFFIX]`` (PID and start time of the writing process), and is renamed onto
the target only once complete. The name lets a later run for the same target tell its dead
predecessors' leftovers (after ``kill -9`` or the out-of-memory killer) from the temporaries of a
live sfr: a leftover's process is gone, or its PID now belongs to a process that started at another
time (PID reuse). Only dead leftovers are removed.

The rules for an output (checked before any long work): it is never an input of the same job
(compared by device and inode, so symlinks, ``..`` and hard links count), never something other than a
regular file (a FIFO, a device, a folder), and an existing one is replaced only when the user says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import MediaError

PathLike = Union[str, "os.PathLike[str]"]

TEMP_MARKER = ".sfr-tmp-"
# After ".NAME.sfr-tmp-": the PID, the process start time (optional: older sfr wrote the PID only), a suffix.
_TEMP_TAIL = re.compile(r"(?P<pid>\d+)(?:-(?P<start>\d+))?(?P<suffix>\.[A-Za-z0-9]+)?")
_PROC_STAT_START_FIELD = 19  # starttime: field 22 of /proc/PID/stat, counted after the ")" closing comm


# ---------------------------------------------------------------------------------------------------
# Temporary names and atomic replacement


def _process_stat(pid: int) -> Optional[Tuple[str, str]]:
    """(state letter, start time in clock ticks after boot) of process `pid` from /proc, or None where
    that cannot be read (no /proc, no such process, or hidden from this user)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rpartition(b")")[2].split()
        return fields[0].decode(), fields[_PROC_STAT_START_FIELD].decode()
    except (OSError, IndexError):
        return None


def _own_token() -> str:
    stat_fields = _process_stat(os.getpid())
    return f"{os.getpid()}-{stat_fields[1]}" if stat_fields is not None else str(os.getpid())


def temporary_path(target: PathLike, suffix: str = "") -> Path:
    """The hidden temporary name of this process for `target`, in the same folder (so the final rename
    never crosses file systems): `.NAME.sfr-tmp-PID-START{suffix}`; `suffix` like ".mp4" or ""."""
    path = Path(target)
    return path.with_name(f".{path.name}{TEMP_MARKER}{_own_token()}{suffix}")


def remove_quietly(path: PathLike) -> None:
    """Remove a file if it is there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield this process's temporary path for `target`; write the file there inside the block. On a clean
    exit it is renamed onto `target` (replacing it); on any exception, Ctrl-C included, it is removed."""
    target = Path(target)
    temporary = temporary_path(target, suffix)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        remove_quietly(temporary)


# ---------------------------------------------------------------------------------------------------
# Leftovers of dead runs


def _writer_alive(pid: int, start: Optional[str]) -> bool:
    """Whether the process that named a temporary `pid`[-`start`] may still be writing it. A zombie
    (exited, not yet reaped) is dead; a live process that started at another time holds a reused PID."""
    stat_fields = _process_stat(pid)
    if stat_fields is not None:
        state, current_start = stat_fields
        if state in ("Z", "X"):
            return False
        return start is None or current_start == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def dead_temporaries(folder: PathLike, target_name: Callable[[str], bool]) -> List[Path]:
    """Temporaries in `folder` whose target name passes `target_name` and whose writer is dead."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    dead = []
    for entry in entries:
        name, marker, tail = entry.name.rpartition(TEMP_MARKER)
        if not marker or not name.startswith(".") or not target_name(name[1:]):
            continue
        match = _TEMP_TAIL.fullmatch(tail)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if not _writer_alive(int(match["pid"]), match["start"]):
            dead.append(folder / entry.name)
    return sorted(dead)


def remove_leftovers(target: PathLike) -> List[Path]:
    """Remove the temporaries that dead sfr processes left for `target`; return what was removed."""
    target = Path(target)
    return _remove_all(dead_temporaries(target.absolute().parent, lambda name: name == target.name))


def remove_leftovers_in(folder: PathLike, target_name: Callable[[str], bool]) -> List[Path]:
    """As `remove_leftovers`, for every target in `folder` whose name passes `target_name` (PNG frames)."""
    return _remove_all(dead_temporaries(folder, target_name))


def _remove_all(paths: List[Path]) -> List[Path]:
    removed = []
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:  # another run cleaned it first
            continue
        removed.append(path)
    return removed


def describe_leftovers(target: PathLike, removed: Sequence[Path]) -> str:
    """The one line a command shows after `remove_leftovers`: what was removed and why."""
    names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
    return (f"{target}: removed {len(removed)} temporary file(s) left by an earlier sfr run that was killed "
            f"({names})")


# ---------------------------------------------------------------------------------------------------
# Which paths may be outputs


@dataclass(frozen=True)
class JobInput:
    """A file a job reads, with the option that named it: `JobInput(Path("face.png"), "--source")`."""

    path: Path
    role: str


def _identity(path: Path) -> Optional[Tuple[int, int]]:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return path.absolute()


def check_not_an_input(output: PathLike, inputs: Sequence[JobInput], what: str = "output") -> None:
    """Raise MediaError when `output` is, or resolves to, one of `inputs` (symlinks, `..` and hard links
    included: the same device and inode, or the same resolved path)."""
    output = Path(output)
    out_id, out_real = _identity(output), _resolved(output)
    for item in inputs:
        if item.path is None:
            continue
        in_path = Path(item.path)
        in_id = _identity(in_path)
        if (out_id is not None and out_id == in_id) or out_real == _resolved(in_path):
            raise MediaError(f"{output}: the {what} would replace {in_path}, the {item.role} input of this job; "
                             "choose another output path")


def check_folder_holds_no_input(folder: PathLike, inputs: Sequence[JobInput], is_output_name: Callable[[str], bool],
                                what: str = "frames folder") -> None:
    """Raise MediaError when an input of the job lives in `folder` under a name the job writes there
    (`is_output_name`, e.g. 000000.png): writing, or replacing old outputs, would destroy it."""
    folder_real = _resolved(Path(folder))
    for item in inputs:
        if item.path is not None and _written_in(folder_real, Path(item.path), is_output_name):
            raise MediaError(f"{folder}: the {what} would replace {item.path}, the {item.role} input of this "
                             "job; choose another folder")


def check_output_not_in_folder(output: PathLike, folder: PathLike, is_output_name: Callable[[str], bool],
                               what: str = "--frames-dir") -> None:
    """Raise MediaError when the output file `output` is one of the files the job writes in `folder`
    (e.g. `-o out/000000.png --frames-dir out`): one would replace the other."""
    if _written_in(_resolved(Path(folder)), Path(output), is_output_name):
        raise MediaError(f"{output}: a PNG frame of {what} {folder} has this name and would replace the MP4; "
                         "give the MP4 another name or folder")


def _written_in(folder_real: Path, path: Path, is_output_name: Callable[[str], bool]) -> bool:
    """Whether `path` resolves to a name the job writes in the (resolved) folder."""
    real = _resolved(path)
    return real.parent == folder_real and is_output_name(real.name)


def check_regular_target(output: PathLike, what: str = "output") -> None:
    """Raise MediaError when `output` exists and is not a regular file (or a link to one): sfr never
    replaces a folder, a FIFO, a device or a socket, whatever the flags."""
    output = Path(output)
    try:
        mode = os.stat(output).st_mode
    except FileNotFoundError:
        return  # free, or a dangling symlink: the rename replaces the link itself
    except OSError as exc:
        raise MediaError(f"{output}: cannot inspect the {what} path ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(mode):
        raise MediaError(f"{output}: is a folder; give a file name for the {what}")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise MediaError(f"{output}: is {kind}, not a regular file; sfr writes only regular files, choose "
                         "another output path")


def output_exists(output: PathLike) -> bool:
    """Whether something (a file, or a symlink even if dangling) is at `output`."""
    return os.path.lexists(output)


def check_output(output: PathLike, inputs: Sequence[JobInput] = (), *, overwrite: bool = False,
                 what: str = "output") -> None:
    """All rules for one output file, cheapest first: a regular file or nothing, not an input of the job,
    and not there already unless `overwrite` (MediaError "exists; pass --overwrite to replace it").
    `sfr batch` skips rows with existing outputs: it calls `output_exists` and passes overwrite=True."""
    check_regular_target(output, what)
    check_not_an_input(output, inputs, what)
    if not overwrite and output_exists(output):
        raise MediaError(f"{output}: exists; pass --overwrite to replace it")


def probe_writable(folder: PathLike, message: str) -> None:
    """Raise MediaError(`message` + the reason) unless a file can be created in `folder`."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".sfr-write-check-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as exc:
        raise MediaError(f"{message} ({exc.strerror or exc})") from exc
