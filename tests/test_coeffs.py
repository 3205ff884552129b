"""Coefficient files, windows, modes and camera poses (CPU, generated data)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from sfr_cli.coeffs import (
    Semantics,
    camera_pose_sequence,
    parse_degrees,
    prepare_semantics,
    read_coefficients,
    read_source_coefficients,
)
from sfr_cli.errors import CoefficientsError

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def random_coeffs(frames, columns=70, seed=0):
    return np.random.default_rng(seed).standard_normal((frames, columns)).astype(np.float32)


def save(path: Path, array: np.ndarray) -> Path:
    if path.suffix == ".mat":
        scipy.io.savemat(str(path), {"coeff_3dmm": array})
    else:
        np.save(path, array)
    return path


def slow_windows(table: np.ndarray) -> np.ndarray:
    """Independent reference: one frame at a time, indices clamped by hand."""
    count = table.shape[0]
    result = []
    for frame in range(count):
        picked = []
        for offset in range(-13, 14):
            index = frame + offset
            if index < 0:
                index = 0
            if index > count - 1:
                index = count - 1
            picked.append(table[index])
        result.append(np.stack(picked, axis=1))
    return np.stack(result)


def raises_about(path: Path, *words: str, call=read_coefficients):
    with pytest.raises(CoefficientsError) as info:
        call(path)
    message = str(info.value)
    assert path.name in message
    for word in words:
        assert word in message, message
    assert "\n" not in message
    return message


# --- reading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".mat", ".npy"])
@pytest.mark.parametrize("columns", [70, 73])
def test_reads_per_frame_files(tmp_path, suffix, columns):
    table = random_coeffs(5, columns)
    result = read_coefficients(save(tmp_path / f"c{suffix}", table))
    assert result.dtype == np.float32 and result.shape == (5, columns)
    np.testing.assert_array_equal(result, table)


def test_float64_mat_and_integer_npy_become_float32(tmp_path):
    table = random_coeffs(3).astype(np.float64)
    result = read_coefficients(save(tmp_path / "c.mat", table))
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, table.astype(np.float32))
    integers = read_coefficients(save(tmp_path / "i.npy", np.arange(140, dtype=np.int64).reshape(2, 70)))
    assert integers.dtype == np.float32 and integers[1, 0] == 70.0


@pytest.mark.parametrize("suffix", [".mat", ".npy"])
def test_reads_windowed_and_leading_one(tmp_path, suffix):
    windows = np.random.default_rng(1).standard_normal((4, 73, 27)).astype(np.float32)
    plain = read_coefficients(save(tmp_path / f"w{suffix}", windows))
    leading = read_coefficients(save(tmp_path / f"w1{suffix}", windows[None]))
    assert plain.shape == leading.shape == (4, 73, 27)
    assert plain.dtype == leading.dtype == np.float32
    np.testing.assert_array_equal(plain, windows)
    np.testing.assert_array_equal(leading, windows)


def test_source_coefficients_first_row_and_window_centre(tmp_path):
    table = random_coeffs(3, 73)
    row = read_source_coefficients(save(tmp_path / "s.mat", table))
    assert row.shape == (73,) and row.dtype == np.float32
    np.testing.assert_array_equal(row, table[0])
    windows = np.random.default_rng(2).standard_normal((2, 70, 27)).astype(np.float32)
    centre = read_source_coefficients(save(tmp_path / "s.npy", windows))
    np.testing.assert_array_equal(centre, windows[0, :, 13])


def test_missing_file(tmp_path):
    raises_about(tmp_path / "nothere.mat", "no such")


def test_missing_source_file(tmp_path):
    raises_about(tmp_path / "nothere.npy", "no such", call=read_source_coefficients)


def test_unknown_extension(tmp_path):
    path = tmp_path / "coeffs.txt"
    path.write_text("1 2 3")
    raises_about(path, "unknown", ".txt")


@pytest.mark.parametrize("content", [b"", b"hello world" * 10, b"MATLAB 5.0 MAT-file" + b"\0" * 20])
def test_corrupt_mat(tmp_path, content):
    path = tmp_path / "bad.mat"
    path.write_bytes(content)
    raises_about(path, ".mat")


def test_truncated_mat(tmp_path):
    path = save(tmp_path / "cut.mat", random_coeffs(20))
    path.write_bytes(path.read_bytes()[:300])
    raises_about(path, ".mat")


def test_mat_without_coeff_key_lists_keys(tmp_path):
    path = tmp_path / "other.mat"
    scipy.io.savemat(str(path), {"pose": np.zeros((2, 6)), "exp": np.zeros((2, 64))})
    raises_about(path, "coeff_3dmm", "exp, pose")


def test_pickled_npy_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled.marker"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.npy"
    np.save(path, np.array([Payload()], dtype=object), allow_pickle=True)
    raises_about(path, "pickled")
    raises_about(path, "pickled", call=read_source_coefficients)
    assert not marker.exists()
    # The payload is live: a loader that unpickles would have created the marker.
    np.load(path, allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("keep_bytes", [20, 100, 300])
def test_truncated_npy(tmp_path, keep_bytes):
    path = save(tmp_path / "cut.npy", random_coeffs(20))
    path.write_bytes(path.read_bytes()[:keep_bytes])
    raises_about(path, ".npy")


def test_not_an_npy_file(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"hello world" * 10)
    raises_about(path, ".npy")


@pytest.mark.parametrize("suffix", [".mat", ".npy"])
def test_non_finite_values_counted_with_first_frame(tmp_path, suffix):
    table = random_coeffs(6)
    table[2, 5] = np.nan
    table[4, 0] = np.inf
    table[4, 1] = -np.inf
    message = raises_about(save(tmp_path / f"nan{suffix}", table), "3 NaN or infinite", "frame 2")
    assert "frame 2" in message


def test_non_finite_in_windowed_file(tmp_path):
    windows = np.zeros((3, 70, 27), np.float32)
    windows[1, 3, 26] = np.nan
    raises_about(save(tmp_path / "w.npy", windows), "1 NaN", "frame 1")


@pytest.mark.parametrize("suffix", [".mat", ".npy"])
def test_zero_frames(tmp_path, suffix):
    raises_about(save(tmp_path / f"empty{suffix}", np.zeros((0, 70), np.float32)), "zero frames")


@pytest.mark.parametrize("shape", [(70,), (1, 2, 3, 4, 5)])
def test_wrong_dimensions(tmp_path, shape):
    raises_about(save(tmp_path / "dims.npy", np.zeros(shape, np.float32)), f"{len(shape)}-D")


def test_window_axis_not_27(tmp_path):
    raises_about(save(tmp_path / "w.npy", np.zeros((3, 70, 25), np.float32)), "25", "27")


def test_four_dimensional_first_axis_not_one(tmp_path):
    raises_about(save(tmp_path / "w4.npy", np.zeros((2, 3, 70, 27), np.float32)), "4-D", "start with 1")


@pytest.mark.parametrize("suffix", [".mat", ".npy"])
@pytest.mark.parametrize("columns", [64, 71, 80])
def test_wrong_column_count(tmp_path, suffix, columns):
    raises_about(save(tmp_path / f"coeffs{suffix}", np.zeros((3, columns), np.float32)),
                 f"{columns} columns", "70 (crop) or 73 (full)")


def test_wrong_column_count_windowed(tmp_path):
    raises_about(save(tmp_path / "w.npy", np.zeros((3, 64, 27), np.float32)), "64 columns")


@pytest.mark.parametrize("array", [np.full((2, 70), "a"), np.zeros((2, 70), bool), np.zeros((2, 70), complex)])
def test_non_numeric_dtype(tmp_path, array):
    raises_about(save(tmp_path / "text.npy", array), str(array.dtype))


def test_non_numeric_mat(tmp_path):
    path = tmp_path / "text.mat"
    scipy.io.savemat(str(path), {"coeff_3dmm": "not numbers"})
    raises_about(path, "real numbers")


@pytest.mark.skipif(not REFERENCE_DIR.is_dir(), reason=f"reference data not found at {REFERENCE_DIR}")
def test_golden_crop_inputs():
    driving = read_coefficients(REFERENCE_DIR / "golden-crop" / "coeffs.mat")
    source = read_source_coefficients(REFERENCE_DIR / "golden-crop" / "source_coeffs.mat")
    assert driving.shape == (4, 70) and driving.dtype == np.float32
    assert source.shape == (70,) and source.dtype == np.float32


# --- windows and modes -------------------------------------------------------------------------------

def test_windows_small_hand_case():
    table = np.arange(3, dtype=np.float32)[:, None] * np.ones((1, 70), np.float32)  # frame i holds i
    semantics = prepare_semantics(table, np.zeros(70, np.float32))
    windows = semantics.windows(0, 3)
    assert windows.shape == (3, 70, 27) and windows.dtype == np.float32 and windows.flags.c_contiguous
    np.testing.assert_array_equal(windows[0, 0], [0] * 14 + [1] + [2] * 12)
    np.testing.assert_array_equal(windows[1, 5], [0] * 13 + [1] + [2] * 13)
    np.testing.assert_array_equal(windows[2, 69], [0] * 12 + [1] + [2] * 14)
    one = prepare_semantics(table[:1], np.zeros(70, np.float32)).windows(0, 1)
    np.testing.assert_array_equal(one, np.zeros((1, 70, 27)))


def test_windows_match_slow_reference_in_any_range():
    table = random_coeffs(40, 73, seed=3)
    semantics = prepare_semantics(table, random_coeffs(1, 73)[0], preprocess="crop")
    expected = slow_windows(table[:, :70])
    np.testing.assert_array_equal(semantics.windows(0, 40), expected)
    for start, stop in [(0, 1), (5, 17), (30, 40), (39, 40), (12, 12)]:
        np.testing.assert_array_equal(semantics.windows(start, stop), expected[start:stop])
    assert semantics.frame_count == 40 and semantics.coeff_count == 70


def test_windowed_input_gives_the_same_windows(tmp_path):
    table = random_coeffs(20, 73, seed=4)
    source = random_coeffs(1, 73, seed=5)[0]
    path = save(tmp_path / "w.npy", slow_windows(table)[None])
    for preprocess, still, scale in [("crop", False, 1.0), ("full", True, 0.5), ("extfull", False, 2.0)]:
        options = dict(preprocess=preprocess, still=still, expression_scale=scale)
        per_frame = prepare_semantics(table, source, **options)
        windowed = prepare_semantics(read_coefficients(path), source, **options)
        assert windowed.frame_count == 20 and windowed.coeff_count == per_frame.coeff_count
        np.testing.assert_array_equal(windowed.windows(3, 11), per_frame.windows(3, 11))
        assert windowed.windows(0, 20).flags.c_contiguous


def test_source_window():
    source = random_coeffs(1, 73)[0]
    crop = prepare_semantics(random_coeffs(2), source).source_window()
    assert crop.shape == (70, 27) and crop.dtype == np.float32
    np.testing.assert_array_equal(crop, np.tile(source[:70, None], (1, 27)))
    full = prepare_semantics(random_coeffs(2), source, preprocess="full").source_window()
    np.testing.assert_array_equal(full[:, 26], source)


def centre_columns(semantics: Semantics) -> np.ndarray:
    """Each frame's own coefficients: the centre column of its window, (N, C)."""
    return semantics.windows(0, semantics.frame_count)[:, :, 13]


def test_crop_expression_scale_and_still():
    driving = np.full((2, 73), 2.0, np.float32)
    driving[:, 64:] = 3.0
    driving[:, 70:] = 9.0  # ignored in crop modes
    source = np.arange(73, dtype=np.float32)
    frames = centre_columns(prepare_semantics(driving, source, preprocess="resize", expression_scale=1.5))
    assert frames.shape == (2, 70)
    np.testing.assert_array_equal(frames[:, :64], 3.0)
    np.testing.assert_array_equal(frames[:, 64:], 3.0)
    still = centre_columns(prepare_semantics(driving, source, still=True, expression_scale=0.5))
    np.testing.assert_array_equal(still[:, :64], 1.0)
    np.testing.assert_array_equal(still[1, 64:], [64, 65, 66, 67, 68, 69])


def test_full_appends_source_crop_columns():
    driving = np.ones((3, 70), np.float32)
    source = np.arange(73, dtype=np.float32)
    semantics = prepare_semantics(driving, source, preprocess="extfull", expression_scale=2.0)
    frames = centre_columns(semantics)
    assert semantics.coeff_count == 73 and frames.shape == (3, 73)
    np.testing.assert_array_equal(frames[:, :64], 2.0)
    np.testing.assert_array_equal(frames[:, 64:70], 1.0)
    np.testing.assert_array_equal(frames[0, 70:], [70, 71, 72])
    still = centre_columns(prepare_semantics(driving, source, preprocess="full", still=True))
    np.testing.assert_array_equal(still[2, 64:], np.arange(64, 73))
    np.testing.assert_array_equal(still[2, :64], 1.0)


def test_full_needs_73_source_columns():
    with pytest.raises(CoefficientsError) as info:
        prepare_semantics(random_coeffs(2), np.zeros(70, np.float32), preprocess="full")
    message = str(info.value)
    assert "73" in message and "--source-coeffs" in message and "crop" in message


def test_expression_scale_matches_float32_arithmetic():
    driving = random_coeffs(4, seed=6)
    frames = centre_columns(prepare_semantics(driving, np.zeros(70, np.float32), expression_scale=1.1))
    np.testing.assert_array_equal(frames[:, :64], driving[:, :64] * np.float32(1.1))


def test_prepare_rejects_bad_arguments():
    with pytest.raises(ValueError, match="preprocess"):
        prepare_semantics(random_coeffs(2), np.zeros(70), preprocess="square")
    with pytest.raises(ValueError, match="source"):
        prepare_semantics(random_coeffs(2), np.zeros(64))
    with pytest.raises(ValueError, match="driving"):
        prepare_semantics(np.zeros((2, 64)), np.zeros(70))
    with pytest.raises(ValueError, match="expression"):
        prepare_semantics(random_coeffs(2), np.zeros(70), expression_scale=float("nan"))


def test_window_bounds_are_checked():
    semantics = prepare_semantics(random_coeffs(5), np.zeros(70))
    for start, stop in [(-1, 2), (3, 2), (0, 6)]:
        with pytest.raises(ValueError, match="outside"):
            semantics.windows(start, stop)


def test_prepare_does_not_copy_or_materialise_windows():
    frames = 15000  # ten minutes at 25 fps
    driving = random_coeffs(frames)
    tracemalloc.start()
    try:
        semantics = prepare_semantics(driving, np.zeros(70, np.float32))
        prepared_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        batch = semantics.windows(frames - 64, frames)
        batch_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    all_windows_bytes = frames * 70 * 27 * 4
    assert prepared_peak < driving.nbytes // 10
    assert batch_peak < all_windows_bytes // 100
    assert batch.shape == (64, 70, 27)
    assert np.shares_memory(semantics.driving, driving)
    assert not semantics.driving.flags.writeable


# --- camera poses ------------------------------------------------------------------------------------

def test_camera_pose_sweep_by_hand():
    # total change 20 + 30 = 50 over 9 steps: 50/9 degrees per frame; 4 frames up, then 6 down.
    step = 50 / 9
    expected = [0, step, 2 * step, 3 * step, 20, 20 - step, 20 - 2 * step, 20 - 3 * step, 20 - 4 * step,
                20 - 5 * step]
    result = camera_pose_sequence([0, 20, -10], 10)
    assert result.dtype == np.float32 and result.shape == (10,)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_camera_pose_single_value_held():
    np.testing.assert_array_equal(camera_pose_sequence([5], 4), [5, 5, 5, 5])


def test_camera_pose_cut_and_padded():
    # rate 5/2 = 2.5: [0, 2.5] + [3] + [4] is one too many, cut to 3 frames.
    np.testing.assert_allclose(camera_pose_sequence([0, 3, 4, 5], 3), [0, 2.5, 3])
    # rate 10: [0] + [10] is one short, padded with the last value.
    np.testing.assert_array_equal(camera_pose_sequence([0, 10, 0], 3), [0, 10, 10])


def test_camera_pose_degenerate_cases():
    # equal neighbours add no frames: rate 20/4 = 5, [10, 15, 20, 25] padded with 25.
    np.testing.assert_array_equal(camera_pose_sequence([10, 10, 30], 5), [10, 15, 20, 25, 25])
    np.testing.assert_array_equal(camera_pose_sequence([7, 7, 7], 3), [7, 7, 7])
    np.testing.assert_array_equal(camera_pose_sequence([0, 20], 1), [0])


def test_camera_pose_rejects_bad_input():
    with pytest.raises(CoefficientsError, match="finite"):
        camera_pose_sequence([0, float("nan")], 5)
    with pytest.raises(ValueError):
        camera_pose_sequence([], 5)
    with pytest.raises(ValueError):
        camera_pose_sequence([1], 0)


def test_parse_degrees():
    assert parse_degrees("0,20,-10") == [0.0, 20.0, -10.0]
    assert parse_degrees(" 0 , 20 ,-10.5 ") == [0.0, 20.0, -10.5]
    assert parse_degrees("15") == [15.0]
    for junk in ["", "0,,20", "a,b", "0;20", "nan", "1,inf"]:
        with pytest.raises(ValueError, match="not a finite number"):
            parse_degrees(junk)
