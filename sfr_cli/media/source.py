"""The source face in: any image Pillow reads, as SadTalker prepares it.

Reading stays with Pillow rather than imageio: the 16-bit grayscale rule below needs the image's Pillow
mode (imageio's Pillow plugin converts before the mode can be seen), and Pillow's own errors
(DecompressionBombError, UnidentifiedImageError) become the messages users get.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from sfr_cli.errors import MediaError

PathLike = Union[str, "os.PathLike[str]"]

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_MAX = 65535


def read_source_image(path: PathLike, size_px: int) -> np.ndarray:
    """Read a source face as SadTalker does: RGB, resized to size_px x size_px, channels first.

    Returns `(3, size_px, size_px) float32 in [0, 1]`. Any Pillow image is made RGB first
    (palette, grayscale, RGBA, CMYK ... through Pillow's `convert("RGB")`, which drops alpha
    without compositing). 16-bit grayscale images keep their precision: they are scaled by 1/65535
    as `img_as_float32` does. Other wide modes (32-bit integer "I", float "F") go through Pillow's
    conversion to 8-bit RGB, which clips to [0, 255]. EXIF orientation is not applied (SadTalker
    does not apply it either).
    """
    image_hwc = _read_rgb_float32(Path(path))
    resized = resize_image(image_hwc, size_px, size_px)
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def source_from_array(image: np.ndarray, size_px: int) -> np.ndarray:
    """A source face given as an RGB array, `(H, W, 3)` uint8 (or float in [0, 1]), read as
    `read_source_image` reads a file: `(3, size_px, size_px) float32 in [0, 1]`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise MediaError(f"source array of shape {image.shape}: give an (H, W, 3) RGB image")
    if image.dtype == np.uint8:
        rgb = np.multiply(image, 1.0 / 255, dtype=np.float32)
    elif image.dtype.kind == "f":
        rgb = image.astype(np.float32)
        if not np.isfinite(rgb).all() or rgb.min() < 0 or rgb.max() > 1:
            raise MediaError("source array: float values must be finite and in [0, 1] (or pass uint8)")
    else:
        raise MediaError(f"source array of type {image.dtype}: pass uint8 RGB, or float in [0, 1]")
    resized = resize_image(np.ascontiguousarray(rgb), size_px, size_px)
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def read_picture_uint8(path: PathLike, what: str) -> np.ndarray:
    """Read a picture for paste-back (the original picture, or SadTalker's crop PNG) as `(H, W, 3) uint8
    RGB`, the 8-bit values `cv2.imread` gives SadTalker (16-bit images are reduced by Pillow). `what`
    names the option in messages ("--paste-into")."""
    path = Path(path)
    with _opened_image(path, f"{what} picture not found", f"{what} takes a picture file", f"{what}: ",
                       "picture") as image:
        if image.mode in SIXTEEN_BIT_MODES:
            image = image.point(lambda v: v / 257).convert("L")
        rgb = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy
    if rgb.shape[0] < 3 or rgb.shape[1] < 3:
        raise MediaError(f"{path}: {what}: a {rgb.shape[1]}x{rgb.shape[0]} picture is too small")
    return rgb


@contextlib.contextmanager
def _opened_image(path: Path, not_found: str, folder_hint: str, where: str, noun: str) -> Iterator[Image.Image]:
    """Yield the loaded Pillow image at `path`; a missing file, a folder, or anything Pillow cannot read
    (in the block too) becomes a MediaError: `{path}: {where}not an image Pillow can read ...`."""
    if not path.exists():
        raise MediaError(f"{path}: {not_found}")
    if path.is_dir():
        raise MediaError(f"{path}: is a folder; {folder_hint} (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            image.load()
            yield image
    except UnidentifiedImageError as exc:
        raise MediaError(f"{path}: {where}not an image Pillow can read (PNG, JPEG, ...)") from exc
    except PermissionError as exc:
        raise MediaError(f"{path}: {where}permission denied; give sfr read access to the {noun}") from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{path}: {where}image is too large to read safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: {where}cannot read the {noun}, it may be truncated or corrupt ({exc})") from exc


def _read_rgb_float32(path: Path) -> np.ndarray:
    """Read any Pillow image as `(H, W, 3) float32 in [0, 1]`, exactly like `img_as_float32`."""
    with _opened_image(path, "source image not found", "give a source image file", "", "source image") as image:
        if image.width == 0 or image.height == 0:
            raise MediaError(f"{path}: source image has zero size ({image.width}x{image.height})")
        if image.mode in SIXTEEN_BIT_MODES:
            gray = np.asarray(image).astype(np.uint16)
            scaled = np.multiply(gray, 1.0 / SIXTEEN_BIT_MAX, dtype=np.float32)
            return np.repeat(scaled[:, :, None], 3, axis=2)
        rgb = np.asarray(image.convert("RGB"))
    # Same arithmetic as skimage's img_as_float32 on uint8: one float32 multiply by 1/255.
    return np.multiply(rgb, 1.0 / 255, dtype=np.float32)


def resize_image(image: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """Resize `(H, W, C) float32` to `(height_px, width_px, C) float32`, as skimage does by default.

    Reproduces `skimage.transform.resize(image, (height_px, width_px, C))` on a float32 image:
    a Gaussian anti-aliasing filter when an axis shrinks (sigma = max(0, (in/out - 1) / 2) per axis),
    bilinear `ndimage.zoom` with grid_mode, numpy's 'reflect' padding (ndimage's 'mirror'), and the
    result clipped to the input's [min, max]. Needs neither scikit-image nor a copy of its code.
    """
    if image.ndim != 3 or image.dtype != np.float32:
        raise ValueError(f"expected (H, W, C) float32, got {image.shape} {image.dtype}")
    if height_px <= 0 or width_px <= 0:
        raise ValueError(f"output size must be positive, got {height_px}x{width_px}")
    input_shape = image.shape
    output_shape = (height_px, width_px, input_shape[2])
    factors = np.divide(input_shape, output_shape)
    if any(out < inp for out, inp in zip(output_shape, input_shape)):
        sigma = np.maximum(0, (factors - 1) / 2)
        filtered = ndimage.gaussian_filter(image, sigma, mode="mirror", cval=0)
    else:
        filtered = image
    zoom = [1 / factor for factor in factors]
    out = ndimage.zoom(filtered, zoom, order=1, mode="mirror", cval=0, grid_mode=True)
    np.clip(out, image.min(), image.max(), out=out)
    return out


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def natural_key(path: Path) -> tuple:
    """Sort key of a frame file: its name's digit runs compared as numbers (`frame2` before `frame10`),
    then the name itself, so unpadded numbering keeps its order."""
    parts = re.split(r"(\d+)", path.name.lower())
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts), path.name


def frame_files(folder: Path) -> List[Path]:
    """The picture files of a frames folder, in their numbers' order (`natural_key`)."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file()), key=natural_key)


class FrameSource:
    """Frames that already exist, for `sfr enhance`: a video (decoded by the bundled ffmpeg, streamed) or a
    folder of pictures (sorted by name). `width_px`, `height_px`, `frame_count`, `fps` (the video's; None
    for a folder) and `frames()` yielding `(H, W, 3) uint8 RGB`, one at a time (flat memory)."""

    def __init__(self, path: PathLike, ffmpeg: Optional[str] = None):
        self.path = Path(path)
        self.fps: Optional[float] = None
        self.notes: List[str] = []  # what the caller should tell the user once (a rotated video)
        self._ffmpeg = ffmpeg
        if not str(path):
            raise MediaError("--input is empty; give a video or a folder of frames")
        if self.path.is_dir():
            self.files = frame_files(self.path)
            if not self.files:
                raise MediaError(f"{self.path}: holds no frames ({', '.join(FRAME_SUFFIXES)} files)")
            first = read_picture_uint8(self.files[0], "--input")
            self.height_px, self.width_px = first.shape[:2]
            self.frame_count = len(self.files)
        elif self.path.is_file():
            self.files = None
            self._probe_video()
        else:
            raise MediaError(f"{self.path}: --input not found; give a video or a folder of frames")

    def _probe_video(self) -> None:
        self._ffmpeg = self._ffmpeg or _find_ffmpeg()
        try:
            with _quiet_imageio():
                reader = self._reader()
                meta = next(reader)
                reader.close()
        except (RuntimeError, OSError, StopIteration) as exc:
            raise MediaError(describe_unreadable_video(self.path, exc)) from exc
        self.width_px, self.height_px = (int(v) for v in meta["size"])
        self.fps = float(meta["fps"]) if meta.get("fps") else None
        if meta.get("source_size") and tuple(meta["source_size"]) != tuple(meta["size"]):
            self.notes.append(f"{self.path}: its frames are turned upright as players show them "
                              f"({meta['source_size'][0]}x{meta['source_size'][1]} stored, "
                              f"{self.width_px}x{self.height_px} enhanced)")
        from .ffmpeg import count_video_frames

        self.frame_count = count_video_frames(self.path, self._ffmpeg)
        if self.frame_count == 0:
            raise MediaError(f"{self.path}: holds no video frames")

    def _reader(self):
        """imageio-ffmpeg's frame generator on this video: the path as a `file:` argument (a name like
        `concat:a.mp4` is the file), every decoded frame once (`-fps_mode passthrough`: a joined or looped
        video's timestamp gaps are not filled with repeated frames, so the count is the packets')."""
        import imageio_ffmpeg

        from .ffmpeg import file_argument

        return imageio_ffmpeg.read_frames(file_argument(self.path), pix_fmt="rgb24", output_params=DECODE_AS_STORED,
                                          input_params=["-nostdin"])

    def frames(self) -> Iterator[np.ndarray]:
        if self.files is not None:
            for path in self.files:
                frame = read_picture_uint8(path, "--input")
                if frame.shape[:2] != (self.height_px, self.width_px):
                    raise MediaError(f"{path}: {frame.shape[1]}x{frame.shape[0]}, but the first frame is "
                                     f"{self.width_px}x{self.height_px}; every frame must have one size")
                yield frame
            return
        with _quiet_imageio():
            reader = self._reader()
            next(reader)
        try:
            for data in reader:
                yield np.frombuffer(data, dtype=np.uint8).reshape(self.height_px, self.width_px, 3)
        finally:
            reader.close()


DECODE_AS_STORED = ["-fps_mode", "passthrough"]


def _find_ffmpeg() -> str:
    from .ffmpeg import find_ffmpeg

    return find_ffmpeg()


def describe_unreadable_video(path: Path, exc: BaseException) -> str:
    """The message for a file ffmpeg cannot decode as a video (`exc` from imageio-ffmpeg's reader)."""
    text = str(exc).strip()
    if "does not contain any stream" in text or "matches no streams" in text:
        return f"{path}: has no video stream; --input takes a video or a folder of frames"
    return f"{path}: ffmpeg cannot read this video ({text.splitlines()[-1] if text else exc})"


@contextlib.contextmanager
def _quiet_imageio() -> Iterator[None]:
    """imageio-ffmpeg's own log warnings (a rotated video's size) silenced: `FrameSource.notes` says it once,
    through the reporter (so `--quiet` silences it)."""
    import logging

    logger = logging.getLogger("imageio_ffmpeg")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
