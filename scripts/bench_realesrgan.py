"""Time SadTalker's background upsampler, upstream RealESRGANer against sfr's tile runner, side by side.

Both run as whole processes on the same PNG frames with the same RealESRGAN_x2plus.pth, 400-px tiles, fp32,
on the CPU, one case after the other in one run:

- upstream: realesrgan 0.3.0 `RealESRGANer(scale=2, model_path, model=RRDBNet(3, 3, 64, 23, 32, scale=2),
  tile=400, tile_pad=10, pre_pad=0, half=False)`, `enhance(cv2.imread(png), outscale=2)` per frame (as
  GFPGANer calls it for SadTalker's `--background_enhancer realesrgan`), from a throwaway venv;
- sfr: the real command, `sfr enhance --input FRAMES --enhancer none --background-enhancer realesrgan
  --batch-size N` (`$SFR_TILE_REUSE` 1, and with `--also-no-reuse` 0 too), `OMP_NUM_THREADS=--threads`,
  from sfr's venv.

Cases: `paste` (paste-back frames of a larger picture, 1200 x 800, whose changing face box lies inside its
top-left 400-px tile: with reuse sfr computes that tile per frame and the other five once) and `golden`
(golden-bg's four 640 x 1024 frames: three paste-back frames whose box crosses four of six tiles, and a grey
one). Each row: the process's wall and CPU seconds (start to exit, model load and PNG I/O included; with
1 thread the CPU seconds are the steadier figure on a shared machine), the seconds
spent in the upsampler per frame, the tiles computed / reused, and sfr's frames against upstream's
(largest difference in uint8 levels, share of values that differ); on `golden` also each side against
golden-bg's `bg/` (whose noise floor is 0 levels).

The upstream side needs a venv with the upstream packages (no sfr dependency; never committed):

    python3 -m venv /tmp/upstream-venv
    /tmp/upstream-venv/bin/pip install torch==2.13.0 torchvision==0.28.0 cython numpy   # first: basicsr builds
    /tmp/upstream-venv/bin/pip install --no-build-isolation realesrgan==0.3.0 basicsr==1.4.2 \
        gfpgan==1.3.8 facexlib==0.3.0 "opencv-python-headless==4.14.*" "opencv-python==4.14.*"
    /tmp/upstream-venv/bin/python scripts/bench_enhance_upstream.py --weights x --patch-venv   # once
    python ../shared/reference/make_enhancer_checkpoints.py /tmp/bg-weights --seed 39 --also RealESRGAN_x2plus.pth
    python scripts/bench_realesrgan.py --weights /tmp/bg-weights --upstream-python /tmp/upstream-venv/bin/python \
        [--cases paste,golden] [--frames 4] [--threads 1] [--also-no-reuse] [--json]

(`python` is sfr's venv. `--worker upstream|sfr` is the per-process entry point the script runs itself.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
WEIGHTS_FILE = "RealESRGAN_x2plus.pth"
PASTE_SIZE_WH = (1200, 800)
PASTE_BOX_AT = (40, 40)  # where golden-paste's 300 x 306 box goes: inside the top-left tile with its context


# --------------------------------------------------------------------------------------------------
# the frames
# --------------------------------------------------------------------------------------------------
def write_case_frames(case: str, out_dir: Path, count: int, reference: Path) -> list:
    """Write the case's frames as PNGs (RGB) into `out_dir`; returns their paths."""
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    golden = reference / "golden-bg" / "frames"
    if case == "golden":
        pictures = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(golden.glob("*.png"))]
    elif case == "paste":
        # golden-paste's box (the face SadTalker pasted into the portrait); its contents change frame to frame
        x1, y1, x2, y2 = json.loads((reference / "golden-paste" / "meta.json").read_text())["box_x1y1x2y2"]
        faces = [np.asarray(Image.open(p).convert("RGB"))[y1:y2, x1:x2] for p in sorted(golden.glob("*.png"))[:3]]
        portrait = np.asarray(Image.open(reference / "golden-paste" / "original.png").convert("RGB"))
        width, height = PASTE_SIZE_WH
        canvas = np.pad(portrait, ((0, max(0, height - portrait.shape[0])), (0, max(0, width - portrait.shape[1])),
                                   (0, 0)), mode="reflect")[:height, :width]
        bx, by = PASTE_BOX_AT
        pictures = []
        for face in faces:
            frame = canvas.copy()
            frame[by:by + face.shape[0], bx:bx + face.shape[1]] = face
            pictures.append(frame)
    else:
        raise SystemExit(f"unknown case {case!r}: use paste or golden")
    paths = []
    for i in range(count if case == "paste" else len(pictures)):
        path = out_dir / f"{i:06d}.png"
        Image.fromarray(pictures[i % len(pictures)]).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# the workers (one process each)
# --------------------------------------------------------------------------------------------------
def upstream_worker(args) -> dict:
    """RealESRGANer as SadTalker builds it (no sfr import here: this runs in the upstream venv)."""
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from realesrgan import RealESRGANer

    model = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=2)
    upsampler = RealESRGANer(scale=2, model_path=str(Path(args.weights) / WEIGHTS_FILE), model=model, tile=400,
                             tile_pad=10, pre_pad=0, half=False, device=torch.device("cpu"))
    seconds, tiles = 0.0, 0
    for path in sorted(Path(args.frames_dir).glob("*.png")):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR, as SadTalker hands it over
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet:  # RealESRGANer prints a line per tile
            stdout, sys.stdout = sys.stdout, quiet
            try:
                output, _ = upsampler.enhance(image, outscale=2)
            finally:
                sys.stdout = stdout
        seconds += time.perf_counter() - start
        tiles += -(-image.shape[0] // 400) * -(-image.shape[1] // 400)
        cv2.imwrite(str(Path(args.out) / path.name), output)
    return {"upsampler_seconds": seconds, "tiles_computed": tiles, "tiles_reused": 0}


# --------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------
def run_worker(python: str, kind: str, frames: Path, out: Path, args, reuse: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [python, str(Path(__file__).resolve()), "--worker", kind, "--frames-dir", str(frames), "--out", str(out),
               "--weights", str(args.weights), "--threads", str(args.threads), "--batch", str(args.batch)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if kind == "sfr":  # the real command, as a user runs it
        command = [python, "-m", "sfr_cli.cli", "enhance", "--input", str(frames), "--enhancer", "none",
                   "--background-enhancer", "realesrgan", "--enhancer-dir", str(args.weights), "--frames-dir",
                   str(out), "--batch-size", str(args.batch), "--device", "cpu", "--json", "--overwrite"]
        env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS=str(args.threads), SFR_TILE_REUSE="1" if reuse else "0")
    start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if kind == "sfr":  # sfr enhance's report: its seconds span decode, stage and PNG writing
        row = {"upsampler_seconds": row["seconds"], "tiles_computed": row["background_tiles_computed"],
               "tiles_reused": row["background_tiles_reused"]}
    row.update(process_seconds=wall, process_cpu_seconds=cpu, frames=len(list(frames.glob("*.png"))))
    return row


def compare(folder_a: Path, folder_b: Path) -> dict:
    import numpy as np
    from PIL import Image

    worst, differing, values = 0, 0, 0
    for path in sorted(folder_a.glob("*.png")):
        a = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
        b = np.asarray(Image.open(folder_b / path.name).convert("RGB")).astype(np.int16)
        diff = np.abs(a - b)
        worst, differing, values = max(worst, int(diff.max())), differing + int(np.count_nonzero(diff)), values + diff.size
    return {"max_levels": worst, "share_differing": differing / values}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help=f"folder holding {WEIGHTS_FILE}")
    parser.add_argument("--upstream-python", default="/tmp/upstream-venv/bin/python")
    parser.add_argument("--cases", default="paste,golden")
    parser.add_argument("--frames", type=int, default=4, help="frames of the paste case (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1, as the golden)")
    parser.add_argument("--batch", type=int, default=4, help="sfr's frames per batch (default 4)")
    parser.add_argument("--also-no-reuse", action="store_true", help="also time sfr with tile reuse off")
    parser.add_argument("--reference", default=str(REFERENCE_DIR))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=("upstream",), help=argparse.SUPPRESS)
    parser.add_argument("--frames-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row = upstream_worker(args)
        print(json.dumps(row))
        return
    if not (Path(args.weights) / WEIGHTS_FILE).is_file():
        raise SystemExit(f"{args.weights} lacks {WEIGHTS_FILE}")
    work = Path(tempfile.mkdtemp(prefix="bench-realesrgan-"))
    rows = []
    for case in args.cases.split(","):
        frames = work / case / "frames"
        write_case_frames(case, frames, args.frames, Path(args.reference))
        runs = [("upstream", True), ("sfr", True)] + ([("sfr", False)] if args.also_no_reuse else [])
        for kind, reuse in runs:
            label = kind if kind == "upstream" else f"sfr reuse {'on' if reuse else 'off'}"
            out = work / case / label.replace(" ", "-")
            python = args.upstream_python if kind == "upstream" else sys.executable
            row = run_worker(python, kind, frames, out, args, reuse)
            row.update(case=case, run=label)
            if case == "golden":  # golden-bg's bg/: upstream's own output when the golden was made
                row["vs_golden_bg"] = compare(out, Path(args.reference) / "golden-bg" / "bg")
            if kind == "sfr":
                row.update(compare(out, work / case / "upstream"))
                upstream = rows_by(rows, case, "upstream")
                row["time_ratio_vs_upstream"] = row["process_seconds"] / upstream["process_seconds"]
                row["cpu_ratio_vs_upstream"] = row["process_cpu_seconds"] / upstream["process_cpu_seconds"]
            rows.append(row)
            if not args.json:
                print(format_row(row), flush=True)
    if args.json:
        print(json.dumps({"threads": args.threads, "batch": args.batch, "rows": rows}, indent=1))


def rows_by(rows, case, run):
    return next(r for r in rows if r["case"] == case and r["run"] == run)


def format_row(row) -> str:
    text = (f"{row['case']:7s} {row['run']:15s} {row['frames']} frames: process {row['process_seconds']:7.1f} s "
            f"({row['process_cpu_seconds']:.1f} s CPU), "
            f"upsampler {row['upsampler_seconds'] / row['frames']:6.1f} s/frame, tiles computed "
            f"{row['tiles_computed']} reused {row['tiles_reused']}")
    if "vs_golden_bg" in row:
        text += (f"; vs golden-bg/bg: max {row['vs_golden_bg']['max_levels']} levels, "
                 f"{100 * row['vs_golden_bg']['share_differing']:.4f} %")
    if "max_levels" in row:
        text += (f"; x{row['time_ratio_vs_upstream']:.2f} of upstream's time (CPU x{row['cpu_ratio_vs_upstream']:.2f}); "
                 f"frames vs upstream: max "
                 f"{row['max_levels']} levels, {100 * row['share_differing']:.4f} % of values differ")
    return text


if __name__ == "__main__":
    main()
