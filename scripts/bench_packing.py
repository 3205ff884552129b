#!/usr/bin/env python3
"""Packed clips against one clip at a time: render throughput of short clips sharing one source.

    python scripts/bench_packing.py --device cuda [--checkpoint-dir CK] [--clips 32] [--frames 30]
        [--batch-size 64] [--precision fp16] [--size 256] [--repeats 3] [--json OUT]

One engine, one source state, ``--clips`` clips of ``--frames`` frames each (different coefficients,
the same face and source coefficients: what `sfr batch` packs). Two ways, each warmed up once, then
timed alternately ``--repeats`` times (the best of each is reported):

  alone   ``Engine.render`` per clip, one after another: what sfr did before packing (each clip ends with
          a short batch and the launch-ahead pipeline drains between clips)
  packed  ``Engine.render_clips`` over all clips: one stream of batches spanning clip boundaries

Frames are copied to the host and dropped (no encoder): this is the GPU side only. Also printed: the
batch sizes of each way, and the largest difference between their frames in uint8 levels (0 on a CPU;
on a GPU batches of another make-up may round differently).

``--end-to-end`` also times the same clips into H.264 MP4s through one warm ``Renderer`` (what `sfr
batch` runs in-process): ``render_job`` per clip against ``render_jobs`` (packed, each clip's commit
overlapping the next clip's frames); checks and files included, model load excluded.

A CPU figure stands for a CPU only: there the default batch is 1 and packing changes nothing unless
``--batch-size`` is larger.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sfr_cli.bench import job_inputs, load_or_random_networks, sync_device
from sfr_cli.config import CONFIG_DIR, load_config
from sfr_cli.engine import ClipMotion, Engine, EngineOptions, configure_torch


def alone(engine: Engine, source, clips):
    return [np.stack(list(engine.render(source, clip.semantics))) for clip in clips]


def packed(engine: Engine, source, clips):
    frames = [[] for _ in clips]
    for index, frame in engine.render_clips(source, clips):
        frames[index].append(frame)
    return [np.stack(f) for f in frames]


def timed(way, engine: Engine, source, clips):
    """(seconds, frames per clip, batch sizes) of one pass."""
    engine.stats.batch_sizes.clear()
    sync_device(engine.device)
    started = time.perf_counter()
    frames = way(engine, source, clips)
    sync_device(engine.device)
    return time.perf_counter() - started, frames, list(engine.stats.batch_sizes)


def end_to_end(args, clips, image: np.ndarray, source_row: np.ndarray, work: Path) -> dict:
    """Best seconds of each way into MP4s (see the module's docstring), and the frames of the files."""
    from PIL import Image

    from sfr_cli import Renderer
    from sfr_cli.checkpoints import write_random_checkpoints
    from sfr_cli.config import config_pair

    checkpoint_dir = args.checkpoint_dir
    if checkpoint_dir is None:
        checkpoint_dir = work / "checkpoints"
        write_random_checkpoints(checkpoint_dir, *config_pair(load_config(args.config)), size_px=args.size)
    Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(work / "face.png")
    np.save(work / "face_coeffs.npy", source_row[None])
    for index, clip in enumerate(clips):
        np.save(work / f"clip{index}.npy", np.asarray(clip.semantics.driving))
    renderer = Renderer(checkpoint_dir, config=args.config, device=args.device, precision=args.precision,
                        batch_size=args.batch_size, size=args.size)

    def jobs(tag: str):
        (work / tag).mkdir(exist_ok=True)
        return [renderer.job(work / f"clip{i}.npy", work / "face.png", source_coeffs=work / "face_coeffs.npy",
                             output=work / tag / f"{i}.mp4", overwrite=True) for i in range(len(clips))]

    def alone_files():
        for job in jobs("alone"):
            renderer.render_job(job)

    def packed_files():
        for index, outcome in renderer.render_jobs(jobs("packed")):
            if isinstance(outcome, Exception):
                raise outcome

    ways = {"alone": alone_files, "packed": packed_files}
    for way in ways.values():  # warm-up: model load, shapes seen
        way()
    best = {name: float("inf") for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            best[name] = min(best[name], time.perf_counter() - started)
    frames_total = sum(clip.frame_count for clip in clips)
    return {"e2e_alone_fps": round(frames_total / best["alone"], 1),
            "e2e_packed_fps": round(frames_total / best["packed"], 1),
            "e2e_speedup": round(best["alone"] / best["packed"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", help="SadTalker's layout (default: random weights)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "facerender.yaml"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the device's automatic batch")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end-to-end", action="store_true", help="also time both ways into MP4s")
    parser.add_argument("--json")
    args = parser.parse_args()

    device = torch.device(args.device)
    configure_torch(device)
    config = load_config(args.config)
    nets, weights = load_or_random_networks(config, args.checkpoint_dir, args.size)
    engine = Engine(nets, EngineOptions(device=args.device, precision=args.precision, batch_size=args.batch_size))
    image, semantics = job_inputs(config.mapping.coeff_nc, args.frames * args.clips, args.size)
    source = engine.prepare_source(image, semantics.source_window())
    # the clips: consecutive stretches of one long smooth clip, each its own Semantics (own windows)
    clips = [ClipMotion(replace(semantics, driving=semantics.driving[i * args.frames:(i + 1) * args.frames]))
             for i in range(args.clips)]

    ways = {"alone": alone, "packed": packed}
    results = {name: timed(way, engine, source, clips) for name, way in ways.items()}  # warm-up, shapes seen
    best = {name: float("inf") for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            seconds, frames, batch_sizes = timed(way, engine, source, clips)
            best[name] = min(best[name], seconds)
            results[name] = (seconds, frames, batch_sizes)
    frames_total = args.clips * args.frames
    gap = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
              for a, b in zip(results["alone"][1], results["packed"][1]))
    row = {"device": str(engine.device), "name": torch.cuda.get_device_name(engine.device) if device.type == "cuda"
           else "cpu", "weights": weights, "size": args.size, "precision": args.precision,
           "batch": engine.batch_size, "clips": args.clips, "frames_per_clip": args.frames,
           "alone_fps": round(frames_total / best["alone"], 1), "packed_fps": round(frames_total / best["packed"], 1),
           "speedup": round(best["alone"] / best["packed"], 3),
           "alone_batches": results["alone"][2][:8], "packed_batches": results["packed"][2][:8],
           "max_level_gap": gap, "repeats": args.repeats}
    if args.end_to_end:
        with tempfile.TemporaryDirectory() as work:
            row.update(end_to_end(args, clips, image, semantics.source_row, Path(work)))
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
