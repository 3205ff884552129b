"""One dispatcher for the batch backends that render in other processes (worker processes in `workers.py`,
Ray actors in `cluster.py`).

The dispatcher owns the rules; a pool owns the processes. A pool starts workers, hands one a task, and
blocks until something happens (`Event`s: a worker is ready, finished a task, or died), waiting on process
sentinels and pipes (`multiprocessing.connection.wait`) or object references (`ray.wait`), never polling.
The rules: tasks go longest first (the order `batch_plan.plan_rows` gives), an idle worker gets the longest
task left; a worker that dies holding a task has it put back, once, for another worker (a fresh worker
takes the dead one's place) and the user is told on stderr; a second death fails the row alone and the
batch goes on. Workers that die before taking any task (they could not start) fail the remaining rows
after `START_FAILURES` such deaths. On any way out (Ctrl-C included) the pool is closed first, then the
temporaries and lock files the in-flight rows' dead workers left are removed.
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Protocol

from .batch_plan import FAILED, RowResult, PlannedRow
from .jobs import output_paths
from .outputs import remove_leftovers, resolved

RETRIES = 1  # a dead worker's clip is tried once more
START_FAILURES = 3  # workers dying without a task before the batch gives up on them
READY, DONE, DIED = "ready", "done", "died"


@dataclass
class Event:
    """What a pool saw: `worker` READY (models loaded, waiting for a task), DONE with `result` (its task's
    report line; the worker is idle again), or DIED (`cause` like "signal 9" says how)."""

    kind: str
    worker: Hashable
    result: Optional[RowResult] = None
    cause: str = ""


class Pool(Protocol):
    """Where a dispatcher's workers live. `noun` names one in messages ("worker", "Ray actor");
    `death_hint` follows a row's "died twice" message; `option` is the command-line option that asked
    for this pool ("--workers", "--ray")."""

    noun: str
    death_hint: str
    option: str

    def start(self) -> Hashable:
        """Start a worker; it reports READY (or DIED) through `wait`."""

    def submit(self, worker: Hashable, task: PlannedRow) -> None:
        """Hand an idle worker a task; its DONE (or DIED) comes through `wait`."""

    def stop(self, worker: Hashable) -> None:
        """Let an idle worker go: no task is left for it. No event follows."""

    def pid(self, worker: Hashable) -> Optional[int]:
        """The worker's process id, once it was READY (for messages)."""

    def wait(self) -> List[Event]:
        """Block until at least one event; a DONE before the DIED of the same worker."""

    def close(self) -> None:
        """Stop every worker (idle or not) and wait for them to end."""


def dispatch(tasks: List[PlannedRow], pool: Pool, on_start: Callable[[PlannedRow], None],
             on_done: Callable[[PlannedRow, RowResult], None], *, workers: int,
             note: Optional[Callable[[str], None]] = None) -> None:
    """Run `tasks` (longest first) on at most `workers` workers of `pool`, calling `on_start` when a task
    is handed out and `on_done` with each row's result (once per task). `note` gets one line per worker
    death (default: stderr)."""
    if not tasks:
        return
    note = note or _print_note
    pending = collections.deque(tasks)  # longest first; a retried task goes back in front (still the longest)
    live: set = set()  # started and neither dead nor stopped
    assigned: Dict[Hashable, PlannedRow] = {}
    deaths: Dict[int, str] = {}  # row -> its first worker's death, for the report line
    remaining = len(tasks)
    idle_deaths = 0

    def settle(task: PlannedRow, result: RowResult) -> None:
        nonlocal remaining
        remaining -= 1
        if task.row in deaths:
            result.note = f"row {task.row}: {deaths[task.row]}"
        on_done(task, result)

    def give(worker: Hashable) -> None:
        if pending:
            task = pending.popleft()
            assigned[worker] = task
            pool.submit(worker, task)
            on_start(task)
        else:
            live.discard(worker)
            pool.stop(worker)

    def start() -> None:
        live.add(pool.start())

    for _ in range(min(workers, len(tasks))):
        start()
    try:
        while remaining:
            for event in pool.wait():
                if event.kind == READY:
                    give(event.worker)
                elif event.kind == DONE:
                    settle(assigned.pop(event.worker), event.result)
                    give(event.worker)
                else:
                    live.discard(event.worker)
                    task = assigned.pop(event.worker, None)
                    pid = pool.pid(event.worker)
                    who = f"{pool.noun}{'' if pid is None else f' {pid}'}"
                    if task is None:
                        idle_deaths += 1  # died before or between tasks (could not start?)
                        if idle_deaths > START_FAILURES:
                            while pending:
                                lost = pending.popleft()
                                settle(lost, failed_result(lost, f"no {pool.noun} could start ({event.cause}); run "
                                                                 f"without {pool.option}, with --debug, to see why"))
                    else:
                        task.attempts += 1
                        if task.attempts <= RETRIES:
                            deaths[task.row] = f"{who} died ({event.cause}); retried on another {pool.noun}"
                            note(f"row {task.row}: {who} died ({event.cause}); retrying on another {pool.noun}")
                            pending.appendleft(task)
                        else:
                            note(f"row {task.row}: {who} died ({event.cause}) again; the row fails")
                            settle(task, failed_result(task, f"the {pool.noun} rendering it died twice "
                                                             f"({event.cause}){pool.death_hint}"))
                    if pending and len(live) < workers:
                        start()  # a fresh worker takes the dead one's place
    finally:
        pool.close()
        for task in assigned.values():  # in flight when interrupted: their workers are gone now
            _remove_dead_temporaries(task)


def failed_result(task: PlannedRow, message: str) -> RowResult:
    """The failed result of a task that no worker could finish."""
    output, frames_dir = output_paths(task.job)
    return RowResult(task.row, str(task.job.coeffs), None if output is None else str(output), FAILED,
                     error=f"row {task.row}: {message}", frames_dir=None if frames_dir is None else str(frames_dir))


def describe_exit(exitcode: Optional[int]) -> str:
    """A dead process's exit status in words: "signal 9" for -9, "exit code 1" for 1."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _print_note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _remove_dead_temporaries(task: PlannedRow) -> None:
    """What a dead worker left for its task's outputs: its MP4's and frames folder's temporaries and locks
    (taking a dead run's lock removes its temporaries; giving it back removes the lock file)."""
    output, frames_dir = output_paths(task.job)
    for target in (output, None if frames_dir is None else resolved(frames_dir)):
        if target is not None:
            remove_leftovers(target)
