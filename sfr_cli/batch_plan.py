"""A batch's plan, made before any model loads: each row's `RenderJob` with the batch's defaults, the
clash index (no row writes another row's input or output, through symlinks, `..` and hard links), rows
already done (resume) or rendered by another live run skipped, every other row checked as `sfr render`
checks it, and the rows to render ordered longest first: a `ManifestRow` as written, a `PlannedRow` as
planned (`plan.tasks`, a backend's tasks), a `RowResult` as settled (the skipped rows and the backends'
results), one report line each (`batch`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import media, outputs
from .errors import SfrError
from .jobs import RenderJob, describe_os_error, job_inputs, output_paths, prepare_job, with_options
from .manifest import ManifestRow
from .options import convert_cell

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
TODO = "todo"  # --dry-run: would render


@dataclass
class PlannedRow:
    """A checked row, ready for a backend (one of `plan.tasks`): its job (outputs resolved), its length in
    frames and the job as the plan checked it (`jobs.PreparedJob` without pixels, picklable: the render and
    the workers take it as it is, not checking the row again; None: the backend plans it, as Ray's actors
    do)."""

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

    tasks: List[PlannedRow] = field(default_factory=list)
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


def plan_rows(rows: Sequence[ManifestRow], defaults: BatchDefaults, *, prefix: str = "row",
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
        shown = optional_str(output)

        def failed(message: str) -> None:
            plan.settled.append(RowResult(row.number, coeffs, shown, FAILED, frames_dir=optional_str(frames_dir),
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
                                              frames_dir=optional_str(frames_dir)))
                continue
            busy = next(((path, holder) for path, holder in
                         ((path, outputs.live_holder(outputs.resolved(path) if path == frames_dir else path))
                          for path in (output, frames_dir) if path is not None) if holder is not None), None)
            if busy is not None:
                plan.settled.append(RowResult(row.number, str(job.coeffs), shown, SKIPPED, frames_dir=optional_str(frames_dir),
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
        plan.tasks.append(PlannedRow(row.number, job, prepared.frame_count, prepared=prepared.without_pixels()))
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


def optional_str(path) -> Optional[str]:
    """`str(path)`, None kept (a report field)."""
    return None if path is None else str(path)


def _make_output_folder(output: Optional[Path]) -> None:
    """A batch creates the folders its MP4s and frames folders go in (`sfr render` wants them to exist)."""
    if output is not None and not output.parent.exists():
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SfrError(f"{output}: cannot create its folder ({exc.strerror or exc})") from exc
