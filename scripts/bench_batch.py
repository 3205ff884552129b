#!/usr/bin/env python3
"""Measure `sfr batch` against one `sfr render` process per clip, and what a batch costs per clip.

    python scripts/bench_batch.py [--clips 12] [--frames 6] [--rss-clips 10,200] [--full] [--workers]

All on the CPU with tiny random weights (configs/tiny.yaml) unless said: a figure from here stands
for this CPU only. What is timed:
  processes  12 `sfr render` processes one after another (each pays Python, torch import, model load)
  batch      one `sfr batch` process over the same 12 clips (imports and model load paid once)
  frames     every MP4 of both, decoded, must be identical
  overhead   per clip, beyond rendering and encoding: a warm Renderer, the rows checked and run through
             batch's scheduler, report and source lookup;
             (wall - sum of render+encode - source work) / clips
  rss        peak RSS of `sfr batch` over N one-frame clips (several faces, so the source LRU turns over)
  startup    (--full) the full-size model: first clip minus second clip of one Renderer (1 frame each)
  workers    (--workers) `sfr batch --workers 1` vs `--workers 2` over the 12 clips
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# As `sfr` itself does: idle OpenMP threads sleep, or the in-process steps crawl beside ffmpeg on a busy CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
SFR = [sys.executable, "-m", "sfr_cli.cli"]


def make_clips(folder: Path, count: int, frames: int, faces: int = 3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(faces):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"face{index}.png")
    rows = []
    for index in range(count):
        np.save(folder / f"c{index:03d}.npy", (rng.standard_normal((frames, 70)) * 0.1).astype(np.float32))
        rows.append(f"c{index:03d}.npy,face{index % faces}.png,out/c{index:03d}.mp4")
    manifest = folder / f"m{count}.csv"
    manifest.write_text("coeffs,source,output\n" + "\n".join(rows) + "\n")
    return manifest


def run(command, cwd, env):
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{result.stderr}")
    return time.perf_counter() - started, result.stdout


def decode(path: Path) -> np.ndarray:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--rss-clips", default="10,200")
    parser.add_argument("--full", action="store_true", help="also time the full-size model's start-up")
    parser.add_argument("--workers", action="store_true", help="also time --workers 2 against 1")
    parser.add_argument("--full-only", action="store_true", help="only the full-size start-up figure")
    parser.add_argument("--skip-processes", action="store_true", help="skip the one-process-per-clip baseline")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE")
    figures = Figures(cpu_count=os.cpu_count(), clips=args.clips, frames_per_clip=args.frames)
    with tempfile.TemporaryDirectory(prefix="sfr-bench-batch-") as tmp:
        work = Path(tmp)
        run(SFR + ["checkpoints", "random", str(work / "ck"), "--config", "tiny"], work, env)
        tiny = ["--config", "tiny", "--checkpoint-dir", str(work / "ck"), "--device", "cpu"]
        manifest = make_clips(work, args.clips, args.frames)
        if args.full_only:
            figures.update(full_startup(work, env))
            print(json.dumps(figures, indent=2))
            return

        # 1. One process per clip, as a shell loop does.
        seconds = 0.0
        (work / "loop").mkdir()
        for index in range(0 if args.skip_processes else args.clips):
            face = f"face{index % 3}.png"
            took, _ = run(SFR + ["render", "--coeffs", f"c{index:03d}.npy", "--source", face, "-o",
                                 f"loop/c{index:03d}.mp4", "--quiet"] + tiny, work, env)
            seconds += took
        figures["processes_seconds"] = round(seconds, 2)

        # 2. One sfr batch.
        took, out = run(SFR + ["batch", manifest.name, "--json"] + tiny, work, env)
        figures["batch_seconds"] = round(took, 2)
        if not args.skip_processes:
            figures["batch_over_processes"] = round(took / seconds, 3)
        same = args.skip_processes or all(np.array_equal(decode(work / "loop" / f"c{i:03d}.mp4"), decode(work / "out" / f"c{i:03d}.mp4"))
                   for i in range(args.clips))
        figures["decoded_frames_identical"] = same

        # 3. Per-clip overhead beyond rendering and encoding, models warm.
        figures["overhead_ms_per_clip"] = overhead(work, manifest, args.clips)

        # 4. Peak RSS over more and more one-frame clips.
        for count in (int(c) for c in args.rss_clips.split(",")):
            folder = work / f"rss{count}"
            folder.mkdir()
            rss_manifest = make_clips(folder, count, 1, faces=12)
            _, out = run(SFR + ["batch", rss_manifest.name, "--json"] + tiny, folder, env)
            figures[f"peak_rss_mib_{count}_clips"] = json.loads(out)["peak_rss_mib"]

        # 5. Workers.
        if args.workers:
            for workers in (1, 2):
                for mp4 in (work / "out").glob("*.mp4"):
                    mp4.unlink()
                took, _ = run(SFR + ["batch", manifest.name, "--workers", str(workers), "--json"] + tiny, work, env)
                figures[f"workers_{workers}_seconds"] = round(took, 2)

        # 6. The full-size model's start-up.
        if args.full:
            figures.update(full_startup(work, env))
    print(json.dumps(figures, indent=2))


class Figures(dict):
    """A dict that prints each figure to stderr as it is measured (a long run killed midway keeps them)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"{key}: {value}", file=sys.stderr, flush=True)

    def update(self, other):
        for key, value in other.items():
            self[key] = value


def overhead(work: Path, manifest: Path, clips: int) -> float:
    """(wall of plan + run over warm models - sum of render+encode seconds) / clips, in ms."""
    sys.path.insert(0, str(REPO))
    from sfr_cli import batch as batching
    from sfr_cli.batch_plan import BatchDefaults, plan_rows
    from sfr_cli.manifest import read_manifest
    from sfr_cli.jobs import RenderJob
    from sfr_cli.progress import BatchProgress
    from sfr_cli.renderer import Renderer

    os.chdir(work)
    template = RenderJob(coeffs=Path("."), source=Path("."), config="tiny", checkpoint_dir=work / "ck", device="cpu",
                         overwrite=True)
    settings = batching.renderer_settings(template)
    renderer = Renderer(**settings)
    renderer.render(coeffs=work / "c000.npy", source=work / "face0.png", output=work / "warm.mp4")  # load once
    renderer.models.source_seconds = 0.0
    started = time.perf_counter()
    plan = plan_rows(read_manifest(manifest), BatchDefaults(template, overwrite=True))
    summary = batching.run_batch(plan, batching.InProcessBackend(settings, renderer=renderer),
                                 batching.ReportFile(work / "overhead.report.jsonl"), BatchProgress(quiet=True))
    wall = time.perf_counter() - started
    rendering = sum(row.render_seconds for row in summary.rows) + renderer.models.source_seconds  # + source work
    return round((wall - rendering) / clips * 1000, 1)


def full_startup(work: Path, env) -> dict:
    """Full-size random weights: the first 1-frame clip of a Renderer against the second."""
    sys.path.insert(0, str(REPO))
    from sfr_cli.renderer import Renderer

    run(SFR + ["checkpoints", "random", str(work / "full"), "--config", "facerender"], work, env)
    np.save(work / "one.npy", np.load(work / "c000.npy")[:1])
    renderer = Renderer(checkpoint_dir=work / "full", device="cpu")
    times = []
    for name in ("f1", "f2"):
        started = time.perf_counter()
        renderer.render(coeffs=work / "one.npy", source=work / "face0.png", output=work / f"{name}.mp4")
        times.append(time.perf_counter() - started)
    return {"full_first_clip_seconds": round(times[0], 2), "full_second_clip_seconds": round(times[1], 2),
            "full_startup_paid_once_seconds": round(times[0] - times[1], 2)}


if __name__ == "__main__":
    main()
