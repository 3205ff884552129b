"""``sfr bench``: sfr's engine against a plain sequential loop in the style of SadTalker's renderer.

Both run in one process on the same weights, source and coefficients:

- ``plain``: SadTalker's way (``PlainLoop``): its default batch of 2 (the source repeated, two runs of
  frames side by side), fp32, the plain modules (spectral norm recomputed, no folding or fusion), the
  generator's source encoding redone at every step, no synchronisation inside the loop;
- ``sfr``: the engine as ``sfr render`` runs it (source work once, batches, rewrites, the requested
  precision), its frames encoded to H.264 by a writer thread like `sfr render`.

Reported per run: frames/s, ms per frame by stage (mapping and keypoints, dense motion, decoder,
transfer and encode), start-up time, peak RSS (sampled) and peak CUDA memory; for reduced precision
also the PSNR of its frames against sfr at fp32. Both runs get the same torch settings
(``configure_torch``: on CUDA cuDNN's algorithm search, and fp32 without TF32, which makes the fp32
plain loop slower than torch's TF32 default would) and a warm-up pass before the timed one. Stage times need a synchronisation
around each stage, so they come from a third pass (``StageTimer``) and do not slow the frames/s figure.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from .checkpoints import Networks, build_networks, find_checkpoints, load_networks, random_state_dict
from .coeffs import prepare_semantics
from .config import ModelConfig
from .engine import RENDER_STEPS, Engine, EngineOptions, configure_torch, peak_rss_mib, resolve_device
from .modes import CROP_COEFFS, mode_for_coeff_count
from .nets.geometry import transform_keypoints
from .nets.inference import detached_copy


class RssSampler:
    """Peak resident memory of this process during a block, sampled from /proc every 10 ms."""

    def __init__(self):
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_mib() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2 ** 20
        except OSError:
            return peak_rss_mib()

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak_mib = max(self.peak_mib, self.current_mib())

    def __enter__(self):
        self.peak_mib = self.current_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.current_mib())


def random_networks(config: ModelConfig, seed: int = 0) -> Networks:
    nets = build_networks(config)
    for name, prefix in (("generator", "generator."), ("kp_detector", "kp_detector."), ("mapping", "mapping.")):
        module = getattr(nets, name)
        module.load_state_dict(random_state_dict(module, prefix, seed))
    return nets


def load_or_random_networks(config: ModelConfig, checkpoint_dir=None, size_px: int = 256):
    """(networks, what they are): SadTalker's files from ``checkpoint_dir``, or random weights shaped by ``config``."""
    if checkpoint_dir is None:
        return random_networks(config), "random"
    files = find_checkpoints(checkpoint_dir, size_px=size_px,
                             preprocess=mode_for_coeff_count(config.mapping.coeff_nc).name)
    return load_networks(config, files), str(checkpoint_dir)


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA work is asynchronous; a CPU's is done when it returns);
    every timer around device work calls this on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_cuda(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _reset_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_cuda_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else 0.0


class StageTimer:
    """An engine step hook (``Engine.step_hook``) that adds up each step's wall time. It synchronises
    the device around every stage, so it is used on a separate pass, never on the one timed whole."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: Dict[str, float] = dict.fromkeys(RENDER_STEPS, 0.0)

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync_device(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync_device(self.device)
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000


def job_inputs(coeff_nc: int, frames: int, size_px: int, seed: int = 0):
    """A deterministic benchmark job: a random ``(3, S, S)`` source image and smooth driving coefficients."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, frames, dtype=np.float32)[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=(1, coeff_nc)).astype(np.float32)
    driving = (0.5 * np.sin(t + phase)).astype(np.float32)
    source_row = (0.3 * rng.standard_normal(coeff_nc)).astype(np.float32)
    semantics = prepare_semantics(driving[:, :CROP_COEFFS], source_row,
                                  preprocess=mode_for_coeff_count(coeff_nc).name)
    image = rng.random((3, size_px, size_px), dtype=np.float32)
    return image, semantics


class PlainLoop:
    """SadTalker's render loop (``make_animation`` as ``animate.py`` drives it) on sfr's plain modules:
    the source image repeated ``rows`` times (SadTalker's batch size, 2 by default), the frames split
    into ``rows`` contiguous runs rendered side by side, one step per frame of a run; every step calls
    the whole generator (source encoding, dense motion, warp, decoder) with spectral norm recomputed, in
    fp32; predictions stay on the device until the end, then become uint8 frames. Nothing in the loop
    synchronises the device."""

    def __init__(self, nets: Networks, device: torch.device, rows: int = 2):
        self.device, self.rows = device, rows
        self.kp_detector, self.generator, self.mapping = (
            detached_copy(m).to(device).eval() for m in (nets.kp_detector, nets.generator, nets.mapping))

    @torch.inference_mode()
    def render(self, image: np.ndarray, semantics, step_hook=None, frame_limit: Optional[int] = None) -> list:
        """Every frame of ``semantics`` (or its first ``frame_limit``), ``(S, S, 3) uint8``, in order."""
        hook = step_hook or (lambda name: contextlib.nullcontext())
        frames, rows = min(semantics.frame_count, frame_limit or semantics.frame_count), self.rows
        steps = -(-frames // rows)
        src = torch.from_numpy(image)[None].to(self.device).repeat(rows, 1, 1, 1)
        window = torch.from_numpy(semantics.source_window())[None].to(self.device).repeat(rows, 1, 1)
        kp_canonical = self.kp_detector(src)
        kp_source = transform_keypoints(kp_canonical, self.mapping(window))
        picks = [[min(row * steps + step, frames - 1) for row in range(rows)] for step in range(steps)]
        predictions = []
        for step in range(steps):
            windows = np.stack([semantics.windows(i, i + 1)[0] for i in picks[step]])
            with hook("mapping_keypoints"):
                kp_driving = transform_keypoints(kp_canonical, self.mapping(torch.from_numpy(windows).to(self.device)))
            with hook("dense_motion"):
                feature_3d = self.generator.encode_source(src)
                warped = self.generator.warp(feature_3d, self.generator.dense_motion_network(
                    feature_3d, kp_driving, kp_source))
            with hook("decoder"):
                predictions.append(self.generator.decoder(warped))
        with hook("transfer"):
            video = torch.stack(predictions, dim=1).reshape(-1, *predictions[0].shape[1:])  # row-major: frame order
            video = (video[:frames].permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return list(video)


def _warm_up_frames(device: torch.device, semantics, batch_size: int) -> int:
    """Frames of the warm-up pass before timing: on CUDA all of them (cuDNN searches an algorithm for
    every new shape, the short last batch included; lazy module loading), on a CPU one batch."""
    return semantics.frame_count if device.type == "cuda" else max(1, batch_size)


def run_plain(nets: Networks, device: torch.device, image: np.ndarray, semantics, rows: int = 2) -> Dict:
    """The plain loop (``PlainLoop``): one warm-up pass, one timed pass, one pass for the stage split."""
    _reset_cuda(device)
    with RssSampler() as rss:
        t0 = time.perf_counter()
        loop = PlainLoop(nets, device, rows)
        sync_device(device)
        startup = time.perf_counter() - t0
        loop.render(image, semantics, frame_limit=_warm_up_frames(device, semantics, rows))
        sync_device(device)
        _reset_peak(device)
        t_render = time.perf_counter()
        frames_out = loop.render(image, semantics)
        seconds = time.perf_counter() - t_render
        timer = StageTimer(device)
        loop.render(image, semantics, step_hook=timer)
    n = semantics.frame_count
    return {"name": "plain", "precision": "fp32", "batch_size": rows, "frames": n, "seconds": seconds,
            "frames_per_second": n / seconds, "startup_seconds": startup,
            "stage_ms_per_frame": {k: timer.ms[k] / n for k in RENDER_STEPS},
            "peak_rss_mib": rss.peak_mib, "peak_cuda_mib": _peak_cuda_mib(device), "_frames": frames_out}


def run_sfr(nets: Networks, options: EngineOptions, image: np.ndarray, semantics, encode: bool = True) -> Dict:
    """sfr as ``sfr render`` runs it: ``streaming.stream_frames`` (the engine, the frame stages' lane, the
    one copy to the host) into ``media.ClipSinks`` (the writer thread and the H.264 encoder).
    One warm-up pass, one timed pass, one pass rendering alone, one pass for the stage split."""
    from .engine import ClipMotion
    from .media import find_ffmpeg
    from .media import ClipSinks
    from .streaming import stream_frames

    device = resolve_device(options.device)
    _reset_cuda(device)
    frames_out = []
    clip = ClipMotion(semantics)

    def frames(engine, source):
        for _, frame in stream_frames(engine, source, [clip], [[]]):
            yield frame

    with RssSampler() as rss, tempfile.TemporaryDirectory(prefix="sfr-bench-") as tmp:
        t0 = time.perf_counter()
        engine = Engine(nets, options)
        source = engine.prepare_source(image, semantics.source_window())
        sync_device(engine.device)
        startup = time.perf_counter() - t0
        warm_up = _warm_up_frames(engine.device, semantics, engine.batch_size)
        for _ in itertools.islice(frames(engine, source), warm_up):
            pass
        sync_device(engine.device)
        _reset_peak(engine.device)  # the warm-up's cuDNN algorithm search tries workspaces no frame needs
        size = image.shape[-1]
        t_render = time.perf_counter()
        encode_seconds = 0.0
        if encode:
            sinks = ClipSinks(output=Path(tmp) / "bench.mp4", frames_dir=None, width_px=size, height_px=size,
                              frame_count=semantics.frame_count, ffmpeg=find_ffmpeg())
            try:
                for frame in frames(engine, source):
                    frames_out.append(frame)
                    sinks.put(frame)
                sinks.commit()
            except BaseException:
                sinks.abort()
                raise
            encode_seconds = sinks.writer_seconds
        else:
            frames_out.extend(frames(engine, source))
        seconds = time.perf_counter() - t_render
        t_render = time.perf_counter()
        for _ in frames(engine, source):  # rendering alone, frames discarded
            pass
        render_seconds = time.perf_counter() - t_render
        timer = StageTimer(engine.device)
        engine.step_hook = timer
        for _ in frames(engine, source):
            pass
        engine.step_hook = None
    n = semantics.frame_count
    stage_ms = {k: timer.ms[k] / n for k in RENDER_STEPS}
    stage_ms["transfer"] += encode_seconds * 1000 / n
    return {"name": "sfr", "precision": engine.precision, "batch_size": max(engine.stats.batch_sizes or [0]),
            "frames": n, "seconds": seconds, "frames_per_second": n / seconds, "startup_seconds": startup,
            "render_frames_per_second": n / render_seconds,
            "stage_ms_per_frame": stage_ms, "encode_overlapped": encode,
            "peak_rss_mib": rss.peak_mib, "peak_cuda_mib": _peak_cuda_mib(engine.device), "_frames": frames_out}


def psnr(a, b) -> float:
    mse = np.mean((np.stack(a).astype(np.float64) - np.stack(b).astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def run_benchmark(config: ModelConfig, *, device: str = "auto", precision: str = "fp32",
                  batch_size: Optional[int] = None, frames: int = 8, size_px: int = 256,
                  checkpoint_dir=None, compile: bool = False, plain: bool = True) -> Dict:
    """Run the plain loop and sfr on the same job; returns a JSON-ready report."""
    resolved = resolve_device(device)
    configure_torch(resolved)  # for both runs: the same denormal flushing and cuDNN settings
    t = time.perf_counter()
    nets, weights = load_or_random_networks(config, checkpoint_dir, size_px)
    load_seconds = time.perf_counter() - t
    image, semantics = job_inputs(config.mapping.coeff_nc, frames, size_px)
    options = EngineOptions(device=device, precision=precision, batch_size=batch_size,
                            compile_scope="decoder" if compile else "none")
    runs = [run_plain(nets, resolved, image, semantics)] if plain else []
    runs.append(run_sfr(nets, options, image, semantics))
    if precision != "fp32":
        engine = Engine(nets, EngineOptions(device=device, batch_size=batch_size))  # fp32, one untimed pass
        reference = list(engine.render(engine.prepare_source(image, semantics.source_window()), semantics))
        del engine
        runs[-1]["psnr_db_vs_fp32"] = psnr(runs[-1]["_frames"], reference)
    if plain:
        runs[-1]["psnr_db_vs_plain"] = psnr(runs[-1]["_frames"], runs[0]["_frames"])
        runs[-1]["speedup_vs_plain"] = runs[-1]["frames_per_second"] / runs[0]["frames_per_second"]
    for run in runs:
        del run["_frames"]
    return {"device": _device_name(resolved), "config": config.name, "weights": weights, "size_px": size_px,
            "frames": frames, "load_seconds": load_seconds, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "runs": runs}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_report(report: Dict) -> str:
    """A plain-text table of a ``run_benchmark`` report."""
    lines = [f"device {report['device']}, config {report['config']}, weights {report['weights']}, "
             f"{report['frames']} frames at {report['size_px']}px, torch {report['torch']}"]
    header = (f"{'run':6} {'prec':5} {'batch':>5} {'frames/s':>9} {'render/s':>9} {'start s':>8} {'map+kp':>8} {'motion':>8} "
              f"{'decoder':>8} {'xfer+enc':>9} {'RSS MiB':>8} {'CUDA MiB':>9}")
    lines += [header, "-" * len(header)]
    for run in report["runs"]:
        ms = run["stage_ms_per_frame"]
        render_fps = f"{run['render_frames_per_second']:>9.3f}" if "render_frames_per_second" in run else f"{'-':>9}"
        lines.append(f"{run['name']:6} {run['precision']:5} {run['batch_size']:>5} {run['frames_per_second']:>9.3f} "
                     f"{render_fps} "
                     f"{run['startup_seconds']:>8.2f} {ms['mapping_keypoints']:>8.1f} {ms['dense_motion']:>8.1f} "
                     f"{ms['decoder']:>8.1f} {ms['transfer']:>9.1f} {run['peak_rss_mib']:>8.0f} "
                     f"{run['peak_cuda_mib']:>9.0f}")
    lines.append("(frames/s: sfr's frames encoded to H.264 on the way, as sfr render does; render/s: frames "
                 "rendered and discarded; stage columns: ms per frame)")
    last = report["runs"][-1]
    for key, label in (("speedup_vs_plain", "sfr speed-up over the plain loop: {:.2f}x"),
                       ("psnr_db_vs_plain", "PSNR of sfr's frames against the plain loop's: {:.1f} dB"),
                       ("psnr_db_vs_fp32", "PSNR of sfr's frames against sfr at fp32: {:.1f} dB")):
        if key in last:
            lines.append(label.format(last[key]))
    return "\n".join(lines)
