"""The render loop: source work once, frames in batches along the frame axis, precision, OOM back-off.

The engine knows devices and batches; it yields ``(H, W, 3) uint8`` frames in order and reports
progress through a callback. It reads no files and prints nothing.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import numpy as np
import torch

from .checkpoints import Networks
from .errors import RenderError
from .nets.geometry import transform_keypoints
from .nets.inference import optimize_generator, optimize_kp_detector

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_AUTO_BATCH = 1  # a CPU gains nothing from batching (its convolutions use every core on one frame)
CUDA_MAX_AUTO_BATCH = 64
CUDA_MEMORY_HEADROOM = 0.8  # share of free memory an automatic batch may plan to use


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # "cpu" | "cuda" | "cuda:N" | "auto"
    precision: str = "fp32"  # "fp32" | "fp16" | "bf16"
    batch_size: Optional[int] = None  # None: chosen from the device's free memory
    optimize: bool = True  # inference rewrites that keep the math (nets/inference.py)
    compile: bool = False  # torch.compile the decoder (start-up cost; pays on long CUDA clips)
    channels_last: Optional[bool] = None  # the decoder in NHWC; None: on CUDA (tensor cores), off on a CPU


@dataclass
class SourceState:
    """What every frame reuses: canonical and posed source keypoints, the 3D feature volume and the
    dense-motion network's compressed source features and heatmaps (all with batch 1)."""

    kp_canonical: torch.Tensor  # (1, K, 3) float32
    kp_source: torch.Tensor  # (1, K, 3) float32
    feature_3d: torch.Tensor  # (1, C, D, h, w)
    dense: Dict[str, torch.Tensor]


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
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RenderError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or fp32")
    return PRECISIONS[precision]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2 ** 20


class Engine:
    """Renders frames of one source driven by a coefficient sequence.

    Keypoint detection, mapping and head-pose math run in float32 whatever ``precision`` says; the SPADE
    decoder (the heavy part) runs under autocast in the reduced precision, the dense motion network and
    warp too under fp16 but not under bf16 (see ``motion_dtype``).
    """

    def __init__(self, nets: Networks, options: EngineOptions = EngineOptions()):
        if options.batch_size is not None and options.batch_size < 1:
            raise RenderError(f"batch size must be at least 1, not {options.batch_size}")
        self.device = resolve_device(options.device)
        self.dtype = check_precision(options.precision, self.device)
        self.precision = options.precision
        # The dense motion network predicts the warp's sampling grid: fp16 keeps it (51 dB against fp32 with
        # random weights), bf16's 8-bit mantissa does not (36 dB), so under bf16 it stays in fp32 (40 dB).
        self.motion_dtype = self.dtype if self.dtype == torch.float16 else torch.float32
        kp_detector, generator, mapping = nets.kp_detector, nets.generator, nets.mapping
        if options.optimize:
            kp_detector = optimize_kp_detector(kp_detector)
            generator = optimize_generator(generator)
        self.kp_detector = kp_detector.to(self.device).eval()
        self.generator = generator.to(self.device).eval()
        self.mapping = mapping.to(self.device).eval()
        self.decoder = self.generator.decoder
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal floats slow CPU convolutions ten-fold; they are < 1e-37
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.channels_last = self.device.type == "cuda" if options.channels_last is None else options.channels_last
        if self.channels_last:  # 2D convolutions only: the dense motion network's 3D ones have no NHWC
            self.decoder.to(memory_format=torch.channels_last)
        if options.compile:
            self.decoder = torch.compile(self.decoder, dynamic=False)
        self.batch_size = options.batch_size or (CPU_AUTO_BATCH if self.device.type == "cpu" else 0)
        self.stats: Dict = {"batch_sizes": [], "stage_ms": defaultdict(float), "peak_cuda_mib": 0.0,
                            "peak_rss_mib": 0.0, "oom_retries": 0}
        self.time_stages = False  # set by the benchmark: synchronises after each stage

    @property
    def coeff_count(self) -> int:
        return self.mapping.coeff_nc

    def _autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def _stage(self, name: str):
        if not self.time_stages:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["stage_ms"][name] += (time.perf_counter() - start) * 1000

    @torch.inference_mode()
    def prepare_source(self, image: np.ndarray, source_window: np.ndarray) -> SourceState:
        """Source image ``(3, S, S) float32 in [0, 1]`` and its coefficient window ``(C, 27)`` -> state."""
        if source_window.shape[0] != self.coeff_count:
            raise RenderError(f"source coefficients have {source_window.shape[0]} columns but the mapping net "
                              f"takes {self.coeff_count}")
        with self._stage("source"):
            img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(self.device)
            window = torch.from_numpy(np.ascontiguousarray(source_window, dtype=np.float32))[None].to(self.device)
            kp_canonical = self.kp_detector(img).float()
            kp_source = transform_keypoints(kp_canonical, self.mapping(window))
            feature_3d = self.generator.encode_source(img)
            dense = self.generator.dense_motion_network.prepare_source(feature_3d, kp_source)
        return SourceState(kp_canonical, kp_source, feature_3d, dense)

    @torch.inference_mode()
    def render_batch(self, source: SourceState, windows: np.ndarray, yaw=None, pitch=None, roll=None) -> np.ndarray:
        """Windows ``(B, C, 27)`` (B counts frames) -> frames ``(B, S, S, 3) uint8``."""
        b = windows.shape[0]
        w = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(self.device)
        angles = {name: None if values is None else torch.from_numpy(np.asarray(values, np.float32)).to(self.device)
                  for name, values in (("yaw", yaw), ("pitch", pitch), ("roll", roll))}
        # CPU kernels choose their reduction order by batch size; frame by frame, the mapping and motion
        # of a frame never depend on the batch it came in (and a CPU loses nothing: its convolutions are
        # parallel inside one frame). The decoder's convolutions are batch-invariant and run batched.
        step = 1 if self.device.type == "cpu" else b
        warped = []
        for start in range(0, b, step):
            pick = slice(start, start + step)
            with self._stage("mapping_keypoints"):
                pose = self.mapping(w[pick])
                kp_driving = transform_keypoints(
                    source.kp_canonical.expand(pose["t"].shape[0], -1, -1), pose,
                    **{name: None if a is None else a[pick] for name, a in angles.items()})
            with self._autocast(self.motion_dtype), self._stage("dense_motion"):
                motion = self.generator.dense_motion_network.motion(source.dense, kp_driving)
                warped.append(self.generator.warp(source.feature_3d, motion))
        with self._autocast(self.dtype), self._stage("decoder"):
            features = torch.cat(warped) if len(warped) > 1 else warped[0]
            if self.channels_last:
                features = features.contiguous(memory_format=torch.channels_last)
            image = self.decoder(features)
        with self._stage("transfer"):
            frames = (image.float().double() * 255).round_().clamp_(0, 255).to(torch.uint8)
            return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def render(self, source: SourceState, semantics, *, yaw=None, pitch=None, roll=None,
               progress: Optional[Callable[[int], None]] = None) -> Iterator[np.ndarray]:
        """Yield every frame of ``semantics`` in order, ``(S, S, 3) uint8``, in batches.

        A CUDA out-of-memory error halves the batch and retries the same frames (down to 1, then a
        RenderError); every other error propagates untouched.
        """
        total = semantics.frame_count
        for name, seq in (("yaw", yaw), ("pitch", pitch), ("roll", roll)):
            if seq is not None and len(seq) != total:
                raise RenderError(f"{name} sequence has {len(seq)} values for {total} frames")
        if not self.batch_size:
            self.batch_size = self._auto_cuda_batch(source, semantics)
        batch = self.batch_size
        start = 0
        while start < total:
            stop = min(start + batch, total)
            pick = slice(start, stop)
            try:
                frames = self.render_batch(source, semantics.windows(start, stop),
                                           *(None if s is None else s[pick] for s in (yaw, pitch, roll)))
            except torch.cuda.OutOfMemoryError:
                frames = None
            if frames is None:  # recover outside the handler, so the failed batch's tensors are freed
                if batch == 1:
                    raise RenderError(f"out of GPU memory on {self.device} even at batch size 1; free the GPU "
                                      "or use --precision fp16 or --device cpu")
                batch = self.batch_size = max(1, batch // 2)  # later clips start from what fitted
                self.stats["oom_retries"] += 1
                self._release_cached_memory()
                continue
            self.stats["batch_sizes"].append(stop - start)
            self._record_memory()
            for frame in frames:
                yield frame
            if progress is not None:
                progress(stop - start)
            start = stop

    def _auto_cuda_batch(self, source: SourceState, semantics) -> int:
        """Measure one frame's peak memory, then plan a batch that fits in the free memory."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        try:
            self.render_batch(source, semantics.windows(0, 1))
        except torch.cuda.OutOfMemoryError as exc:  # nothing to retry: no smaller batch exists
            raise RenderError(f"out of GPU memory on {self.device} rendering one frame; free the GPU or use "
                              "--precision fp16 or --device cpu") from exc
        per_frame = max(torch.cuda.max_memory_allocated(self.device) - before, 1)
        free, _ = torch.cuda.mem_get_info(self.device)
        batch = int(free * CUDA_MEMORY_HEADROOM // per_frame)
        return max(1, min(CUDA_MAX_AUTO_BATCH, batch, semantics.frame_count))

    def _release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _record_memory(self) -> None:
        self.stats["peak_rss_mib"] = peak_rss_mib()
        if self.device.type == "cuda":
            self.stats["peak_cuda_mib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
