"""SadTalker 3DMM coefficients: files to float32 arrays, 27-frame windows, still/full/expression-scale
modes, and camera pose sequences.

A coefficient row holds 64 expression values, 6 pose values (3 rotation, 3 translation) and, after
SadTalker's full preprocessing, 3 crop parameters: 70 columns in crop mode, 73 in full mode.
The math follows SadTalker's ``src/generate_facerender_batch.py`` (``get_facerender_data``,
``transform_semantic_1``, ``transform_semantic_target``, ``gen_camera_pose``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from sfr_cli.errors import CoefficientsError
from sfr_cli.modes import COEFF_COUNTS, CROP_COEFFS, FULL_COEFFS, get_mode

SEMANTIC_RADIUS = 13
WINDOW = 2 * SEMANTIC_RADIUS + 1  # 27 frames: frame i and 13 either side
EXPRESSION_COEFFS = 64
MAT_KEY = "coeff_3dmm"
MAX_ABS_DEGREES = 360.0  # a camera angle beyond a full turn is a typo, and 1e308 overflowed the sweep
MAX_ABS_EXPRESSION_SCALE = 1000.0  # SadTalker users pass 0..3; larger is a typo that overflows float32
FINITE_CHECK_FRAMES = 1024  # frames checked for NaN/inf at a time, so a memory-mapped file stays on disk

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_MAT_READ_ERRORS = (MatReadError, OSError, ValueError, TypeError, IndexError, NotImplementedError, zlib.error)

PathLike = Union[str, Path]


def read_coefficients(path: PathLike) -> np.ndarray:
    """Read a SadTalker coefficient file: ``.mat`` (key ``coeff_3dmm``) or ``.npy`` (never unpickled).

    Returns ``(N, C) float32`` per-frame coefficients, or ``(N, C, 27) float32`` windows for an
    already-windowed file (``(1, N, C, 27)`` is squeezed to that); ``C`` is 70 (crop) or 73 (full).
    A windowed float32 ``.npy`` comes back memory-mapped, read-only. Raises ``CoefficientsError``.
    """
    path = Path(path)
    if not path.exists():
        raise CoefficientsError(f"{path}: no such coefficient file; check the path")
    if not path.is_file():
        raise CoefficientsError(f"{path}: not a file; pass a .mat or .npy coefficient file")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        array = _load_mat(path)
    elif suffix == ".npy":
        array = _load_npy(path)
    else:
        raise CoefficientsError(f"{path}: unknown coefficient file type '{path.suffix}'; "
                                f"pass a SadTalker .mat file (key {MAT_KEY}) or a .npy array")
    return _checked(path, array)


def read_source_coefficients(path: PathLike) -> np.ndarray:
    """The source face's own coefficients: ``(C,) float32``, ``C`` 70 or 73, from the first frame of a
    coefficient file (for a windowed file, frame 0's centre column). Raises ``CoefficientsError``."""
    coefficients = read_coefficients(path)
    first = coefficients[0] if coefficients.ndim == 2 else coefficients[0, :, SEMANTIC_RADIUS]
    return np.array(first, dtype=np.float32)


def _load_mat(path: Path) -> np.ndarray:
    try:
        contents = scipy.io.loadmat(str(path), appendmat=False)
    except _MAT_READ_ERRORS as exc:
        raise CoefficientsError(f"{path}: not a readable MATLAB .mat file ({exc}); "
                                f"export the coefficients again with scipy.io.savemat") from exc
    if MAT_KEY not in contents:
        keys = ", ".join(sorted(key for key in contents if not key.startswith("__"))) or "none"
        raise CoefficientsError(f"{path}: no '{MAT_KEY}' variable (it has: {keys}); "
                                f"pass a coefficient file written by SadTalker")
    return contents[MAT_KEY]


def _load_npy(path: Path) -> np.ndarray:
    """Read the header first so an object (pickled) array is refused before any data is touched."""
    try:
        with open(path, "rb") as stream:
            version = np.lib.format.read_magic(stream)
            if version not in _NPY_HEADER_READERS:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            _, _, dtype = _NPY_HEADER_READERS[version](stream)
    except (OSError, ValueError, EOFError) as exc:
        raise CoefficientsError(f"{path}: not a readable .npy file ({exc}); "
                                f"save the coefficients again with numpy.save") from exc
    if dtype.hasobject:
        raise CoefficientsError(f"{path}: holds Python objects (a pickled array), which sfr never loads; "
                                f"save a plain numeric array with numpy.save")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CoefficientsError(f"{path}: the .npy data cannot be read ({exc}), the file may be truncated; "
                                f"save the coefficients again with numpy.save") from exc


def _checked(path: Path, array: np.ndarray) -> np.ndarray:
    """Validate dtype, shape and values; ``(N, C)`` or ``(N, C, 27)`` float32."""
    if array.dtype.kind not in "iuf":
        raise CoefficientsError(f"{path}: values of type {array.dtype}; coefficients must be real numbers "
                                f"(float32)")
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise CoefficientsError(f"{path}: 4-D shape {array.shape} must start with 1, i.e. "
                                    f"(1, frames, coefficients, {WINDOW}); save one sequence per file")
        array = array[0]
    if array.ndim not in (2, 3):
        raise CoefficientsError(f"{path}: {array.ndim}-D shape {array.shape}; expected (frames, coefficients) "
                                f"or windows (frames, coefficients, {WINDOW})")
    if array.shape[0] == 0:
        raise CoefficientsError(f"{path}: zero frames; pass a coefficient file with at least one frame")
    if array.ndim == 3 and array.shape[2] != WINDOW:
        raise CoefficientsError(f"{path}: windows of {array.shape[2]} frames in shape {array.shape}; "
                                f"SadTalker windows have {WINDOW}")
    if array.shape[1] not in COEFF_COUNTS:
        raise CoefficientsError(f"{path}: {array.shape[1]} columns per frame; SadTalker coefficients have "
                                f"{CROP_COEFFS} (crop) or {FULL_COEFFS} (full)")
    _check_finite(path, array)
    if array.ndim == 2:
        return np.array(array, dtype=np.float32)
    return np.asarray(array, dtype=np.float32)


def _check_finite(path: Path, array: np.ndarray) -> None:
    bad_count, first_bad_frame = 0, None
    for start in range(0, array.shape[0], FINITE_CHECK_FRAMES):
        bad = ~np.isfinite(np.asarray(array[start:start + FINITE_CHECK_FRAMES]))
        bad_count += int(np.count_nonzero(bad))
        bad_frames = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
        if first_bad_frame is None and bad_frames.size:
            first_bad_frame = start + int(bad_frames[0])
    if bad_count:
        raise CoefficientsError(f"{path}: {bad_count} NaN or infinite values, the first in frame "
                                f"{first_bad_frame}; export the coefficients again")


@dataclass(frozen=True, eq=False)
class Semantics:
    """What the mapping net sees, built by ``prepare_semantics``.

    ``source_row`` is ``(C,) float32`` with ``C`` = ``coeff_count`` (70 crop, 73 full); ``driving`` is the
    caller's per-frame ``(N, C_in) float32`` or windowed ``(N, C_in, 27) float32`` array (read-only view,
    ``C_in`` 70 or 73). Windows are built per call, so memory does not grow with the clip length.
    """

    source_row: np.ndarray
    driving: np.ndarray
    expression_scale: float
    still: bool

    @property
    def frame_count(self) -> int:
        return int(self.driving.shape[0])

    @property
    def coeff_count(self) -> int:
        return int(self.source_row.shape[0])

    def source_window(self) -> np.ndarray:
        """The source row repeated over the window: ``(C, 27) float32``."""
        return np.repeat(self.source_row[:, None], WINDOW, axis=1)

    def windows(self, start: int, stop: int) -> np.ndarray:
        """Target windows of frames ``start .. stop-1``: ``(stop - start, C, 27) float32``, C-contiguous.

        Frame i's window holds frames i-13 .. i+13 clamped to [0, N-1], coefficients along axis 1;
        windowed input is taken as given. Expression scale, full-mode crop columns and still mode applied.
        """
        if not 0 <= start <= stop <= self.frame_count:
            raise ValueError(f"window range {start}:{stop} is outside 0:{self.frame_count}")
        if self.driving.ndim == 3:
            block = self.driving[start:stop]
        else:
            offsets = np.arange(-SEMANTIC_RADIUS, SEMANTIC_RADIUS + 1)
            frames = np.clip(np.arange(start, stop)[:, None] + offsets, 0, self.frame_count - 1)
            block = self.driving[frames].transpose(0, 2, 1)
        return self._adjusted(block)

    def _adjusted(self, block: np.ndarray) -> np.ndarray:
        """``(n, C_in, 27)`` driving windows -> ``(n, C, 27)`` with SadTalker's per-column changes, in
        its order: expression scale, then the source's crop columns (full), then still mode."""
        out = np.empty((block.shape[0], self.coeff_count, WINDOW), dtype=np.float32)
        out[:, :CROP_COEFFS] = block[:, :CROP_COEFFS]
        with np.errstate(over="raise"):
            try:
                out[:, :EXPRESSION_COEFFS] *= self.expression_scale
            except FloatingPointError:
                raise CoefficientsError(f"expression scale {self.expression_scale:g} takes expression "
                                        "coefficients beyond float32's range; use a smaller scale") from None
        if self.coeff_count == FULL_COEFFS:
            out[:, CROP_COEFFS:] = self.source_row[CROP_COEFFS:, None]
        if self.still:
            out[:, EXPRESSION_COEFFS:] = self.source_row[EXPRESSION_COEFFS:, None]
        return out


def prepare_semantics(driving: np.ndarray, source_row: np.ndarray, *, preprocess: str = "crop",
                      still: bool = False, expression_scale: float = 1.0) -> Semantics:
    """Pair driving coefficients with the source's for one of SadTalker's preprocess modes.

    ``driving``: ``(N, C) or (N, C, 27)`` from ``read_coefficients``; ``source_row``: ``(70,) or (73,)``.
    Crop modes (crop, resize, extcrop) use 70 columns; full modes (full, extfull) use 73, the source's
    3 crop columns appended to every driving frame. No copy of ``driving`` is made. Raises
    ``CoefficientsError`` when a full mode gets a 70-column source, ``ValueError`` for bad arguments.
    """
    coeff_count = get_mode(preprocess).coeff_count  # UnknownModeError, a ValueError, for other names
    if not math.isfinite(expression_scale):
        raise ValueError(f"expression scale {expression_scale} is not a finite number")
    driving = np.asarray(driving, dtype=np.float32)
    source_row = np.asarray(source_row, dtype=np.float32)
    windowed = driving.ndim == 3 and driving.shape[2] == WINDOW
    if not (driving.ndim == 2 or windowed) or driving.shape[0] == 0 or driving.shape[1] not in COEFF_COUNTS:
        raise ValueError(f"driving coefficients must be (N, 70|73) or (N, 70|73, {WINDOW}) with N >= 1, "
                         f"got {driving.shape}")
    if source_row.shape not in ((CROP_COEFFS,), (FULL_COEFFS,)):
        raise ValueError(f"source coefficients must be (70,) or (73,), got {source_row.shape}")
    if source_row.shape[0] < coeff_count:
        raise CoefficientsError(f"preprocess '{preprocess}' needs the source's {FULL_COEFFS} coefficients "
                                f"({CROP_COEFFS} + 3 crop parameters) but the source has {CROP_COEFFS}; "
                                f"pass --source-coeffs from SadTalker's full preprocessing or use crop")
    source = source_row[:coeff_count].copy()
    source.flags.writeable = False
    driving_view = driving.view(np.ndarray)
    driving_view.flags.writeable = False
    return Semantics(source_row=source, driving=driving_view, expression_scale=float(expression_scale),
                     still=bool(still))


def camera_pose_sequence(degrees: Sequence[float], frame_count: int) -> np.ndarray:
    """SadTalker's ``gen_camera_pose`` for one clip: ``(frame_count,) float32`` degrees.

    One value is held for every frame. Several values are swept at a constant rate: the total absolute
    change divided by ``frame_count - 1`` degrees per frame; each segment is ``np.arange(start, end,
    ±rate)`` in float64, the segments are joined, then cut or padded with the last value to
    ``frame_count``. Where SadTalker divides by zero, this does what a user expects instead: a segment
    with no change adds no frames, and with no change at all or a single frame the first value is held.
    Raises ``CoefficientsError`` for non-finite degrees or beyond ±360, ``ValueError`` for no degrees or frames.
    """
    values = [float(degree) for degree in degrees]
    if not values:
        raise ValueError("camera pose needs at least one degree value")
    if frame_count < 1:
        raise ValueError(f"camera pose needs at least one frame, got {frame_count}")
    if not all(math.isfinite(value) for value in values):
        raise CoefficientsError(f"camera pose degrees {values} include NaN or infinity; pass finite degrees")
    check_degrees(values)
    total_change = 0.0
    for previous, degree in zip(values, values[1:]):
        total_change += abs(degree - previous)
    degrees_per_frame = total_change / (frame_count - 1) if frame_count > 1 else 0.0
    if degrees_per_frame == 0.0:
        return np.full(frame_count, values[0], dtype=np.float32)
    segments = []
    for previous, degree in zip(values, values[1:]):
        change = degree - previous
        if change != 0.0:
            segments.append(np.arange(previous, degree, degrees_per_frame * abs(change) / change))
    sweep = np.concatenate(segments)[:frame_count]
    held = np.full(frame_count - sweep.shape[0], sweep[-1])
    return np.concatenate([sweep, held]).astype(np.float32)


def parse_degrees(text: str) -> List[float]:
    """``"0,20,-10"`` -> ``[0.0, 20.0, -10.0]``; spaces allowed. Raises ``ValueError`` on anything else."""
    items = [item.strip() for item in text.split(",")]
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a comma-separated list of degrees like 0,20,-10: "
                             f"{item!r} is not a finite number")
        values.append(value)
    try:
        check_degrees(values)
    except CoefficientsError as exc:
        raise ValueError(str(exc)) from None
    return values


def check_degrees(values: Sequence[float]) -> None:
    """Raise CoefficientsError unless every camera angle is within ±MAX_ABS_DEGREES."""
    beyond = [value for value in values if not abs(value) <= MAX_ABS_DEGREES]
    if beyond:
        raise CoefficientsError(f"{beyond[0]:g} degrees is beyond ±{MAX_ABS_DEGREES:g}; give angles within "
                                f"one turn, like 0,20,-10")


def check_expression_scale(scale: float) -> float:
    """Return ``scale`` as a float, or raise CoefficientsError unless it is finite and within
    ±MAX_ABS_EXPRESSION_SCALE."""
    value = float(scale)
    if not (math.isfinite(value) and abs(value) <= MAX_ABS_EXPRESSION_SCALE):
        raise CoefficientsError(f"expression scale {value:g}: must be a finite number within "
                                f"±{MAX_ABS_EXPRESSION_SCALE:g}")
    return value
