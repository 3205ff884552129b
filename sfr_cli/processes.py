"""Processes as Linux's /proc shows them: state, parent and start time, by PID.

A PID alone does not name a process for long: once it ends, the kernel may give its PID to another. The
start time (clock ticks after boot, field 22 of /proc/PID/stat) tells them apart, so whoever remembers a
process remembers `(pid, start)`: a lock file's holder (`outputs.py`), what a driver started
(`watchdog.py`). Where there is no /proc the start is "0" and only the PID can be judged.
"""

from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional

# Fields of /proc/PID/stat counted after the ")" that closes the command name (which may hold spaces).
_STATE_FIELD, _PPID_FIELD, _START_FIELD = 0, 1, 19
NO_START = "0"  # the start of a process whose /proc could not be read


class ProcessStat(NamedTuple):
    state: str  # "R", "S", ...; "Z" a zombie (exited, not yet reaped), "X" dead
    parent_pid: int
    start: str  # clock ticks after boot, as /proc writes it


def read_stat(pid: int) -> Optional[ProcessStat]:
    """Process `pid` as /proc shows it, or None (no /proc, no such process, or hidden from this user)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rpartition(b")")[2].split()
        return ProcessStat(fields[_STATE_FIELD].decode(), int(fields[_PPID_FIELD]), fields[_START_FIELD].decode())
    except (OSError, IndexError, ValueError):
        return None


def process_table() -> Dict[int, ProcessStat]:
    """Every process /proc shows, by PID (empty without /proc)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    table = {}
    for name in names:
        if name.isdigit():
            found = read_stat(int(name))
            if found is not None:  # else gone meanwhile
                table[int(name)] = found
    return table


def own_start() -> str:
    """This process's start time (NO_START without /proc)."""
    found = read_stat(os.getpid())
    return found.start if found is not None else NO_START


def is_running(pid: int, start: str) -> bool:
    """Whether the process that had `(pid, start)` still runs: not a zombie, and the PID not reused by a
    process that started at another time. With NO_START, or without /proc, the PID alone is judged."""
    found = read_stat(pid)
    if found is not None:
        return found.state not in ("Z", "X") and start in (found.start, NO_START)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True  # there, but its start cannot be read (hidden /proc): judged by its PID
