"""A batch backend of worker processes on one machine: each loads the models once (its own `Renderer`)
and pulls tasks from one shared queue, longest first (the order `batch.plan_batch` gives).

On CUDA each worker gets one device (`--devices`, default every visible GPU). On a CPU the workers share
the cores, each with this process's torch thread count: CPU kernels split their sums by thread count,
so a worker on fewer threads would differ from `sfr render` by a level on a few pixels (measured: 1
level on ~0.03 % of values at 1 vs 2 threads). Same threads, same frames. A worker that dies (killed, segfault, out of memory) has
its clip put back on the queue once for another worker (a fresh worker takes the dead one's place);
a second death fails the row and the batch goes on. Frames do not depend on which worker renders them.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue
import time
from typing import Callable, Dict, List, Optional

from .batch import FAILED, RowResult, Task, run_task
from .jobs import output_paths

POLL_SECONDS = 0.01  # between looks at the workers' outboxes when none spoke
JOIN_SECONDS = 10.0
RETRIES = 1  # a dead worker's clip is tried once more
START_FAILURES = 3  # workers dying without a task before the batch gives up on worker processes


def same_threads() -> int:
    """The torch thread count of this process, for workers whose frames must equal this process's."""
    import torch

    return torch.get_num_threads()


def visible_cuda_devices() -> List[str]:
    """`cuda:0`, `cuda:1`, ... for the GPUs torch sees (empty without CUDA)."""
    import torch

    return [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _worker_main(settings: Dict, threads: Optional[int], inbox, results) -> None:
    """A worker: one Renderer; says "ready", takes a task from its inbox (None: stop), renders it, reports."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .renderer import Renderer

    renderer = Renderer(**settings)
    pid = os.getpid()
    try:
        while True:
            results.put(("ready", pid, None))
            task = inbox.get()
            if task is None:
                return
            results.put(("done", pid, run_task(renderer, task)))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the clip cleaned up, the driver reports
        return


class WorkerPoolBackend:
    """Worker processes pulling tasks: an idle worker asks, the driver hands it the longest task left."""

    def __init__(self, renderer_settings: Dict, *, workers: int, devices: Optional[List[str]] = None):
        self.renderer_settings = renderer_settings
        self.workers = workers
        self.devices = devices
        self.threads = None if devices else same_threads()
        self.idle_deaths = 0

    def run(self, tasks: List[Task], on_start: Callable[[Task], None], on_done: Callable[[Task, RowResult], None]):
        if not tasks:
            return
        context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
        pending = collections.deque(tasks)  # longest first
        # Each worker has its own inbox and outbox: a worker killed while writing to a queue shared with
        # the others would leave that queue's lock held, and every other worker stuck behind it.
        workers: Dict[int, tuple] = {}  # pid -> (process, inbox, outbox)
        assigned: Dict[int, Task] = {}  # pid -> its task
        remaining = len(tasks)
        started = 0

        def start_worker() -> None:
            nonlocal started
            settings = dict(self.renderer_settings)
            if self.devices:
                settings["device"] = self.devices[started % len(self.devices)]
            started += 1
            inbox, outbox = context.Queue(), context.Queue()
            process = context.Process(target=_worker_main, args=(settings, self.threads, inbox, outbox),
                                      name=f"sfr-worker-{started}", daemon=True)
            process.start()
            workers[process.pid] = (process, inbox, outbox)

        for _ in range(min(self.workers, len(tasks))):
            start_worker()
        try:
            while remaining:
                heard = False
                for pid, (_, inbox, outbox) in list(workers.items()):
                    try:
                        kind, _, result = outbox.get_nowait()
                    except (queue.Empty, EOFError, OSError):
                        continue
                    heard = True
                    if kind == "done":
                        task = assigned.pop(pid)
                        remaining -= 1
                        on_done(task, result)
                    elif pending:
                        task = pending.popleft()
                        assigned[pid] = task
                        inbox.put(task)
                        on_start(task)
                    else:
                        inbox.put(None)
                if not heard:
                    remaining -= self._reap(workers, assigned, pending, on_done, start_worker)
                    time.sleep(POLL_SECONDS)
        finally:
            for process, inbox, _ in workers.values():
                inbox.put(None)
            deadline = time.monotonic() + JOIN_SECONDS
            for process, _, _ in workers.values():
                process.join(timeout=max(0.1, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()

    def _reap(self, workers, assigned, pending, on_done, start_worker) -> int:
        """Handle dead workers: put a dead worker's clip back once, else fail it. Returns rows settled."""
        settled = 0
        for pid, (process, _, _) in list(workers.items()):
            if process.is_alive():
                continue
            del workers[pid]
            task = assigned.pop(pid, None)
            if task is None:
                self.idle_deaths += 1  # died before or between tasks (could not start?)
                if self.idle_deaths > START_FAILURES:
                    while pending:
                        lost = pending.popleft()
                        settled += 1
                        on_done(lost, _failed(lost, f"no worker process could start (exit code {process.exitcode}); "
                                                    "run without --workers, with --debug, to see why"))
            else:
                task.attempts += 1
                if task.attempts <= RETRIES:
                    pending.appendleft(task)
                else:
                    settled += 1
                    on_done(task, _failed(task, f"the worker rendering it died twice (exit code "
                                                f"{process.exitcode}); see the system log (out of memory?)"))
            if pending and len(workers) < self.workers:
                start_worker()
        if pending and not workers:
            start_worker()
        return settled


def _failed(task: Task, message: str) -> RowResult:
    """The failed result of a task that no worker could finish."""
    output, frames_dir = output_paths(task.job)
    return RowResult(task.row, str(task.job.coeffs), None if output is None else str(output), FAILED,
                     error=f"row {task.row}: {message}", frames_dir=None if frames_dir is None else str(frames_dir))
