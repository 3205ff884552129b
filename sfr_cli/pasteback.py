"""Paste-back as a render stage: which box, what size the output frames are, and the frame transform
that runs between the engine and the sinks.

SadTalker's full modes end with two steps after the 256x256 face: `animate.py` resizes each frame to
the face box's aspect `(size, int(size * h / w))` and `paste_pic.py` resizes that to the box and
blends it into the original picture with `seamlessClone`. The math is in `nets/paste.py`; pictures
are read by `media`; this module decides and checks, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from . import media
from .errors import MediaError

Box = Tuple[int, int, int, int]
# A crop written by SadTalker from this very picture matches exactly; a JPEG original decoded by
# another library than OpenCV's may differ by a level or two. Beyond this mean difference (levels),
# the picture does not hold the crop.
CROP_MATCH_MAX_MEAN_LEVELS = 2.0
CPU_STAGE_THREADS = 1
BOX_HINT = "pass the box as --crop-box x1,y1,x2,y2 (SadTalker's ox1,oy1,ox2,oy2 from crop_info)"


def format_box(box: Box) -> str:
    return ",".join(str(v) for v in box)


def parse_box(text: str) -> Box:
    """`"x1,y1,x2,y2"` -> ints with x2 > x1 and y2 > y1; ValueError says what is wrong."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise ValueError(f"{text!r}: a box is four integers x1,y1,x2,y2")
    try:
        x1, y1, x2, y2 = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r}: a box is four integers x1,y1,x2,y2") from None
    if x2 - x1 < 3 or y2 - y1 < 3:
        raise ValueError(f"{text!r}: x2 must exceed x1 and y2 exceed y1 by at least 3 pixels")
    return x1, y1, x2, y2


def aspect_size(size_px: int, box: Box) -> Tuple[int, int]:
    """(width, height) of SadTalker's `<name>.mp4` frames for this box: `(size, int(size * h / w))`."""
    from .nets.paste import aspect_height_px

    return size_px, aspect_height_px(size_px, box[2] - box[0], box[3] - box[1])


def find_crop_box(crop_path: Path, picture_path: Path, crop_what: str = "--source",
                  picture_what: str = "--paste-into"):
    """Locate SadTalker's crop PNG in the original picture. Returns `nets.paste.BoxMatch`; raises
    MediaError, suggesting --crop-box, when the picture does not hold the crop."""
    crop = media.read_picture_uint8(crop_path, crop_what)
    picture = media.read_picture_uint8(picture_path, picture_what)
    return locate_crop(crop, picture, crop_path, picture_path)


def locate_crop(crop: np.ndarray, picture: np.ndarray, crop_path: Path, picture_path: Path):
    import torch

    from .nets import paste

    height_px, width_px = picture.shape[:2]
    if min(height_px, width_px) < paste.MIN_BOX_PX:
        raise MediaError(f"{picture_path}: a {width_px}x{height_px} picture is too small to hold a face crop")
    try:
        match = paste.find_box(torch.from_numpy(crop), torch.from_numpy(picture))
    except ValueError as exc:  # no candidate box fits the picture at all
        raise MediaError(f"{picture_path}: cannot hold the crop {crop_path} ({exc}); {BOX_HINT}") from exc
    if match.mean_abs_levels > CROP_MATCH_MAX_MEAN_LEVELS:
        raise MediaError(
            f"{picture_path}: does not contain the crop {crop_path} (the closest box, "
            f"{format_box(match.box)}, differs by {match.mean_abs_levels:.1f} levels on average); "
            f"give the picture SadTalker cropped, or {BOX_HINT}"
        )
    return match


def describe_match(match) -> str:
    how = "exact" if match.exact else (f"closest; mean difference {match.mean_abs_levels:.2f}, "
                                       f"max {match.max_abs_levels} levels")
    return f"crop box {format_box(match.box)} ({how})"


@dataclass
class FrameTransform:
    """Turns the engine's `(S, S, 3) uint8` frames into the output frames, on `device`.

    With `picture`: SadTalker's full paste (aspect resize, box resize, seamlessClone blend); the
    output is the picture's size. Without: the aspect resize alone (SadTalker's `<name>.mp4`).
    """

    box: Box
    size_px: int
    picture: Optional[np.ndarray] = None
    device: str = "cpu"

    @property
    def output_size(self) -> Tuple[int, int]:
        """(width, height) of every output frame."""
        if self.picture is not None:
            return self.picture.shape[1], self.picture.shape[0]
        return aspect_size(self.size_px, self.box)

    def bind(self, device) -> "FrameTransform":
        """Run on `device` (the render device) from now on."""
        self.device = str(device)
        self._picture_t = None
        return self

    def __call__(self, frames: List[np.ndarray]) -> List[np.ndarray]:
        import torch

        from .nets import paste

        if self.device == "cpu" and not getattr(self, "_threads_set", False):
            # This runs in its own stage thread beside the engine's: one OpenMP thread here (the setting is
            # per calling thread) keeps the two from fighting over the cores; small FFTs gain nothing more.
            torch.set_num_threads(CPU_STAGE_THREADS)
            self._threads_set = True
        batch = torch.from_numpy(np.stack(frames)).to(self.device)
        if self.picture is None:
            out = paste.resize_to_box_aspect(batch, self.box[2] - self.box[0], self.box[3] - self.box[1])
        else:
            if getattr(self, "_picture_t", None) is None:
                self._picture_t = torch.from_numpy(self.picture).to(self.device)
            out = paste.paste_back(batch, self._picture_t, self.box)
        out = out.cpu().numpy()
        return [out[i] for i in range(out.shape[0])]


def plan(source: Path, size_px: int, paste_into: Optional[Path], crop_box: Optional[Box], pastes_back: bool,
         extended_crop: bool, mode_name: str, note: Callable[[str], None]) -> Optional[FrameTransform]:
    """Check the paste-back options and return the stage to run, or None (frames stay `size x size`).

    Reads the original picture and, without `crop_box`, finds the box (seconds, no model needed).
    """
    if paste_into is None:
        if pastes_back and crop_box is None:
            box_from = "crop alone" if extended_crop else "crop and quad"
            note(f"SadTalker pastes {mode_name} frames back into the original picture; pass --paste-into "
                 f"ORIGINAL (and --crop-box, its ox1,oy1,ox2,oy2 from {box_from}, if known) to do the same")
        if crop_box is None:
            return None
        width, height = aspect_size(size_px, crop_box)
        note(f"frames resized to the crop box's aspect, {width}x{height}, as SadTalker's <name>.mp4")
        return FrameTransform(box=crop_box, size_px=size_px)
    picture = media.read_picture_uint8(paste_into, "--paste-into")
    height_px, width_px = picture.shape[:2]
    if crop_box is None:
        crop = media.read_picture_uint8(source, "--source")
        match = locate_crop(crop, picture, Path(source), Path(paste_into))
        crop_box = match.box
        note(f"{describe_match(match)} in {paste_into}")
    else:
        x1, y1, x2, y2 = crop_box
        inside = (max(x1 + 1, 0), max(y1 + 1, 0), min(x2 - 1, width_px), min(y2 - 1, height_px))
        if inside[2] - inside[0] < 3 or inside[3] - inside[1] < 3:
            raise MediaError(f"--crop-box {format_box(crop_box)} lies outside the {width_px}x{height_px} "
                             f"picture {paste_into}")
        if x1 < 0 or y1 < 0 or x2 > width_px or y2 > height_px:
            note(f"--crop-box {format_box(crop_box)} runs past the {width_px}x{height_px} picture; "
                 "the part inside is blended (SadTalker would fail here)")
    return FrameTransform(box=crop_box, size_px=size_px, picture=picture)
