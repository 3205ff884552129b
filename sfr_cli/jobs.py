"""One render job before any model loads: what it asks for (`RenderJob`), every check of it, cheapest first
(`prepare_job`), and what a finished job reports (`RenderReport`).

The order is the point. Everything a user can get wrong (config, coefficients, source image, ffmpeg,
audio, output location, checkpoint files, each frame stage's options and files) is checked before any
network loads, so a mistake costs seconds, not a model load. `streaming` then renders a `PreparedJob`.

A job is planned once: the `PreparedJob` (inputs resolved, crop box found, weights checked, frame count)
is what the render takes, in this process or, pickled, in a worker (`claim_job` claims its outputs
there). Frame stages' options ride in `job.stages` by stage name (`RenderJob.make(enhancer=...)`).
`sfr enhance`'s job, frames that already exist instead of coefficients and a face, is `enhance_jobs`'s; it
shares these checks (`check_outputs`, `check_mp4_output`, `under_claims`, `StageOptions`).
"""
from __future__ import annotations
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from . import coeffs, media, outputs
from .config import resolve_config
from .errors import ConfigError, MediaError, RenderError
from .stages import chain_output_size, default_options, option_owners, plan_stages, stage_input_files

SIZES_PX = (256, 512)


class StageOptions:
    """What a job type shares: its frame stages' options by stage name (`job.stages["enhance"]`, a stage
    module's `Options`), read and given under the option table's flat names."""

    @classmethod
    def make(cls, **given):
        """A job from the option table's names: its own fields and every stage's options (`enhancer=`,
        `paste_into=`, ...); a stage option not given takes its `Options` default."""
        owners = option_owners()
        job = cls(**{name: value for name, value in given.items() if name not in owners})
        return with_options(job, **{name: value for name, value in given.items() if name in owners})

    def option(self, name: str):
        """The value of table option `name`: a field of the job or of one of its stages' options."""
        owner = option_owners().get(name)
        return getattr(self.stages[owner] if owner is not None else self, name)


def option_defaults() -> Dict[str, object]:
    """`{table option name: its RenderJob default}` (a field's, or its stage `Options`' field's);
    required fields have none."""
    from dataclasses import MISSING, fields

    defaults = {f.name: f.default for f in fields(RenderJob) if f.default is not MISSING}
    for options in default_options().values():
        defaults.update({f.name: getattr(options, f.name) for f in fields(options)})
    return defaults


def with_options(job, **changes):
    """`job` with `changes` (the option table's names: its own fields and its stages' options)."""
    owners = option_owners()
    stages = dict(job.stages)
    for name, value in changes.items():
        owner = owners.get(name)
        if owner is None:
            continue
        if owner not in stages:
            raise TypeError(f"{type(job).__name__} has no {owner} stage (option {name})")
        stages[owner] = replace(stages[owner], **{name: value})
    return replace(job, stages=stages, **{name: value for name, value in changes.items() if name not in owners})


@dataclass(frozen=True)
class RenderJob(StageOptions):
    """Everything `sfr render` takes. Paths may be str or Path; None means "not given". Its frame stages'
    options are `stages[stage name]` (`RenderJob.make(enhancer=...)` sets them by the table's names)."""

    coeffs: Path
    source: Path
    source_coeffs: Optional[Path] = None
    output: Optional[Path] = None  # the MP4; None with frames_dir = frames only, None without = <coeffs stem>.mp4
    frames_dir: Optional[Path] = None
    audio: Optional[Path] = None
    fps: float = 25.0
    checkpoint_dir: Optional[Path] = None  # None: $SFR_CHECKPOINT_DIR or ./checkpoints
    checkpoint: Optional[Path] = None
    mapping: Optional[Path] = None
    config: Optional[str] = None  # a built-in name (facerender, tiny, ...) or a YAML path; None: facerender
    size_px: int = 256
    preprocess: str = "crop"
    still: bool = False
    expression_scale: float = 1.0
    yaw: Optional[Tuple[float, ...]] = None  # degrees, swept over the clip as SadTalker's --input_yaw
    pitch: Optional[Tuple[float, ...]] = None
    roll: Optional[Tuple[float, ...]] = None
    batch_size: Optional[int] = None  # None: the engine picks from free memory
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False  # CUDA only; ignored with a note on the CPU
    overwrite: bool = False  # replace an existing MP4 / earlier frames in frames_dir
    stages: Dict[str, object] = field(default_factory=default_options)  # stage name -> its Options


@dataclass
class RenderReport:
    """What a finished job wrote and how it went. `seconds` covers rendering and encoding (model load
    excluded); `frames_per_second` is frames / seconds."""

    output: Optional[Path]
    frames_dir: Optional[Path]
    frames: int
    seconds: float
    frames_per_second: float
    peak_rss_mib: Optional[float]
    peak_cuda_mib: Optional[float]
    device: str
    precision: str
    batch_size: int
    notes: List[str] = field(default_factory=list)
    stages: Dict[str, object] = field(default_factory=dict)  # what the frame stages report (enhancer, ...)

    def to_json(self) -> str:
        """One JSON object (no notes): output, frames_dir, frames, seconds, frames_per_second, peak_rss_mib,
        peak_cuda_mib, device, precision, batch_size, and what the frame stages report (e.g. enhancer,
        enhancer_noise_seed)."""
        data = asdict(self)
        data.pop("notes")
        data.update(data.pop("stages"))
        for key in ("output", "frames_dir"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["seconds"] = round(self.seconds, 3)
        data["frames_per_second"] = round(self.frames_per_second, 3)
        return json.dumps(data)


# ---------------------------------------------------------------------------------------------------
# Checks that run before anything loads


def output_paths(job: RenderJob) -> Tuple[Optional[Path], Optional[Path]]:
    """(MP4 path or None, frames folder or None): `<coeffs stem>.mp4` here when neither is given."""
    output = Path(job.output) if job.output is not None else None
    frames_dir = Path(job.frames_dir) if job.frames_dir is not None else None
    if output is None and frames_dir is None:
        output = Path(Path(job.coeffs).stem + ".mp4")
    return output, frames_dir


def job_inputs(job: RenderJob, config_file: Optional[Path] = None) -> List[outputs.JobInput]:
    """The files `job` reads that the user named, with their options (the config's YAML too), and the
    files its frame stages read (each stage module's `input_files`)."""
    named = [(job.coeffs, "--coeffs"), (job.source, "--source"), (job.source_coeffs, "--source-coeffs"),
             (job.audio, "--audio"), (job.checkpoint, "--checkpoint"), (job.mapping, "--mapping"),
             (config_file, "--config")]
    given = [outputs.JobInput(Path(path), role) for path, role in named
             if path is not None and not isinstance(path, np.ndarray)]  # the API's arrays are no files
    return given + stage_job_inputs(job, given)


def stage_job_inputs(job, known: Sequence[outputs.JobInput] = ()) -> List[outputs.JobInput]:
    """The files the frame stages of `job` read (`stages.stage_input_files`: the enhancer's weights, the
    paste-back picture, ...) that `known` does not list yet, as inputs no output may be."""
    seen = {Path(item.path) for item in known}
    found = []
    for path, role in stage_input_files(job):
        if not isinstance(path, np.ndarray) and Path(path) not in seen:
            seen.add(Path(path))
            found.append(outputs.JobInput(Path(path), role))
    return found


def check_outputs(output: Optional[Path], frames_dir: Optional[Path], inputs: Sequence[outputs.JobInput], *,
                  overwrite: bool, note=None, claims: Optional[List[outputs.OutputClaim]] = None) -> None:
    """Refuse outputs that are inputs, not regular files, or already there (unless `overwrite`); with
    `note`, first remove the leftovers of killed earlier runs for these outputs and say so. With `claims`
    (a list), first claim each output for this job (`outputs.OutputClaim`, appended to it; OutputBusy
    when another live run holds one): then leftovers are removed and "exists" judged under the claim.
    An output whose folder does not exist yet is not claimed (its final rename still replaces nothing)."""
    if claims is not None:
        for path in (output, frames_dir):
            if path is not None and path.absolute().parent.is_dir():
                claims.append(outputs.OutputClaim(outputs.resolved(path) if path == frames_dir else path).acquire())
    if output is not None:
        if note is not None:
            removed = outputs.remove_leftovers(output)
            if removed:
                note(outputs.describe_leftovers(output, removed))
        outputs.check_output(output, inputs, overwrite=overwrite)
    if output is not None and frames_dir is not None:
        outputs.check_output_not_in_folder(output, frames_dir, media.is_frame_name)
    if frames_dir is not None:
        if note is not None:
            removed = (outputs.remove_leftovers(outputs.resolved(frames_dir))  # a killed run's frames folder
                       + outputs.remove_leftovers_in(frames_dir, media.is_frame_name))  # sfr's older per-frame ones
            if removed:
                note(outputs.describe_leftovers(frames_dir, removed))
        outputs.check_folder_holds_no_input(frames_dir, inputs, media.is_frame_name)
        media.check_frames_dir(frames_dir, overwrite=overwrite)


def describe_os_error(exc: OSError) -> str:
    """A user's message for an OSError met while checking a job (a folder without permission, ...)."""
    where = exc.filename if exc.filename is not None else "a path of this job"
    if isinstance(exc, PermissionError):
        return f"{where}: permission denied; give sfr access to it, or choose another path"
    return f"{where}: {exc.strerror or exc}"


def _pose(degrees: Optional[Sequence[float]], frame_count: int) -> Optional[np.ndarray]:
    return None if degrees is None else coeffs.camera_pose_sequence(degrees, frame_count)


# ---------------------------------------------------------------------------------------------------
# The job


@dataclass
class PreparedJob:
    """A job after every check, before any model: the planned job, what `render_prepared` streams and
    `Renderer.frames` yields. Planned once (`plan_job`: inputs resolved, the crop box found, the weight
    files checked, the frame count known) and picklable while unclaimed, so `sfr batch`'s plan hands it to
    the render and to worker processes as it is; `claim_job` claims its outputs where it renders.
    `image` is the source `(3, S, S) float32 in [0, 1]`, None once `without_pixels` (read again by
    `source_image`); `output`/`frames_dir` are where it will write (both None for frames kept in memory);
    `files` are the checkpoint files found; `inputs` every file it reads (outputs must be none of them)."""

    job: RenderJob
    config: object  # config.ModelConfig
    files: object  # checkpoints.CheckpointFiles
    semantics: object  # coeffs.Semantics
    image: Optional[np.ndarray]
    yaw: Optional[np.ndarray]
    pitch: Optional[np.ndarray]
    roll: Optional[np.ndarray]
    output: Optional[Path]
    frames_dir: Optional[Path]
    ffmpeg: Optional[str]
    compile_decoder: bool
    notes: List[str]
    stages: List = field(default_factory=list)  # the frame stages, in chain order (`stages` package)
    frame_size: Tuple[int, int] = (0, 0)  # (width, height) of the frames written: after the last stage
    claims: List[outputs.OutputClaim] = field(default_factory=list)  # held until `release()`
    inputs: List[outputs.JobInput] = field(default_factory=list)  # every file the job reads

    def release(self) -> None:
        """Give up this job's claims on its outputs (after its commit or failure); idempotent."""
        release_claims(self.claims)

    @property
    def frame_count(self) -> int:
        return self.semantics.frame_count

    def source_image(self, sources=None) -> np.ndarray:
        """The source face `(3, S, S) float32`, read again (through `sources`, a `models.SourceImages`)
        when the plan dropped it."""
        if self.image is None:
            self.image = read_source(self.job.source, self.job.size_px, sources)
        return self.image

    def without_pixels(self) -> "PreparedJob":
        """This planned job without the source pixels (a long batch plan keeps thousands; the render reads
        the face again, checked already). Unclaimed jobs only: claims stay with their process."""
        if self.claims:
            raise ValueError("a claimed job stays whole")
        return replace(self, image=None, notes=list(self.notes))

    @property
    def fps(self) -> float:
        return self.job.fps

    @property
    def audio(self) -> Optional[Path]:
        return self.job.audio

    audio_copy = False  # a render's sound is always encoded to AAC
    exact_count = True  # the engine yields exactly `frame_count` frames (the sinks check it)


def read_driving(value) -> Tuple[np.ndarray, str]:
    """Coefficients from a file path, or an `(N, 70|73)` / `(N, C, 27)` array; (array, name for messages)."""
    if isinstance(value, np.ndarray):
        return coeffs.check_coefficients(value, "coefficients array"), "the coefficients array"
    return coeffs.read_coefficients(value), str(value)


def read_source_row(value) -> np.ndarray:
    """The source face's own coefficients `(C,) float32` from a file path, or from an array: one row
    `(C,)`, or rows `(N, C)` / windows `(N, C, 27)` whose first frame is taken, as from a file."""
    if not isinstance(value, np.ndarray):
        return coeffs.read_source_coefficients(value)
    array = coeffs.check_coefficients(value[None] if value.ndim == 1 else value, "the source coefficients array")
    return np.array(array[0] if array.ndim == 2 else array[0, :, coeffs.SEMANTIC_RADIUS], dtype=np.float32)


def read_source(value, size_px: int, sources=None) -> np.ndarray:
    """The source face from an image path (through `sources`, a `models.SourceImages`, when given), or an
    `(H, W, 3)` RGB array (uint8, or float in [0, 1])."""
    if isinstance(value, np.ndarray):
        return media.source_from_array(value, size_px)
    if sources is not None:
        return sources.read(value, size_px)
    return media.read_source_image(value, size_px)


def release_claims(claims: Sequence[outputs.OutputClaim]) -> None:
    """Give up `claims` on outputs (after a commit or a failure); idempotent."""
    for claim in claims:
        claim.release()


PreparedT = TypeVar("PreparedT")


def under_claims(prepare: Callable[[List[outputs.OutputClaim]], PreparedT]) -> PreparedT:
    """`prepare(claims)`, which appends the claims it takes, with them kept on its result (`.claims`) or,
    when a check fails, released; a folder refusing access becomes a MediaError, as any user error."""
    claims: List[outputs.OutputClaim] = []
    try:
        prepared = prepare(claims)
    except PermissionError as exc:
        release_claims(claims)
        raise MediaError(describe_os_error(exc)) from exc
    except BaseException:
        release_claims(claims)
        raise
    prepared.claims = claims
    return prepared


def check_encodable_size(width_px: int, height_px: int) -> None:
    """Refuse frames larger than libx264 encodes (`media.MAX_SIDE_PX` a side, after the odd-size padding)
    before anything renders: ffmpeg would fail "invalid width x height" after the last frame."""
    padded = (width_px + width_px % 2, height_px + height_px % 2)
    if max(padded) > media.MAX_SIDE_PX:
        raise MediaError(f"{width_px}x{height_px} frames: too large for an H.264 MP4 (at most {media.MAX_SIDE_PX} "
                         "pixels a side); choose a smaller picture or crop box, or write --frames-dir only")


def check_mp4_output(output: Path, width_px: int, height_px: int, note: Callable[[str], None]) -> None:
    """An MP4 output's own checks: its folder writable (or creatable: the MP4 writer creates it, as
    `--frames-dir` and `sfr batch` create theirs), a size libx264 takes, and a note when the frames' size is
    odd."""
    check_encodable_size(width_px, height_px)
    media.check_output_writable(output, folder_created=True)
    if width_px % 2 or height_px % 2:
        note(f"{width_px}x{height_px} frames: the MP4 repeats the last "
             f"{'column' if width_px % 2 else 'row'}{' and row' if width_px % 2 and height_px % 2 else ''} "
             "(H.264 yuv420p needs even sizes); PNG frames keep the exact size")


def claim_job(prepared: PreparedJob, note=None) -> PreparedJob:
    """Claim the outputs of a job planned earlier without claims (`sfr batch`'s plan): each output is
    claimed for the job's life (OutputBusy when another live run holds one), the leftovers of killed runs
    removed (said through `note` and the job's notes), and "exists" judged again under the claims, as
    `prepare_job(claim=True)` does. Release with `PreparedJob.release()`."""
    def noted(message: str) -> None:
        prepared.notes.append(message)
        if note is not None:
            note(message)

    def claim(claims: List[outputs.OutputClaim]) -> PreparedJob:
        check_outputs(prepared.output, prepared.frames_dir, prepared.inputs, overwrite=prepared.job.overwrite,
                      note=noted, claims=claims)
        return prepared

    return under_claims(claim)


def prepare_job(job: RenderJob, note=None, *, in_memory: bool = False, claim: bool = False,
                sources=None) -> PreparedJob:
    """Every check `sfr render` makes, cheapest first, loading no model; raises SfrError kinds. With
    `in_memory` the job writes no files (the caller keeps its frames). `note(message)` hears notes.
    A missing MP4 folder is fine when it can be created. With `claim` the job's outputs are claimed first
    (OutputBusy when another live run writes one) and stay claimed until `PreparedJob.release()`, which
    whoever renders it calls; a check failing releases them. A folder refusing access is a MediaError, as
    any user error. `sources`: a cache of source images (`models.SourceImages`, the Renderer's)."""
    return under_claims(lambda claims: _prepare_job(job, note, in_memory, claims if claim else None, sources))


def _prepare_job(job: RenderJob, note, in_memory: bool, claims: Optional[List[outputs.OutputClaim]],
                 sources) -> PreparedJob:
    notes: List[str] = []

    def noted(message: str) -> None:
        notes.append(message)
        if note is not None:
            note(message)

    if job.size_px not in SIZES_PX:
        raise ConfigError(f"size {job.size_px} px is not supported; SadTalker renders 256 or 512")
    if job.batch_size is not None and job.batch_size < 1:
        raise RenderError(f"batch size {job.batch_size}: must be at least 1 (or auto)")
    media.check_fps(job.fps)
    coeffs.check_expression_scale(job.expression_scale)
    if in_memory:
        output = frames_dir = None
    elif isinstance(job.coeffs, np.ndarray) and job.output is None and job.frames_dir is None:
        raise MediaError("coefficients given as an array: name the output (output= or frames_dir=)")
    else:
        output, frames_dir = output_paths(job)
    if job.audio is not None and output is None:
        raise MediaError(f"{job.audio}: --audio needs an MP4 output; add -o/--output PATH.mp4")
    config = resolve_config(job.config, job.preprocess)
    inputs = job_inputs(job, config.path)
    check_outputs(output, frames_dir, inputs, overwrite=job.overwrite, note=noted, claims=claims)

    driving, driving_name = read_driving(job.coeffs)
    if job.source_coeffs is not None:
        source_row = read_source_row(job.source_coeffs)
    else:
        first = driving[0] if driving.ndim == 2 else driving[0, :, coeffs.SEMANTIC_RADIUS]
        source_row = np.array(first, dtype=np.float32)
        noted(f"source coefficients: first frame of {driving_name} (pass --source-coeffs for the source's own)")
    semantics = coeffs.prepare_semantics(driving, source_row, preprocess=job.preprocess, still=job.still,
                                         expression_scale=job.expression_scale)
    frame_count = semantics.frame_count
    yaw, pitch, roll = (_pose(d, frame_count) for d in (job.yaw, job.pitch, job.roll))
    image = read_source(job.source, job.size_px, sources)
    stages = plan_stages(job, job.size_px, noted)
    frame_width, frame_height = chain_output_size(stages, job.size_px, job.size_px)

    ffmpeg = None
    if output is not None:
        ffmpeg = media.find_ffmpeg()
        check_mp4_output(output, frame_width, frame_height, noted)
        if job.audio is not None:
            audio = media.probe_audio(job.audio, ffmpeg)
            video_seconds = frame_count / job.fps
            if audio.duration_seconds is not None and audio.duration_seconds < video_seconds - 0.1:
                noted(f"{job.audio}: {audio.duration_seconds:.2f} s of audio for {video_seconds:.2f} s of video; "
                      "the end is silent")

    from . import checkpoints  # torch from here on

    files = checkpoints.find_checkpoints(job.checkpoint_dir, size_px=job.size_px, preprocess=job.preprocess,
                                         checkpoint=job.checkpoint, mapping=job.mapping)
    found = [outputs.JobInput(files.renderer, "renderer checkpoint"),
             outputs.JobInput(files.mapping, "mapping checkpoint")]
    check_outputs(output, frames_dir, found, overwrite=True)  # the files found in --checkpoint-dir
    inputs = inputs + found
    if output is not None:  # after every check that protects an input: that message matters more
        media.check_mp4_name(output)
    from .engine import check_precision, resolve_device

    device = resolve_device(job.device)
    check_precision(job.precision, device)  # an unavailable device or precision fails here
    compile_decoder = job.compile and device.type == "cuda"
    if job.compile and not compile_decoder:
        noted(f"--compile is ignored on {device.type}: torch.compile speeds up CUDA renders only")
    return PreparedJob(job=job, config=config, files=files, semantics=semantics, image=image, yaw=yaw,
                       pitch=pitch, roll=roll, output=output, frames_dir=frames_dir, ffmpeg=ffmpeg,
                       compile_decoder=compile_decoder, notes=notes, stages=stages,
                       frame_size=(frame_width, frame_height), inputs=inputs)
