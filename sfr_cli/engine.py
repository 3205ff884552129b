"""The render loop: source work once, frames in batches along the frame axis, precision, OOM back-off.

The engine knows devices and batches; it yields batches of ``(B, S, S, 3) uint8`` frames on the render
device (``launch_clips``, what the frame stages take) or frames on the host (``render_clips``), in order,
and reports progress through a callback. It reads no files, prints nothing, leaves the networks it is given as
they were (it renders from its own rewritten copies) and sets no process-wide torch state: the entry
points call ``configure_torch`` once.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass, field
from bisect import bisect_right
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .checkpoints import Networks
from .errors import RenderError
from .nets.geometry import transform_keypoints
from .nets.inference import detached_copy, optimize_generator, optimize_kp_detector

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BF16_MIN_CAPABILITY = 8  # CUDA compute capability major version with native bf16 (Ampere and later)
CUDA_MAX_AUTO_BATCH = 64
CUDA_MEMORY_HEADROOM = 0.8  # share of free memory an automatic batch may plan to use
# The engine's steps, as a step hook sees them (not the frame stages after the engine, `stages/`):
SOURCE_STEP = "source"  # around prepare_source
RENDER_STEPS = ("mapping_keypoints", "dense_motion", "decoder", "transfer")  # around each batch's steps
COMPILE_SCOPES = ("none", "decoder", "all")

StepHook = Callable[[str], ContextManager]


def configure_torch(device: torch.device) -> None:
    """Process-wide torch settings for rendering on ``device``; each entry point (``sfr render``,
    ``sfr bench``, a Renderer) calls it once before building an Engine.

    CPU: denormal floats are flushed to zero (they slow CPU convolutions up to ten-fold and are
    < 1e-37, far below a uint8 level). CUDA: cuDNN picks the fastest convolution algorithm for each
    shape once (``cudnn.benchmark``); the batch shapes repeat, so the search pays for itself. fp32 means
    fp32: TF32 tensor-core arithmetic (torch's default for cuDNN convolutions) is turned off, since its
    10-bit mantissa moved frames 2 levels from SadTalker's; fp16 and bf16 are the fast precisions.
    """
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@dataclass(frozen=True)
class BatchPolicy:
    """How a device runs a batch of frames: the one place where CPU and CUDA differ.

    ``motion_frames``: frames per call of the mapping net, keypoint math and dense motion network
    (None: the whole batch). On a CPU they run frame by frame: CPU kernels pick their reduction order
    by batch size, so this keeps every frame bit-identical whatever batch it came in, and costs
    nothing (a CPU's convolutions are already parallel inside one frame). The decoder runs batched
    everywhere (its convolutions are batch-invariant on a CPU). On CUDA the whole batch runs at once:
    a GPU needs the batch to fill its cores, and frames agree across batch sizes within float rounding.

    ``auto_batch``: the batch size ``--batch-size auto`` means (None: planned from free GPU memory
    after measuring one frame). A CPU gains nothing from batching, so 1.

    ``launch_ahead``: launch the next batch before the frames of this one are handed out, so the GPU
    works while the caller encodes. A CPU computes as it launches, so it hands frames out at once.
    """

    motion_frames: Optional[int]
    auto_batch: Optional[int]
    launch_ahead: bool = False

    @staticmethod
    def for_device(device: torch.device) -> "BatchPolicy":
        if device.type == "cpu":
            return BatchPolicy(motion_frames=1, auto_batch=1, launch_ahead=False)
        return BatchPolicy(motion_frames=None, auto_batch=None, launch_ahead=True)


@dataclass
class EngineStats:
    """What an engine's renders did so far: the size of every batch rendered, out-of-memory back-offs,
    peak memory."""

    batch_sizes: List[int] = field(default_factory=list)
    oom_retries: int = 0
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float = 0.0


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # "cpu" | "cuda" | "cuda:N" | "auto"
    precision: str = "fp32"  # "fp32" | "fp16" | "bf16"
    batch_size: Optional[int] = None  # None: chosen from the device's free memory
    optimize: bool = True  # inference rewrites that keep the math (nets/inference.py)
    compile_scope: str = "none"  # torch.compile: "none", "decoder" (--compile) or "all" (dense motion and warp too)
    channels_last: Optional[bool] = None  # the decoder in NHWC; None: on CUDA (tensor cores), off on a CPU


@dataclass
class SourceState:
    """What every frame reuses: canonical and posed source keypoints, the 3D feature volume and the
    dense-motion network's compressed source features and heatmaps (all with batch 1)."""

    kp_canonical: torch.Tensor  # (1, K, 3) float32
    kp_source: torch.Tensor  # (1, K, 3) float32
    feature_3d: torch.Tensor  # (1, C, D, h, w)
    dense: Dict[str, torch.Tensor]


POSE_NAMES = ("yaw", "pitch", "roll")


@dataclass(frozen=True)
class ClipMotion:
    """What drives one clip of a render: its ``coeffs.Semantics`` and, optionally, per-frame head angles in
    degrees ``(N,) float32`` that replace the predicted ones (``yaw``, ``pitch``, ``roll``)."""

    semantics: object
    yaw: Optional[np.ndarray] = None
    pitch: Optional[np.ndarray] = None
    roll: Optional[np.ndarray] = None

    @property
    def frame_count(self) -> int:
        return self.semantics.frame_count

    def angles(self) -> Tuple[Optional[np.ndarray], ...]:
        return self.yaw, self.pitch, self.roll

    def check(self) -> None:
        for name, values in zip(POSE_NAMES, self.angles()):
            if values is not None and len(values) != self.frame_count:
                raise RenderError(f"{name} sequence has {len(values)} values for {self.frame_count} frames")


class _ClipStream:
    """Clips laid end to end as one stream of frames; ``batch(start, stop)`` cuts any stretch of it."""

    def __init__(self, clips: Sequence[ClipMotion]):
        self.clips = list(clips)
        counts = [clip.frame_count for clip in self.clips]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self.total = self.starts[-1]
        # per angle: given by some clip? (then frames of the others carry NaN: "keep the predicted angle")
        self.given = [any(clip.angles()[k] is not None for clip in self.clips) for k in range(len(POSE_NAMES))]

    def clip_at(self, position: int) -> int:
        """The clip holding stream frame ``position`` (empty clips hold none)."""
        return bisect_right(self.starts, position) - 1

    def batch(self, start: int, stop: int):
        """Stream frames ``start .. stop-1`` -> (windows ``(B, C, 27)``, (yaw, pitch, roll) each ``(B,)`` or
        None, the clip index of each frame)."""
        windows, owners = [], []
        angles: List[list] = [[] for _ in POSE_NAMES]
        position = start
        while position < stop:
            index = self.clip_at(position)
            clip = self.clips[index]
            first = position - self.starts[index]
            last = min(stop, self.starts[index + 1]) - self.starts[index]
            windows.append(clip.semantics.windows(first, last))
            owners.extend([index] * (last - first))
            for k, values in enumerate(clip.angles()):
                if self.given[k]:
                    angles[k].append(np.full(last - first, np.nan, np.float32) if values is None
                                     else np.asarray(values[first:last], np.float32))
            position += last - first
        joined = windows[0] if len(windows) == 1 else np.concatenate(windows)
        return joined, [np.concatenate(a) if self.given[k] else None for k, a in enumerate(angles)], owners


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RenderError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RenderError(f"device {name!r} asked for, but this torch sees no CUDA GPU "
                              f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RenderError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise RenderError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise RenderError(f"unknown precision {precision!r}; use fp32, fp16 or bf16")
    if device.type == "cpu" and precision == "fp16":
        raise RenderError("fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    # bf16 arithmetic needs compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() also says yes
    # for older cards such as the T4 (7.5), where bf16 only runs emulated, slowly
    if device.type == "cuda" and precision == "bf16" and torch.cuda.get_device_capability(device)[0] < BF16_MIN_CAPABILITY:
        raise RenderError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or fp32")
    return PRECISIONS[precision]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2 ** 20


OUT_OF_MEMORY = object()  # what `attempt` returns when the device ran out of memory


def attempt(run: Callable, *args, **kwargs):
    """`run(*args, **kwargs)`, or `OUT_OF_MEMORY` when CUDA ran out of memory: the caller recovers outside
    the handler, so the failed call's tensors are freed first. Every other error propagates untouched."""
    try:
        return run(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        return OUT_OF_MEMORY


def halve_after_oom(size: int, device: torch.device, at_one: str) -> int:
    """The out-of-memory back-off of the engine and the frame stages: half of `size` (frames or faces per
    call) to retry with, the cached memory released; at 1 a RenderError "out of GPU memory on DEVICE
    <at_one>" (what failed and what to do)."""
    if size <= 1:
        raise RenderError(f"out of GPU memory on {device} {at_one}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return max(1, size // 2)


@dataclass
class DeviceFrames:
    """A launched batch on the render device: ``frames`` ``(B, S, S, 3) uint8``, the clip index of each
    frame (``owners``) and, on CUDA, an event recorded on the engine's stream once they are computed
    (work on another stream waits for it before reading them)."""

    frames: torch.Tensor
    owners: List[int]
    ready: Optional["torch.cuda.Event"] = None

    def to_host(self) -> np.ndarray:
        """The frames on the host, ``(B, S, S, 3) uint8`` (waits for them)."""
        return self.frames.cpu().numpy()


class Engine:
    """Renders frames of one source driven by a coefficient sequence.

    Keypoint detection, mapping and head-pose math run in float32 whatever ``precision`` says; the SPADE
    decoder (the heavy part) runs under autocast in the reduced precision, the dense motion network and
    warp too under fp16 but not under bf16 (see ``motion_dtype``).
    """

    def __init__(self, nets: Networks, options: EngineOptions = EngineOptions(),
                 step_hook: Optional[StepHook] = None):
        """``nets`` are read, never changed. ``step_hook(name)``, when given, returns a context manager
        entered around each step of every batch (names in ``RENDER_STEPS``) and around the source work
        (``SOURCE_STEP``); a benchmark times steps or a
        profiler marks them through it. It may be set or cleared between renders."""
        if options.batch_size is not None and options.batch_size < 1:
            raise RenderError(f"batch size must be at least 1, not {options.batch_size}")
        self.device = resolve_device(options.device)
        self.dtype = check_precision(options.precision, self.device)
        self.precision = options.precision
        self.policy = BatchPolicy.for_device(self.device)
        # The dense motion network predicts the warp's sampling grid: fp16 keeps it (51 dB against fp32 with
        # random weights), bf16's 8-bit mantissa does not (36 dB), so under bf16 it stays in fp32 (40 dB).
        self.motion_dtype = self.dtype if self.dtype == torch.float16 else torch.float32
        if options.optimize:
            kp_detector, generator = optimize_kp_detector(nets.kp_detector), optimize_generator(nets.generator)
        else:
            kp_detector, generator = detached_copy(nets.kp_detector), detached_copy(nets.generator)
        self.kp_detector = kp_detector.to(self.device).eval()
        self.generator = generator.to(self.device).eval()
        self.mapping = detached_copy(nets.mapping).to(self.device).eval()
        self.decoder = self.generator.decoder
        self.channels_last = self.device.type == "cuda" if options.channels_last is None else options.channels_last
        if self.channels_last:  # 2D convolutions only: the dense motion network's 3D ones have no NHWC
            self.decoder.to(memory_format=torch.channels_last)
        # --compile: the decoder becomes one compiled graph (its many small elementwise and layout ops
        # fused: 108 -> 155 frames/s at 256 fp16 on an H100, README), built once for a render's batch size;
        # a short last batch is padded to it rather than compiled again. Scope "all" compiles the dense
        # motion and warp as well (tiny config: right frames; not yet timed at full size).
        if options.compile_scope not in COMPILE_SCOPES:
            raise RenderError(f"unknown compile scope {options.compile_scope!r}; use one of {', '.join(COMPILE_SCOPES)}")
        self.compile_scope = options.compile_scope
        self._compiled = options.compile_scope != "none"
        self._decode_compiled = torch.compile(self._decode_eager, dynamic=False) if self._compiled else None
        self._motion_compiled = (torch.compile(self._motion_eager, dynamic=False)
                                 if options.compile_scope == "all" else None)
        # The engine's settings stay as given; what a render decides (its batch size) is that render's.
        self.batch_size = options.batch_size or self.policy.auto_batch or 0  # 0: planned for each render
        self._frame_bytes = 0  # CUDA: one frame's peak memory, measured once (the automatic batch's unit)
        self._oom_cap = 0  # the largest batch known to fit after an out-of-memory back-off (0: none yet)
        self.stats = EngineStats()
        self.step_hook = step_hook

    def _motion(self, dense, feature_3d, kp_driving):
        compiled = self._motion_compiled if self._compiled else None
        return (compiled or self._motion_eager)(dense, feature_3d, kp_driving)

    def _decode(self, features):
        return (self._decode_compiled if self._compiled else self._decode_eager)(features)

    @property
    def coeff_count(self) -> int:
        return self.mapping.coeff_nc

    def _autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _step(self, name: str) -> ContextManager:
        return contextlib.nullcontext() if self.step_hook is None else self.step_hook(name)

    @torch.inference_mode()
    def prepare_source(self, image: np.ndarray, source_window: np.ndarray) -> SourceState:
        """Source image ``(3, S, S) float32 in [0, 1]`` and its coefficient window ``(C, 27)`` -> state."""
        if source_window.shape[0] != self.coeff_count:
            raise RenderError(f"source coefficients have {source_window.shape[0]} columns but the mapping net "
                              f"takes {self.coeff_count}")
        with self._step(SOURCE_STEP):
            img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(self.device)
            window = torch.from_numpy(np.ascontiguousarray(source_window, dtype=np.float32))[None].to(self.device)
            kp_canonical = self.kp_detector(img).float()
            kp_source = transform_keypoints(kp_canonical, self.mapping(window))
            feature_3d = self.generator.encode_source(img)
            dense = self.generator.dense_motion_network.prepare_source(feature_3d, kp_source)
        return SourceState(kp_canonical, kp_source, feature_3d, dense)

    @torch.inference_mode()
    def launch_batch(self, source: SourceState, windows: np.ndarray, yaw=None, pitch=None, roll=None, *,
                     pad_to: int = 0) -> torch.Tensor:
        """Start rendering windows ``(B, C, 27)`` (B counts frames) -> ``(B, S, S, 3) uint8`` on the device.
        On CUDA the work is only queued, so the next batch can be launched before this one is read.
        ``pad_to``: with ``--compile``, the batch size the compiled graph was built for."""
        b = windows.shape[0]
        poses = [None if values is None else np.asarray(values, np.float32) for values in (yaw, pitch, roll)]
        if self._compiled and b < pad_to:
            # a compiled graph is built for one batch size: pad the short last batch with copies of its
            # last frame (dropped below) instead of compiling another graph for it
            pad = pad_to - b
            windows = np.concatenate([windows, np.repeat(windows[-1:], pad, axis=0)])
            poses = [None if p is None else np.concatenate([p, np.repeat(p[-1:], pad)]) for p in poses]
        w = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(self.device)
        angles = {name: None if values is None else torch.from_numpy(values).to(self.device)
                  for name, values in zip(("yaw", "pitch", "roll"), poses)}
        step = self.policy.motion_frames or w.shape[0]  # see BatchPolicy
        warped = []
        for start in range(0, w.shape[0], step):
            pick = slice(start, start + step)
            with self._step("mapping_keypoints"):
                pose = self.mapping(w[pick])
                kp_driving = transform_keypoints(
                    source.kp_canonical.expand(pose["t"].shape[0], -1, -1), pose,
                    **{name: None if a is None else a[pick] for name, a in angles.items()})
            with self._step("dense_motion"):
                warped.append(self._motion(source.dense, source.feature_3d, kp_driving))
        with self._step("decoder"):
            image = self._decode(torch.cat(warped) if len(warped) > 1 else warped[0])
        with self._step("transfer"):
            return self._to_uint8(image[:b])

    def render_batch(self, source: SourceState, windows: np.ndarray, yaw=None, pitch=None, roll=None) -> np.ndarray:
        """Windows ``(B, C, 27)`` (B counts frames) -> frames ``(B, S, S, 3) uint8`` on the host."""
        return self.launch_batch(source, windows, yaw, pitch, roll).cpu().numpy()

    def _motion_eager(self, dense: Dict[str, torch.Tensor], feature_3d: torch.Tensor, kp_driving: torch.Tensor):
        """Dense motion and warp: ``(B, K, 3)`` driving keypoints -> warped features ``(B, C, h, w)``."""
        with self._autocast(self.motion_dtype):
            motion = self.generator.dense_motion_network.motion(dense, kp_driving)
            return self.generator.warp(feature_3d, motion)

    def _decode_eager(self, features: torch.Tensor) -> torch.Tensor:
        """Warped features -> image ``(B, 3, S, S)`` in [0, 1]."""
        with self._autocast(self.dtype):
            if self.channels_last:
                features = features.contiguous(memory_format=torch.channels_last)
            return self.decoder(features)

    def _to_uint8(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] -> ``(B, S, S, 3) uint8`` as round(255 x value), computed in float64 as
        SadTalker's numpy conversion does; stays on the device."""
        return (image.float().double() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def render(self, source: SourceState, semantics, *, yaw=None, pitch=None, roll=None,
               progress: Optional[Callable[[int], None]] = None) -> Iterator[np.ndarray]:
        """Yield every frame of ``semantics`` in order, ``(S, S, 3) uint8`` on the host, in batches: the
        one-clip case of ``render_clips``. (No frame stages: ``streaming`` runs those.)"""
        for _, frame in self.render_clips(source, [ClipMotion(semantics, yaw, pitch, roll)], progress=progress):
            yield frame

    def render_clips(self, source: SourceState, clips: Sequence["ClipMotion"], *,
                     progress: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """``launch_clips`` with each batch copied to the host: ``(clip index, (S, S, 3) uint8 frame)``."""
        for batch in self.launch_clips(source, clips):
            frames = batch.to_host()
            self.record_memory()
            yield from zip(batch.owners, frames)
            if progress is not None:
                progress(len(frames))

    def launch_clips(self, source: SourceState, clips: Sequence["ClipMotion"]) -> Iterator[DeviceFrames]:
        """Yield every frame of every clip as batches on the render device (``DeviceFrames``), clip after
        clip, each clip's frames in order. All clips share ``source``; the clips are one stream of frames
        cut into batches, so a batch may end one clip and begin the next (``stats.batch_sizes`` shows it):
        short clips fill a GPU's batch, and the GPU is not drained between clips.

        The batch size is this render's: the engine's, or with ``auto`` on CUDA planned from the free
        memory now for these frames (``batch_size_for``). On CUDA each batch is yielded only once the next
        one is launched (``BatchPolicy.launch_ahead``), so the GPU renders ahead while the caller runs the
        frame stages and encodes. A CUDA out-of-memory error halves the batch and retries the same frames
        (down to 1, then a RenderError; later renders start from what fitted); every other error
        propagates untouched.
        """
        for clip in clips:
            clip.check()
        stream = _ClipStream(clips)
        if not stream.total:
            return
        batch = self.batch_size_for(source, clips[stream.clip_at(0)].semantics, stream.total)
        planned = batch
        start = 0
        pending: Optional[DeviceFrames] = None
        while start < stream.total:
            stop = min(start + batch, stream.total)
            windows, angles, owners = stream.batch(start, stop)
            frames = attempt(self.launch_batch, source, windows, *angles, pad_to=planned)
            if frames is OUT_OF_MEMORY:  # later renders start from what fitted
                batch = planned = self._oom_cap = halve_after_oom(batch, self.device, "even at batch size 1; free "
                                                                  "the GPU or use --precision fp16 or --device cpu")
                self.stats.oom_retries += 1
                continue
            launched = DeviceFrames(frames, owners, self._record_ready())
            self.stats.batch_sizes.append(stop - start)
            if pending is not None:
                yield pending
            pending = launched
            start = stop
            if not self.policy.launch_ahead:
                yield pending
                pending = None
        if pending is not None:
            yield pending

    def _record_ready(self) -> Optional["torch.cuda.Event"]:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def batch_size_for(self, source: SourceState, semantics, frame_count: int) -> int:
        """This render's batch size for ``frame_count`` frames: the engine's fixed size (capped by an
        earlier out-of-memory back-off), or on CUDA with ``auto`` as many frames as fit in the free memory
        now, at most ``CUDA_MAX_AUTO_BATCH`` and ``frame_count``. One frame's memory is measured once per
        engine (``semantics`` gives that frame); the free memory is read for every render, so a short
        preview first does not hold a later long clip to a small batch."""
        batch = self.batch_size
        if not batch:
            if not self._frame_bytes:
                self._frame_bytes = self._measure_frame_bytes(source, semantics)
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            batch = max(1, min(CUDA_MAX_AUTO_BATCH, int(free * CUDA_MEMORY_HEADROOM // self._frame_bytes), frame_count))
        return min(batch, self._oom_cap) if self._oom_cap else batch

    def _measure_frame_bytes(self, source: SourceState, semantics) -> int:
        """One frame's peak CUDA memory (the first of ``semantics``). The frame is rendered twice, eagerly:
        the first time cuDNN's algorithm search allocates large trial workspaces that are no part of a
        frame's needs; the second is measured."""
        compiled, self._compiled = self._compiled, False
        try:
            self.render_batch(source, semantics.windows(0, 1))
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.render_batch(source, semantics.windows(0, 1))
        except torch.cuda.OutOfMemoryError as exc:  # nothing to retry: no smaller batch exists
            raise RenderError(f"out of GPU memory on {self.device} rendering one frame; free the GPU or use "
                              "--precision fp16 or --device cpu") from exc
        finally:
            self._compiled = compiled
        return max(torch.cuda.max_memory_allocated(self.device) - before, 1)

    def record_memory(self) -> None:
        """Note the peak memory so far in ``stats`` (after each batch collected)."""
        self.stats.peak_rss_mib = peak_rss_mib()
        if self.device.type == "cuda":
            self.stats.peak_cuda_mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
