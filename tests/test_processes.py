"""sfr_cli/processes.py: a process named by PID and start time, as /proc shows it (the locks' holders,
the watchdog's list)."""

import os
import subprocess
import sys
import time

import pytest

from sfr_cli.processes import NO_START, is_running, own_start, process_table, read_stat

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux's /proc")


def test_a_process_is_running_only_with_its_own_start_time():
    assert own_start() == read_stat(os.getpid()).start != NO_START
    assert is_running(os.getpid(), own_start()) and is_running(os.getpid(), NO_START)
    assert not is_running(os.getpid(), str(int(own_start()) + 1))  # the PID given to a later process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = read_stat(child.pid).start
    try:
        for _ in range(500):  # exited, not yet reaped: a zombie is not running
            if read_stat(child.pid).state == "Z":
                break
            time.sleep(0.01)
        assert not is_running(child.pid, start)
    finally:
        child.wait()
    assert not is_running(child.pid, start) and read_stat(child.pid) is None


def test_the_table_knows_parents():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        table = process_table()
        assert table[child.pid].parent_pid == os.getpid() and table[os.getpid()].start == own_start()
    finally:
        child.kill()
        child.wait()
