"""The public Python API: a `Renderer` that loads models once and renders many clips.

    from sfr_cli import Renderer

    renderer = Renderer(checkpoint_dir="checkpoints", device="auto")
    for frame in renderer.frames(coeffs="talk.mat", source="face.png"):   # (256, 256, 3) uint8
        ...
    report = renderer.render(coeffs="talk.mat", source="face.png", output="talk.mp4", audio="talk.wav")

`sfr render`, `sfr batch` (every backend) and notebooks all go through it: the same checks
(`jobs.prepare_job`), the same frames, the same files. Models load on the first clip that needs
them, once per (config, checkpoint files, device, precision); the source work of a face (keypoints,
feature volume, dense-motion source features) is kept in a small LRU, so memory stays flat over any
number of clips. `render_jobs` renders many jobs, packing consecutive ones that share the model and the
source face into one stream of batches (what `sfr batch` does in-process).
"""

from __future__ import annotations

import contextlib
import numbers
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import CoefficientsError, ConfigError, MediaError
from .jobs import PreparedJob, RenderJob, RenderReport, claim_job, option_defaults, prepare_job, with_options
from .models import SOURCE_CACHE_ENTRIES, ModelCache, load_group
from .streaming import render_prepared, render_prepared_group, stream_frames
from .options import clip_rows, convert_keyword, row_named, shared_rows
from .progress import Reporter, SilentReporter

# Jobs packed into one stream at most: each holds its source image and coefficients until the group is
# done; one more group boundary per 16 clips costs one short batch.
PACK_MAX_JOBS = 16
# RenderJob fields that are the Renderer's, set once in the constructor, and a clip's (`options`' table).
SHARED_FIELDS = tuple(row.name for row in shared_rows())
PER_CLIP_FIELDS = tuple(row.name for row in clip_rows())
# Per-clip paths (str or Path); coeffs, source and source_coeffs may also be arrays.
PATH_OPTIONS = tuple(row.name for row in clip_rows()
                     if row.path and row.name not in ("coeffs", "source", "source_coeffs"))


class Renderer:
    """Renders clips with models loaded once. Settings shared by every clip go here; per-clip options
    (`preprocess`, `still`, `expression_scale`, `yaw`, `pitch`, `roll`, `fps`, `source_coeffs`, ...) go
    to `frames`/`render` under `sfr render`'s names.

    `size` is 256 or 512 px; `device` auto/cpu/cuda/cuda:N; `precision` fp32/fp16/bf16; `batch_size`
    None picks from free memory; `config` a built-in family (facerender, tiny) or a YAML path.
    Errors are `sfr_cli.errors.SfrError` kinds, with `sfr render`'s messages.
    """

    def __init__(self, checkpoint_dir=None, config: Optional[str] = None, device: str = "auto",
                 precision: str = "fp32", batch_size: Optional[int] = None, size: int = 256, *,
                 checkpoint=None, mapping=None, compile: bool = False,
                 source_cache_entries: int = SOURCE_CACHE_ENTRIES, **stage_settings):
        """`stage_settings`: the shared options frame stages add to the table (`options.shared_rows()`),
        under their `Renderer` keywords; each not given takes its `RenderJob` default."""
        given = dict(checkpoint_dir=checkpoint_dir, checkpoint=checkpoint, mapping=mapping,
                     config=None if config is None else str(config), size=int(size), batch_size=batch_size,
                     device=device, precision=precision, compile=compile, **stage_settings)
        rows = shared_rows()
        unknown = sorted(set(given) - {row.api_name for row in rows})
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; Renderer settings are "
                              f"{', '.join(row.api_name for row in rows)} (per-clip options go to frames/render)")
        defaults = option_defaults()
        self.settings = {}
        for row in rows:
            value = given.get(row.api_name, defaults[row.name])
            self.settings[row.name] = _path(value, row.api_name) if row.path else convert_keyword(row, value)
        self.models = ModelCache(source_cache_entries)

    def job(self, coeffs, source, **options) -> RenderJob:
        """The `RenderJob` of one clip: this renderer's settings and `options` (`sfr render`'s names)."""
        unknown = sorted(set(options) - set(PER_CLIP_FIELDS))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; per-clip options are "
                              f"{', '.join(name for name in PER_CLIP_FIELDS if name not in ('coeffs', 'source'))}")
        for name in PATH_OPTIONS:
            if options.get(name) is not None:
                options[name] = _file_argument(name, options[name], "a path (str or Path)")
        if options.get("source_coeffs") is not None:
            options["source_coeffs"] = _coefficients_argument("source_coeffs", options["source_coeffs"],
                                                              "(70|73,), (N, 70|73) or (N, 70|73, 27)")
        for name in ("yaw", "pitch", "roll"):
            if options.get(name) is not None:
                options[name] = _degrees(name, options[name])
        for name in set(options) - {"yaw", "pitch", "roll", "source_coeffs", *PATH_OPTIONS}:
            options[name] = convert_keyword(row_named(name), options[name])
        coeffs = _coefficients_argument("coeffs", coeffs, "(N, 70|73) or windows (N, 70|73, 27)")
        source = _source_argument(source)
        return RenderJob.make(coeffs=coeffs, source=source, **options, **self.settings)

    def frames(self, coeffs, source, **options) -> Iterator[np.ndarray]:
        """Yield the clip's frames in order, `(H, W, 3) uint8 RGB`: what `sfr render --frames-dir` writes,
        every frame stage included (paste-back with `paste_into`/`crop_box`, ...). Everything is checked
        and loaded before the first frame (this is not lazy about errors)."""
        from .engine import ClipMotion

        prepared = prepare_job(self.job(coeffs, source, **options), in_memory=True, sources=self.models.source_images)
        engine, state = load_group([prepared], self.models)
        clip = ClipMotion(prepared.semantics, prepared.yaw, prepared.pitch, prepared.roll)
        return ClipFrames(_frames_only(stream_frames(engine, state, [clip], [prepared.stages])), prepared)

    def render(self, coeffs, source, output=None, frames_dir=None, audio=None, *,
               reporter: Optional[Reporter] = None, **options) -> RenderReport:
        """Write the clip like `sfr render` (MP4 and/or PNG frames, atomically) and return its report."""
        job = self.job(coeffs, source, output=output, frames_dir=frames_dir, audio=audio, **options)
        return self.render_job(job, reporter)

    def render_job(self, job: Union[RenderJob, PreparedJob], reporter: Optional[Reporter] = None) -> RenderReport:
        """Render a ready `RenderJob` (its shared settings replaced by this renderer's), or a job planned
        already (`jobs.PreparedJob`, unclaimed: `sfr batch`'s plan, made with this renderer's settings):
        its outputs are claimed and it renders as planned, not checked again."""
        reporter = reporter if reporter is not None else SilentReporter()
        return render_prepared(self._ready(job, reporter), reporter, self.models)

    def _ready(self, job: Union[RenderJob, PreparedJob], reporter: Reporter) -> PreparedJob:
        """A job checked (once) and its outputs claimed."""
        if isinstance(job, PreparedJob):
            return claim_job(job, reporter.note)
        return prepare_job(with_options(job, **self.settings), reporter.note, claim=True,
                           sources=self.models.source_images)

    def render_jobs(self, jobs: Sequence[Union[RenderJob, PreparedJob]], reporter: Optional[Reporter] = None,
                    on_start: Optional[Callable[[int], None]] = None
                    ) -> Iterator[Tuple[int, Union[RenderReport, Exception]]]:
        """Render many ready `RenderJob`s (shared settings replaced by this renderer's) or planned jobs (as
        `render_job` takes them); yield
        `(index in jobs, RenderReport)` as each job's outputs are committed, or `(index, error)` when it
        fails (its checks, its sinks, the model or the render), every job exactly once, in order.

        Consecutive jobs that share the model and the source face (`ModelCache.pack_key`: same face
        pixels and source coefficients) are packed: their frames run as one stream of batches, so a batch
        may end one clip and begin the next. On a GPU this fills the batches of clips shorter than a batch
        and keeps the GPU busy between clips; at batch size 1 (a CPU's default) it renders the same batches
        as one job at a time. A job failing its checks breaks the run of packed jobs and fails alone.
        `on_start(index)` is called when a job's turn comes: before its checks, or, when they ran ahead
        while an earlier group waited to render (the next job's checks decide whether it joins), as it
        joins that group or once that group is done. Close the generator (or run it to the end) to
        release open outputs at once when stopping early.
        """
        reporter = reporter if reporter is not None else SilentReporter()
        group: List[Tuple[int, PreparedJob]] = []
        key = None

        def flush():
            indices = [index for index, _ in group]
            outcomes = render_prepared_group([prepared for _, prepared in group], reporter, self.models)
            with contextlib.closing(outcomes):
                for position, outcome in outcomes:
                    yield indices[position], outcome
            group.clear()

        try:
            for index, job in enumerate(jobs):
                if not group and on_start is not None:
                    on_start(index)  # its turn has come: nothing is waiting to render
                prepared = None
                try:
                    prepared = self._ready(job, reporter)
                    error = None
                    job_key = self.models.pack_key(prepared)
                except Exception as exc:  # SfrError or a bug: this job's outcome (the caller decides how loud)
                    if prepared is not None:
                        prepared.release()
                    prepared, error = None, exc
                if group:  # checked ahead while a group waits: render that group first unless this job joins it
                    if error is not None or job_key != key or len(group) >= PACK_MAX_JOBS:
                        yield from flush()
                    if on_start is not None:
                        on_start(index)
                if error is not None:
                    yield index, error
                    continue
                group.append((index, prepared))
                key = job_key
            yield from flush()
        finally:  # closed early: jobs checked but never rendered give up their outputs' claims
            for _, prepared in group:
                prepared.release()


class ClipFrames:
    """What `Renderer.frames` returns: an iterator of the clip's frames, with `stages` (what its frame stages
    report, as `--json`: `enhancer_noise_seed`, the drawn seed that replays the frames, ...) and `notes`."""

    def __init__(self, frames: Iterator[np.ndarray], prepared: PreparedJob):
        self._frames = frames
        self._prepared = prepared
        self.notes: List[str] = prepared.notes

    @property
    def stages(self) -> Dict[str, object]:
        from .stages import stage_reports

        return stage_reports(self._prepared.stages)

    def __iter__(self) -> "ClipFrames":
        return self

    def __next__(self) -> np.ndarray:
        return next(self._frames)

    def close(self) -> None:
        self._frames.close()


def _frames_only(tagged: Iterator[Tuple[int, object]]) -> Iterator[np.ndarray]:
    for _, frame in tagged:
        if isinstance(frame, Exception):  # a frame stage failed
            raise frame
        yield frame


def _path(value, name: str) -> Optional[Path]:
    return None if value is None else _file_argument(name, value, "a path (str or Path)")


def _file_argument(name: str, value, accepted: str) -> Path:
    """`value` as a Path, or ConfigError naming the argument `name` and what it takes (`accepted`)."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ConfigError(f"{name}: got {type(value).__name__} {_shown(value)}; {name} takes {accepted}")


def _coefficients_argument(name: str, value, shapes: str):
    """A coefficient file's Path, or the in-memory coefficients as an array (a numpy array, a list of rows,
    anything numpy can turn into numbers: a CPU torch tensor); `jobs` checks their shape and values."""
    accepted = f"a .mat/.npy path (str or Path) or coefficients as an array or list of rows, {shapes}"
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        raise ConfigError(f"{name}: got a list of {len(value)} path(s); a call renders one clip, so pass one "
                          "path (for many clips call render once per clip, or use `sfr batch`)")
    if isinstance(value, np.ndarray) or isinstance(value, (list, tuple)) or hasattr(value, "__array__"):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as exc:  # ragged lists, tensors on a GPU, ...
            raise CoefficientsError(f"{name}: cannot be read as an array ({exc}); {name} takes {accepted}") from exc
        if array.dtype.kind not in "iuf":
            raise CoefficientsError(f"{name}: an array of {array.dtype} values; {name} takes {accepted}")
        return array
    raise ConfigError(f"{name}: got {type(value).__name__} {_shown(value)}; {name} takes {accepted}")


def _source_argument(value):
    """The source face: a Path, or an image as an array (numpy, or anything numpy reads: a PIL image)."""
    accepted = "an image path (str or Path) or an (H, W, 3) RGB array (uint8, or float in [0, 1])"
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    if isinstance(value, np.ndarray) or hasattr(value, "__array__") or hasattr(value, "__array_interface__"):
        try:
            return np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise MediaError(f"source: cannot be read as an image array ({exc}); source takes {accepted}") from exc
    raise ConfigError(f"source: got {type(value).__name__} {_shown(value)}; source takes {accepted}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _degrees(name: str, value) -> Tuple[float, ...]:
    """Degrees for yaw/pitch/roll: one number, a sequence of numbers, or text like "0,20,-10"."""
    if isinstance(value, str):
        from .coeffs import parse_degrees

        try:
            return tuple(parse_degrees(value))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
    if isinstance(value, numbers.Real):
        return (float(value),)
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: got {type(value).__name__} {_shown(value)}; {name} takes degrees: a number, "
                          "a list of numbers or text like \"0,20,-10\"") from None
