"""The face enhancer as a frame stage: SadTalker's `--enhancer gfpgan`, on the render device, in batches.

SadTalker ends its render stage by running GFPGAN v1.4 through facexlib's face-restore helper on every
frame of the finished video (the face frames, or in full modes the pasted picture), output at twice the
size. Per frame, the same steps here, on batches of frames and of faces:

1. RetinaFace-R50 on the frame at its own size: faces over 0.97, NMS 0.4, eyes at least 5 px apart, all
   faces kept in score order (`nets.retinaface`);
2. per face the similarity to the FFHQ 5-point template at 512 as OpenCV's
   `estimateAffinePartial2D(LMEDS)` gives it, and the aligned 512 crop (bilinear, constant border
   (135, 133, 132) BGR) (`imaging.face_align`);
3. GFPGANv1Clean on the crop, clamped and rounded as basicsr's `tensor2img` (`nets.gfpgan`);
4. ParseNet's soft mask of the restored face (`nets.parsenet`);
5. the background resized 2x with Lanczos-4 (or kept, `--enhancer-upscale 1`), each face warped back
   and blended in, restricted to the face's box (`imaging.face_blend`).
A frame without faces is the resized background alone.

Why no OpenCV, gfpgan, facexlib, basicsr or torchvision: gfpgan 1.3.8 / basicsr 1.4.2 no longer import
with current torchvision, OpenCV's functions run on the CPU one frame at a time, and each package pulls a
large tree for a few functions. Every step above is written in torch (exact to OpenCV where SadTalker's
output depends on it: the tests hold it against OpenCV's own outputs and the upstream golden), so the
whole stage runs on the render device, in batches, with the renderer's memory rules.

The module is the stage's one home: its options (`Options`, `OPTIONS`), the files it reads
(`input_files`), its weights (found, checked before any model loads, loaded, written at random for `sfr
checkpoints random --enhancer`), `plan`, the stage (`FaceEnhancer`) and its report. Step 3's net is a
slot: the restorer registry (`stages.restorers`) fills it (gfpgan, restoreformer). Step 5's background is
a slot too (`stages.backgrounds`: Lanczos, or Real-ESRGAN with `--background-enhancer realesrgan`, whose
weights file is found, checked and loaded here like the face path's). With `--enhancer none` and a
background enhancer the stage is the background alone: whole frames upscaled (`BackgroundUpscaler`).

What differs from SadTalker, on purpose: no lossy H.264 encode and decode before the enhancer (it gets
the rendered frames), StyleGAN2 noise from the weights file by default (the same job gives the same
frames; SadTalker draws fresh noise for every face, so fine texture flickers), and `--enhancer-upscale 1`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import click

from ..errors import CheckpointError, ConfigError
from ..options import BATCH, CLIP, ENHANCE, RENDER, ChoiceOrNone, IntChoice, OptionRow
from .backgrounds import BACKGROUND_ENHANCERS, make_background, tile_reuse, upsampler_of
from .restorers import ALIASES, ENHANCERS, canonical, restorer_of

UPSCALES = (2, 1)  # 2: SadTalker's (twice the input size); 1: the input's size
NOISES = ("stored", "random")
# Faces restored per call. On a CPU one at a time, and frames detected one at a time: CPU kernels pick
# their reduction order by batch size (a batch of 3 moved a landmark by 1e-5 px, hence a warp position by
# 1/32 px and a level here and there), the convolutions already use every core on one face, and so the
# frames do not depend on the batch size. On CUDA as many as fit (halved on out-of-memory).
CPU_FACES_PER_CALL = 1
CUDA_FACES_PER_CALL = 32
SEED_BITS = 63

# The enhancer's options (`options.table()` reads them): the face enhancer (`enhancer` and its options) and
# the background it pastes on (`background_enhancer`), which also runs alone (whole frames).
OPTIONS = (
    OptionRow("enhancer", ("--enhancer",), "Restore faces after paste-back, as SadTalker's --enhancer gfpgan or "
              "RestoreFormer (-tiny: the same nets at test widths; none: off).",
              type=ChoiceOrNone(ENHANCERS, ALIASES), scope=CLIP, column=True,
              batch_help="Default enhancer for every row (a row's none turns it off)."),
    OptionRow("background_enhancer", ("--background-enhancer",), "Upsample the background the faces are pasted "
              "on with Real-ESRGAN x2plus, as SadTalker's --background_enhancer realesrgan; without --enhancer, "
              "whole frames 2x (-tiny: test widths; none: Lanczos). fp32; $SFR_TILE_REUSE=0 computes every tile.",
              type=ChoiceOrNone(BACKGROUND_ENHANCERS), scope=CLIP, column=True, commands=(RENDER, BATCH, ENHANCE),
              batch_help="Default background enhancer for every row (a row's none turns it off)."),
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


@dataclass(frozen=True)
class Options:
    """A job's enhancer options (`job.stages["enhance"]`), one field per row of `OPTIONS`."""

    enhancer: Optional[str] = None  # the face enhancer after paste-back: "gfpgan" (SadTalker's) or None
    background_enhancer: Optional[str] = None  # the background's upsampler ("realesrgan"); None: Lanczos
    enhancer_dir: Optional[Path] = None  # its weights' folder; None: searched beside the checkpoints
    enhancer_upscale: int = 2  # 2: twice the size, as SadTalker; 1: the frames' own size
    enhancer_noise: str = "stored"  # StyleGAN2 noise: "stored" in the weights file, or "random" per face
    enhancer_seed: Optional[int] = None  # the random noise's seed (None: drawn, and reported)


# ---------------------------------------------------------------------------------------------------
# Weights: the restorer's file (the registry's) and the face path's two, found in one folder.

FACE_PATH_FILES = {"detector": "detection_Resnet50_Final.pth", "parser": "parsing_parsenet.pth"}
ENHANCER_DIR_ENV = "SFR_ENHANCER_DIR"
CHECKPOINT_DIR_ENV = "SFR_CHECKPOINT_DIR"  # checkpoints.CHECKPOINT_DIR_ENV (not imported: it loads torch)


@dataclass(frozen=True)
class FaceFiles:
    """The three files an enhancer reads: its restorer's, RetinaFace's and ParseNet's."""

    restorer: Path
    detector: Path
    parser: Path

    def paths(self) -> List[Path]:
        return [self.restorer, self.detector, self.parser]


@dataclass
class FaceNets:
    """The enhancer's modules, in eval mode: the restorer (GFPGANv1Clean, ...), RetinaFace and ParseNet."""

    restorer: object
    detector: object
    parser: object

    def to(self, device) -> "FaceNets":
        return FaceNets(self.restorer.to(device), self.detector.to(device), self.parser.to(device))


def weights_files(enhancer: str) -> List[str]:
    """The file names `enhancer` reads, its restorer's first."""
    return [restorer_of(enhancer)[0].weights_file, *FACE_PATH_FILES.values()]


def search_dirs(enhancer_dir=None, checkpoint_dir=None) -> List[Path]:
    """Where the enhancer's files are looked for, in order: ``enhancer_dir`` alone when given; else
    ``$SFR_ENHANCER_DIR``, then where SadTalker's download script puts them (``gfpgan/weights`` beside the
    checkpoints folder), then the checkpoints folder itself."""
    if enhancer_dir is not None:
        return [Path(enhancer_dir)]
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else \
        Path(os.environ.get(CHECKPOINT_DIR_ENV) or "checkpoints")
    dirs = [Path(os.environ[ENHANCER_DIR_ENV])] if os.environ.get(ENHANCER_DIR_ENV) else []
    return dirs + [checkpoints.parent / "gfpgan" / "weights", checkpoints]


def find_weights(enhancer: str = "gfpgan", enhancer_dir=None, checkpoint_dir=None) -> FaceFiles:
    """The first searched folder holding all three files; a CheckpointError naming the files and the
    folders searched when none does."""
    names = weights_files(enhancer)
    searched = search_dirs(enhancer_dir, checkpoint_dir)
    for folder in searched:
        files = FaceFiles(*(folder / name for name in names))
        if all(path.is_file() for path in files.paths()):
            return files
    partial = [(folder, [n for n in names if not (folder / n).is_file()]) for folder in searched]
    partial = [(folder, missing) for folder, missing in partial if len(missing) < len(names)]
    detail = (f"; {partial[0][0]} lacks {', '.join(partial[0][1])}" if partial else "")
    raise CheckpointError(
        f"the face enhancer needs {', '.join(names)} (SadTalker's gfpgan/weights); searched "
        f"{', '.join(str(folder) for folder in searched)}{detail}. Pass --enhancer-dir DIR, or write random "
        "ones with `sfr checkpoints random DIR --enhancer`")


def build_nets(enhancer: str = "gfpgan") -> FaceNets:
    """The enhancer's modules for ``enhancer`` (gfpgan, gfpgan-tiny, ...) with untrained weights (no I/O)."""
    from ..nets.parsenet import FACEXLIB_PARSENET_CONFIG, TINY_PARSENET_CONFIG, ParseNet
    from ..nets.retinaface import build_retinaface

    if enhancer not in ENHANCERS:
        raise CheckpointError(f"unknown enhancer {enhancer!r}; use {' or '.join(ENHANCERS)}")
    restorer, tiny = restorer_of(enhancer)
    nets = FaceNets(restorer.build(tiny), build_retinaface(tiny=tiny),
                    ParseNet(**(TINY_PARSENET_CONFIG if tiny else FACEXLIB_PARSENET_CONFIG)))
    for module in (nets.restorer, nets.detector, nets.parser):
        module.eval().requires_grad_(False)
    return nets


def read_state_dicts(enhancer: str, files: FaceFiles) -> Dict[str, Dict]:
    """``{restorer, detector, parser: state_dict}`` as the nets name their keys (`read_weights`). No code runs."""
    return {part: read_weights(part, getattr(files, part), enhancer) for part in ("restorer", "detector", "parser")}


def read_weights(part: str, path, enhancer: str = "gfpgan") -> Dict:
    """One of the enhancer's files as its net names the keys: the restorer's unwrapped as `enhancer`'s
    registry entry says (``params_ema``, else ``params``), the detector's DataParallel ``module.`` prefix
    stripped, the parser's flat dict as it is; part ``background``: the upsampler's file, `enhancer` then
    naming the background enhancer (`stages.backgrounds`), unwrapped as its entry says. Memory-mapped,
    tensors only: no code runs."""
    import torch

    from ..checkpoints import read_weights_file
    from ..nets.retinaface import strip_module_prefix

    path = Path(path)
    entry = upsampler_of(enhancer)[0] if part == "background" else restorer_of(enhancer)[0]
    accepted = (entry.weights_file if part == "background"
                else "SadTalker's gfpgan/weights files " + ", ".join(weights_files(enhancer)))
    data = read_weights_file(path, accepted)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    if part == "detector":
        data = strip_module_prefix(data)
    elif part != "parser":
        try:
            data = entry.unwrap(data)
        except KeyError as exc:
            raise CheckpointError(f"{path}: {exc.args[0]}; is this {entry.weights_file}?") from exc
    if not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return data


def weights_part(name: str) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """For a file name of the enhancers' (SadTalker's): (its part, the enhancers that read it: the
    background enhancers for part ``background``); None for any other name."""
    backgrounds = tuple(b for b in BACKGROUND_ENHANCERS if upsampler_of(b)[0].weights_file == name)
    if backgrounds:
        return "background", backgrounds
    parts = {name: part for part, name in FACE_PATH_FILES.items()}
    enhancers = tuple(enhancer for enhancer in ENHANCERS
                      if parts.get(name) is not None or restorer_of(enhancer)[0].weights_file == name)
    if not enhancers:
        return None
    return parts.get(name, "restorer"), enhancers


def inspect_weights_file(path) -> List[str]:
    """`sfr checkpoints inspect` for one of the enhancers' files (named as SadTalker names them,
    `weights_part`): lines saying what it holds and which enhancer it fits; CheckpointError naming the
    first mismatch when it fits none."""
    import torch

    from ..checkpoints import check_state_dict

    part, enhancers = weights_part(Path(path).name)
    state_dict = read_weights(part, path, enhancers[0])
    values = sum(t.numel() for t in state_dict.values() if t.is_floating_point())
    owner = "the background enhancer's net" if part == "background" else f"the face enhancer's {part}"
    lines = [f"{path}: {owner} ({len(state_dict)} tensors, {values:,} parameters)"]
    first_error = None
    for enhancer in enhancers:
        try:
            check_part(part, enhancer, state_dict, path)
        except CheckpointError as exc:
            first_error = first_error or exc
            continue
        option = "--background-enhancer" if part == "background" else "--enhancer"
        return lines + [f"fits the {enhancer} {'background ' if part == 'background' else ''}enhancer "
                        f"({option} {enhancer})"]
    raise first_error


def build_part(part: str, name: str):
    """The untrained net of `part` (restorer, detector, parser; background) for enhancer (or background
    enhancer) `name`, in eval mode, no I/O; under `torch.device('meta')` it costs nothing."""
    if part == "background":
        upsampler, tiny = upsampler_of(name)
        return upsampler.build(tiny).eval().requires_grad_(False)
    return getattr(build_nets(name), part)


def check_part(part: str, name: str, state_dict, path) -> None:
    """Every key, shape and dtype of `state_dict` (read from `path`) against `part`'s net for `name`, built
    on the meta device. Raises CheckpointError."""
    import torch

    from ..checkpoints import check_state_dict

    with torch.device("meta"):
        net = build_part(part, name)
    what = f"the {name} background enhancer" if part == "background" else f"the {name} enhancer"
    check_state_dict(net, state_dict, str(path), what)


def check_weights(enhancer: str, files: FaceFiles) -> None:
    """Every key, shape and dtype of the three files against ``enhancer``'s modules (built on the meta
    device: no memory, no init); the files are memory-mapped, not loaded. Raises CheckpointError.

    Files that passed unchanged (same path, size and modification time) are not read again: the rows of
    a batch usually share one set of weights, and a full-size check costs 0.2-0.4 s per row."""
    _check_once(_check_files, enhancer, files, files.paths())


def check_background_weights(name: str, path) -> None:
    """`path` against background enhancer `name`'s net as `check_weights` checks the face path's files
    (meta device, memory-mapped, once while unchanged); names the other variant when the file fits it."""
    _check_once(_check_background, name, Path(path), [Path(path)])


def _check_once(check: Callable, name: str, files, paths: List[Path]) -> None:
    """`check(name, files)`, skipped when it passed for the same `paths` as they are on disk (path, size,
    modification time)."""
    identity = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            return check(name, files)  # the read says what is wrong
        identity.append((os.path.abspath(path), info.st_size, info.st_mtime_ns))
    _checked(check, name, files, tuple(identity))


@functools.lru_cache(maxsize=8)
def _checked(check: Callable, name: str, files, identity: Tuple) -> None:
    """`check(name, files)` once per (check, name, files as they are on disk); a failure is not kept."""
    check(name, files)


def _check_background(name: str, path: Path) -> None:
    state_dict = read_weights("background", path, name)
    try:
        check_part("background", name, state_dict, path)
    except CheckpointError as exc:
        for other in BACKGROUND_ENHANCERS:
            if other == name or upsampler_of(other)[0].weights_file != upsampler_of(name)[0].weights_file:
                continue
            try:
                check_part("background", other, state_dict, path)
            except CheckpointError:
                continue
            raise CheckpointError(f"{exc}; these are weights of the {other} background enhancer: pass "
                                  f"--background-enhancer {other}") from exc
        raise


def find_background_weights(name: str, enhancer_dir=None, checkpoint_dir=None) -> Path:
    """Background enhancer `name`'s file, in the first folder `search_dirs` gives that holds it (where the
    face enhancer's files are: SadTalker's gfpgan/weights); a CheckpointError naming the file and the
    folders searched when none does."""
    file_name = upsampler_of(name)[0].weights_file
    searched = search_dirs(enhancer_dir, checkpoint_dir)
    for folder in searched:
        if (folder / file_name).is_file():
            return folder / file_name
    raise CheckpointError(
        f"--background-enhancer {name} needs {file_name}; searched {', '.join(map(str, searched))}. Put it "
        "beside GFPGANv1.4.pth (SadTalker's gfpgan/weights), pass --enhancer-dir DIR, or write random ones "
        "with `sfr checkpoints random DIR --enhancer`")


def write_random_background_weights(out_dir, name: str = "realesrgan", seed: int = 39) -> Path:
    """Background enhancer `name`'s deterministic random weights in its real file's layout (``{'params_ema':
    sd}``) under its file name; at full size and seed 39 they are the reference weights of ``golden-bg``."""
    import torch

    from ..checkpoints import save_atomically

    upsampler, tiny = upsampler_of(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / upsampler.weights_file
    net = build_part("background", name)
    save_atomically(path, lambda p: torch.save(upsampler.wrap(upsampler.random_state_dict(net, seed)), p))
    return path


def _check_files(enhancer: str, files: FaceFiles) -> None:
    state_dicts = read_state_dicts(enhancer, files)
    try:
        _check_state_dicts(enhancer, state_dicts, files)
    except CheckpointError as exc:
        same_file = [other for other in ENHANCERS if other != enhancer and weights_files(other) == weights_files(enhancer)]
        for other in same_file:
            try:
                _check_state_dicts(other, state_dicts, files)
            except CheckpointError:
                continue
            raise CheckpointError(f"{exc}; these are weights of the {other} enhancer: pass --enhancer {other}") from exc
        raise


def _check_state_dicts(enhancer: str, state_dicts, files: FaceFiles) -> None:
    import torch

    from ..checkpoints import check_state_dict

    with torch.device("meta"):
        nets = build_nets(enhancer)
    for part, sd in state_dicts.items():
        check_state_dict(getattr(nets, part), sd, str(getattr(files, part)), f"the {enhancer} enhancer")


def load_nets(enhancer: str, files: FaceFiles) -> FaceNets:
    """Build ``enhancer``'s modules and fill them from ``files``, strictly (keys, shapes, finite values)."""
    return FaceNets(*(load_part(part, enhancer, getattr(files, part)) for part in ("restorer", "detector", "parser")))


def load_part(part: str, name: str, path):
    """`part`'s net (restorer, detector, parser; background) for enhancer (or background enhancer) `name`,
    filled from `path` strictly (keys, shapes, finite values), fp32, in eval mode, on the CPU."""
    import torch

    from ..checkpoints import load_into

    with torch.device("meta"):
        net = build_part(part, name)
    what = f"the {name} background enhancer" if part == "background" else f"the {name} enhancer"
    load_into(net, read_weights(part, path, name), str(path), what)
    return net


def write_random_weights(out_dir, enhancer: str = "gfpgan", seed: int = 14) -> FaceFiles:
    """Deterministic random weights in the real files' layouts (the restorer's wrapper, e.g.
    ``{'params_ema': sd}``, ``module.``-prefixed detector keys, flat ParseNet) under SadTalker's names; at
    full size and seed 14 they are the reference weights of ``golden-enhance``. The detector is
    conditioned to find faces."""
    import torch

    from .. import detector_weights
    from ..checkpoints import save_atomically
    from ..nets import parsenet, retinaface

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    restorer, tiny = restorer_of(enhancer)
    nets = build_nets(enhancer)
    detector_seed = detector_weights.TINY_SEED if tiny and seed == 14 else seed
    files = FaceFiles(*(out_dir / name for name in weights_files(enhancer)))
    save_atomically(files.restorer, lambda p: torch.save(restorer.wrap(restorer.random_state_dict(nets.restorer, seed)), p))
    detector = detector_weights.random_state_dict(nets.detector, detector_seed)
    save_atomically(files.detector, lambda p: torch.save(
        {retinaface.DATAPARALLEL_PREFIX + k: v for k, v in detector.items()}, p))
    save_atomically(files.parser, lambda p: torch.save(parsenet.random_state_dict(nets.parser, seed), p))
    return files


def random_weights_names(tiny: bool) -> Dict[str, List[str]]:
    """`sfr checkpoints random --enhancer`: the enhancer and background enhancer names it writes (each
    restorer's and upsampler's, at the config's widths) and their files."""
    names = {name: weights_files(name) for name in ENHANCERS if name.endswith("-tiny") == tiny}
    names.update({name: [upsampler_of(name)[0].weights_file] for name in BACKGROUND_ENHANCERS
                  if name.endswith("-tiny") == tiny})
    return names


def write_random_files(out_dir, name: str, seed: int) -> None:
    """`sfr checkpoints random --enhancer`: the files of `name` (a `random_weights_names` key) with
    `seed` moved along from each net's reference seed (14 for the face path, 39 for the background)."""
    if name in BACKGROUND_ENHANCERS:
        write_random_background_weights(out_dir, name, 39 + seed)
    else:
        write_random_weights(out_dir, name, 14 + seed)


# ---------------------------------------------------------------------------------------------------
# The stage module's hooks


def input_files(options: Options, job) -> List[Tuple[Path, str]]:
    """The files the enhancer and background enhancer of `options` read, `(path, role)`: their weights as
    found (none when they are not found: `plan` says so)."""
    checkpoint_dir = getattr(job, "checkpoint_dir", None)
    found: List[Tuple[Path, str]] = []
    if options.enhancer is not None and canonical(options.enhancer) in ENHANCERS:
        try:
            files = find_weights(canonical(options.enhancer), options.enhancer_dir, checkpoint_dir)
            found += [(path, "enhance weights") for path in files.paths()]
        except CheckpointError:
            pass
    if options.background_enhancer in BACKGROUND_ENHANCERS:
        try:
            found.append((find_background_weights(options.background_enhancer, options.enhancer_dir, checkpoint_dir),
                          "background enhancer weights"))
        except CheckpointError:
            pass
    return found


def ignored_options(options: Options) -> List[Tuple[List[str], str]]:
    """The options `options` give (away from their defaults) that do nothing for the job, as
    `([flag and value, ...], why)`: every enhancer option while both enhancers are off (the folder and
    the upscale serve a background enhancer alone too), the noise options without a face enhancer, the
    seed without random noise, random noise (and its seed) for a restorer that draws none. `plan` notes
    each."""
    defaults = Options()
    flags = {row.name: row.flags[0] for row in OPTIONS}

    def given(*names: str) -> List[str]:
        return [f"{flags[name]} {getattr(options, name)}" for name in names
                if getattr(options, name) != getattr(defaults, name)]

    if options.enhancer is None:
        names = ("enhancer_noise", "enhancer_seed") if options.background_enhancer is not None else \
            ("enhancer_dir", "enhancer_upscale", "enhancer_noise", "enhancer_seed")
        off = given(*names)
        return [(off, f"the face enhancer is off (add --enhancer {ENHANCERS[0]} to run it)")] if off else []
    if canonical(options.enhancer) not in ENHANCERS:
        return []
    restorer = restorer_of(options.enhancer)[0]
    if options.enhancer_noise != "random":
        seed = given("enhancer_seed")
        return [(seed, "it seeds --enhancer-noise random only")] if seed else []
    if restorer.draw_noise is None:
        return [(given("enhancer_noise", "enhancer_seed"), f"the {restorer.name} enhancer draws no noise")]
    return []


def plan(options: Options, job, size_px: int, note: Callable[[str], None]) -> List:
    """The enhancer stage `options` ask for (`options.enhancer`, `options.background_enhancer`), its
    weights found and checked (keys, shapes, no code) before any model loads, or none; a note for each
    option that does nothing here (`ignored_options`). `job` gives `checkpoint_dir` and `precision`."""
    enhancer, background = options.enhancer, options.background_enhancer
    if enhancer is not None and canonical(enhancer) not in ENHANCERS:
        raise ConfigError(f"unknown enhancer {enhancer!r}; use {' or '.join(ENHANCERS)}")
    if background is not None and background not in BACKGROUND_ENHANCERS:
        raise ConfigError(f"unknown background enhancer {background!r}; use {' or '.join(BACKGROUND_ENHANCERS)}")
    if enhancer is not None or background is not None:
        if options.enhancer_upscale not in UPSCALES:
            raise ConfigError(f"--enhancer-upscale {options.enhancer_upscale}: use 2 (SadTalker's) or 1")
    if enhancer is not None and options.enhancer_noise not in NOISES:
        raise ConfigError(f"--enhancer-noise {options.enhancer_noise!r}: use stored or random")
    for flags, why in ignored_options(options):
        note(f"{', '.join(flags)} ignored: {why}")
    if enhancer is None and background is None:
        return []
    env_dir = os.environ.get(ENHANCER_DIR_ENV)
    if options.enhancer_dir is None and env_dir and not Path(env_dir).is_dir():
        note(f"${ENHANCER_DIR_ENV}={env_dir}: no such folder; the enhancer's weights are searched in the other "
             "folders")
    background_file = None
    if background is not None:
        background_file = find_background_weights(background, options.enhancer_dir, job.checkpoint_dir)
        check_background_weights(background, background_file)
    reuse = tile_reuse() if background is not None else True
    if enhancer is None:
        if job.precision != "fp32":
            note(f"the background enhancer runs in fp32 (--precision {job.precision} reaches the renderer only: "
                 f"reduced precision is not yet measured to keep {upsampler_of(background)[0].about} within 40 dB "
                 "of fp32)")
        return [BackgroundUpscaler(background, background_file, options.enhancer_upscale, reuse)]
    enhancer = canonical(enhancer)
    files = find_weights(enhancer, options.enhancer_dir, job.checkpoint_dir)
    check_weights(enhancer, files)
    restorer = restorer_of(enhancer)[0]
    seed = None
    if options.enhancer_noise == "random" and restorer.draw_noise is not None:
        seed = options.enhancer_seed if options.enhancer_seed is not None else secrets.randbits(SEED_BITS)
        note(f"enhancer noise: fresh per face from seed {seed} (--enhancer-seed {seed} renders the same frames)")
    if job.precision != "fp32":
        nets = restorer.about + (f" and {upsampler_of(background)[0].about}" if background else "")
        note(f"the face enhancer runs in fp32 (--precision {job.precision} reaches the renderer only: reduced "
             f"precision is not yet measured to keep {nets} within 40 dB of fp32)")
    return [FaceEnhancer(enhancer, files, options.enhancer_upscale, seed, background, background_file, reuse)]


def face_seed(seed: int, frame: int, face: int) -> int:
    """The noise seed of face `face` of frame `frame` of a clip: the same whatever the batching."""
    digest = hashlib.blake2b(f"{seed}:{frame}:{face}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class BackgroundUpscaler:
    """Stage `enhance` without a face enhancer: `(B, H, W, 3) uint8` frames -> `(B, H*u, W*u, 3) uint8`,
    whole frames through background enhancer `background` (`stages.backgrounds`; u = `upscale`)."""

    background: str
    weights: Path
    upscale: int = 2
    tile_reuse: bool = True
    name: str = "enhance"
    _background: object = field(default=None, repr=False)

    def output_size(self, width_px: int, height_px: int) -> Tuple[int, int]:
        return width_px * self.upscale, height_px * self.upscale

    def report(self) -> Dict[str, object]:
        return {"enhancer_upscale": self.upscale, **(self._background or self._make()).report()}

    def _make(self):
        return make_background(self.background, self.upscale, self.weights, self.tile_reuse)

    def load(self, device, models) -> None:
        """The background's net on `device`; a new clip starts (no tile reused from another)."""
        self._background = self._make()
        self._background.load(device, models)

    def __call__(self, frames):
        return self._background(frames.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@dataclass
class FaceEnhancer:
    """Stage `enhance`: `(B, H, W, 3) uint8` frames -> `(B, H*u, W*u, 3) uint8` (u = `upscale`).

    `noise_seed` None: the noise stored in the weights file (reproducible, no flicker); else fresh
    N(0, 1) noise per face as SadTalker draws it, from `face_seed(noise_seed, frame, face)`.
    `background`: the background enhancer the faces are pasted on (`stages.backgrounds`; None: Lanczos),
    its weights file `background_weights`; bound in `load`, which starts a clip."""

    variant: str
    files: FaceFiles
    upscale: int = 2
    noise_seed: Optional[int] = None
    background: Optional[str] = None
    background_weights: Optional[Path] = None
    tile_reuse: bool = True
    name: str = "enhance"
    faces: int = 0  # faces enhanced so far (for the report)
    _nets: object = field(default=None, repr=False)
    _frames_seen: int = field(default=0, repr=False)
    _faces_per_call: int = field(default=0, repr=False)
    _background: object = field(default=None, repr=False)

    def output_size(self, width_px: int, height_px: int) -> Tuple[int, int]:
        return width_px * self.upscale, height_px * self.upscale

    def report(self) -> Dict[str, object]:
        background = self._background or make_background(self.background, self.upscale, self.background_weights,
                                                         self.tile_reuse)
        return {"enhancer": self.variant, "enhancer_upscale": self.upscale, "enhancer_faces": self.faces,
                "enhancer_noise_seed": self.noise_seed, **background.report()}

    def describe(self) -> str:
        """How it batches, once loaded, for the job's notes."""
        return "one face at a time" if self._faces_per_call == 1 else f"up to {self._faces_per_call} faces at a time"

    def load(self, device, models) -> None:
        """The three nets on `device`, once per process (the model cache keys them by files and device)."""
        key = ("enhancer", self.variant, *map(str, self.files.paths()), str(device))
        self._nets = models.stage_model(key, lambda: load_nets(self.variant, self.files).to(device))
        self._device = device
        self._faces_per_call = CUDA_FACES_PER_CALL if device.type == "cuda" else CPU_FACES_PER_CALL
        self._background = make_background(self.background, self.upscale, self.background_weights, self.tile_reuse)
        self._background.load(device, models)

    def __call__(self, frames):
        import torch

        from ..imaging import face_align, face_blend
        from ..nets.retinaface import detect_faces

        nets = self._nets
        rgb = frames.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
        first_frame = self._frames_seen
        self._frames_seen += rgb.shape[0]
        background = self._background(rgb)
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
        inverse = face_blend.paste_inverse_affines(matrices_t, self.upscale)
        out = face_blend.paste_faces(background, restored, masks, inverse, index_t)
        return out.permute(0, 2, 3, 1)

    def _restore(self, rgb, matrices, frame_index, face_number):
        """Aligned, restored faces `(N, 3, 512, 512) uint8` and their masks `(N, 512, 512)`, in calls of at
        most `_faces_per_call` faces; a CUDA out-of-memory error halves that and retries (no face lost)."""
        import torch

        from ..engine import OUT_OF_MEMORY, attempt, halve_after_oom
        from ..imaging import face_align
        from ..nets.parsenet import face_masks

        restorer = restorer_of(self.variant)[0]

        def restore(start: int, stop: int):
            aligned = face_align.align_faces(rgb, matrices[start:stop].to(rgb.device), frame_index[start:stop])
            noise = None
            if self.noise_seed is not None:
                draws = [restorer.draw_noise(self._nets.restorer, face_seed(self.noise_seed, *face_number[i]),
                                             rgb.device) for i in range(start, stop)]
                noise = [torch.cat(layer) for layer in zip(*draws)]
            faces = restorer.restore(self._nets.restorer, aligned, noise)
            return faces, face_masks(self._nets.parser, faces)

        restored, masks = [], []
        start, count = 0, matrices.shape[0]
        while start < count:
            stop = min(count, start + self._faces_per_call)
            result = attempt(restore, start, stop)
            if result is OUT_OF_MEMORY:
                self._faces_per_call = halve_after_oom(self._faces_per_call, self._device, "enhancing one face; "
                                                       "free the GPU or use --device cpu")
                continue
            restored.append(result[0])
            masks.append(result[1])
            start = stop
        return torch.cat(restored), torch.cat(masks)
