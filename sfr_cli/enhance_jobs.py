"""One `sfr enhance` job before any model loads: what it asks for (`EnhanceJob`: frames that already exist,
a video or a folder of pictures, instead of coefficients and a face), every check of it, cheapest first
(`prepare_enhance`), and the checked job `streaming.render_enhance` takes (`PreparedEnhance`).

The outputs' checks and claims are `sfr render`'s, shared from `jobs`: the same messages, the same
guarantees about files.
"""
from __future__ import annotations
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import media, outputs
from .errors import MediaError, RenderError
from .jobs import StageOptions, check_mp4_output, check_outputs, release_claims, stage_job_inputs, under_claims
from .stages import chain_output_size, default_options, plan_stages

def frame_stage_options() -> Dict[str, object]:
    """The stages `sfr enhance` runs on existing frames, their options at the defaults."""
    return default_options(frames_in=True)


@dataclass(frozen=True)
class EnhanceJob(StageOptions):
    """Everything `sfr enhance` takes: frames in (a video, or a folder of pictures), where to write, and
    the options of the frame stages that run on existing frames (`stages`, as `RenderJob`'s: the same
    names; `EnhanceJob.make(input=..., enhancer="gfpgan")`). No stage asked: the frames are copied."""

    input: Path
    output: Optional[Path] = None  # the MP4; None with frames_dir = frames only, None without = <input>_enhanced.mp4
    frames_dir: Optional[Path] = None
    fps: Optional[float] = None  # None: the video's own rate (a frames folder: 25)
    checkpoint_dir: Optional[Path] = None  # where the enhancer's weights are looked for, as for sfr render
    batch_size: Optional[int] = None  # frames per batch (None: 4 on a CPU, 16 on CUDA)
    device: str = "auto"
    precision: str = "fp32"
    overwrite: bool = False
    stages: Dict[str, object] = field(default_factory=frame_stage_options)  # stage name -> its Options


@dataclass
class PreparedEnhance:
    """An `EnhanceJob` after every check, before any model: its frame source (`media.FrameSource`), planned
    stages, frame size, outputs (claimed until `release()`), rate and sound."""

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
    exact_count = False  # `frame_count` is counted before decoding (a joined or looped video may differ)

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
    return under_claims(lambda claims: _prepare_enhance(job, note, claims))


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
    stages = plan_stages(job, source.width_px, noted)
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
    if output is not None:  # after every check that protects an input, as sfr render's
        media.check_mp4_name(output)
    from .engine import check_precision, resolve_device

    check_precision(job.precision, resolve_device(job.device))
    return PreparedEnhance(job=job, source=source, stages=stages, frame_size=(frame_width, frame_height), output=output,
                           frames_dir=frames_dir, fps=fps, audio=audio, audio_copy=audio_copy, ffmpeg=ffmpeg, notes=notes)
