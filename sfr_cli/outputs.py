"""Output files: where sfr may write, and how it writes so that a user's files are never destroyed.

One mechanism, after git's lockfile. Each output has one lock, held for its job's life (`OutputClaim`):
``.NAME.sfr-lock`` beside it, made with O_EXCL, naming its holder (host, PID, start time, since when),
flock-ed where the file system has flock and its modification time refreshed while held. A second run for
the output stops before any long work (OutputBusy, naming the holder). A lock is live while its flock is
held, or its holder runs on this host (`processes.is_running`: PID and start time), or, another host's,
while it is refreshed: a live run on shared storage (NFS, a Colab drive) is never taken over, whether or
not its flock reaches here. A dead run's lock (kill -9, the out-of-memory killer) is taken over.

Every file (and frames folder) goes first to a hidden temporary named from its target,
``.NAME.sfr-tmp[SUFFIX]`` beside it, and is renamed onto the target only once complete; without
``--overwrite`` that rename never replaces anything that appeared meanwhile (`commit_path`). Only the
lock's holder writes there, so whatever temporary is there when the lock is taken is a dead run's, and
taking the lock removes it (`remove_leftovers` says what). A writer whose caller holds no lock on its
target takes one for its own life (`claim_unless_held`).

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
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import MediaError
from .processes import is_running, own_start

try:
    import fcntl
except ImportError:  # not POSIX: lock files without flock
    fcntl = None

PathLike = Union[str, "os.PathLike[str]"]

TEMP_MARKER = ".sfr-tmp"
LOCK_SUFFIX = ".sfr-lock"
# A temporary's name after ".TARGET.sfr-tmp": a suffix like ".mp4" or none, after "-[HOST-]PID-START" in
# the names of sfr before temporaries were named from their target alone.
_TEMP_TAIL = re.compile(r"(?:-(?:[A-Za-z_][A-Za-z0-9_]*-)?\d+-\d+)?(?:\.[A-Za-z0-9]+)?")
HOST_NAME_CHARS = 40
LOCK_HEARTBEAT_SECONDS = 30.0  # a held lock's modification time is refreshed this often
LOCK_WRITE_GRACE_SECONDS = 5.0  # a lock file still without its holder this long: its run was killed taking it
LOCK_STALE_SECONDS = 600.0  # another host's lock not refreshed this long belongs to a dead run
LOCK_ATTEMPTS = 5


class OutputExists(MediaError):
    """An output is there (before the job, or it appeared while the job rendered) and may not be replaced."""


class OutputBusy(MediaError):
    """Another live sfr run holds the output's lock (`OutputClaim`); `holder` says which."""

    def __init__(self, message: str, holder: Optional["LockHolder"] = None):
        super().__init__(message)
        self.holder = holder


# ---------------------------------------------------------------------------------------------------
# Temporaries and atomic replacement


def temporary_path(target: PathLike, suffix: str = "") -> Path:
    """The hidden temporary of `target`, in its folder (so the final rename never crosses file systems):
    `.NAME.sfr-tmp{suffix}`, `suffix` like ".mp4" or "". Only the holder of the target's lock writes it."""
    path = Path(target)
    return path.with_name(f".{path.name}{TEMP_MARKER}{suffix}")


def remove_quietly(path: PathLike) -> None:
    """Remove a file if it is there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield the temporary path of `target`, its lock held for the block (this process's, or taken here);
    write the file there inside the block. On a clean exit it is renamed onto `target` (replacing it); on
    any exception, Ctrl-C included, it is removed."""
    target = Path(target)
    claim = claim_unless_held(target)
    temporary = temporary_path(target, suffix)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        remove_quietly(temporary)
        if claim is not None:
            claim.release()


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
# Locks: one live run per output


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


def host_name() -> str:
    """This host as locks name it: the host name with every character other than a letter or a digit
    made "_", a letter first, at most HOST_NAME_CHARS characters."""
    name = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname() or "host")[:HOST_NAME_CHARS]
    return name if name[:1].isalpha() or name[:1] == "_" else f"h{name}"[:HOST_NAME_CHARS]


def lock_path(target: PathLike) -> Path:
    """The lock file of `target`: `.NAME.sfr-lock` in the target's folder (symlinked folders resolved,
    so every path to one output shares one lock)."""
    target = Path(target)
    return resolved(target.absolute().parent) / f".{target.name}{LOCK_SUFFIX}"


def _judge(path: Path) -> Optional[Tuple[bool, Optional[LockHolder], int]]:
    """(live, holder, inode) of the lock file at `path`, or None where there is none. It is live while its
    flock is held, or its holder runs on this host, or, another host's (whose process and flock may not
    be seen from here), while refreshed within LOCK_STALE_SECONDS; without a holder (a run killed while
    making it leaves it empty), for LOCK_WRITE_GRACE_SECONDS."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        info, holder = os.fstat(handle), None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # empty, or being written right now
            data = json.loads(os.read(handle, 4096))
            holder = LockHolder(str(data["host"]), int(data["pid"]), str(data["start"]), float(data["since"]))
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # dropped when closed below
            except BlockingIOError:
                return True, holder, info.st_ino
            except OSError:
                pass  # no flock on this file system
        if holder is not None and holder.host == host_name():
            return is_running(holder.pid, holder.start), holder, info.st_ino
        age_limit = LOCK_STALE_SECONDS if holder is not None else LOCK_WRITE_GRACE_SECONDS
        return time.time() - info.st_mtime < age_limit, holder, info.st_ino
    finally:
        os.close(handle)


def live_holder(target: PathLike) -> Optional[LockHolder]:
    """The live run holding `target`'s lock (one still writing its holder: pid 0), or None."""
    try:
        judged = _judge(lock_path(target))
    except OSError:  # a folder refusing access: its row fails on its own checks
        return None
    if judged is None or not judged[0]:
        return None
    return judged[1] or LockHolder("?", 0, "0", time.time())


_held: Dict[Path, "OutputClaim"] = {}  # the locks this process holds, by lock path
_held_guard = threading.Lock()
_heartbeat: Optional[threading.Thread] = None


def _refresh_held_locks() -> None:
    """The heartbeat: every LOCK_HEARTBEAT_SECONDS the modification time of each lock held is refreshed."""
    while True:
        time.sleep(LOCK_HEARTBEAT_SECONDS)
        with _held_guard:
            for claim in _held.values():
                with contextlib.suppress(OSError):
                    os.utime(claim._handle)


class OutputClaim:
    """This run's lock on one output for the life of its job. `acquire()` makes `.NAME.sfr-lock` beside
    `target` (O_CREAT | O_EXCL, holding host, PID, start time and time; flock-ed where supported; refreshed
    every LOCK_HEARTBEAT_SECONDS), a dead run's lock moved aside first, or raises OutputBusy naming the live
    holder; holding it, it removes the dead runs' temporaries of `target` (`removed`). `release()` removes
    the lock (idempotent). A context manager."""

    def __init__(self, target: PathLike):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.removed: List[Path] = []
        self._handle: Optional[int] = None

    def acquire(self) -> "OutputClaim":
        for _ in range(LOCK_ATTEMPTS):
            try:
                handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                judged = _judge(self.path)
                if judged is None:
                    continue  # released meanwhile
                live, holder, inode = judged
                if live:
                    who = holder.describe() if holder is not None else "starting now"
                    raise OutputBusy(f"{self.target}: another sfr run is writing it ({who}); wait for it to "
                                     f"finish, or remove {self.path} if no such run is alive", holder) from None
                _break_lock(self.path, inode)
                continue
            except OSError as exc:
                raise MediaError(f"{self.target}: output folder {self.path.parent} is not writable (its lock file "
                                 f"{self.path.name}: {exc.strerror or exc}); check the folder's permissions") from exc
            self._take(handle)
            return self
        raise OutputBusy(f"{self.target}: other sfr runs keep taking its lock {self.path}; try again")

    def _take(self, handle: int) -> None:
        global _heartbeat
        info = {"host": host_name(), "pid": os.getpid(), "start": own_start(), "since": time.time()}
        try:
            os.write(handle, json.dumps(info).encode())
            if fcntl is not None:
                with contextlib.suppress(OSError):  # no flock here, or a run judging it right now: the file alone
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(handle)
            remove_quietly(self.path)
            raise
        self._handle = handle
        with _held_guard:
            _held[self.path] = self
            if _heartbeat is None or not _heartbeat.is_alive():
                _heartbeat = threading.Thread(target=_refresh_held_locks, name="sfr-lock-heartbeat", daemon=True)
                _heartbeat.start()
        try:  # held: every temporary of the target is a dead run's
            self.removed = _remove_all(_temporaries(self.path.parent, lambda name: name == self.target.name))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove the lock file (only if it is still ours) and close it."""
        with _held_guard:
            handle, self._handle = self._handle, None
            if handle is None:
                return
            _held.pop(self.path, None)
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
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if os.stat(aside).st_ino != judged_inode:  # a fresh lock: put it back
            rename_noreplace(aside, path)
    finally:
        remove_quietly(aside)


def _held_claim(target: PathLike) -> Optional[OutputClaim]:
    """This process's claim on `target`, if it holds one."""
    path = lock_path(target)
    with _held_guard:
        return _held.get(path)


def claim_unless_held(target: PathLike) -> Optional[OutputClaim]:
    """A claim on `target` for a writer's life (release it when done), or None when this process holds
    one already (its job's, taken before the checks)."""
    return None if _held_claim(target) is not None else OutputClaim(target).acquire()


# ---------------------------------------------------------------------------------------------------
# Leftovers of killed runs, removed by the lock's holder


def _temporaries(folder: Path, target_name: Callable[[str], bool]) -> List[Path]:
    """The temporaries (files, or folders of frames) in `folder` of the targets whose names pass `target_name`."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        target, marker, tail = name.rpartition(TEMP_MARKER)
        if marker and target.startswith(".") and target_name(target[1:]) and _TEMP_TAIL.fullmatch(tail):
            found.append(folder / name)
    return sorted(found)


def _remove_all(paths: List[Path]) -> List[Path]:
    removed = []
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def remove_leftovers(target: PathLike) -> List[Path]:
    """Remove the temporaries killed runs left for `target`; return what was removed. Whoever holds the
    target's lock removes them: this process when it holds it (what taking it removed, returned once),
    else the lock is taken for a moment; nothing while another live run holds it or the folder is missing."""
    target = Path(target)
    held = _held_claim(target)
    if held is not None:
        removed, held.removed = held.removed, []
        return removed
    if not target.absolute().parent.is_dir():
        return []
    try:
        with OutputClaim(target) as claim:
            return claim.removed
    except OutputBusy:
        return []


def remove_leftovers_in(folder: PathLike, target_name: Callable[[str], bool]) -> List[Path]:
    """As `remove_leftovers`, for the files a job writes inside `folder` whose names pass `target_name`
    (PNG frames, which sfr once wrote one temporary at a time), under the folder's lock."""
    folder = resolved(folder)
    if not folder.is_dir():
        return []
    try:
        with contextlib.ExitStack() as stack:
            if _held_claim(folder) is None:
                stack.enter_context(OutputClaim(folder))
            return _remove_all(_temporaries(folder, target_name))
    except OutputBusy:
        return []


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
