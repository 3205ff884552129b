"""Many clips in one run: manifest rows, their checks, shards, resume, scheduling and the report.

Where rows run is not this module's business: a backend (`InProcessBackend` here, worker processes in
`workers.py`, Ray actors in `cluster.py`) takes the checked tasks, longest first, and hands back one
`RowResult` per task. Everything else (which rows, which are done, in what order, what the report
says) is decided here, the same for every backend.

A row's life: parsed (a bad cell fails the row, tagged with its row number) -> a `RenderJob` with the
batch's defaults -> failed when an output is another row's input or output -> skipped when its outputs
exist (resume) or another live sfr run renders them -> checked by `jobs.prepare_job`, the checks `sfr
render` makes, before any model loads -> rendered by a backend, its outputs claimed for the job's life
(a second run of the same manifest at once skips what this one renders) -> one report line.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import media, outputs
from .errors import SfrError
from .jobs import RenderJob, describe_os_error, job_inputs, output_paths, prepare_job, with_options
from .options import column_rows, convert_cell, shared_rows

# The manifest's columns (`options`' table) and the paths among them (relative to the manifest's folder).
ROW_FIELDS = tuple(row.name for row in column_rows())
PATH_FIELDS = tuple(row.name for row in column_rows() if row.path)
REQUIRED_FIELDS = tuple(row.name for row in column_rows() if row.required)
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
GLOB_REPORT_NAME = "sfr-batch.report.jsonl"
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
TODO = "todo"  # --dry-run: would render


class ManifestError(SfrError):
    """The manifest as a whole cannot be used (unreadable, no header, unknown columns): a usage error."""


@dataclass
class ManifestRow:
    """One clip as the manifest wrote it: `number` counts data rows from 1; `values` are the raw cells
    (relative paths already made relative to the manifest's folder); `error` a parse failure."""

    number: int
    values: Dict[str, object]
    error: Optional[str] = None


@dataclass
class Task:
    """A checked row, ready for a backend: its job (outputs resolved), its length in frames and the job as
    the plan checked it (`jobs.PreparedJob` without pixels, picklable: the render and the workers take it
    as it is, not checking the row again; None: the backend plans it, as Ray's actors do)."""

    row: int
    job: RenderJob
    frames: int
    attempts: int = 0
    prepared: Optional[object] = None

    @property
    def planned(self):
        """What a Renderer renders for this task: the planned job, else the job."""
        return self.prepared if self.prepared is not None else self.job


@dataclass
class RowResult:
    """One report line."""

    row: int
    coeffs: Optional[str]
    output: Optional[str]
    status: str  # done | skipped | failed
    frames: Optional[int] = None
    seconds: Optional[float] = None
    error: Optional[str] = None
    frames_dir: Optional[str] = None
    render_seconds: Optional[float] = None  # of `seconds`: rendering and encoding (model load, checks excluded)
    note: Optional[str] = None  # why a row was skipped (when not because its outputs were there at the start),
    # or why it was rendered twice (its first worker died)
    stages: Dict[str, object] = field(default_factory=dict)  # what its frame stages report (enhancer_noise_seed, ...)

    def to_dict(self) -> Dict:
        data = asdict(self)
        data.update(data.pop("stages"))
        for key in ("seconds", "render_seconds"):
            if data[key] is not None:
                data[key] = round(data[key], 3)
        return data


# ---------------------------------------------------------------------------------------------------
# Reading rows


def manifest_format(path: Path) -> str:
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ManifestError(f"{path}: unknown manifest type '{path.suffix}'; use .csv (with a header row) "
                            "or .jsonl (one JSON object per line)")
    return kind


def read_manifest(path: Path, default_source: Optional[str] = None) -> List[ManifestRow]:
    """The rows of a CSV (header row) or JSONL manifest; relative paths are taken from the manifest's
    folder (`default_source`, from the command line, is used as given for rows without a source). A row
    that cannot be parsed comes back with its `error`; the manifest as a whole failing (unreadable, no
    header, unknown column) raises ManifestError."""
    path = Path(path)
    kind = manifest_format(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc})") from exc
    rows = _csv_rows(path, text) if kind == "csv" else _jsonl_rows(path, text)
    if not rows:
        raise ManifestError(f"{path}: no rows; write one row per clip (coeffs and source at least)"
                            + (" under the header row" if kind == "csv" else ", one JSON object per line"))
    base = path.parent
    for row in rows:
        for name in PATH_FIELDS:
            value = row.values.get(name)
            if isinstance(value, str) and value:
                row.values[name] = str(base / Path(value).expanduser())
        if default_source is not None and not row.values.get("source"):
            row.values["source"] = default_source
        if row.error is None:
            row.error = _check_cells(row.values)
    return rows


def _csv_rows(path: Path, text: str) -> List[ManifestRow]:
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise ManifestError(f"{path}: empty manifest; the first row names the columns (coeffs,source,...)")
    header = [name.strip() for name in header]
    unknown = [name for name in header if name not in ROW_FIELDS]
    if unknown:
        raise ManifestError(f"{path}: unknown column(s) {', '.join(unknown)}; columns are {', '.join(ROW_FIELDS)}")
    missing = [name for name in REQUIRED_FIELDS[:1] if name not in header]  # source may come from --source
    if missing:
        raise ManifestError(f"{path}: no {' or '.join(missing)} column; every row needs coeffs and source")
    rows = []
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue  # blank lines
        number = len(rows) + 1
        if len(cells) != len(header):
            rows.append(ManifestRow(number, {}, f"{len(cells)} cells for {len(header)} columns; quote cells "
                                                "holding commas (\"0,20,-10\")"))
            continue
        rows.append(ManifestRow(number, {k: v.strip() for k, v in zip(header, cells) if v.strip() != ""}))
    return rows


def _jsonl_rows(path: Path, text: str) -> List[ManifestRow]:
    """Rows of a JSONL manifest. An unknown key fails the whole manifest, as an unknown CSV column does:
    it is a mistake in how the manifest was written (a typo like `ouptut` or `expresion_scale`, usually
    on every line a script wrote), found before anything renders rather than once per row."""
    rows = []
    unknown_keys: Dict[str, List[int]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        number = len(rows) + 1
        try:
            values = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(ManifestRow(number, {}, f"not a JSON object ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(values, dict):
            rows.append(ManifestRow(number, {}, "not a JSON object; write {\"coeffs\": ..., \"source\": ...}"))
            continue
        for name in values:
            if name not in ROW_FIELDS:
                unknown_keys.setdefault(name, []).append(number)
        rows.append(ManifestRow(number, {k: v for k, v in values.items() if v is not None}))
    if unknown_keys:
        where = "; ".join(f"{name} (row {', '.join(map(str, numbers[:5]))}{', ...' if len(numbers) > 5 else ''})"
                          for name, numbers in unknown_keys.items())
        raise ManifestError(f"{path}: unknown key(s) {where}; keys are {', '.join(ROW_FIELDS)}")
    return rows


def _check_cells(values: Dict) -> Optional[str]:
    missing = [name for name in REQUIRED_FIELDS if not values.get(name)]
    if missing:
        return f"no {' or '.join(missing)}; every row needs coeffs and source"
    for name in PATH_FIELDS:
        if name in values and not isinstance(values[name], str):
            return f"{name}: {values[name]!r} is not a path"
    return None


def rows_from_globs(patterns: Sequence[str], source: Optional[str]) -> List[ManifestRow]:
    """Rows for `--coeffs 'results/*.mat' --source face.png`: every file a pattern matches, sorted, once.
    A pattern matching nothing raises ManifestError naming it (a usage error: nothing to render is a
    mistake, not a success); a plain path is taken as given, so a missing file fails its row with
    `sfr render`'s message."""
    paths: List[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise ManifestError(f"--coeffs '{pattern}' matches no file; check the pattern and the folder "
                                f"(relative patterns start from {os.getcwd()})")
        paths.extend(p for p in matched if p not in paths)
    rows = [ManifestRow(number, {"coeffs": path, "source": source}) for number, path in enumerate(paths, 1)]
    for row in rows:
        row.error = _check_cells({k: v for k, v in row.values.items() if v is not None})
    return rows


def parse_shard(text: str) -> Tuple[int, int]:
    """`"2/4"` -> (2, 4); raises ValueError."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r} is not K/N like 1/4") from None
    if not 1 <= k <= n:
        raise ValueError(f"shard {text}: K must be 1..N")
    return k, n


def select_shard(rows: Sequence[ManifestRow], shard: Optional[Tuple[int, int]]) -> List[ManifestRow]:
    """Rows K, K+N, K+2N, ... (by row number): N shards together cover every row exactly once, whatever
    each row holds, and a shard's rows do not change when other rows are fixed."""
    if shard is None:
        return list(rows)
    k, n = shard
    return [row for row in rows if (row.number - 1) % n == k - 1]


# ---------------------------------------------------------------------------------------------------
# From rows to tasks


@dataclass
class BatchDefaults:
    """What applies to every row unless the row says otherwise: a `RenderJob` template (shared settings
    and per-clip defaults) and where outputs go without an `output` cell."""

    template: RenderJob
    output_dir: Path = Path(".")
    overwrite: bool = False


def row_job(row: ManifestRow, defaults: BatchDefaults) -> RenderJob:
    """The row's `RenderJob`; a bad cell raises SfrError with `sfr render`'s message for that option."""
    import click

    changes: Dict[str, object] = {}
    for name, value in row.values.items():
        try:
            changes[name] = convert_cell(name, value)
        except click.BadParameter as exc:
            raise SfrError(f"{name.replace('_', '-')}: {exc.format_message()}") from None
    job = with_options(defaults.template, **changes)
    if job.output is None and job.frames_dir is None:
        job = replace(job, output=defaults.output_dir / f"{Path(job.coeffs).stem}.mp4")
    return job


def outputs_done(job: RenderJob) -> bool:
    """Whether a row's outputs are all there. Outputs appear only complete: the MP4 is renamed into place
    after its last frame (and after every PNG frame), so its presence means the row finished; a
    frames-only row is done when its folder holds one frame per coefficient frame."""
    output, frames_dir = output_paths(job)
    if output is not None:
        return output.is_file()
    if frames_dir is None or not frames_dir.is_dir():
        return False
    from .coeffs import read_coefficients

    try:
        frame_count = read_coefficients(job.coeffs).shape[0]
    except SfrError:
        return False  # prepare_job reports it
    return len(media.existing_frames(frames_dir)) == frame_count


@dataclass(frozen=True)
class Place:
    """A path a row reads or writes, keyed for comparison: (device, inode) where it exists, and its
    resolved path (symlinked folders, `..`) either way. `frames`: a frames folder (its frames are written)."""

    row: int
    path: Path
    role: str  # "coeffs", "source", ... for inputs; "output" or "frames_dir" for outputs
    ident: Optional[Tuple[int, int]]
    real: Path

    @classmethod
    def of(cls, row: int, path: Path, role: str) -> "Place":
        return cls(row, Path(path), role, outputs.identity(path), outputs.resolved(path))

    @property
    def frames(self) -> bool:
        return self.role == "frames_dir"

    def describe(self) -> str:
        if self.row == 0:
            return f"the {self.role}"
        kind = "frames folder" if self.frames else self.role
        return f"row {self.row}'s {kind}"


class PlaceIndex:
    """Places by identity, by resolved path and by resolved folder: every row against every row in
    linear time."""

    def __init__(self, places: Iterable[Place] = ()):
        self._by_id: Dict[Tuple[int, int], List[Place]] = {}
        self._by_real: Dict[Path, List[Place]] = {}
        self._by_folder: Dict[Path, List[Place]] = {}
        self._folders: Dict[Path, List[Place]] = {}
        for place in places:
            self.add(place)

    def add(self, place: Place) -> None:
        if place.ident is not None:
            self._by_id.setdefault(place.ident, []).append(place)
        self._by_real.setdefault(place.real, []).append(place)
        self._by_folder.setdefault(place.real.parent, []).append(place)
        if place.frames:
            self._folders.setdefault(place.real, []).append(place)

    def same(self, place: Place) -> List[Place]:
        """Places naming the same file or folder as `place`."""
        found = list(self._by_id.get(place.ident, [])) if place.ident is not None else []
        found += [other for other in self._by_real.get(place.real, []) if other not in found]
        return found

    def written_over_by(self, place: Place) -> List[Place]:
        """Places `place` would write over: the same path, or (a frames folder) frame names in it."""
        found = self.same(place)
        if place.frames:
            found += [other for other in self._by_folder.get(place.real, [])
                      if media.is_frame_name(other.real.name) and other not in found]
        return found

    def folders_holding(self, place: Place) -> List[Place]:
        """Frames folders in which `place` (a file) has a frame name: they would write over it."""
        if not media.is_frame_name(place.real.name):
            return []
        return list(self._folders.get(place.real.parent, []))


@dataclass
class Plan:
    """What a batch will do: tasks to render (longest first) and rows already settled (skipped/failed);
    `reads`/`writes`: every path any row reads or writes (and the files all rows share), for `check_report`."""

    tasks: List[Task] = field(default_factory=list)
    settled: List[RowResult] = field(default_factory=list)
    total: int = 0
    reads: List[Place] = field(default_factory=list)
    writes: List[Place] = field(default_factory=list)


def _row_places(number: int, job: RenderJob) -> Tuple[List[Place], List[Place]]:
    """(inputs, outputs) of a row as Places."""
    output, frames_dir = output_paths(job)
    reads = [Place.of(number, item.path, item.role.lstrip("-")) for item in job_inputs(job)]
    writes = [Place.of(number, path, role) for path, role in ((output, "output"), (frames_dir, "frames_dir"))
              if path is not None]
    return reads, writes


def row_clash(number: int, writes: Sequence[Place], reads: PlaceIndex, written: PlaceIndex) -> Optional[str]:
    """Why row `number` may not write its outputs, or None: an output is (or, a frames folder, holds under a
    frame name) another row's input, or is an earlier row's output (or lies in, or holds, an earlier row's
    output as a frame name)."""
    for place in writes:
        for other in reads.written_over_by(place):
            if other.row != number:
                what = (f"its frames folder {place.path} would replace {other.path}" if place.frames and
                        not outputs.same_file(place.path, other.path) else f"writes {place.path}")
                return f"{what}, {other.describe()} (an input); give each row its own output"
        earlier = [other for other in written.written_over_by(place) + written.folders_holding(place)
                   if other.row < number]
        if earlier:
            other = earlier[0]
            if outputs.same_file(place.path, other.path):
                return f"writes {place.path or other.path}, as row {other.row} does; give each row its own output"
            return (f"writes {place.path}, and row {other.row} writes {other.path}: one would replace the other; "
                    "give each row its own output")
    return None


def plan_batch(rows: Sequence[ManifestRow], defaults: BatchDefaults, *, prefix: str = "row",
               dry_run: bool = False, on_checked: Optional[Callable[[int, int], None]] = None) -> Plan:
    """Check every row, as `sfr render` would, before any model loads; fail rows whose outputs are another
    row's input or output (every row against every row, through symlinks, `..` and hard links); skip rows
    already done (unless `overwrite`) or being rendered by another live sfr run; fail bad rows alone
    (a folder refusing access included); order the rest longest first. `on_checked(rows checked, rows)`
    hears progress before each row's full check (a long manifest takes a while)."""
    plan = Plan(total=len(rows))
    jobs: Dict[int, RenderJob] = {}
    places: Dict[int, List[Place]] = {}
    errors: Dict[int, str] = {}
    for row in rows:
        if row.error is not None:
            errors[row.number] = row.error
            continue
        try:
            jobs[row.number] = job = row_job(row, defaults)
            reads, places[row.number] = _row_places(row.number, job)
        except SfrError as exc:
            errors[row.number] = str(exc)
            continue
        except OSError as exc:
            errors[row.number] = describe_os_error(exc)
            continue
        plan.reads += reads
        plan.writes += places[row.number]
    reads_index = PlaceIndex(plan.reads)
    written = PlaceIndex(plan.writes)
    shared_found: set = set()
    for checked, row in enumerate(rows):
        if on_checked is not None:
            on_checked(checked, len(rows))
        job = jobs.get(row.number)
        coeffs = row.values.get("coeffs")
        output, frames_dir = output_paths(job) if job is not None else (row.values.get("output"), row.values.get("frames_dir"))
        shown = _str(output)

        def failed(message: str) -> None:
            plan.settled.append(RowResult(row.number, coeffs, shown, FAILED, frames_dir=_str(frames_dir),
                                          error=f"{prefix} {row.number}: {message}"))

        if job is None:
            failed(errors[row.number])
            continue
        clash = row_clash(row.number, places[row.number], reads_index, written)
        if clash is not None:
            failed(clash)
            continue
        try:
            if not defaults.overwrite and outputs_done(job):
                plan.settled.append(RowResult(row.number, str(job.coeffs), shown, SKIPPED,
                                              frames_dir=_str(frames_dir)))
                continue
            busy = next(((path, holder) for path, holder in
                         ((path, outputs.live_holder(outputs.resolved(path) if path == frames_dir else path))
                          for path in (output, frames_dir) if path is not None) if holder is not None), None)
            if busy is not None:
                plan.settled.append(RowResult(row.number, str(job.coeffs), shown, SKIPPED, frames_dir=_str(frames_dir),
                                              note=f"{prefix} {row.number}: {busy[0]}: another sfr run is rendering "
                                                   f"it ({busy[1].describe()}); skipped here"))
                continue
            if not dry_run:
                _make_output_folder(output)
                _make_output_folder(frames_dir)
            prepared = prepare_job(job)
        except SfrError as exc:
            failed(str(exc))
            continue
        except OSError as exc:
            failed(describe_os_error(exc))
            continue
        # the files rows read that no row named: the config, the checkpoints found (a full-mode row's mapping
        # file is another); the frame stages' files are each row's own inputs (`jobs.job_inputs`)
        for path, role in ((prepared.config.path, "--config input"), (prepared.files.renderer, "renderer checkpoint"),
                           (prepared.files.mapping, "mapping checkpoint")):
            if path is not None and Path(path) not in shared_found:
                shared_found.add(Path(path))
                plan.reads.append(Place.of(0, path, role))
        plan.tasks.append(Task(row.number, job, prepared.frame_count, prepared=prepared.without_pixels()))
    plan.tasks.sort(key=lambda task: (-task.frames, task.row))
    return plan


def check_report(report: Path, plan: Plan, manifest: Optional[Path] = None) -> None:
    """Raise SfrError unless the report file is none of the batch's inputs (the manifest, any row's
    files, the config and checkpoints) and none of its outputs (an MP4, a frame of a frames folder)."""
    report_place = Place.of(0, report, "report")
    reads = plan.reads + ([Place.of(0, manifest, "manifest")] if manifest is not None else [])
    for other in PlaceIndex(reads).same(report_place):
        raise SfrError(f"{report}: is {other.describe()}{' (an input)' if other.row else ''}, which the report "
                       "would append to; choose another --report PATH")
    writes = PlaceIndex(plan.writes)
    for other in writes.same(report_place) + writes.folders_holding(report_place):
        raise SfrError(f"{report}: {'is' if not other.frames or outputs.same_file(report, other.path) else 'lies in'} "
                       f"{other.describe()} {other.path}, which the batch writes; choose another --report PATH")


def _str(path) -> Optional[str]:
    return None if path is None else str(path)


def _make_output_folder(output: Optional[Path]) -> None:
    """A batch creates the folders its MP4s and frames folders go in (`sfr render` wants them to exist)."""
    if output is not None and not output.parent.exists():
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SfrError(f"{output}: cannot create its folder ({exc.strerror or exc})") from exc


# ---------------------------------------------------------------------------------------------------
# Running tasks


def run_task(renderer, task: Task, *, reraise: bool = False) -> RowResult:
    """Render one task with `renderer` (a `Renderer`); any failure becomes the row's failed result.
    `reraise` (in-process with --debug) lets an unexpected error out with its traceback."""
    started = time.perf_counter()
    try:
        outcome = renderer.render_job(task.planned)
    except Exception as exc:  # judged by row_result, as a packed row's error is
        outcome = exc
    return row_result(task, outcome, time.perf_counter() - started, reraise=reraise)


def row_result(task: Task, outcome, seconds: float, *, reraise: bool = False) -> RowResult:
    """A task's report line from what rendering it gave: a `RenderReport` (done), an `SfrError` (the
    user's: failed with its message) or another exception (a bug: failed as an internal error, or
    raised with its traceback when `reraise`)."""
    job = task.job
    output, frames_dir = output_paths(job)
    base = dict(row=task.row, coeffs=str(job.coeffs), output=_str(output), frames_dir=_str(frames_dir),
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

    def run(self, tasks: List[Task], on_start: Callable[[Task], None], on_done: Callable[[Task, RowResult], None],
            note: Optional[Callable[[str], None]] = None):
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

    def on_done(task: Task, result: RowResult) -> None:
        report.write(result)
        results.append(result)
        progress.settled(result, task.frames)

    backend.run(plan.tasks, progress.started, on_done, note=progress.note)
    progress.end()
    return BatchSummary(results, time.perf_counter() - started)


def dry_run_summary(plan: Plan) -> BatchSummary:
    """What `--dry-run` reports: settled rows as they are, each task as status "todo" with its frames."""
    todo = [RowResult(task.row, str(task.job.coeffs), _str(output_paths(task.job)[0]), TODO, frames=task.frames,
                      frames_dir=_str(output_paths(task.job)[1])) for task in plan.tasks]
    return BatchSummary(list(plan.settled) + todo, 0.0)


def default_report_path(manifest: Optional[Path], output_dir: Path) -> Path:
    if manifest is not None:
        return manifest.with_name(f"{manifest.stem}.report.jsonl")
    return output_dir / GLOB_REPORT_NAME

