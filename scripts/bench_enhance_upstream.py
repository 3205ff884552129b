"""Time the upstream face enhancer (gfpgan's GFPGANer + facexlib's FaceRestoreHelper, as SadTalker's
`--enhancer gfpgan` calls it) per frame, on the same cases and weights as scripts/bench_enhance.py.

This script is NOT part of sfr and does not import it: run it from a throwaway venv holding the upstream
packages (they are no sfr dependency), e.g.

    python3 -m venv /tmp/upstream-venv
    /tmp/upstream-venv/bin/pip install torch==2.13.0 torchvision==0.28.0 gfpgan==1.3.8 facexlib==0.3.0 \
        basicsr==1.4.2 opencv-python-headless      # check first (--dry-run) that no CUDA packages come along
    /tmp/upstream-venv/bin/python scripts/bench_enhance_upstream.py --weights x --patch-venv  # once, see below
    python ../shared/reference/make_enhancer_checkpoints.py /tmp/bench-enh-weights --seed 14  # golden's weights
    /tmp/upstream-venv/bin/python scripts/bench_enhance_upstream.py --weights /tmp/bench-enh-weights \
        [--threads N] [--frames 4] [--cases 256,640x1024] [--json]

The weights folder holds GFPGANv1.4.pth, detection_Resnet50_Final.pth and parsing_parsenet.pth (sfr's
`stages.enhance.write_random_weights(dir, 'gfpgan', 14)` or `make_enhancer_checkpoints.py DIR --seed 14`: the
golden-enhance weights; their sha256 is recorded in the output). Per frame, as SadTalker's
`src/utils/face_enhancer.py` does: `GFPGANer(model_path, upscale=2, arch='clean', channel_multiplier=2,
bg_upsampler=None).enhance(bgr, has_aligned=False, only_center_face=False, paste_back=True)`, on the BGR frame
(`cv2.imread` of the PNG = SadTalker's RGB->BGR of the same frame), one warm-up frame per case first.

What is changed in the upstream code, as for golden-enhance (its meta.json `patches`):
- torchvision: if its compiled ops cannot load (the PyPI wheel is a CUDA build; this venv's torch is the CPU
  one), patch the venv once with `--patch-venv` (torchvision/__init__.py skips `_meta_registrations` when
  its `_C` did not load; basicsr/data/degradations.py imports `rgb_to_grayscale` from
  `torchvision.transforms.functional`, `functional_tensor` being gone), and `torchvision.ops.nms` is replaced
  here by a plain-torch greedy NMS (`nms_cpu`: IoU > threshold, in score order), which is what facexlib calls;
- StyleGAN2 noise: `randomize_noise=False` (the stored noise buffers, as sfr's default; the cost is the same);
- downloads raise (every file must be in the weights folder: facexlib's `model_rootpath` is GFPGANer's
  relative `gfpgan/weights`, so the run happens in a temporary folder where that links to --weights);
- timing wrappers only (wall seconds; the row also gives process CPU seconds per frame, all threads) (arguments and results passed through unchanged): detection
  (`get_face_landmarks_5`), alignment (`align_warp_face`), gfpgan (net forward + `tensor2img`), parse_mask
  (ParseNet forward + `cv2.GaussianBlur`, used only by the parse mask), paste (the rest of
  `get_inverse_affine` + `paste_faces_to_input_image`: Lanczos 2x, warps, blend), other (the rest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
WEIGHT_FILES = ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth")
MODEL_FILES = {"clean": "GFPGANv1.4.pth", "RestoreFormer": "RestoreFormer.pth"}  # --arch: SadTalker's two restorers
STEPS = ("detection", "alignment", "gfpgan", "parse_mask", "paste")


def patch_venv() -> None:
    """Make gfpgan 1.3.8 / basicsr 1.4.2 import with a CUDA-build torchvision on CPU torch (edits files
    of the venv this runs from; idempotent)."""
    import importlib.util

    tv_init = Path(importlib.util.find_spec("torchvision").origin)
    text = tv_init.read_text()
    old = "    _autograd_registrations,\n    _meta_registrations,\n"
    if old in text:  # register fake/autograd kernels only when torchvision's ops library loaded
        text = text.replace(old, "", 1).replace(
            "from . import extension  # usort:skip  # noqa: F401\n",
            "from . import extension  # usort:skip  # noqa: F401\n"
            "if extension._has_ops():  # patched: the CUDA-build _C cannot load on CPU torch\n"
            "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n", 1)
        tv_init.write_text(text)
    degradations = Path(importlib.util.find_spec("basicsr").submodule_search_locations[0]) / "data" / "degradations.py"
    text = degradations.read_text()
    if "functional_tensor" in text:
        degradations.write_text(text.replace("torchvision.transforms.functional_tensor", "torchvision.transforms.functional"))


def nms_cpu(boxes, scores, iou_threshold: float):
    """Greedy NMS as torchvision's CPU kernel: boxes `(N, 4)` x1y1x2y2, kept indices in descending score
    order; a box is dropped when its IoU with a kept one is > `iou_threshold`."""
    import torch

    boxes = boxes.float()
    order = torch.sort(scores, descending=True).indices
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou.double() > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def no_download(*args, **kwargs):
    raise RuntimeError(f"download blocked (weights must be local): {args[:1]}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def case_frames(name: str, reference: Path, count: int):
    import cv2

    if name == "256":
        paths = sorted((reference / "golden-enhance" / "frames").glob("*.png"))
    elif name == "640x1024":
        paths = [reference / "golden-paste" / "original.png"]
    else:
        raise SystemExit(f"unknown case {name!r}: use 256 or 640x1024")
    pictures = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]  # BGR, as SadTalker hands GFPGANer
    return [pictures[i % len(pictures)] for i in range(count)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="folder holding " + ", ".join(WEIGHT_FILES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--frames", type=int, default=4, help="frames per case (default 4: the golden frames once)")
    parser.add_argument("--cases", default="256,640x1024")
    parser.add_argument("--reference", default=str(REFERENCE_DIR))
    parser.add_argument("--patch-venv", action="store_true", help="patch torchvision/basicsr in this venv, then exit")
    parser.add_argument("--arch", choices=tuple(MODEL_FILES), default="clean",
                        help="GFPGANer's arch: clean (GFPGANv1.4.pth, --enhancer gfpgan) or RestoreFormer (RestoreFormer.pth)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.patch_venv:
        patch_venv()
        return
    weights = Path(args.weights).resolve()
    missing = [n for n in (MODEL_FILES[args.arch], *WEIGHT_FILES[1:]) if not (weights / n).is_file()]
    if missing:
        raise SystemExit(f"{weights} lacks {', '.join(missing)}")

    import cv2
    import torch
    import torch.hub
    import torchvision
    import torchvision.ops

    if args.threads is not None:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    torchvision.ops.nms = nms_cpu
    torch.hub.download_url_to_file = no_download
    import basicsr.utils.download_util
    import facexlib.utils.misc
    from facexlib.detection import retinaface_utils

    facexlib.utils.misc.download_url_to_file = no_download
    basicsr.utils.download_util.download_url_to_file = no_download
    if hasattr(retinaface_utils, "torchvision"):
        retinaface_utils.torchvision.ops.nms = nms_cpu
    import gfpgan.utils
    from gfpgan import GFPGANer

    seconds = defaultdict(float)

    def timed(step, fn):
        def wrapper(*a, **k):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn(*a, **k)
            seconds[step] += time.perf_counter() - start
            seconds["cpu_" + step] += time.process_time() - cpu_start
            return out

        return wrapper

    workdir = tempfile.mkdtemp(prefix="upstream-enh-")
    os.makedirs(os.path.join(workdir, "gfpgan"))
    os.symlink(weights, os.path.join(workdir, "gfpgan", "weights"))
    os.chdir(workdir)  # GFPGANer hands facexlib model_rootpath='gfpgan/weights' (relative)
    started = time.perf_counter()
    restorer = GFPGANer(model_path=str(weights / MODEL_FILES[args.arch]), upscale=2, arch=args.arch,
                        channel_multiplier=2, bg_upsampler=None)
    load_seconds = time.perf_counter() - started
    gfpgan_forward = restorer.gfpgan.forward
    restorer.gfpgan.forward = timed("gfpgan", lambda *a, **k: gfpgan_forward(*a, **{**k, "randomize_noise": False}))
    gfpgan.utils.tensor2img = timed("gfpgan", gfpgan.utils.tensor2img)
    helper = restorer.face_helper
    helper.get_face_landmarks_5 = timed("detection", helper.get_face_landmarks_5)
    helper.align_warp_face = timed("alignment", helper.align_warp_face)
    helper.get_inverse_affine = timed("paste_total", helper.get_inverse_affine)
    helper.paste_faces_to_input_image = timed("paste_total", helper.paste_faces_to_input_image)
    parse_forward = helper.face_parse.forward
    helper.face_parse.forward = timed("parse_mask", parse_forward)
    cv2.GaussianBlur = timed("parse_mask", cv2.GaussianBlur)  # facexlib's helper calls it for the parse mask only

    rows = []
    for name in args.cases.split(","):
        frames = case_frames(name, Path(args.reference), args.frames)
        with torch.no_grad():
            restorer.enhance(frames[0], has_aligned=False, only_center_face=False, paste_back=True)  # warm-up
            seconds.clear()
            faces = 0
            start, cpu_start = time.perf_counter(), time.process_time()
            for bgr in frames:
                _, _, out = restorer.enhance(bgr, has_aligned=False, only_center_face=False, paste_back=True)
                faces += len(helper.cropped_faces)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        steps = {k: seconds.get(k, 0.0) for k in STEPS if k != "paste"}
        steps["paste"] = seconds.get("paste_total", 0.0) - seconds.get("parse_mask", 0.0)
        steps["other"] = max(0.0, total - sum(steps.values()))
        cpu_steps = {k: seconds.get("cpu_" + k, 0.0) for k in STEPS if k != "paste"}
        cpu_steps["paste"] = seconds.get("cpu_paste_total", 0.0) - seconds.get("cpu_parse_mask", 0.0)
        n = len(frames)
        rows.append({
            "case": name, "size_wh": [int(frames[0].shape[1]), int(frames[0].shape[0])], "frames": n, "faces": faces,
            "out_wh": [int(out.shape[1]), int(out.shape[0])], "device": "cpu", "threads": torch.get_num_threads(),
            "code": "upstream GFPGANer.enhance", "seconds_per_frame": round(total / n, 3),
            "seconds_per_face": round(total / faces, 3) if faces else None, "cpu_seconds_per_frame": round(cpu / n, 3),
            "step_seconds_per_frame": {k: round(v / n, 4) for k, v in steps.items()},
            "step_cpu_seconds_per_frame": {k: round(v / n, 4) for k, v in cpu_steps.items()},
            "load_seconds": round(load_seconds, 2), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "weights_sha256": {n_: sha256(weights / n_)[:16] for n_ in (MODEL_FILES[args.arch], *WEIGHT_FILES[1:])},
        })
        print(json.dumps(rows[-1]), file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
