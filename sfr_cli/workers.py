"""A batch backend of worker processes on one machine: each loads the models once (its own `Renderer`)
and renders the tasks the driver hands it, longest first (`dispatch.dispatch` decides who gets what).

On CUDA each worker gets one device (`--devices`, default every visible GPU). On a CPU the workers share
the cores, each with this process's torch thread count: CPU kernels split their sums by thread count,
so a worker on fewer threads would differ from `sfr render` by a level on a few pixels (measured: 1
level on ~0.03 % of values at 1 vs 2 threads). Same threads, same frames. A worker that dies (killed, segfault, out of memory) has
its clip put back once for another worker (a fresh worker takes the dead one's place); a second death
fails the row and the batch goes on. Frames do not depend on which worker renders them.

Each worker talks to the driver over its own pipe (a worker killed mid-message breaks only its own
pipe), and the driver waits on every pipe and every worker's sentinel at once. The pipe is also how a
worker knows its driver is alive: a thread in the worker reads it, and when the driver's end closes
(the driver exited, however: kill -9 included) the worker interrupts its render and exits within
`ORPHAN_GRACE_SECONDS`. multiprocessing's resource tracker then ends too (its last writers are gone).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Callable, Dict, List, Optional

from .batch import run_task
from .batch_plan import RowResult, PlannedRow
from .dispatch import DIED, DONE, READY, Event, describe_exit, dispatch

JOIN_SECONDS = 10.0
ORPHAN_GRACE_SECONDS = 3.0  # a worker whose driver died: time to clean up its clip before it exits anyway
ORPHAN_EXIT_CODE = 3


def same_threads() -> int:
    """The torch thread count of this process, for workers whose frames must equal this process's."""
    import torch

    return torch.get_num_threads()


def visible_cuda_devices() -> List[str]:
    """`cuda:0`, `cuda:1`, ... for the GPUs torch sees (empty without CUDA)."""
    import torch

    return [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _worker_main(settings: Dict, threads: Optional[int], pipe) -> None:
    """A worker: one Renderer; says "ready", then renders each task the pipe brings (None: stop) and
    sends its result back. A thread reads the pipe, so the worker notices its driver's death mid-render."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    inbox: queue.Queue = queue.Queue()
    orphaned = threading.Event()
    threading.Thread(target=_read_driver, args=(pipe, inbox, orphaned), name="sfr-driver-pipe", daemon=True).start()
    try:
        try:
            import torch

            if threads:
                torch.set_num_threads(threads)
            from .renderer import Renderer

            renderer = Renderer(**settings)
            pipe.send((READY, os.getpid()))
            while True:
                task = inbox.get()
                if task is None:
                    return
                pipe.send((DONE, run_task(renderer, task)))
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the clip cleaned up, the driver reports
            return
        except OSError:  # the pipe broke: the driver is gone (see _read_driver)
            return
    finally:
        if orphaned.is_set():  # the clip is cleaned up; nobody waits for this process: skip the slow teardown
            os._exit(ORPHAN_EXIT_CODE)


def _read_driver(pipe, inbox: queue.Queue, orphaned: threading.Event) -> None:
    """The worker's watch on its driver: pass on what the driver sends; when the pipe ends (the driver
    exited or was killed) interrupt the render like Ctrl-C, so the clip's temporary is removed, and exit
    after `ORPHAN_GRACE_SECONDS` if the main thread has not."""
    while True:
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            break
        inbox.put(message)
        if message is None:
            return
    orphaned.set()
    inbox.put(None)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(ORPHAN_GRACE_SECONDS)
    os._exit(ORPHAN_EXIT_CODE)


class WorkerPoolBackend:
    """Worker processes pulling tasks: an idle worker asks, the driver hands it the longest task left."""

    def __init__(self, renderer_settings: Dict, *, workers: int, devices: Optional[List[str]] = None):
        self.renderer_settings = renderer_settings
        self.workers = workers
        self.devices = devices
        self.threads = None if devices else same_threads()

    def run(self, tasks: List[PlannedRow], on_start: Callable[[PlannedRow], None],
            on_done: Callable[[PlannedRow, RowResult], None], note: Optional[Callable[[str], None]] = None):
        if not tasks:
            return
        pool = _ProcessPool(self.renderer_settings, self.threads, self.devices)
        dispatch(tasks, pool, on_start, on_done, workers=self.workers, note=note)


class _ProcessPool:
    """`dispatch.Pool` of spawned worker processes, one pipe each, keyed by PID."""

    noun = "worker"
    death_hint = "; see the system log (out of memory?)"
    option = "--workers"

    def __init__(self, settings: Dict, threads: Optional[int], devices: Optional[List[str]]):
        self.context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
        self.settings = settings
        self.threads = threads
        self.devices = devices
        self.started = 0
        self.workers: Dict[int, tuple] = {}  # pid -> (process, the driver's end of its pipe)
        self.stopped: List = []  # (process, pipe) let go, joined at close

    def start(self) -> int:
        settings = dict(self.settings)
        if self.devices:
            settings["device"] = self.devices[self.started % len(self.devices)]
        self.started += 1
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(settings, self.threads, theirs),
                                       name=f"sfr-worker-{self.started}", daemon=True)
        process.start()
        theirs.close()  # the worker holds the only other end: it sees ours close when this process dies
        self.workers[process.pid] = (process, ours)
        return process.pid

    def submit(self, worker: int, task: PlannedRow) -> None:
        _send(self.workers[worker][1], task)  # a dead worker's sentinel reports it

    def stop(self, worker: int) -> None:
        process, pipe = self.workers.pop(worker)
        _send(pipe, None)
        self.stopped.append((process, pipe))

    def pid(self, worker: int) -> Optional[int]:
        return worker

    def wait(self) -> List[Event]:
        owners = {}
        for pid, (process, pipe) in self.workers.items():
            owners[pipe] = owners[process.sentinel] = pid
        events, dead = [], []
        for ready in wait(list(owners)):
            pid = owners[ready]
            if ready is self.workers[pid][0].sentinel:
                if pid not in dead:
                    dead.append(pid)
                continue
            try:
                kind, payload = ready.recv()
            except (EOFError, OSError):  # its end closed: the worker is exiting (mid-message, maybe)
                if pid not in dead:
                    dead.append(pid)
                continue
            events.append(Event(kind, pid, result=payload if kind == DONE else None))
        for pid in dead:
            process, pipe = self.workers.pop(pid)
            process.join(timeout=JOIN_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
            while _readable(pipe):  # a result sent just before dying counts
                try:
                    kind, payload = pipe.recv()
                except (EOFError, OSError):
                    break
                events.append(Event(kind, pid, result=payload if kind == DONE else None))
            pipe.close()
            events.append(Event(DIED, pid, cause=describe_exit(process.exitcode)))
        return events

    def close(self) -> None:
        everyone = list(self.workers.values()) + self.stopped
        self.workers, self.stopped = {}, []
        for _, pipe in everyone:
            _send(pipe, None)
        deadline = time.monotonic() + JOIN_SECONDS
        for process, pipe in everyone:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            pipe.close()


def _send(pipe, message) -> None:
    try:
        pipe.send(message)
    except OSError:  # the worker is gone; its sentinel (or close) deals with it
        pass


def _readable(pipe) -> bool:
    try:
        return pipe.poll()
    except (EOFError, OSError):
        return False
