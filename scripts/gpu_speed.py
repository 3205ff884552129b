#!/usr/bin/env python3
"""Render throughput of sfr's engine on a GPU, one line per variant, all in one process (models loaded once).

For each variant (``SIZE:PRECISION:BATCH:COMPILE``, COMPILE one of ``none``, ``decoder``, ``all``):

- ``first_s``: the first pass over the frames (cuDNN's algorithm search for each new shape, compilation);
- ``fps``: a second pass, timed, frames rendered and copied to the host, then dropped (no encoder):
  what the GPU sustains, the launch-ahead overlap included;
- ``peak_mib``: peak CUDA memory of that pass;
- ``new_shape_s``: (eager only) the cost of one batch of a shape not seen before, minus the same batch
  once its shape is known: what an eager short last batch costs in cuDNN's algorithm search, against
  padding it to the full batch as ``--compile`` does.

``--encode`` also times the H.264 writer alone (sfr's Mp4Writer, libx264, random frames) at each size:
frames/s the encoder takes, to compare with the renderer's.

Usage: scripts/gpu_speed.py --checkpoint-dir CK [--frames 1024] [--variants 256:fp16:64:none,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sfr_cli.bench import job_inputs, load_or_random_networks, sync_device
from sfr_cli.config import CONFIG_DIR, load_config
from sfr_cli.engine import Engine, EngineOptions, configure_torch


def make_engine(nets, device: str, precision: str, batch: int, compile_scope: str) -> Engine:
    """An engine as ``sfr render`` builds it; ``decoder``: ``--compile`` as it is (the decoder compiled);
    ``all``: the dense motion and warp compiled as well, the candidate this script is here to time."""
    engine = Engine(nets, EngineOptions(device=device, precision=precision, batch_size=batch,
                                        compile_scope=compile_scope))
    return engine


def timed_pass(engine: Engine, source, semantics) -> float:
    sync_device(engine.device)
    start = time.perf_counter()
    for _ in engine.render(source, semantics):
        pass
    sync_device(engine.device)
    return time.perf_counter() - start


def new_shape_cost(engine: Engine, source, semantics) -> float:
    """Seconds a batch of an unseen shape costs beyond the same batch once seen (eager engines): what a
    short last batch costs today, against padding it to the full batch."""
    windows = semantics.windows(0, max(1, engine.batch_size - 5))
    times = []
    for _ in range(2):
        sync_device(engine.device)
        start = time.perf_counter()
        engine.render_batch(source, windows)
        sync_device(engine.device)
        times.append(time.perf_counter() - start)
    return times[0] - times[1]


def run_variant(spec: str, config, nets_by_size, frames: int, device: str) -> dict:
    size, precision, batch, scope = spec.split(":")
    size, batch = int(size), int(batch)
    nets = nets_by_size[size]
    image, semantics = job_inputs(config.mapping.coeff_nc, frames, size)
    engine = make_engine(nets, device, precision, batch, scope)
    source = engine.prepare_source(image, semantics.source_window())
    first = timed_pass(engine, source, semantics)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_pass(engine, source, semantics)
    row = {"variant": spec, "size": size, "precision": precision, "batch": engine.batch_size, "compile": scope,
           "frames": frames, "first_s": round(first, 2), "fps": round(frames / seconds, 1),
           "ms_per_frame": round(1000 * seconds / frames, 3),
           "peak_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else None}
    if scope == "none":
        row["new_shape_s"] = round(new_shape_cost(engine, source, semantics), 3)
    del engine, source
    if cuda:
        torch.cuda.empty_cache()
    return row


def encode_speed(size: int, frames: int) -> float:
    from sfr_cli.media import Mp4Writer, find_ffmpeg

    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        writer = Mp4Writer(Path(tmp) / "enc.mp4", width_px=size, height_px=size, frame_count=frames,
                           ffmpeg=find_ffmpeg())
        start = time.perf_counter()
        for i in range(frames):
            writer.write(pool[i % len(pool)])
        writer.close()
        return frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", help="SadTalker's layout (default: random weights)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script itself")
    parser.add_argument("--config", default=str(CONFIG_DIR / "facerender.yaml"))
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--variants", default="256:fp16:64:none,256:fp16:64:all")
    parser.add_argument("--encode", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    configure_torch(torch.device(args.device))
    config = load_config(args.config)
    sizes = sorted({int(v.split(":")[0]) for v in args.variants.split(",")})
    nets_by_size = {s: load_or_random_networks(config, args.checkpoint_dir, s)[0] for s in sizes}
    rows = []
    if args.encode:
        for size in sizes:
            rows.append({"variant": f"encode {size}", "fps": round(encode_speed(size, args.frames), 1)})
            print(json.dumps(rows[-1]), flush=True)
    for spec in args.variants.split(","):
        try:
            rows.append(run_variant(spec, config, nets_by_size, args.frames, args.device))
        except Exception as exc:  # one failing variant must not cost the others' figures
            rows.append({"variant": spec, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
