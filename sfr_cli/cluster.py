"""A batch backend on Ray (`pip install 'sfr[ray]'`): one actor per GPU (per worker slot on CPUs), each
holding a `Renderer`, so models load once per actor. The driver (this process) hands the longest task
left to each idle actor, collects the results, and keeps the report and progress (`dispatch.dispatch`,
as for worker processes, waiting on `ray.wait`); a dead actor's clip is retried once on a fresh actor,
then reported failed.

`--ray local` starts a private instance whose processes end with the driver: `ray.shutdown()` on any
way out (Ctrl-C: then the in-flight clips' temporaries are removed once their actors are gone), and a
`watchdog.DriverWatchdog` that kills them if the driver itself is killed.

Outputs are written by the actors where the rows say: on a cluster, that must be storage every node
sees (NFS, a mounted bucket), as must the coefficient, source and checkpoint files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .batch import run_task
from .batch_plan import RowResult, PlannedRow
from .dispatch import DIED, DONE, READY, Event, dispatch
from .errors import SfrError
from .jobs import output_paths
from .watchdog import DriverWatchdog, wait_for_exit


JOIN_SECONDS = 10.0  # after ray.shutdown: how long a local instance's actor processes get to end


class _RowActor:
    """Runs on a Ray worker: one Renderer for every task it is given."""

    def __init__(self, settings: Dict, threads: Optional[int]):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if threads:
            import torch

            torch.set_num_threads(threads)
        from .renderer import Renderer

        self.renderer = Renderer(**settings)

    def pid(self) -> int:
        """This actor's process id; answered once the models are loaded (the actor is ready)."""
        return os.getpid()

    def run(self, task: PlannedRow) -> RowResult:
        return run_task(self.renderer, task)


class RayBackend:
    """`address`: "local" starts a private local instance (stopped at the end); "auto" or "HOST:PORT"
    joins a running cluster. `workers`: actors on a CPU-only cluster (default 1)."""

    def __init__(self, renderer_settings: Dict, *, address: str, workers: Optional[int] = None,
                 debug: bool = False, num_cpus: Optional[int] = None):
        self.renderer_settings = renderer_settings
        self.address = address
        self.workers = workers
        self.debug = debug
        self.num_cpus = num_cpus

    def _init(self):
        try:
            import ray
        except ImportError as exc:
            raise SfrError("--ray needs Ray: pip install 'sfr[ray]'") from exc
        quiet = dict(log_to_driver=self.debug, logging_level=logging.INFO if self.debug else logging.ERROR,
                     include_dashboard=False)
        if self.address == "local":
            cpus = self.num_cpus or int(os.environ.get("SFR_RAY_CPUS", 0)) or os.cpu_count() or 1
            ray.init(num_cpus=cpus, **quiet)
        else:
            try:
                ray.init(address=self.address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SfrError(f"--ray {self.address}: cannot join a Ray cluster ({exc}); start one with "
                               "`ray start --head`, or use --ray local") from exc
        return ray

    def run(self, tasks: List[PlannedRow], on_start: Callable[[PlannedRow], None],
            on_done: Callable[[PlannedRow, RowResult], None], note: Optional[Callable[[str], None]] = None):
        if not tasks:
            return
        watchdog = DriverWatchdog() if self.address == "local" else None
        try:
            ray = self._init()
            try:
                if watchdog is not None:
                    watchdog.watch_descendants()
                pool = self._pool(ray, len(tasks), watchdog)
            except BaseException:
                ray.shutdown()
                raise
            # Ray's driver prints its error messages (a page per dead actor) to stdout, which carries results
            # only: to stderr with --debug, else nowhere (the dispatcher tells the user in one line).
            with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(sys.stderr if self.debug else nowhere):
                dispatch(tasks, pool, on_start, on_done, workers=pool.count, note=note)  # closing the pool stops Ray
        finally:
            if watchdog is not None:
                watchdog.close()

    def _pool(self, ray, task_count: int, watchdog: Optional[DriverWatchdog]) -> "_ActorPool":
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        settings = dict(self.renderer_settings)
        for name in ("checkpoint_dir", "checkpoint", "mapping"):
            if settings.get(name) is not None:
                settings[name] = Path(os.path.abspath(settings[name]))
        if settings.get("config") and os.path.exists(settings["config"]):
            settings["config"] = os.path.abspath(settings["config"])
        if gpus and settings.get("device") in ("auto", "cuda"):
            count, options, threads = gpus, {"num_gpus": 1, "num_cpus": 1}, None
            settings["device"] = "cuda"
        else:
            # Ray would give each actor OMP_NUM_THREADS = its CPUs; the driver's thread count keeps the frames
            # equal to `sfr render`'s on this machine (see workers.py).
            from .workers import same_threads

            count = self.workers or 1
            options, threads = {"num_cpus": max(1, cpus // count)}, same_threads()
        actor_class = ray.remote(_RowActor).options(**options)
        return _ActorPool(ray, lambda: actor_class.remote(settings, threads), min(count, task_count), watchdog)


class _ActorPool:
    """`dispatch.Pool` of Ray actors. Each call in flight is an object reference: the actor's `pid` call
    (it is ready) or its `run` call (its task); `ray.wait` on all of them is the one wait."""

    noun = "Ray actor"
    death_hint = "; see Ray's logs (/tmp/ray/session_latest/logs for --ray local; out of memory?)"
    option = "--ray"

    def __init__(self, ray, new_actor: Callable, count: int, watchdog: Optional[DriverWatchdog]):
        from ray.exceptions import RayActorError

        self.ray = ray
        self.actor_error = RayActorError
        self.new_actor = new_actor
        self.count = count
        self.watchdog = watchdog
        self.started = 0
        self.actors: Dict[int, object] = {}  # key -> actor handle
        self.pids: Dict[int, int] = {}
        self.calls: Dict = {}  # object ref -> (key, the original task or None for the ready call)

    def start(self) -> int:
        self.started += 1
        actor = self.new_actor()
        self.actors[self.started] = actor
        self.calls[actor.pid.remote()] = (self.started, None)
        return self.started

    def submit(self, worker: int, task: PlannedRow) -> None:
        self.calls[self.actors[worker].run.remote(_absolute(task))] = (worker, task)

    def stop(self, worker: int) -> None:
        self.ray.kill(self.actors.pop(worker), no_restart=True)

    def pid(self, worker: int) -> Optional[int]:
        return self.pids.get(worker)

    def wait(self) -> List[Event]:
        ready, _ = self.ray.wait(list(self.calls), num_returns=1)
        events = []
        for ref in ready:
            worker, task = self.calls.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.actor_error as exc:
                self.ray.kill(self.actors.pop(worker), no_restart=True)
                events.append(Event(DIED, worker, cause=_first_sentence(exc)))
                continue
            if task is None:
                self.pids[worker] = value
                if self.watchdog is not None:
                    self.watchdog.watch_descendants()  # the actor's process, and agents started meanwhile
                events.append(Event(READY, worker))
            else:
                # the report names paths as the manifest did, not as the actor saw them
                output, frames_dir = output_paths(task.job)
                value.output, value.frames_dir, value.coeffs = _str(output), _str(frames_dir), str(task.job.coeffs)
                events.append(Event(DONE, worker, result=value))
        return events

    def close(self) -> None:
        """Stop Ray (`ray.shutdown`: this driver's actors end, and a local instance with them), then wait
        for a local instance's actor processes to be gone, so the dispatcher can remove the temporaries of
        the clips they were rendering (Ctrl-C: a running actor task is not interrupted by `ray.cancel`)."""
        self.calls = {}
        self.ray.shutdown()
        if self.watchdog is not None:
            wait_for_exit(list(self.pids.values()), timeout_seconds=JOIN_SECONDS)


def _absolute(task: PlannedRow) -> PlannedRow:
    """The task with absolute paths: an actor's working folder is not the driver's. The actor plans the
    job again (the driver's plan names files by the driver's paths)."""
    from .jobs import with_options
    from .options import table

    changes = {row.name: Path(os.path.abspath(task.job.option(row.name))) for row in table()
               if row.path and isinstance(task.job.option(row.name), (str, Path))}
    return replace(task, job=with_options(task.job, **changes), prepared=None)


def _first_sentence(exc: Exception) -> str:
    """Ray's actor-death message is a page (ids, addresses, guesses); its first line says what happened."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip().rstrip(".") if lines else type(exc).__name__
    return first[:1].lower() + first[1:]


def _str(path) -> Optional[str]:
    return None if path is None else str(path)
