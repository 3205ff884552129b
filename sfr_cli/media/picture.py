"""Pictures for paste-back: the original picture and SadTalker's crop PNG, as the 8-bit pixels OpenCV
gives SadTalker."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from sfr_cli.errors import MediaError

from .source import SIXTEEN_BIT_MODES

PathLike = Union[str, "os.PathLike[str]"]


def read_picture_uint8(path: PathLike, what: str) -> np.ndarray:
    """Read a picture for paste-back (the original picture, or SadTalker's crop PNG) as `(H, W, 3) uint8
    RGB`, the 8-bit values `cv2.imread` gives SadTalker (16-bit images are reduced by Pillow). `what`
    names the option in messages ("--paste-into")."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: {what} picture not found")
    if path.is_dir():
        raise MediaError(f"{path}: is a folder; {what} takes a picture file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in SIXTEEN_BIT_MODES:
                image = image.point(lambda v: v / 257).convert("L")
            rgb = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy
    except UnidentifiedImageError as exc:
        raise MediaError(f"{path}: {what}: not an image Pillow can read (PNG, JPEG, ...)") from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{path}: {what}: image is too large to read safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: {what}: cannot read the picture, it may be truncated or corrupt ({exc})") from exc
    if rgb.shape[0] < 3 or rgb.shape[1] < 3:
        raise MediaError(f"{path}: {what}: a {rgb.shape[1]}x{rgb.shape[0]} picture is too small")
    return rgb
