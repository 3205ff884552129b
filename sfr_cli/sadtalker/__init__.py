"""SadTalker's own command with sfr as its face renderer:

    python -m sfr_cli.sadtalker [--precision fp16] path/to/SadTalker/inference.py --driven_audio a.wav \\
        --source_image face.png --enhancer gfpgan [every other inference.py flag]

SadTalker's `inference.py` runs as it is, from the user's checkout (nothing of SadTalker is copied into
sfr): its preprocessing (face crop, 3DMM extraction) and audio-to-coefficient steps are SadTalker's code.
Its face-render stage, `src.facerender.animate.AnimateFromCoeff`, is replaced before the script imports it
by `AnimateFromCoeff` below, which has the same constructor and `generate` and renders with sfr: the
render, paste-back in full modes, the face enhancer, in one pass, writing the one video SadTalker returns
(`<name>.mp4`, `<name>_full.mp4` or `<name>_enhanced.mp4` in its results folder), which `inference.py`
then moves to `<result_dir>/<timestamp>.mp4` as usual. SadTalker's own animate.py (and with it gfpgan,
basicsr and realesrgan, whose imports break on recent torchvision) is never imported.

The data dict `generate` takes is what SadTalker's `get_facerender_data` builds: `source_image`
`(B, 3, S, S)` float in [0, 1] (the source repeated over SadTalker's batch), `source_semantics` `(B, C, 27)`,
`target_semantics_list` `(B, T, C, 27)` (every frame's window, padded with the last to B x T, in frame
order), `frame_num`, `video_name`, `audio_path`, and with SadTalker's `--input_yaw/pitch/roll`
`yaw_c_seq`/`pitch_c_seq`/`roll_c_seq` `(B, T)` degrees. C is 70 (crop, resize, extcrop) or 73 (full,
extfull). SadTalker's expression scale and still mode are already applied to the windows.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import runpy
import sys
import types
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import SadTalkerError

# What inference.py imports from SadTalker's src/ besides the face renderer: imported first, so a missing
# package is one clear error before anything runs.
SADTALKER_MODULES = ("src.utils.preprocess", "src.test_audio2coeff", "src.generate_batch",
                     "src.generate_facerender_batch", "src.utils.init_path")
RENDERER_MODULE = "src.facerender.animate"
CHECKOUT_FILES = ("src/facerender/animate.py", "src/generate_facerender_batch.py", "src/utils/preprocess.py")
VIDEO_FPS = 25.0  # SadTalker writes every video at 25 frames per second


class AnimateFromCoeff:
    """SadTalker's face renderer, done by sfr: `AnimateFromCoeff(sadtalker_path, device)` as SadTalker builds
    it (`sadtalker_path` is `init_path`'s dict: `checkpoint` (safetensors) or `free_view_checkpoint` (pth),
    `mappingnet_checkpoint`, `facerender_yaml`), plus sfr's own settings as keywords: `precision`,
    `batch_size` (None: from free memory), `config` (instead of SadTalker's YAML, e.g. tiny for tests),
    `yaw`/`pitch`/`roll` (SadTalker's `--input_yaw` ... degrees, to match the data dict's per-frame
    sequences), `quiet`. Models load once per frame size, on the first `generate`."""

    def __init__(self, sadtalker_path: Dict, device, *, precision: str = "fp32", batch_size: Optional[int] = None,
                 config: Optional[str] = None, yaw: Optional[Sequence[float]] = None,
                 pitch: Optional[Sequence[float]] = None, roll: Optional[Sequence[float]] = None,
                 quiet: bool = False):
        renderer = sadtalker_path.get("checkpoint") or sadtalker_path.get("free_view_checkpoint")
        mapping = sadtalker_path.get("mappingnet_checkpoint")
        if not renderer or not mapping:
            raise SadTalkerError("SadTalker's paths name no renderer checkpoint ('checkpoint' or "
                                 "'free_view_checkpoint') or no 'mappingnet_checkpoint'; is this SadTalker's "
                                 "init_path() dict?")
        self.renderer_file, self.mapping_file = Path(renderer), Path(mapping)
        for path in (self.renderer_file, self.mapping_file):  # built before SadTalker's slow steps: say it now
            if not path.is_file():
                raise SadTalkerError(f"{path}: not there; fetch SadTalker's weights with `sfr checkpoints download "
                                     f"{path.parent}` (or its scripts/download_models.sh)")
        self.config = config if config is not None else sadtalker_path.get("facerender_yaml")
        self.device = str(device)
        self.precision, self.batch_size, self.quiet = precision, batch_size, quiet
        self.degrees = {"yaw": yaw, "pitch": pitch, "roll": roll}
        self._renderers: Dict[int, object] = {}

    def renderer(self, size_px: int):
        """sfr's `Renderer` for `size_px`, built once. Enhancer weights are looked for as SadTalker keeps
        them: `gfpgan/weights` beside the checkpoints folder."""
        if size_px not in self._renderers:
            from ..renderer import Renderer

            self._renderers[size_px] = Renderer(
                checkpoint_dir=self.renderer_file.parent, checkpoint=self.renderer_file, mapping=self.mapping_file,
                config=self.config, device=self.device, precision=self.precision, batch_size=self.batch_size,
                size=size_px)
        return self._renderers[size_px]

    def clip(self, x: Dict, pic_path, crop_info, enhancer: Optional[str] = None,
             background_enhancer: Optional[str] = None, preprocess: str = "crop", img_size: int = 256) -> Dict:
        """The `Renderer` keywords of one SadTalker clip (coeffs, source, source_coeffs and the options)."""
        frame_count = int(x["frame_num"])
        windows = _array(x["target_semantics_list"])
        coeff_count = windows.shape[-2]
        windows = windows.reshape(-1, coeff_count, windows.shape[-1])[:frame_count]
        source = _array(x["source_image"])[0].transpose(1, 2, 0)  # (S, S, 3) float in [0, 1]
        source_row = _array(x["source_semantics"])[0, :, 0]
        options = dict(coeffs=windows, source=np.clip(source, 0, 1), source_coeffs=source_row, preprocess=preprocess,
                       fps=VIDEO_FPS)
        for axis in ("yaw", "pitch", "roll"):
            if f"{axis}_c_seq" in x:
                options[axis] = self._sweep(axis, _array(x[f"{axis}_c_seq"]).reshape(-1)[:frame_count])
        options.update(_paste_options(pic_path, crop_info, preprocess))
        if enhancer:
            options["enhancer"] = sfr_enhancer(enhancer, self.config)
        if background_enhancer:
            options.update(_background_options(background_enhancer, self.config))
        return options

    def frames(self, x: Dict, pic_path, crop_info, enhancer=None, background_enhancer=None, preprocess="crop",
               img_size=256) -> Iterator[np.ndarray]:
        """The frames `generate` writes, `(H, W, 3) uint8 RGB`, without writing them."""
        return self.renderer(img_size).frames(**self.clip(x, pic_path, crop_info, enhancer, background_enhancer,
                                                          preprocess, img_size))

    def generate(self, x: Dict, video_save_dir, pic_path, crop_info, enhancer=None, background_enhancer=None,
                 preprocess="crop", img_size=256) -> str:
        """Render the clip into `video_save_dir` under the name SadTalker returns (`<video_name>.mp4`, or
        `_full.mp4` in full modes, `_enhanced.mp4` with an enhancer), with the audio cut to the video;
        returns its path."""
        from ..progress import RichReporter, SilentReporter

        suffix = "_enhanced" if enhancer else "_full" if "full" in preprocess.lower() else ""
        output = Path(video_save_dir) / f"{x['video_name']}{suffix}.mp4"
        options = self.clip(x, pic_path, crop_info, enhancer, background_enhancer, preprocess, img_size)
        with (SilentReporter() if self.quiet else RichReporter()) as reporter:
            self.renderer(img_size).render(output=output, audio=x.get("audio_path"), reporter=reporter, **options)
        return str(output)

    def _sweep(self, axis: str, per_frame: np.ndarray) -> Tuple[float, ...]:
        """SadTalker's per-frame camera angles as the degrees sfr sweeps (one held value, or the
        `--input_<axis>` list this class was given), checked to give the very same angles."""
        from ..coeffs import camera_pose_sequence

        per_frame = per_frame.astype(np.float32)
        given = self.degrees[axis]
        candidates = ([tuple(float(d) for d in given)] if given else []) + [(float(per_frame[0]),)]
        for degrees in candidates:
            if np.allclose(camera_pose_sequence(degrees, per_frame.shape[0]), per_frame, rtol=0, atol=1e-4):
                return degrees
        raise SadTalkerError(f"the data dict's {axis}_c_seq ({per_frame.shape[0]} frames, from {per_frame[0]:g} to "
                             f"{per_frame[-1]:g} degrees) is not a sweep of "
                             f"{'--input_' + axis + ' ' + ' '.join(f'{d:g}' for d in given) if given else 'one held angle'}; "
                             f"give AnimateFromCoeff {axis}= the degrees SadTalker swept")


def sfr_enhancer(name: str, config=None) -> str:
    """SadTalker's `--enhancer` name (gfpgan, RestoreFormer) as sfr's (its -tiny variant when `config` is a
    tiny one); SadTalkerError for an enhancer sfr does not have."""
    from ..stages.restorers import ENHANCERS

    choices = list(ENHANCERS)
    wanted = _sfr_name(name, choices, config)
    if wanted is not None:
        return wanted
    raise SadTalkerError(f"--enhancer {name}: sfr runs {', '.join(c for c in choices if not c.endswith('-tiny'))} "
                         "as SadTalker's face enhancer; use --enhancer gfpgan or leave it out")


def _sfr_name(name: str, choices, config) -> Optional[str]:
    """`name` in any case as one of `choices`, its -tiny variant for a tiny `config`; None when none is."""
    wanted = name.lower()
    if str(config or "").startswith("tiny") and f"{wanted}-tiny" in choices:
        return f"{wanted}-tiny"
    return wanted if wanted in choices else None


def _array(value) -> np.ndarray:
    """A data-dict tensor (torch, any device) or array as a float32 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _paste_options(pic_path, crop_info, preprocess: str) -> Dict:
    """SadTalker's paste-back from its `crop_info` (`((w, h), (clx, cly, crx, cry), (lx, ly, rx, ry))`):
    full modes paste into the picture at `crop + quad` (extfull: `crop`); the other modes resize frames to
    the box's aspect, `(size, int(size * h / w))`, as animate.py does for `<name>.mp4`."""
    mode = preprocess.lower()
    if "full" in mode:
        if crop_info is None or len(crop_info) != 3 or crop_info[1] is None or crop_info[2] is None:
            raise SadTalkerError(f"--preprocess {preprocess}: SadTalker gave no crop box to paste into {pic_path}")
        clx, cly, crx, cry = (int(v) for v in crop_info[1])
        lx, ly, rx, ry = (int(v) for v in crop_info[2])
        box = (clx, cly, crx, cry) if "ext" in mode else (clx + lx, cly + ly, clx + rx, cly + ry)
        return {"paste_into": Path(pic_path), "crop_box": box}
    if crop_info and crop_info[0]:
        width_px, height_px = (int(v) for v in crop_info[0])
        return {"crop_box": (0, 0, width_px, height_px)}
    return {}


def _background_options(name: str, config=None) -> Dict:
    """SadTalker's `--background_enhancer` (realesrgan) as sfr's option (its -tiny variant for a tiny
    `config`); SadTalkerError for one sfr does not have."""
    from ..stages.backgrounds import BACKGROUND_ENHANCERS

    wanted = _sfr_name(name, BACKGROUND_ENHANCERS, config)
    if wanted is None:
        raise SadTalkerError(f"--background_enhancer {name}: sfr runs realesrgan as SadTalker's background enhancer; "
                             "use --background_enhancer realesrgan or leave it out")
    return {"background_enhancer": wanted}


# ---------------------------------------------------------------------------------------------------
# Running the user's inference.py


def find_checkout(inference_py) -> Path:
    """The SadTalker checkout that holds `inference_py`; SadTalkerError when it is no such file."""
    path = Path(inference_py)
    root = path.parent
    if not path.is_file():
        raise SadTalkerError(f"{path}: no such file; pass the inference.py of a SadTalker checkout "
                             "(git clone https://github.com/OpenTalker/SadTalker)")
    missing = [name for name in CHECKOUT_FILES if not (root / name).is_file()]
    if missing:
        raise SadTalkerError(f"{path}: not SadTalker's inference.py ({root} has no {missing[0]}); pass the "
                             "inference.py of a SadTalker checkout (git clone https://github.com/OpenTalker/SadTalker)")
    return root.resolve()


def read_sadtalker_flags(flags: Sequence[str]):
    """The inference.py flags sfr acts on, read as SadTalker's argparse reads them: `input_yaw`,
    `input_pitch`, `input_roll` (degrees, nargs='+'), `cpu`, `enhancer`, `background_enhancer`."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    for axis in ("yaw", "pitch", "roll"):
        parser.add_argument(f"--input_{axis}", nargs="+", type=float, default=None)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--enhancer", default=None)
    parser.add_argument("--background_enhancer", default=None)
    known, _ = parser.parse_known_args(list(flags))
    return known


def check_before_running(flags: Sequence[str], precision: str = "fp32", config=None, **_settings) -> None:
    """What can be checked before SadTalker's slow steps run: sfr's precision on the device SadTalker will
    choose (CUDA when there is one, unless --cpu), and the enhancers asked for."""
    from ..engine import check_precision, resolve_device

    known = read_sadtalker_flags(flags)
    check_precision(precision, resolve_device("cpu" if known.cpu else "auto"))
    if known.enhancer:
        sfr_enhancer(known.enhancer, config)
    if known.background_enhancer:
        _background_options(known.background_enhancer, config)


@contextlib.contextmanager
def _sadtalker_imports(root: Path, argv: List[str], animate: types.ModuleType):
    """SadTalker's checkout first on the import path, `sys.argv` as inference.py expects it, and sfr's
    renderer module in place of SadTalker's; all undone afterwards (its `src` modules forgotten)."""
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    saved_src = {name: module for name, module in sys.modules.items() if name == "src" or name.startswith("src.")}
    for name in saved_src:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    sys.argv = argv
    sys.modules[RENDERER_MODULE] = animate
    try:
        yield
    finally:
        sys.path[:], sys.argv[:] = saved_path, saved_argv
        for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
            del sys.modules[name]
        sys.modules.update(saved_src)


def run_inference(inference_py, flags: Sequence[str], **settings) -> None:
    """Run SadTalker's `inference.py` with `flags`, its face renderer replaced by `AnimateFromCoeff` with
    sfr's `settings` (precision, batch_size, config, quiet). Checked first: the path, sfr's settings against
    the flags (`check_before_running`), and SadTalker's modules, imported before anything runs (a missing
    package is a SadTalkerError naming it)."""
    root = find_checkout(inference_py)
    script = root / Path(inference_py).name
    animate = types.ModuleType(RENDERER_MODULE)
    animate.__doc__ = "sfr's face renderer in place of SadTalker's (sfr_cli.sadtalker)"
    check_before_running(flags, **settings)
    known = read_sadtalker_flags(flags)
    degrees = {axis: getattr(known, f"input_{axis}") for axis in ("yaw", "pitch", "roll")}
    animate.AnimateFromCoeff = functools.partial(AnimateFromCoeff, **settings, **degrees)
    with _sadtalker_imports(root, [str(script), *flags], animate):
        for name in SADTALKER_MODULES:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise SadTalkerError(
                    f"SadTalker's {name} (in {root}) failed to import: {exc}; install SadTalker's requirements "
                    f"into this Python, keeping its torch (pip install -r {root / 'requirements.txt'}, with "
                    "torch and torchvision lines left out)") from exc
        runpy.run_path(str(script), run_name="__main__")
