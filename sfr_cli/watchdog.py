"""Ending what a driver started when the driver dies without stopping it (kill -9, the out-of-memory killer).

`DriverWatchdog` starts a small process of its own, tells it the PIDs of what this process started (a
local Ray instance: its GCS, raylet, agents and actors) and keeps the write end of a pipe to it, which
nothing else holds. When this process ends cleanly it says "done"; when the pipe closes without that,
the driver is dead and the watchdog kills those processes, each checked by PID and start time
(`processes.is_running`), so a PID reused meanwhile is left alone. Linux only (/proc); elsewhere it does
nothing.
(Worker processes need no watchdog: each watches its own pipe to the driver, see `workers.py`.)
"""

from __future__ import annotations

import collections
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .processes import is_running, process_table


def descendants(pid: int) -> List[Tuple[int, str]]:
    """(pid, start time) of every process below `pid` (children, their children, ...), from /proc."""
    table = process_table()
    children: Dict[int, List[int]] = collections.defaultdict(list)
    for child, stat in table.items():
        children[stat.parent_pid].append(child)
    found, stack = [], list(children[pid])
    while stack:
        child = stack.pop()
        found.append((child, table[child].start))
        stack.extend(children[child])
    return found


def wait_for_exit(pids: Sequence[int], timeout_seconds: float) -> None:
    """Wait until the processes `pids` (not necessarily this one's children) have ended, at most
    `timeout_seconds` in all: each through a pidfd, which becomes readable when its process exits (Linux
    5.3+; elsewhere, or for a process already gone, nothing to wait for)."""
    deadline = time.monotonic() + timeout_seconds
    for pid in pids:
        try:
            handle = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd here, or no such process
            continue
        try:
            select.select([handle], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(handle)


class DriverWatchdog:
    """A process that kills what this process started (told with `watch_descendants`) if this process
    dies without `close()`: the pipe to it closes when its only writer, this process, goes. Linux only
    (/proc); elsewhere it does nothing."""

    def __init__(self):
        self._process = None
        self._sent: set = set()
        if not os.path.isdir("/proc"):
            return
        package_parent = str(Path(__file__).resolve().parents[1])
        code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                "from sfr_cli.watchdog import watchdog_main; watchdog_main()")
        # Its own session: a Ctrl-C in the terminal is the driver's to handle, not the watchdog's.
        self._process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)

    def watch_descendants(self) -> None:
        """Tell the watchdog about every process below this one it has not been told of yet."""
        if self._process is None:
            return
        new = [entry for entry in descendants(os.getpid()) if entry[0] != self._process.pid and entry not in self._sent]
        if not new:
            return
        self._sent.update(new)
        try:
            self._process.stdin.write("".join(f"{pid} {start}\n" for pid, start in new).encode())
            self._process.stdin.flush()
        except OSError:
            pass  # the watchdog is gone: nothing to do about it here

    def close(self) -> None:
        """This process ends cleanly (what it started is stopped): let the watchdog go without killing."""
        if self._process is None:
            return
        try:
            self._process.stdin.write(b"done\n")
            self._process.stdin.close()
        except OSError:
            pass
        self._process.wait()
        self._process = None


def watchdog_main() -> None:
    """The watchdog process: read "PID START" lines until "done" (exit) or end of file (the driver died:
    kill every listed process still running with that start time)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watched = []
    for line in sys.stdin.buffer:
        words = line.split()
        if words == [b"done"]:
            return
        if len(words) == 2:
            watched.append((int(words[0]), words[1].decode()))
    for pid, start in watched:
        if is_running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
