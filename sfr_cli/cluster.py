"""A batch backend on Ray (`pip install 'sfr[ray]'`): one actor per GPU (per worker slot on CPUs), each
holding a `Renderer`, so models load once per actor. The driver (this process) hands the longest task
left to each idle actor, collects the results, and keeps the report and progress; a dead actor's clip
is retried once on a fresh actor, then reported failed.

Outputs are written by the actors where the rows say: on a cluster, that must be storage every node
sees (NFS, a mounted bucket), as must the coefficient, source and checkpoint files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .batch import FAILED, RowResult, Task, run_task
from .errors import SfrError
from .jobs import output_paths

PATH_FIELDS = ("coeffs", "source", "source_coeffs", "output", "frames_dir", "audio", "checkpoint_dir",
               "checkpoint", "mapping")

RETRIES = 1


class _RowActor:
    """Runs on a Ray worker: one Renderer for every task it is given."""

    def __init__(self, settings: Dict, threads: Optional[int]):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if threads:
            import torch

            torch.set_num_threads(threads)
        from .renderer import Renderer

        self.renderer = Renderer(**settings)

    def run(self, task: Task) -> RowResult:
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

    def run(self, tasks: List[Task], on_start: Callable[[Task], None], on_done: Callable[[Task, RowResult], None]):
        if not tasks:
            return
        ray = self._init()
        try:
            self._run(ray, tasks, on_start, on_done)
        finally:
            ray.shutdown()

    def _run(self, ray, tasks, on_start, on_done) -> None:
        from ray.exceptions import RayActorError

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
        actor_class = ray.remote(_RowActor)
        count = min(count, len(tasks))

        def new_actor():
            return actor_class.options(**options).remote(settings, threads)

        actors = [new_actor() for _ in range(count)]
        originals = {task.row: task for task in tasks}
        pending = [_absolute(task) for task in tasks]  # longest first; paths as every node must see them
        running: Dict = {}  # object ref -> (actor index, task)

        def submit(index: int) -> None:
            task = pending.pop(0)
            running[actors[index].run.remote(task)] = (index, task)
            on_start(task)

        for index in range(count):
            if pending:
                submit(index)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            index, task = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as exc:
                ray.kill(actors[index], no_restart=True)
                actors[index] = new_actor()
                task.attempts += 1
                if task.attempts <= RETRIES:
                    pending.insert(0, task)
                else:
                    output, frames_dir = output_paths(task.job)
                    result = RowResult(task.row, str(task.job.coeffs), None if output is None else str(output),
                                       FAILED, error=f"row {task.row}: the Ray actor rendering it died twice ({exc})",
                                       frames_dir=None if frames_dir is None else str(frames_dir))
                    on_done(task, result)
            else:
                original = originals[task.row]  # the report names paths as the manifest did
                result.output, result.frames_dir, result.coeffs = (
                    _str(output_paths(original.job)[0]), _str(output_paths(original.job)[1]), str(original.job.coeffs))
                on_done(original, result)
            if pending:
                submit(index)


def _absolute(task: Task) -> Task:
    """The task with absolute paths: an actor's working folder is not the driver's."""
    changes = {name: Path(os.path.abspath(getattr(task.job, name))) for name in PATH_FIELDS
               if isinstance(getattr(task.job, name), (str, Path))}
    return replace(task, job=replace(task.job, **changes))


def _str(path) -> Optional[str]:
    return None if path is None else str(path)
