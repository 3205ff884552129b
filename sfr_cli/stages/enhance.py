"""The face enhancer as a frame stage: SadTalker's `--enhancer gfpgan`, on the render device, in batches.

SadTalker ends its render stage by running GFPGAN v1.4 through facexlib's face-restore helper on every
frame of the finished video (the face frames, or in full modes the pasted picture), output at twice the
size. Per frame, the same steps here, on batches of frames and of faces:

1. RetinaFace-R50 on the frame at its own size: faces over 0.97, NMS 0.4, eyes at least 5 px apart, all
   faces kept in score order (`nets.retinaface`);
2. per face the similarity to the FFHQ 5-point template at 512 as OpenCV's
   `estimateAffinePartial2D(LMEDS)` gives it, and the aligned 512 crop (bilinear, constant border
   (135, 133, 132) BGR) (`nets.face_align`);
3. GFPGANv1Clean on the crop, clamped and rounded as basicsr's `tensor2img` (`nets.gfpgan`);
4. ParseNet's soft mask of the restored face (`nets.parsenet`);
5. the background resized 2x with Lanczos-4 (or kept, `--enhancer-upscale 1`), each face warped back
   and blended in, restricted to the face's box (`nets.face_paste`).
A frame without faces is the resized background alone.

Why no OpenCV, gfpgan, facexlib, basicsr or torchvision: gfpgan 1.3.8 / basicsr 1.4.2 no longer import
with current torchvision, OpenCV's functions run on the CPU one frame at a time, and each package pulls a
large tree for a few functions. Every step above is written in torch (exact to OpenCV where SadTalker's
output depends on it: the tests hold it against OpenCV's own outputs and the upstream golden), so the
whole stage runs on the render device, in batches, with the renderer's memory rules.

What differs from SadTalker, on purpose: no lossy H.264 encode and decode before the enhancer (it gets
the rendered frames), StyleGAN2 noise from the weights file by default (the same job gives the same
frames; SadTalker draws fresh noise for every face, so fine texture flickers), and `--enhancer-upscale 1`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import click

from ..errors import ConfigError, SfrError
from ..options import BATCH, CLIP, ENHANCE, RENDER, ChoiceOrNone, IntChoice, OptionRow

ENHANCERS = ("gfpgan", "gfpgan-tiny")  # SadTalker's, and the same nets at test widths
UPSCALES = (2, 1)  # 2: SadTalker's (twice the input size); 1: the input's size
NOISES = ("stored", "random")
# Faces restored per call. On a CPU one at a time, and frames detected one at a time: CPU kernels pick
# their reduction order by batch size (a batch of 3 moved a landmark by 1e-5 px, hence a warp position by
# 1/32 px and a level here and there), the convolutions already use every core on one face, and so the
# frames do not depend on the batch size. On CUDA as many as fit (halved on out-of-memory).
CPU_FACES_PER_CALL = 1
CUDA_FACES_PER_CALL = 32
SEED_BITS = 63

# The enhancer's options (`options.table()` reads them). Renderer keywords for now: no command declares
# them yet; `commands=(RENDER, BATCH)` (and `column=True`, and the README's rows) puts them on the CLI.
OPTIONS = (
    OptionRow("enhancer", ("--enhancer",), "Restore faces after paste-back, as SadTalker's --enhancer gfpgan "
              "(gfpgan-tiny: the same nets at test widths; none: off).",
              type=ChoiceOrNone(ENHANCERS), scope=CLIP, column=True,
              batch_help="Default enhancer for every row (a row's none turns it off)."),
    OptionRow("enhancer_dir", ("--enhancer-dir",), "The enhancer's weights folder [default: searched beside "
              "the checkpoints].", path=True, scope=CLIP, column=True, commands=(RENDER, BATCH, ENHANCE)),
    OptionRow("enhancer_upscale", ("--enhancer-upscale",), "2: twice the frames' size, as SadTalker; 1: their "
              "own size.", type=IntChoice(UPSCALES), default="2", scope=CLIP, column=True,
              commands=(RENDER, BATCH, ENHANCE)),
    OptionRow("enhancer_noise", ("--enhancer-noise",), "StyleGAN2 noise: stored in the weights file (the same "
              "frames every run) or random per face, as SadTalker.", type=click.Choice(NOISES), default="stored",
              scope=CLIP, column=True, commands=(RENDER, BATCH, ENHANCE)),
    OptionRow("enhancer_seed", ("--enhancer-seed",), "The random noise's seed [default: drawn, and reported].",
              type=click.INT, scope=CLIP, column=True, commands=(RENDER, BATCH, ENHANCE)),
)


def input_files(job) -> List[Path]:
    """Every file this stage reads for `job`: the enhancer's three weights files where they are found
    (none when `job.enhancer` is off or they are missing: `plan` says what is wrong)."""
    if getattr(job, "enhancer", None) not in ENHANCERS:
        return []
    from .. import checkpoints

    try:
        return checkpoints.find_enhancer_weights(job.enhancer_dir, job.checkpoint_dir).paths()
    except SfrError:
        return []


def ignored_options(job) -> List[str]:
    """The enhancer options `job` gives away from their defaults while the enhancer is off, as flags."""
    given = [("--enhancer-dir", getattr(job, "enhancer_dir", None) is not None),
             ("--enhancer-upscale", getattr(job, "enhancer_upscale", 2) != 2),
             ("--enhancer-noise", getattr(job, "enhancer_noise", "stored") != "stored"),
             ("--enhancer-seed", getattr(job, "enhancer_seed", None) is not None)]
    return [flag for flag, off_default in given if off_default]


def plan(job, size_px: int, note: Callable[[str], None]) -> List:
    """The enhancer stage `job` asks for (`job.enhancer`), its weights found and checked (keys, shapes, no
    code) before any model loads, or none."""
    if job.enhancer is None:
        ignored = ignored_options(job)
        if ignored:
            note(f"{', '.join(ignored)} ignored: the face enhancer is off (add --enhancer gfpgan to run it)")
        return []
    from .. import checkpoints

    if job.enhancer not in ENHANCERS:
        raise ConfigError(f"unknown enhancer {job.enhancer!r}; use {' or '.join(ENHANCERS)}")
    if job.enhancer_upscale not in UPSCALES:
        raise ConfigError(f"--enhancer-upscale {job.enhancer_upscale}: use 2 (SadTalker's) or 1")
    if job.enhancer_noise not in NOISES:
        raise ConfigError(f"--enhancer-noise {job.enhancer_noise!r}: use stored or random")
    env_dir = os.environ.get(checkpoints.ENHANCER_DIR_ENV)
    if job.enhancer_dir is None and env_dir and not Path(env_dir).is_dir():
        note(f"${checkpoints.ENHANCER_DIR_ENV}={env_dir}: no such folder; the enhancer's weights are searched "
             "in the other folders")
    if job.enhancer_noise != "random" and job.enhancer_seed is not None:
        note(f"--enhancer-seed {job.enhancer_seed} ignored: it seeds --enhancer-noise random only")
    files = checkpoints.find_enhancer_weights(job.enhancer_dir, job.checkpoint_dir)
    checkpoints.check_enhancer_weights(job.enhancer, files)
    seed = None
    if job.enhancer_noise == "random":
        seed = job.enhancer_seed if job.enhancer_seed is not None else secrets.randbits(SEED_BITS)
        note(f"enhancer noise: fresh per face from seed {seed} (--enhancer-seed {seed} renders the same frames)")
    if job.precision != "fp32":
        note(f"the face enhancer runs in fp32 (--precision {job.precision} reaches the renderer only: reduced "
             "precision is not yet measured to keep GFPGAN within 40 dB of fp32)")
    return [FaceEnhancer(job.enhancer, files, job.enhancer_upscale, seed)]


def face_seed(seed: int, frame: int, face: int) -> int:
    """The noise seed of face `face` of frame `frame` of a clip: the same whatever the batching."""
    digest = hashlib.blake2b(f"{seed}:{frame}:{face}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class FaceEnhancer:
    """Stage `enhance`: `(B, H, W, 3) uint8` frames -> `(B, H*u, W*u, 3) uint8` (u = `upscale`).

    `noise_seed` None: the StyleGAN2 noise stored in the weights file (reproducible, no flicker); else
    fresh N(0, 1) noise per face as SadTalker draws it, from `face_seed(noise_seed, frame, face)`."""

    variant: str
    files: object  # checkpoints.EnhancerFiles
    upscale: int = 2
    noise_seed: Optional[int] = None
    name: str = "enhance"
    faces: int = 0  # faces enhanced so far (for the report)
    _nets: object = field(default=None, repr=False)
    _frames_seen: int = field(default=0, repr=False)
    _faces_per_call: int = field(default=0, repr=False)

    @property
    def input_files(self) -> List:
        return self.files.paths()

    def output_size(self, width_px: int, height_px: int) -> Tuple[int, int]:
        return width_px * self.upscale, height_px * self.upscale

    def report(self) -> Dict[str, object]:
        return {"enhancer": self.variant, "enhancer_upscale": self.upscale, "enhancer_faces": self.faces,
                "enhancer_noise_seed": self.noise_seed}

    def load(self, device, models) -> None:
        """The three nets on `device`, once per process (the model cache keys them by files and device)."""
        from .. import checkpoints

        key = ("enhancer", self.variant, *map(str, self.files.paths()), str(device))
        self._nets = models.stage_model(key, lambda: checkpoints.load_enhancer_nets(self.variant, self.files).to(device))
        self._device = device
        self._faces_per_call = CUDA_FACES_PER_CALL if device.type == "cuda" else CPU_FACES_PER_CALL

    def __call__(self, frames):
        import torch

        from ..nets import face_align, face_paste
        from ..nets.retinaface import detect_faces

        nets = self._nets
        rgb = frames.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
        first_frame = self._frames_seen
        self._frames_seen += rgb.shape[0]
        background = face_paste.upsample_background(rgb, self.upscale)
        if self._device.type == "cpu":  # one frame at a time: see CPU_FACES_PER_CALL
            detections = [rows for b in range(rgb.shape[0]) for rows in detect_faces(nets.detector, rgb[b : b + 1])]
        else:
            detections = detect_faces(nets.detector, rgb)
        matrices, frame_index, face_number = [], [], []
        for b, rows in enumerate(detections):
            for k, row in enumerate(rows.cpu()):
                matrices.append(face_align.similarity_lmeds(row[5:15].reshape(5, 2)))
                frame_index.append(b)
                face_number.append((first_frame + b, k))
        if not matrices:
            return background.permute(0, 2, 3, 1)
        self.faces += len(matrices)
        matrices_t = torch.stack(matrices)
        index_t = torch.tensor(frame_index, dtype=torch.int64, device=rgb.device)
        restored, masks = self._restore(rgb, matrices_t, index_t, face_number)
        inverse = face_paste.paste_inverse_affines(matrices_t, self.upscale)
        out = face_paste.paste_faces(background, restored, masks, inverse, index_t)
        return out.permute(0, 2, 3, 1)

    def _restore(self, rgb, matrices, frame_index, face_number):
        """Aligned, restored faces `(N, 3, 512, 512) uint8` and their masks `(N, 512, 512)`, in calls of at
        most `_faces_per_call` faces; a CUDA out-of-memory error halves that and retries (no face lost)."""
        import torch

        from ..nets import face_align
        from ..nets.gfpgan import restore_faces
        from ..nets.parsenet import face_masks
        from ..nets.stylegan2 import draw_noise

        restored, masks = [], []
        start, count = 0, matrices.shape[0]
        while start < count:
            stop = min(count, start + self._faces_per_call)
            try:
                aligned = face_align.align_faces(rgb, matrices[start:stop].to(rgb.device), frame_index[start:stop])
                noise = None
                if self.noise_seed is not None:
                    draws = [draw_noise(self._nets.gfpgan.stylegan_decoder, face_seed(self.noise_seed, *face_number[i]),
                                        1, rgb.device) for i in range(start, stop)]
                    noise = [torch.cat(layer) for layer in zip(*draws)]
                faces = restore_faces(self._nets.gfpgan, aligned, noise=noise)
                mask = face_masks(self._nets.parser, faces)
            except torch.cuda.OutOfMemoryError:
                faces = None
            if faces is None:
                if self._faces_per_call == 1:
                    from ..errors import RenderError

                    raise RenderError(f"out of GPU memory on {self._device} enhancing one face; free the GPU "
                                      "or use --device cpu")
                self._faces_per_call = max(1, self._faces_per_call // 2)
                torch.cuda.empty_cache()
                continue
            restored.append(faces)
            masks.append(mask)
            start = stop
        return torch.cat(restored), torch.cat(masks)
