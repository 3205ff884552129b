#!/usr/bin/env python3
"""Where a batch's GPU time goes: per stage and per kernel, with FLOPs per frame per stage.

Runs sfr's engine on the full-size model (random weights, or ``--checkpoint-dir``) and prints, for one
batch size and precision:

- FLOPs per frame of each stage (``torch.utils.flop_counter`` on one frame: convolutions and matrix
  products; elementwise work, norms and ``grid_sample`` are not counted, they are memory-bound);
- the device time per frame of each stage (``torch.profiler`` with the engine's stage hook marking
  the ranges), the achieved TFLOP/s and the share of the given peak;
- the kernels that take most of the time.

Usage: scripts/profile_stages.py [--device cuda] [--precision fp16] [--batch-size 32] [--size 256]
       [--checkpoint-dir DIR] [--peak-tflops 989] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from sfr_cli.bench import job_inputs, load_or_random_networks, sync_device
from sfr_cli.config import CONFIG_DIR, load_config
from sfr_cli.engine import RENDER_STEPS, Engine, EngineOptions, configure_torch, resolve_device


def stage_flops(engine: Engine, source, windows: np.ndarray) -> dict:
    """FLOPs of each stage for the frames in ``windows`` (counted on the engine's own modules)."""
    flops = {}
    counters = {}

    @contextlib.contextmanager
    def count(name):
        counter = FlopCounterMode(display=False)
        with counter:
            yield
        counters[name] = counters.get(name, 0) + counter.get_total_flops()

    engine.step_hook = count
    engine.render_batch(source, windows)
    engine.step_hook = None
    for name in RENDER_STEPS:
        flops[name] = counters.get(name, 0) / len(windows)
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--config", default=str(CONFIG_DIR / "facerender.yaml"))
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's dense peak at this precision, for the share of peak")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    configure_torch(device)
    config = load_config(args.config)
    nets, _ = load_or_random_networks(config, args.checkpoint_dir, args.size)
    image, semantics = job_inputs(config.mapping.coeff_nc, args.batch_size, args.size)
    engine = Engine(nets, EngineOptions(device=args.device, precision=args.precision, batch_size=args.batch_size,
                                        compile_scope="decoder" if args.compile else "none"))
    source = engine.prepare_source(image, semantics.source_window())
    windows = semantics.windows(0, args.batch_size)
    flops = stage_flops(engine, source, windows[:1])
    for _ in range(3):  # warm-up: cuDNN autotuning, compilation
        engine.render_batch(source, windows)
    sync_device(device)

    engine.step_hook = record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.batches):
            engine.render_batch(source, windows)
        sync_device(device)
    engine.step_hook = None
    frames = args.batches * args.batch_size

    events = prof.key_averages()
    stage_us = {}
    for event in events:
        if event.key in RENDER_STEPS:
            stage_us[event.key] = event.device_time_total if device.type == "cuda" else event.cpu_time_total
    kernels = sorted((e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                      and e.key not in RENDER_STEPS), key=lambda e: -e.self_device_time_total)
    total_kernel_us = max(sum(e.self_device_time_total for e in kernels), 1e-9)

    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {args.precision}, "
          f"batch {args.batch_size}, {args.size}px, {frames} frames profiled")
    print(f"{'stage':18} {'GFLOP/frame':>12} {'us/frame':>10} {'TFLOP/s':>8} {'% peak':>7}")
    report = {"precision": args.precision, "batch_size": args.batch_size, "size_px": args.size, "stages": {}}
    for name in RENDER_STEPS:
        us = stage_us.get(name, 0.0) / frames
        tflops = flops[name] / (us * 1e-6) / 1e12 if us else 0.0
        share = 100 * tflops / args.peak_tflops if args.peak_tflops else float("nan")
        print(f"{name:18} {flops[name] / 1e9:>12.2f} {us:>10.1f} {tflops:>8.1f} {share:>7.1f}")
        report["stages"][name] = {"gflop_per_frame": flops[name] / 1e9, "device_us_per_frame": us,
                                  "tflops": tflops}
    print(f"all kernels: {total_kernel_us / frames:.1f} us/frame -> {frames / (total_kernel_us * 1e-6):.0f} frames/s "
          "of pure GPU time")
    groups = defaultdict(float)
    for e in kernels:
        groups[e.key[:90]] += e.self_device_time_total
    print(f"{'us/frame':>9} {'%':>5}  kernel")
    for key, us in sorted(groups.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{us / frames:>9.1f} {100 * us / total_kernel_us:>5.1f}  {key}")
    report["kernel_us_per_frame"] = total_kernel_us / frames
    report["top_kernels"] = [[k, us / frames] for k, us in sorted(groups.items(), key=lambda kv: -kv[1])[:40]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
