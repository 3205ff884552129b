"""Many clips in one run: the plan's tasks run on a backend, and the report. Rows are read in
`manifest.py` and planned in `batch_plan.py`; this module runs the plan and writes what each row became.

Where rows run is not this module's business: a backend (`InProcessBackend` here, worker processes in
`workers.py`, Ray actors in `cluster.py`) takes the checked tasks, longest first, and hands back one
`RowResult` per task. Everything else (which rows, which are done, in what order, what the report
says) is decided by the plan and here, the same for every backend.

A row's life: parsed (a bad cell fails the row, tagged with its row number) -> a `RenderJob` with the
batch's defaults -> failed when an output is another row's input or output -> skipped when its outputs
exist (resume) or another live sfr run renders them -> checked by `jobs.prepare_job`, the checks `sfr
render` makes, before any model loads -> rendered by a backend, its outputs claimed for the job's life
(a second run of the same manifest at once skips what this one renders) -> one report line.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import outputs
from .batch_plan import DONE, FAILED, SKIPPED, TODO, Plan, RowResult, PlannedRow, optional_str
from .errors import SfrError
from .jobs import RenderJob, output_paths
from .options import shared_rows

GLOB_REPORT_NAME = "sfr-batch.report.jsonl"


# ---------------------------------------------------------------------------------------------------
# Running tasks


def run_task(renderer, task: PlannedRow, *, reraise: bool = False) -> RowResult:
    """Render one task with `renderer` (a `Renderer`); any failure becomes the row's failed result.
    `reraise` (in-process with --debug) lets an unexpected error out with its traceback."""
    started = time.perf_counter()
    try:
        outcome = renderer.render_job(task.planned)
    except Exception as exc:  # judged by row_result, as a packed row's error is
        outcome = exc
    return row_result(task, outcome, time.perf_counter() - started, reraise=reraise)


def row_result(task: PlannedRow, outcome, seconds: float, *, reraise: bool = False) -> RowResult:
    """A task's report line from what rendering it gave: a `RenderReport` (done), an `SfrError` (the
    user's: failed with its message) or another exception (a bug: failed as an internal error, or
    raised with its traceback when `reraise`)."""
    job = task.job
    output, frames_dir = output_paths(job)
    base = dict(row=task.row, coeffs=str(job.coeffs), output=optional_str(output), frames_dir=optional_str(frames_dir),
                seconds=seconds)
    if isinstance(outcome, outputs.OutputBusy) or (isinstance(outcome, outputs.OutputExists) and not job.overwrite):
        # another live run renders it, or finished it since this batch began: its clip, not lost
        return RowResult(status=SKIPPED, note=f"row {task.row}: {outcome}; skipped here", **base)
    if isinstance(outcome, SfrError):
        return RowResult(status=FAILED, error=f"row {task.row}: {outcome}", **base)
    if isinstance(outcome, Exception):
        if reraise:
            raise outcome
        return RowResult(status=FAILED, **base,
                         error=f"row {task.row}: internal error {type(outcome).__name__}: {outcome} (a bug in sfr; "
                               "rerun with --debug for the traceback)")
    return RowResult(status=DONE, frames=outcome.frames, render_seconds=outcome.seconds, stages=dict(outcome.stages),
                     **base)


class InProcessBackend:
    """Rows one after another in this process, with one `Renderer` (models loaded once).

    Consecutive tasks sharing the model and the source face are packed (`Renderer.render_jobs`): one
    stream of batches across their clips, each row still committed, reported and failed on its own. It
    is always on: at batch size 1 (a CPU's default) it renders exactly the batches of one row at a time,
    and on a GPU it fills the batches of clips shorter than a batch. A row's `seconds` run from its
    checks to its report line, so packed rows overlap in time (as rows of worker processes do).
    (Worker processes and Ray actors render one task at a time, unpacked.)"""

    def __init__(self, renderer_settings: Dict, *, debug: bool = False, renderer=None):
        self.renderer_settings = renderer_settings
        self.debug = debug
        self.renderer = renderer  # a warm Renderer to reuse (the benchmark's), else one is made per run

    def run(self, tasks: List[PlannedRow], on_start: Callable[[PlannedRow], None],
            on_done: Callable[[PlannedRow, RowResult], None], note: Optional[Callable[[str], None]] = None):
        from .renderer import Renderer

        renderer = self.renderer if self.renderer is not None else Renderer(**self.renderer_settings)
        started: Dict[int, float] = {}

        def start(index: int) -> None:
            started[index] = time.perf_counter()
            on_start(tasks[index])

        outcomes = renderer.render_jobs([task.planned for task in tasks], on_start=start)
        with contextlib.closing(outcomes):
            for index, outcome in outcomes:
                seconds = time.perf_counter() - started.pop(index)
                on_done(tasks[index], row_result(tasks[index], outcome, seconds, reraise=self.debug))


def renderer_settings(template: RenderJob) -> Dict:
    """`Renderer(**settings)` for a batch's shared options (picklable, for worker processes and actors)."""
    return {row.api_name: template.option(row.name) for row in shared_rows()}


class ReportFile:
    """Appends one JSON line per settled row and flushes it, so a killed batch keeps every line written."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self._handle = None
        if path is not None:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(path, "a", encoding="utf-8")
            except OSError as exc:
                raise SfrError(f"{path}: cannot write the report ({exc.strerror or exc}); choose --report PATH") from exc

    def write(self, result: RowResult) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(result.to_dict()) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class BatchSummary:
    rows: List[RowResult]
    seconds: float

    @property
    def counts(self) -> Dict[str, int]:
        counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
        for row in self.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    @property
    def ok(self) -> bool:
        return self.counts[FAILED] == 0

    def to_dict(self) -> Dict:
        """Totals, the driver's peak memory (with in-process rows, the whole batch's), every row."""
        from .engine import peak_rss_mib

        frames = sum(row.frames or 0 for row in self.rows if row.status == DONE)
        return {"total": len(self.rows), **self.counts, "frames": frames, "seconds": round(self.seconds, 3),
                "peak_rss_mib": round(peak_rss_mib(), 1), "rows": [row.to_dict() for row in sorted(self.rows, key=lambda r: r.row)]}


def run_batch(plan: Plan, backend, report: ReportFile, progress) -> BatchSummary:
    """Write the settled rows' lines, run the tasks on `backend`, write each result as it comes."""
    started = time.perf_counter()
    results: List[RowResult] = []
    progress.begin(plan.total, sum(task.frames for task in plan.tasks))
    for result in sorted(plan.settled, key=lambda r: r.row):
        report.write(result)
        results.append(result)
        progress.settled(result)

    def on_done(task: PlannedRow, result: RowResult) -> None:
        report.write(result)
        results.append(result)
        progress.settled(result, task.frames)

    backend.run(plan.tasks, progress.started, on_done, note=progress.note)
    progress.end()
    return BatchSummary(results, time.perf_counter() - started)


def dry_run_summary(plan: Plan) -> BatchSummary:
    """What `--dry-run` reports: settled rows as they are, each task as status "todo" with its frames."""
    todo = [RowResult(task.row, str(task.job.coeffs), optional_str(output_paths(task.job)[0]), TODO, frames=task.frames,
                      frames_dir=optional_str(output_paths(task.job)[1])) for task in plan.tasks]
    return BatchSummary(list(plan.settled) + todo, 0.0)


def default_report_path(manifest: Optional[Path], output_dir: Path) -> Path:
    if manifest is not None:
        return manifest.with_name(f"{manifest.stem}.report.jsonl")
    return output_dir / GLOB_REPORT_NAME

