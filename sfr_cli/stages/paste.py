"""Paste-back as two frame stages: the aspect resize and the blend into the original picture.

SadTalker's full modes end with two steps after the 256x256 face: `animate.py` resizes each frame to
the face box's aspect `(size, int(size * h / w))` (stage `aspect`, also alone with `--crop-box` and no
picture: SadTalker's `<name>.mp4`) and `paste_pic.py` resizes that to the box and blends it into the
original picture with `seamlessClone` (stage `paste`). The math is in `imaging/`; pictures are read
by `media`; `plan` decides and checks, before any model loads, which box and which stages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np
# numpy and media are imported where used: this module is imported for its options by `sfr --help`.
from ..errors import MediaError
from ..modes import get_mode
from ..options import RENDER, OptionRow, ParsedText

Box = Tuple[int, int, int, int]
# A crop written by SadTalker from this very picture matches exactly; a JPEG original decoded by
# another library than OpenCV's may differ by a level or two. Beyond this mean difference (levels),
# the picture does not hold the crop.
CROP_MATCH_MAX_MEAN_LEVELS = 2.0
# The aspect frames are (size, int(size * h / w)): within 1/32..32 they stay between 8 and 16384 px high
# (libx264's largest side) at 256 and 512 px; SadTalker's boxes are near square.
MAX_BOX_ASPECT = 32
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
    height, width = y2 - y1, x2 - x1
    if height > MAX_BOX_ASPECT * width or width > MAX_BOX_ASPECT * height:
        raise ValueError(f"{text!r}: a {width}x{height} box; its sides may differ at most {MAX_BOX_ASPECT}-fold "
                         "(the frames take its aspect: a 512 px face would be "
                         f"{max(1, int(512 * height / width))} px high)")
    return x1, y1, x2, y2


# `x1,y1,x2,y2`: SadTalker's face box in the original picture (ox1,oy1,ox2,oy2), exclusive ends.
CROP_BOX = ParsedText("X1,Y1,X2,Y2", parse_box)


OPTIONS = (
    OptionRow("paste_into", ("--paste-into",),
              "Paste the face back into this original picture, SadTalker's full-mode way (seamless clone); "
              "frames and MP4 take its size. --source must then be SadTalker's crop of it.",
              path=True, metavar="PICTURE", column=True, commands=(RENDER,)),
    OptionRow("crop_box", ("--crop-box",),
              "The face box in the original picture (SadTalker's ox1,oy1,ox2,oy2). With --paste-into: skip the "
              "search; alone: frames resized to the box's aspect, as SadTalker's <name>.mp4.",
              type=CROP_BOX, column=True, commands=(RENDER,)),
)


@dataclass(frozen=True)
class Options:
    """A job's paste-back options (`job.stages["paste"]`), one field per row of `OPTIONS`."""

    paste_into: Optional[Path] = None  # the original picture: frames are pasted back into it (its size)
    crop_box: Optional[Box] = None  # x1,y1,x2,y2 in it; None with paste_into: found


def input_files(options: Options, job) -> List[Tuple[Path, str]]:
    """The files paste-back reads, `(path, role)`: the original picture, and SadTalker's crop (`job.source`)
    when the box is searched for."""
    if not isinstance(options.paste_into, (str, os.PathLike)):
        return []
    files = [(Path(options.paste_into), "--paste-into")]
    if options.crop_box is None and isinstance(getattr(job, "source", None), (str, os.PathLike)):
        files.append((Path(job.source), "--source"))
    return files


def aspect_size(size_px: int, box: Box) -> Tuple[int, int]:
    """(width, height) of SadTalker's `<name>.mp4` frames for this box: `(size, int(size * h / w))`."""
    from ..imaging.resize import aspect_height_px

    return size_px, aspect_height_px(size_px, box[2] - box[0], box[3] - box[1])


def find_crop_box(crop_path: Path, picture_path: Path, crop_what: str = "--source",
                  picture_what: str = "--paste-into"):
    """Locate SadTalker's crop PNG in the original picture. Returns `imaging.box_search.BoxMatch`; raises
    MediaError, suggesting --crop-box, when the picture does not hold the crop."""
    from .. import media

    crop = media.read_picture_uint8(crop_path, crop_what)
    picture = media.read_picture_uint8(picture_path, picture_what)
    return locate_crop(crop, picture, crop_path, picture_path)


def locate_crop(crop: np.ndarray, picture: np.ndarray, crop_path: Path, picture_path: Path):
    import torch

    from ..imaging import box_search

    height_px, width_px = picture.shape[:2]
    if min(height_px, width_px) < box_search.MIN_BOX_PX:
        raise MediaError(f"{picture_path}: a {width_px}x{height_px} picture is too small to hold a face crop")
    try:
        match = box_search.find_box(torch.from_numpy(crop), torch.from_numpy(picture))
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
class AspectResize:
    """Stage `aspect`: `(B, S, S, 3) uint8` frames -> `(B, int(S*h/w), S, 3)` for the box `w x h` (bilinear,
    exact to `cv2.resize`), as SadTalker's animate.py does before pasting or for its `<name>.mp4`."""

    box: Box
    name: str = "aspect"

    def output_size(self, width_px: int, height_px: int) -> Tuple[int, int]:
        return aspect_size(width_px, self.box)

    def load(self, device, models) -> None:
        """No weights."""

    def __call__(self, frames):
        from ..imaging.resize import resize_to_box_aspect

        return resize_to_box_aspect(frames, self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclass
class PasteBack:
    """Stage `paste`: aspect-sized frames resized to the box and blended into the original picture
    (`picture_path`, `(H, W, 3) uint8` once read; `size_px` its (width, height)) as SadTalker's
    `seamlessClone(NORMAL_CLONE)`; the output is the picture's size. The plan reads and checks the
    picture; the stage reads it again where it renders (a planned job carries no pixels)."""

    box: Box
    picture_path: Path
    size_px: Tuple[int, int]
    name: str = "paste"
    _picture_t: object = field(default=None, repr=False)

    def output_size(self, width_px: int, height_px: int) -> Tuple[int, int]:
        return self.size_px

    def load(self, device, models) -> None:
        """The picture goes to the render device once."""
        import torch

        from .. import media

        picture = media.read_picture_uint8(self.picture_path, "--paste-into")
        if (picture.shape[1], picture.shape[0]) != tuple(self.size_px):
            raise MediaError(f"{self.picture_path}: changed since the job was checked "
                             f"({picture.shape[1]}x{picture.shape[0]}, was {self.size_px[0]}x{self.size_px[1]})")
        self._picture_t = torch.from_numpy(picture).to(device)

    def __call__(self, frames):
        from ..imaging.resize import resize_linear
        from ..imaging.seamless_clone import paste_frames

        x1, y1, x2, y2 = self.box
        return paste_frames(resize_linear(frames, x2 - x1, y2 - y1), self._picture_t, self.box)


def plan(options: Options, job, size_px: int, note: Callable[[str], None]) -> List:
    """Check the paste-back `options` of `job` (a `jobs.RenderJob`: its source and preprocess mode) and
    return its stages: none (frames stay `size x size`), `aspect` alone (`--crop-box` without a picture)
    or `aspect` + `paste`.

    Reads the original picture and, without `crop_box`, finds the box (seconds, no model needed).
    """
    import numpy as np

    from .. import media

    if options.paste_into is not None and options.crop_box is None and isinstance(job.source, np.ndarray):
        raise MediaError("paste_into with the source as an array: give crop_box= too (the box is found by "
                         "matching SadTalker's crop file in the picture)")
    mode = get_mode(job.preprocess)
    paste_into, crop_box = options.paste_into, options.crop_box
    if paste_into is None:
        if mode.pastes_back and crop_box is None:
            box_from = "crop alone" if mode.extended_crop else "crop and quad"
            note(f"SadTalker pastes {mode.name} frames back into the original picture; pass --paste-into "
                 f"ORIGINAL (and --crop-box, its ox1,oy1,ox2,oy2 from {box_from}, if known) to do the same")
        if crop_box is None:
            return []
        width, height = aspect_size(size_px, crop_box)
        note(f"frames resized to the crop box's aspect, {width}x{height}, as SadTalker's <name>.mp4")
        return [AspectResize(crop_box)]
    picture = media.read_picture_uint8(paste_into, "--paste-into")
    height_px, width_px = picture.shape[:2]
    if crop_box is None:
        crop = media.read_picture_uint8(job.source, "--source")
        match = locate_crop(crop, picture, Path(job.source), Path(paste_into))
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
    return [AspectResize(crop_box), PasteBack(crop_box, Path(paste_into), (width_px, height_px))]
