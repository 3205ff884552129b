"""Output files: where sfr may write, and how it writes so that a user's files are never destroyed.

Every file (and frames folder) sfr writes goes first to a hidden temporary name beside its target,
``.NAME.sfr-tmp-HOST-PID-START[SUFFIX]`` (host, PID and start time of the writing process), and is renamed
onto the target only once complete; without ``--overwrite`` that rename never replaces anything that
appeared meanwhile (`commit_path`). The name lets a later run for the same target tell its dead
predecessors' leftovers (after ``kill -9`` or the out-of-memory killer) from the temporaries of a
live sfr: a leftover's process is gone, or its PID now belongs to a process that started at another
time (PID reuse). A temporary of another host (shared storage: NFS, a Colab drive) cannot be judged from
here, so it is never removed as a leftover. Only dead leftovers are removed.

While a job runs, each of its outputs is claimed (`OutputClaim`): a lock file ``.NAME.sfr-lock`` beside
it, created exclusively, naming host, PID and start time, flock-ed where the file system supports it and
refreshed every `LOCK_HEARTBEAT_SECONDS`. A second run for the same output sees it busy; a dead holder's
lock (its process gone on this host, or not refreshed for `LOCK_STALE_SECONDS` on another) is taken over.

The rules for an output (checked before any long work): it is never an input of the same job
(compared by device and inode, so symlinks, ``..`` and hard links count), never something other than a
regular file (a FIFO, a device, a folder), and an existing one is replaced only when the user says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import MediaError

try:
    import fcntl
except ImportError:  # not POSIX: lock files without flock
    fcntl = None

PathLike = Union[str, "os.PathLike[str]"]

TEMP_MARKER = ".sfr-tmp-"
LOCK_SUFFIX = ".sfr-lock"
# After ".NAME.sfr-tmp-": the host (a letter first; absent in the names of sfr before hosts were named,
# which were written on this host), the PID, the process start time, a suffix.
_TEMP_TAIL = re.compile(r"(?:(?P<host>[A-Za-z_][A-Za-z0-9_]*)-)?(?P<pid>\d+)-(?P<start>\d+)(?P<suffix>\.[A-Za-z0-9]+)?")
_PROC_STAT_START_FIELD = 19  # starttime: field 22 of /proc/PID/stat, counted after the ")" closing comm
HOST_NAME_CHARS = 40
LOCK_HEARTBEAT_SECONDS = 30.0  # a held lock's modification time is refreshed this often
LOCK_WRITE_GRACE_SECONDS = 5.0  # a lock file still without its holder this long: its run was killed taking it
LOCK_STALE_SECONDS = 600.0  # another host's lock not refreshed this long belongs to a dead run
LOCK_ATTEMPTS = 5


class OutputExists(MediaError):
    """An output is there (before the job, or it appeared while the job rendered) and may not be replaced."""


class OutputBusy(MediaError):
    """Another live sfr run has claimed the output (`OutputClaim`); `holder` says which."""

    def __init__(self, message: str, holder: Optional["LockHolder"] = None):
        super().__init__(message)
        self.holder = holder


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


def host_name() -> str:
    """This host as temporaries and locks name it: the host name with every character other than a
    letter or a digit made "_", a letter first, at most HOST_NAME_CHARS characters."""
    name = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname() or "host")[:HOST_NAME_CHARS]
    return name if name[:1].isalpha() or name[:1] == "_" else f"h{name}"[:HOST_NAME_CHARS]


def _own_start() -> str:
    """This process's start time from /proc ("0" where there is no /proc: then the PID alone is judged)."""
    stat_fields = _process_stat(os.getpid())
    return stat_fields[1] if stat_fields is not None else "0"


def _own_token() -> str:
    return f"{host_name()}-{os.getpid()}-{_own_start()}"


def temporary_path(target: PathLike, suffix: str = "") -> Path:
    """The hidden temporary name of this process for `target`, in the same folder (so the final rename
    never crosses file systems): `.NAME.sfr-tmp-HOST-PID-START{suffix}`; `suffix` like ".mp4" or ""."""
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


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_NOREPLACE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _renameat2_noreplace(source: Path, target: Path) -> Optional[bool]:
    """Linux renameat2(RENAME_NOREPLACE): True when renamed, False when `target` exists, None where the
    kernel, the C library or the file system does not offer it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        return False
    if code in _NOREPLACE_UNSUPPORTED:
        return None
    raise OSError(code, os.strerror(code), str(target))


def rename_noreplace(source: PathLike, target: PathLike) -> bool:
    """Rename `source` onto `target` only if nothing (not even a dangling symlink) is at `target`, in one
    step: renameat2(RENAME_NOREPLACE) where available, else a hard link and an unlink (files), else a
    check and a rename (folders, file systems without hard links: then a writer appearing in between
    is left to the output's claim). Returns False, touching nothing, when `target` exists."""
    source, target = Path(source), Path(target)
    done = _renameat2_noreplace(source, target)
    if done is not None:
        return done
    if not source.is_dir():
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
        else:
            os.unlink(source)
            return True
    if os.path.lexists(target):
        return False
    os.rename(source, target)
    return True


def commit_path(temporary: PathLike, target: PathLike, *, overwrite: bool) -> None:
    """Move a finished file from `temporary` to `target`: replacing what is there only with `overwrite`,
    else raising OutputExists (the temporary stays for the caller to remove) when something appeared."""
    if overwrite:
        os.replace(temporary, target)
    elif not rename_noreplace(temporary, target):
        raise OutputExists(f"{target}: exists (another run wrote it while this one rendered); "
                           "pass --overwrite to replace it")


# ---------------------------------------------------------------------------------------------------
# Leftovers of dead runs


def _writer_alive(pid: int, start: Optional[str], host: Optional[str] = None) -> bool:
    """Whether the process that named a temporary [`host`-]`pid`-`start` may still be writing it. Another
    host's writer cannot be judged from here: alive. A zombie (exited, not yet reaped) is dead; a live
    process that started at another time holds a reused PID (a start of "0": written without /proc)."""
    if host is not None and host != host_name():
        return True
    stat_fields = _process_stat(pid)
    if stat_fields is not None:
        state, current_start = stat_fields
        if state in ("Z", "X"):
            return False
        return start in (None, "0") or current_start == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def dead_temporaries(folder: PathLike, target_name: Callable[[str], bool]) -> List[Path]:
    """Temporaries (files, or folders of frames) in `folder` whose target name passes `target_name` and
    whose writer is dead; another host's are never dead (`_writer_alive`)."""
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
        if match is None or entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            continue
        if not _writer_alive(int(match["pid"]), match["start"], match["host"]):
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
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
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
# Claims: one live run per output


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output's lock file, as the file says."""

    host: str
    pid: int
    start: str
    since: float  # time.time() when it was taken

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {when}"


def lock_path(target: PathLike) -> Path:
    """The lock file of `target`: `.NAME.sfr-lock` in the target's folder (symlinked folders resolved,
    so every path to one output shares one lock)."""
    target = Path(target)
    return resolved(target.absolute().parent) / f".{target.name}{LOCK_SUFFIX}"


def _read_holder(path: Path) -> Optional[LockHolder]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(str(data["host"]), int(data["pid"]), str(data["start"]), float(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # gone, or half written by a run taking it right now


def _flock_refused(path: Path) -> bool:
    """Whether a live process holds the flock of `path` (False where flock is missing or unsupported)."""
    if fcntl is None:
        return False
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(handle)  # closing drops the shared lock taken to test
    return False


def _lock_live(path: Path, holder: Optional[LockHolder]) -> bool:
    """Whether the lock file at `path` belongs to a live run: its flock is held, or its process lives on
    this host, or (another host) it was refreshed lately, or (no holder written yet) it was created a
    moment ago: a run killed between creating it and writing its holder leaves an empty file behind."""
    if _flock_refused(path):
        return True
    if holder is not None and holder.host == host_name():
        return _writer_alive(holder.pid, holder.start)
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    if holder is None:  # no holder written: a run taking it writes one at once; after a while it died doing so
        return age < LOCK_WRITE_GRACE_SECONDS
    return age < LOCK_STALE_SECONDS


def live_holder(target: PathLike) -> Optional[LockHolder]:
    """The live run holding `target`'s lock (a half-written lock gives a holder with pid 0), or None."""
    path = lock_path(target)
    if not os.path.lexists(path):
        return None
    holder = _read_holder(path)
    if not _lock_live(path, holder):
        return None
    return holder if holder is not None else LockHolder("?", 0, "0", time.time())


def remove_dead_lock(target: PathLike) -> bool:
    """Remove `target`'s lock file if the run holding it is dead (as a new claim would take it over); say
    whether one was removed. For a batch driver tidying up after workers that were stopped mid-clip."""
    path = lock_path(target)
    try:
        judged = os.stat(path).st_ino
    except FileNotFoundError:
        return False
    if _lock_live(path, _read_holder(path)):
        return False
    _break_lock(path, judged)
    return True


class _Heartbeat:
    """One thread per process refreshing the modification time of every lock this process holds."""

    def __init__(self):
        self._handles: set = set()
        self._guard = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def add(self, handle: int) -> None:
        with self._guard:
            self._handles.add(handle)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sfr-lock-heartbeat", daemon=True)
                self._thread.start()

    def discard(self, handle: int) -> None:
        with self._guard:
            self._handles.discard(handle)

    def _run(self) -> None:
        while True:
            time.sleep(LOCK_HEARTBEAT_SECONDS)
            with self._guard:
                for handle in list(self._handles):
                    with contextlib.suppress(OSError):
                        os.utime(handle)


_heartbeat = _Heartbeat()


class OutputClaim:
    """This run's claim on one output for the life of its job: `acquire()` creates the lock file
    `.NAME.sfr-lock` beside `target` (O_CREAT | O_EXCL, holding host, PID, start time and time; flock-ed
    where supported; refreshed every LOCK_HEARTBEAT_SECONDS) or raises OutputBusy naming the live
    holder; a dead holder's lock is taken over. `release()` removes it (idempotent). A context manager."""

    def __init__(self, target: PathLike):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self._handle: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> "OutputClaim":
        for _ in range(LOCK_ATTEMPTS):
            try:
                handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                try:
                    judged = os.stat(self.path).st_ino
                except FileNotFoundError:
                    continue  # released meanwhile
                if _lock_live(self.path, holder):
                    who = holder.describe() if holder is not None else "starting now"
                    raise OutputBusy(f"{self.target}: another sfr run is writing it ({who}); wait for it to "
                                     f"finish, or remove {self.path} if no such run is alive", holder) from None
                _break_lock(self.path, judged)
                continue
            except OSError as exc:
                raise MediaError(f"{self.target}: output folder {self.path.parent} is not writable (its lock file "
                                 f"{self.path.name}: {exc.strerror or exc}); check the folder's permissions") from exc
            self._take(handle)
            return self
        raise OutputBusy(f"{self.target}: other sfr runs keep taking its lock {self.path}; try again")

    def _take(self, handle: int) -> None:
        info = {"host": host_name(), "pid": os.getpid(), "start": _own_start(), "since": time.time()}
        try:
            os.write(handle, json.dumps(info).encode())
            if fcntl is not None:
                with contextlib.suppress(OSError):  # no flock on this file system: the file alone
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(handle)
            remove_quietly(self.path)
            raise
        self._handle = handle
        _heartbeat.add(handle)

    def release(self) -> None:
        """Remove the lock file (only if it is still ours) and close it."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        _heartbeat.discard(handle)
        try:
            if os.stat(self.path).st_ino == os.fstat(handle).st_ino:
                os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(handle)

    def __enter__(self) -> "OutputClaim":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _break_lock(path: Path, judged_inode: int) -> None:
    """Remove a dead run's lock file, unless another run took it over since it was judged (then it stays)."""
    aside = path.with_name(f"{path.name}.stale-{_own_token()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if os.stat(aside).st_ino != judged_inode:  # a fresh lock: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        remove_quietly(aside)


# ---------------------------------------------------------------------------------------------------
# Which paths may be outputs


@dataclass(frozen=True)
class JobInput:
    """A file a job reads, with the option that named it: `JobInput(Path("face.png"), "--source")`."""

    path: Path
    role: str


def identity(path: PathLike) -> Optional[Tuple[int, int]]:
    """(device, inode) of what `path` names (symlinks followed), or None where nothing is there."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def resolved(path: PathLike) -> Path:
    """`path` with symlinks and `..` resolved (as far as it exists)."""
    path = Path(path)
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return path.absolute()


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file or folder: the same device and inode (hard links, symlinks) or,
    for paths not there yet, the same resolved path (symlinked folders, `..`)."""
    a_id = identity(Path(a))
    return (a_id is not None and a_id == identity(Path(b))) or resolved(a) == resolved(b)


def check_not_an_input(output: PathLike, inputs: Sequence[JobInput], what: str = "output") -> None:
    """Raise MediaError when `output` is, or resolves to, one of `inputs` (symlinks, `..` and hard links
    included: the same device and inode, or the same resolved path)."""
    output = Path(output)
    out_id, out_real = identity(output), resolved(output)
    for item in inputs:
        if item.path is None:
            continue
        in_path = Path(item.path)
        in_id = identity(in_path)
        if (out_id is not None and out_id == in_id) or out_real == resolved(in_path):
            raise MediaError(f"{output}: the {what} would replace {in_path}, the {item.role} input of this job; "
                             "choose another output path")


def check_folder_holds_no_input(folder: PathLike, inputs: Sequence[JobInput], is_output_name: Callable[[str], bool],
                                what: str = "frames folder") -> None:
    """Raise MediaError when an input of the job lives in `folder` under a name the job writes there
    (`is_output_name`, e.g. 000000.png): writing, or replacing old outputs, would destroy it."""
    folder_real = resolved(Path(folder))
    for item in inputs:
        if item.path is not None and written_in(folder_real, Path(item.path), is_output_name):
            raise MediaError(f"{folder}: the {what} would replace {item.path}, the {item.role} input of this "
                             "job; choose another folder")


def check_output_not_in_folder(output: PathLike, folder: PathLike, is_output_name: Callable[[str], bool],
                               what: str = "--frames-dir") -> None:
    """Raise MediaError when the output file `output` is one of the files the job writes in `folder`
    (e.g. `-o out/000000.png --frames-dir out`): one would replace the other."""
    if written_in(resolved(Path(folder)), Path(output), is_output_name):
        raise MediaError(f"{output}: a PNG frame of {what} {folder} has this name and would replace the MP4; "
                         "give the MP4 another name or folder")


def written_in(folder_real: Path, path: Path, is_output_name: Callable[[str], bool]) -> bool:
    """Whether `path` resolves to a name the job writes in the (resolved) folder."""
    real = resolved(path)
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
        raise OutputExists(f"{output}: exists; pass --overwrite to replace it")


def probe_writable(folder: PathLike, message: str) -> None:
    """Raise MediaError(`message` + the reason) unless a file can be created in `folder`."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".sfr-write-check-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as exc:
        raise MediaError(f"{message} ({exc.strerror or exc})") from exc
