"""Time sfr's face enhancer stage (SadTalker's `--enhancer gfpgan`) per frame, and its memory over a clip.

Speed (default): the `enhance` stage (`stages.enhance.FaceEnhancer`, upscale 2, stored noise) as `sfr
enhance` runs it, on two cases, warmed up (one frame of each case first), with full-size weights (the
reference weights of golden-enhance: `stages.enhance.write_random_weights(dir, 'gfpgan', 14)`, the same files as
`make_enhancer_checkpoints.py --seed 14`):

- `256`: the golden-enhance frames (256x256 with 1, 1, 2 and 0 faces), cycled to --frames;
- `640x1024`: golden-paste/original.png (a 640x1024 portrait) repeated --frames times.

Frames go through the stage in batches of --batch (default: `sfr enhance`'s, 4 on a CPU, 16 on CUDA) and
come back to the host, as `streaming.StageLane` does. Wall seconds per frame and per face, process CPU
seconds per frame (all threads: on a shared, loaded machine the steadier figure at 1 thread), and the split
of the wall time by step:
detection (RetinaFace), alignment (LMEDS similarity + 512 warp), gfpgan (GFPGANv1Clean + rounding),
parse_mask (ParseNet + blurred mask), paste (2x Lanczos background, inverse warps, blend), other (the
rest: host copy, bookkeeping). Steps are timed by wrapping the nets functions the stage calls (its
behaviour is unchanged); on CUDA each wrapper synchronises, so the total comes from a separate plain pass.

    python scripts/bench_enhance.py [--device cpu|cuda] [--threads N] [--frames 4] [--cases 256,640x1024]
                                    [--weights DIR] [--json]

Memory (--memory): peak RSS of `streaming.render_enhance` (`sfr enhance` without the CLI: frames read from
a folder, enhanced in batches, encoded to MP4) with the tiny enhancer (`gfpgan-tiny`) on clips of 100 and
1000 golden-enhance frames (--memory-frames), each in a fresh subprocess so the peaks are separate.

    python scripts/bench_enhance.py --memory [--memory-frames 100,1000] [--device cpu] [--json]

The upstream side of the speed comparison is scripts/bench_enhance_upstream.py (run from a throwaway venv).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
STEPS = ("detection", "alignment", "gfpgan", "parse_mask", "paste")
# the nets functions `FaceEnhancer.__call__` / `_restore` look up at call time, by step
STEP_FUNCTIONS = {
    "detection": [("sfr_cli.nets.retinaface", "detect_faces")],
    "alignment": [("sfr_cli.imaging.face_align", "similarity_lmeds"), ("sfr_cli.imaging.face_align", "align_faces")],
    "gfpgan": [("sfr_cli.nets.gfpgan", "restore_faces")],
    "parse_mask": [("sfr_cli.nets.parsenet", "face_masks")],
    "paste": [("sfr_cli.imaging.face_blend", "upsample_background"), ("sfr_cli.imaging.face_blend", "paste_inverse_affines"),
              ("sfr_cli.imaging.face_blend", "paste_faces")],
}
SEED = 14  # the golden-enhance reference weights


def read_rgb(path: Path) -> np.ndarray:
    """A picture file -> `(H, W, 3) uint8 RGB`."""
    from sfr_cli.media.source import read_picture_uint8

    return read_picture_uint8(path, str(path))


def case_frames(name: str, reference: Path, count: int) -> np.ndarray:
    """`(count, H, W, 3) uint8 RGB` frames of case `name`."""
    if name == "256":
        pictures = [read_rgb(p) for p in sorted((reference / "golden-enhance" / "frames").glob("*.png"))]
    elif name == "640x1024":
        pictures = [read_rgb(reference / "golden-paste" / "original.png")]
    else:
        raise SystemExit(f"unknown case {name!r}: use 256 or 640x1024")
    return np.stack([pictures[i % len(pictures)] for i in range(count)])


@contextlib.contextmanager
def step_timers(device):
    """Wrap the nets functions the stage calls; yields `{step: wall seconds, 'cpu_' + step: process CPU
    seconds}` accumulated while inside."""
    import importlib

    from sfr_cli.bench import sync_device

    seconds = defaultdict(float)
    saved = []

    def timed(step, fn):
        def wrapper(*args, **kwargs):
            sync_device(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            sync_device(device)
            seconds[step] += time.perf_counter() - start
            seconds["cpu_" + step] += time.process_time() - cpu_start
            return out

        return wrapper

    for step, targets in STEP_FUNCTIONS.items():
        for module_name, attr in targets:
            module = importlib.import_module(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, timed(step, getattr(module, attr)))
    try:
        yield seconds
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def run_stage(stage, frames: np.ndarray, batch: int, device):
    """Wall seconds and process CPU seconds (all threads) to put `frames` through `stage` in batches of
    `batch` and bring the results to the host."""
    from sfr_cli.bench import sync_device

    sync_device(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for lo in range(0, len(frames), batch):
            stage(torch.from_numpy(frames[lo:lo + batch]).to(device)).cpu()
    sync_device(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def bench_speed(args) -> list:
    from sfr_cli.models import ModelCache
    from sfr_cli.stages import enhance as enhance_stage
    from sfr_cli.stages.enhance import FaceEnhancer
    from sfr_cli.streaming import CPU_ENHANCE_BATCH, CUDA_ENHANCE_BATCH

    device = torch.device(args.device)
    batch = args.batch or (CUDA_ENHANCE_BATCH if device.type == "cuda" else CPU_ENHANCE_BATCH)
    with contextlib.ExitStack() as stack:
        if args.weights is None:
            weights = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sfr-enh-weights-")))
        else:
            weights = Path(args.weights)
        files = enhance_stage.FaceFiles(*(weights / n for n in enhance_stage.weights_files(args.variant)))
        if not all(p.is_file() for p in files.paths()):
            started = time.perf_counter()
            files = enhance_stage.write_random_weights(weights, args.variant, SEED)
            print(f"wrote {args.variant} weights (seed {SEED}) to {weights} in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
        stage = FaceEnhancer(args.variant, files, upscale=2, noise_seed=None)
        started = time.perf_counter()
        stage.load(device, ModelCache())
        load_seconds = time.perf_counter() - started
        rows = []
        for name in args.cases.split(","):
            frames = case_frames(name, Path(args.reference), args.frames)
            run_stage(stage, frames[:1], 1, device)  # warm-up: allocator, kernels, prior boxes
            faces_before = stage.faces
            with step_timers(device) as seconds:
                total, cpu = run_stage(stage, frames, batch, device)
            faces = stage.faces - faces_before
            if device.type == "cuda":  # the wrappers' synchronisations slow CUDA: the total from a plain pass
                total, cpu = run_stage(stage, frames, batch, device)
            steps = {k: seconds.get(k, 0.0) for k in STEPS}
            steps["other"] = max(0.0, total - sum(steps.values())) if device.type != "cuda" else None
            n = len(frames)
            rows.append({
                "case": name, "size_wh": [int(frames.shape[2]), int(frames.shape[1])], "frames": n, "faces": faces,
                "device": str(device), "threads": torch.get_num_threads(), "batch": batch, "variant": args.variant,
                "seconds_per_frame": round(total / n, 3), "seconds_per_face": round(total / faces, 3) if faces else None,
                "cpu_seconds_per_frame": round(cpu / n, 3),
                "step_seconds_per_frame": {k: (round(v / n, 4) if v is not None else None) for k, v in steps.items()},
                "step_cpu_seconds_per_frame": {k: round(seconds.get("cpu_" + k, 0.0) / n, 4) for k in STEPS},
                "load_seconds": round(load_seconds, 2), "torch": torch.__version__,
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------------
# memory: peak RSS over clip length, each clip in a fresh process


def memory_child(args) -> dict:
    """One clip of `args.memory_child` frames through `streaming.render_enhance`; its report as a dict."""
    from sfr_cli import enhance_jobs, streaming
    from sfr_cli.engine import peak_rss_mib
    from sfr_cli.progress import SilentReporter
    from sfr_cli.models import ModelCache

    count = args.memory_child
    with tempfile.TemporaryDirectory(prefix="sfr-enh-mem-") as tmp:
        tmp = Path(tmp)
        frames_dir = tmp / "frames"
        frames_dir.mkdir()
        golden = sorted((Path(args.reference) / "golden-enhance" / "frames").glob("*.png"))
        for i in range(count):  # links, not copies: the input costs no memory or disk
            (frames_dir / f"{i:06d}.png").symlink_to(golden[i % len(golden)])
        job = enhance_jobs.EnhanceJob.make(input=frames_dir, output=tmp / "out.mp4", enhancer="gfpgan-tiny",
                              enhancer_dir=Path(args.weights), device=args.device, batch_size=args.batch)
        rss_before = peak_rss_mib()
        prepared = enhance_jobs.prepare_enhance(job)
        report = streaming.render_enhance(prepared, SilentReporter(), ModelCache())
        return {"frames": report.frames, "faces": report.stages.get("enhancer_faces"),
                "peak_rss_mib": round(peak_rss_mib(), 1), "peak_rss_before_mib": round(rss_before, 1),
                "seconds": round(report.seconds, 2), "frames_per_second": round(report.frames_per_second, 2),
                "batch": report.batch_size, "device": report.device, "output_bytes": (tmp / "out.mp4").stat().st_size,
                "threads": torch.get_num_threads()}


def bench_memory(args) -> list:
    from sfr_cli.stages import enhance as enhance_stage

    rows = []
    with tempfile.TemporaryDirectory(prefix="sfr-enh-tiny-") as weights:
        enhance_stage.write_random_weights(weights, "gfpgan-tiny")
        for count in (int(c) for c in args.memory_frames.split(",")):
            command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(count), "--weights", weights,
                       "--device", args.device, "--reference", str(args.reference)]
            if args.threads is not None:
                command += ["--threads", str(args.threads)]
            if args.batch is not None:
                command += ["--batch", str(args.batch)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"memory run of {count} frames failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's")
    parser.add_argument("--frames", type=int, default=4, help="frames per case (default 4: the golden frames once)")
    parser.add_argument("--cases", default="256,640x1024")
    parser.add_argument("--batch", type=int, default=None, help="frames per stage call; default: sfr enhance's")
    parser.add_argument("--variant", default="gfpgan", help="gfpgan (full size) or gfpgan-tiny")
    parser.add_argument("--weights", default=None,
                        help="folder of the enhancer weights; written there (seed 14) when absent; default: a temporary one")
    parser.add_argument("--reference", default=str(REFERENCE_DIR), help="the shared reference folder")
    parser.add_argument("--memory", action="store_true", help="peak RSS over clip length instead of speed (tiny)")
    parser.add_argument("--memory-frames", default="100,1000")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args)))
        return
    rows = bench_memory(args) if args.memory else bench_speed(args)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
