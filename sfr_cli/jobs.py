"""One render job before any model loads: what it asks for (`RenderJob`), every check of it, cheapest first
(`prepare_job`), and what a finished job reports (`RenderReport`).

The order is the point. Everything a user can get wrong (config, coefficients, source image, ffmpeg,
audio, output location, checkpoint files, each frame stage's options and files) is checked before any
network loads, so a mistake costs seconds, not a model load. `streaming` then renders a `PreparedJob`.
"""
from __future__ import annotations
import collections
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from . import coeffs, media, outputs
from .config import resolve_config
from .errors import ConfigError, MediaError, RenderError
from .stages import chain_output_size, plan_stages, stage_input_files

SIZES_PX = (256, 512)


@dataclass(frozen=True)
class RenderJob:
    """Everything `sfr render` takes. Paths may be str or Path; None means "not given"."""

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
    paste_into: Optional[Path] = None  # the original picture: frames are pasted back into it (its size)
    crop_box: Optional[Tuple[int, int, int, int]] = None  # x1,y1,x2,y2 in it; None with paste_into: found
    enhancer: Optional[str] = None  # the face enhancer after paste-back: "gfpgan" (SadTalker's) or None
    enhancer_dir: Optional[Path] = None  # its weights' folder; None: searched beside the checkpoints
    enhancer_upscale: int = 2  # 2: twice the size, as SadTalker; 1: the frames' own size
    enhancer_noise: str = "stored"  # StyleGAN2 noise: "stored" in the weights file, or "random" per face
    enhancer_seed: Optional[int] = None  # the random noise's seed (None: drawn, and reported)


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
    """The files `job` reads that the user named, with their options (the config's YAML too)."""
    named = [(job.coeffs, "--coeffs"), (job.source, "--source"), (job.source_coeffs, "--source-coeffs"),
             (job.audio, "--audio"), (job.checkpoint, "--checkpoint"), (job.mapping, "--mapping"),
             (config_file, "--config"), (job.paste_into, "--paste-into")]
    given = [outputs.JobInput(Path(path), role) for path, role in named
             if path is not None and not isinstance(path, np.ndarray)]  # the API's arrays are no files
    return given + stage_job_inputs(job, given)


def stage_job_inputs(job, known: Sequence[outputs.JobInput] = ()) -> List[outputs.JobInput]:
    """The files the frame stages `job` asks for read (`stages.stage_input_files`: the enhancer's weights,
    the paste-back picture, ...) that `known` does not list yet, as inputs no output may be."""
    seen = {Path(item.path) for item in known}
    found = []
    for path, stage in stage_input_files(job):
        if Path(path) not in seen:
            seen.add(Path(path))
            found.append(outputs.JobInput(Path(path), f"{stage} stage's"))
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
    """A job after every check, before any model: what `render_prepared` streams and `Renderer.frames`
    yields. `image` is the source `(3, S, S) float32 in [0, 1]`; `output`/`frames_dir` are where it will
    write (both None for frames kept in memory); `files` are the checkpoint files found."""

    job: RenderJob
    config: object  # config.ModelConfig
    files: object  # checkpoints.CheckpointFiles
    semantics: object  # coeffs.Semantics
    image: np.ndarray
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

    def release(self) -> None:
        """Give up this job's claims on its outputs (after its commit or failure); idempotent."""
        release_claims(self.claims)

    @property
    def frame_count(self) -> int:
        return self.semantics.frame_count


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


SOURCE_IMAGES_KEPT = 8  # resized source images kept per cache (a 256 px one is 0.75 MiB)


class SourceImages:
    """A small LRU of resized source images keyed by (path, size, modification time, size_px), thread-safe.
    A batch checks each row, then renders it, often with one face for many clips: the Renderer's model
    cache holds one (`ModelCache.source_images`), with its source states."""

    def __init__(self, entries: int = SOURCE_IMAGES_KEPT):
        self._images: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()
        self._entries = max(0, entries)
        self._lock = threading.Lock()

    def read(self, path, size_px: int) -> np.ndarray:
        """`media.read_source_image(path, size_px)`, from the cache when the file is unchanged (a copy)."""
        try:
            info = os.stat(path)
            key = (os.path.abspath(path), info.st_size, info.st_mtime_ns, size_px)
        except OSError:
            key = None  # read_source_image says what is wrong
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key].copy()
        image = media.read_source_image(path, size_px)
        if key is not None and self._entries:
            with self._lock:
                self._images[key] = image.copy()
                while len(self._images) > self._entries:
                    self._images.popitem(last=False)
        return image


def read_source(value, size_px: int, sources: Optional[SourceImages] = None) -> np.ndarray:
    """The source face from an image path (through `sources` when given), or an `(H, W, 3)` RGB array
    (uint8, or float in [0, 1])."""
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


def _under_claims(prepare: Callable[[List[outputs.OutputClaim]], PreparedT]) -> PreparedT:
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


def stage_inputs(stages: Sequence) -> List[outputs.JobInput]:
    """The files the frame stages read (their weights), as inputs no output may be."""
    return [outputs.JobInput(path, f"{stage.name} weights") for stage in stages
            for path in getattr(stage, "input_files", ())]


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


def prepare_job(job: RenderJob, note=None, *, in_memory: bool = False, claim: bool = False,
                sources: Optional[SourceImages] = None) -> PreparedJob:
    """Every check `sfr render` makes, cheapest first, loading no model; raises SfrError kinds. With
    `in_memory` the job writes no files (the caller keeps its frames). `note(message)` hears notes.
    A missing MP4 folder is fine when it can be created. With `claim` the job's outputs are claimed first
    (OutputBusy when another live run writes one) and stay claimed until `PreparedJob.release()`, which
    whoever renders it calls; a check failing releases them. A folder refusing access is a MediaError, as
    any user error. `sources`: a cache of source images (the Renderer's)."""
    return _under_claims(lambda claims: _prepare_job(job, note, in_memory, claims if claim else None, sources))


def _prepare_job(job: RenderJob, note, in_memory: bool, claims: Optional[List[outputs.OutputClaim]],
                 sources: Optional[SourceImages]) -> PreparedJob:
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
             outputs.JobInput(files.mapping, "mapping checkpoint")] + stage_inputs(stages)
    check_outputs(output, frames_dir, found, overwrite=True)  # the files found in --checkpoint-dir
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
                       frame_size=(frame_width, frame_height))



# ---------------------------------------------------------------------------------------------------
# `sfr enhance`: the frame stages on frames that already exist


@dataclass(frozen=True)
class EnhanceJob:
    """Everything `sfr enhance` takes: frames in (a video, or a folder of pictures), the enhancer's options
    (the same names as `RenderJob`'s), and where to write."""

    input: Path
    output: Optional[Path] = None  # the MP4; None with frames_dir = frames only, None without = <input>_enhanced.mp4
    frames_dir: Optional[Path] = None
    fps: Optional[float] = None  # None: the video's own rate (a frames folder: 25)
    enhancer: str = "gfpgan"
    enhancer_dir: Optional[Path] = None
    enhancer_upscale: int = 2
    enhancer_noise: str = "stored"
    enhancer_seed: Optional[int] = None
    checkpoint_dir: Optional[Path] = None  # where the enhancer's weights are looked for, as for sfr render
    batch_size: Optional[int] = None  # frames per batch (None: 4 on a CPU, 16 on CUDA)
    device: str = "auto"
    precision: str = "fp32"
    overwrite: bool = False


@dataclass
class PreparedEnhance:
    job: EnhanceJob
    source: object  # media.FrameSource
    stages: List
    frame_size: Tuple[int, int]
    output: Optional[Path]
    frames_dir: Optional[Path]
    fps: float
    audio: Optional[Path]  # the input video, when its sound is kept
    audio_copy: bool
    ffmpeg: Optional[str]
    notes: List[str]
    claims: List[outputs.OutputClaim] = field(default_factory=list)  # held until `release()`

    @property
    def frame_count(self) -> int:
        return self.source.frame_count

    def release(self) -> None:
        """Give up the claims on the outputs (after the commit or a failure); idempotent."""
        release_claims(self.claims)


DEFAULT_ENHANCE_FPS = 25.0


def default_enhanced_name(input_path: Path) -> Path:
    """`<input name>_enhanced.mp4` here; the name of the folder itself for `.` or `..`."""
    name = input_path.name or outputs.resolved(input_path).name or "frames"
    return Path(name.rsplit(".", 1)[0] + "_enhanced.mp4")


def enhance_inputs(input_path: Path) -> List[outputs.JobInput]:
    """What `sfr enhance` reads from `--input`: the video, or every frame file of the folder: no output may
    be one of them."""
    if input_path.is_dir():
        try:
            return [outputs.JobInput(path, "--input frame") for path in media.frame_files(input_path)]
        except OSError:
            return []  # FrameSource says what is wrong
    return [outputs.JobInput(input_path, "--input")]


def check_not_the_input_folder(frames_dir: Optional[Path], input_path: Path) -> None:
    """Refuse a `--frames-dir` that is the `--input` folder under any spelling (a symlink, `f/.`, `../x/f`):
    the enhanced frames would land among (or, with --overwrite, replace) the frames being read."""
    if frames_dir is not None and input_path.is_dir() and (
            outputs.resolved(frames_dir) == outputs.resolved(input_path) or outputs.same_file(frames_dir, input_path)):
        raise MediaError(f"{frames_dir}: is the --input folder {input_path}; the enhanced frames would replace "
                         "the frames being read; choose another --frames-dir")


def check_fps_keeps_sound(fps: Optional[float], video_fps: Optional[float], input_path: Path) -> None:
    """`--fps` with the input's sound kept is refused: a new rate changes the video's length, and the sound
    would no longer match it (it was cut to the new length). The video's own rate is fine."""
    if fps is not None and (video_fps is None or abs(fps - video_fps) > 1e-6 * video_fps):
        raise MediaError(f"--fps {fps:g}: {input_path} has sound, kept in the MP4, and its video runs at "
                         f"{video_fps or 0:g} frames/s; another rate would change the video's length and the sound "
                         "would no longer match. Drop --fps, or write --frames-dir only and mux the sound yourself")


def prepare_enhance(job: EnhanceJob, note=None) -> PreparedEnhance:
    """Every check `sfr enhance` makes before any model loads (input, outputs, ffmpeg, the weights). The
    outputs are claimed for the job's life, as `sfr render`'s (`PreparedEnhance.release()` ends it; a
    check failing releases them); a folder refusing access is a MediaError."""
    return _under_claims(lambda claims: _prepare_enhance(job, note, claims))


def _prepare_enhance(job: EnhanceJob, note, claims: List[outputs.OutputClaim]) -> PreparedEnhance:
    notes: List[str] = []

    def noted(message: str) -> None:
        notes.append(message)
        if note is not None:
            note(message)

    if job.batch_size is not None and job.batch_size < 1:
        raise RenderError(f"batch size {job.batch_size}: must be at least 1 (or auto)")
    if job.fps is not None:
        media.check_fps(job.fps)
    if not str(job.input).strip():
        raise MediaError("--input is empty; give a video or a folder of frames")
    input_path = Path(job.input)
    output = Path(job.output) if job.output is not None else None
    frames_dir = Path(job.frames_dir) if job.frames_dir is not None else None
    if output is None and frames_dir is None:
        output = default_enhanced_name(input_path)
    inputs = enhance_inputs(input_path) + stage_job_inputs(job)
    check_not_the_input_folder(frames_dir, input_path)
    check_outputs(output, frames_dir, inputs, overwrite=job.overwrite, note=noted, claims=claims)
    ffmpeg = media.find_ffmpeg() if output is not None or input_path.is_file() else None
    source = media.FrameSource(input_path, ffmpeg)
    for message in source.notes:
        noted(message)
    fps = job.fps or source.fps or DEFAULT_ENHANCE_FPS
    stages = plan_stages(job, source.width_px, noted, kinds=("enhance",))
    frame_width, frame_height = chain_output_size(stages, source.width_px, source.height_px)
    audio, audio_copy = None, False
    if output is not None:
        check_mp4_output(output, frame_width, frame_height, noted)
        if source.files is None:
            try:
                info = media.probe_audio(input_path, ffmpeg)
            except MediaError:
                info = None  # a silent video
            if info is not None:
                check_fps_keeps_sound(job.fps, source.fps, input_path)
                audio, audio_copy = input_path, info.codec == "aac"
                noted(f"sound of {input_path} kept ({'copied as it is' if audio_copy else f'{info.codec} encoded to AAC'})")
    check_outputs(output, frames_dir, stage_inputs(stages), overwrite=True)
    if output is not None:  # after every check that protects an input, as sfr render's
        media.check_mp4_name(output)
    from .engine import check_precision, resolve_device

    check_precision(job.precision, resolve_device(job.device))
    return PreparedEnhance(job=job, source=source, stages=stages, frame_size=(frame_width, frame_height), output=output,
                           frames_dir=frames_dir, fps=fps, audio=audio, audio_copy=audio_copy, ffmpeg=ffmpeg, notes=notes)
