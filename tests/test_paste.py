"""Paste-back math: cv2-exact resize and blend (against OpenCV's own outputs stored in
tests/data), the blend against an independent sparse Poisson solve, the box search, and the shared
golden paste case."""

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from sfr_cli.imaging import box_search, resize, seamless_clone

DATA = Path(__file__).resolve().parent / "data" / "opencv_paste_cases.npz"


def cases(prefix):
    data = np.load(DATA)
    count = len({k.split("_")[0] for k in data.files if k.startswith(prefix)})
    return data, range(count)


def test_resize_matches_opencv_bit_for_bit():
    data, indices = cases("resize")
    for i in indices:
        image = torch.from_numpy(data[f"resize{i}_in"])[None]
        expected = data[f"resize{i}_out"]
        got = resize.resize_linear(image, expected.shape[1], expected.shape[0])[0].numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"resize case {i}")


def test_resize_identity_halving_and_batch_independence():
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (3, 20, 18, 3), dtype=np.uint8))
    assert torch.equal(resize.resize_linear(frames, 18, 20), frames)
    halved = resize.resize_linear(frames, 9, 10).int()
    f = frames.int()
    expected = (f[:, 0::2, 0::2] + f[:, 1::2, 0::2] + f[:, 0::2, 1::2] + f[:, 1::2, 1::2] + 2) >> 2
    assert torch.equal(halved, expected)
    one_by_one = torch.cat([resize.resize_linear(frames[i : i + 1], 31, 7) for i in range(3)])
    assert torch.equal(resize.resize_linear(frames, 31, 7), one_by_one)


def test_blend_matches_opencv_seamless_clone():
    data, indices = cases("clone")
    for i in indices:
        picture = torch.from_numpy(data[f"clone{i}_picture"])
        patch = torch.from_numpy(data[f"clone{i}_patch"])[None]
        box = tuple(int(v) for v in data[f"clone{i}_box"])
        got = seamless_clone.paste_frames(patch, picture, box, torch.float64)[0].numpy()
        diff = np.abs(got.astype(int) - data[f"clone{i}_out"])
        # float rounding may move a value across an integer before truncation: at most one level, rarely
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"clone case {i}"


def sparse_reference(patch, region):
    """seamlessClone's equations written out one pixel at a time and solved with scipy.sparse:
    unknowns are the region's interior, the outer ring is fixed, the guidance gradient at a pixel
    comes from the patch where the mask eroded 3 times survives and from the region elsewhere."""
    h, w = region.shape
    P, D = patch.astype(np.float64), region.astype(np.float64)

    def kept(y, x):
        return 3 <= y < h - 3 and 3 <= x < w - 3

    def gx(y, x):
        src = P if kept(y, x) else D
        return src[y, x + 1] - src[y, x]

    def gy(y, x):
        src = P if kept(y, x) else D
        return src[y + 1, x] - src[y, x]

    index = {}
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            index[(y, x)] = len(index)
    rows, cols, vals = [], [], []
    rhs = np.zeros(len(index))
    for (y, x), k in index.items():
        rows.append(k), cols.append(k), vals.append(-4.0)
        rhs[k] = gx(y, x) - gx(y, x - 1) + gy(y, x) - gy(y - 1, x)
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if (ny, nx) in index:
                rows.append(k), cols.append(index[(ny, nx)]), vals.append(1.0)
            else:
                rhs[k] -= D[ny, nx]
    matrix = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(index), len(index)))
    return scipy.sparse.linalg.spsolve(matrix, rhs).reshape(h - 2, w - 2)


@pytest.mark.parametrize("h,w", [(3, 3), (5, 9), (12, 7), (17, 16)])
def test_blend_solves_the_same_equations_as_a_sparse_solver(h, w):
    rng = np.random.default_rng(h * 100 + w)
    patch = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    region = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 2e-3)):
        got = seamless_clone.clone_solution(torch.from_numpy(patch), torch.from_numpy(region), dtype).double().numpy()
        for b in range(2):
            for c in range(3):
                expected = sparse_reference(patch[b, :, :, c], region[b, :, :, c])
                np.testing.assert_allclose(got[b, c], expected, atol=tol, rtol=0)


def test_blend_of_the_picture_itself_changes_nothing():
    rng = np.random.default_rng(3)
    picture = torch.from_numpy(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    box = (5, 4, 30, 26)
    out = seamless_clone.paste_frames(picture[4:26, 5:30][None], picture, box, torch.float64)[0]
    # exact integers in, exact solution out; truncation may lose one level where float lands just below
    assert int((out.int() - picture.int()).abs().max()) <= 1


def test_box_past_the_picture_edge_is_clipped_not_refused():
    rng = np.random.default_rng(4)
    picture = torch.from_numpy(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    frames = torch.from_numpy(rng.integers(0, 256, (1, 20, 20, 3), dtype=np.uint8))
    out = seamless_clone.paste_frames(frames, picture, (-5, 20, 15, 40), torch.float32)
    assert out.shape == (1, 30, 40, 3)
    assert torch.equal(out[0, :21], picture[:21])  # above the box (and its outer ring) untouched
    with pytest.raises(ValueError):
        seamless_clone.paste_frames(frames, picture, (-19, -19, 1, 1), torch.float32)


@pytest.fixture
def face_picture(reference_dir):
    return torch.from_numpy(iio.imread(reference_dir / "sample_face_640x896.png")[..., :3].copy())


@pytest.mark.heavy
@pytest.mark.parametrize(
    "box",
    [
        (150, 230, 470, 560),  # the face, roughly square
        (163, 241, 447, 538),  # shifted and scaled, odd sizes
        (0, 0, 300, 330),  # touching the top-left corner
        (390, 640, 640, 896),  # touching the bottom-right corner
        (0, 300, 180, 610),  # narrow and tall at the left edge (a clipped SadTalker crop)
    ],
)
def test_find_box_recovers_the_exact_box(box, face_picture):
    picture = face_picture
    x1, y1, x2, y2 = box
    crop = resize.resize_linear(picture[y1:y2, x1:x2][None].contiguous(), 256, 256)[0]
    match = box_search.find_box(crop, picture)
    assert match.box == box and match.exact


@pytest.mark.heavy
def test_find_box_reports_a_crop_that_is_not_there(face_picture):
    picture = face_picture
    rng = np.random.default_rng(5)
    crop = torch.from_numpy(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    match = box_search.find_box(crop, picture)
    assert not match.exact and match.mean_abs_levels > 20


@pytest.mark.heavy
def test_golden_paste_with_the_box_sfr_finds(reference_dir):
    GOLDEN = reference_dir / "golden-paste"
    meta = json.loads((GOLDEN / "meta.json").read_text())
    picture = torch.from_numpy(iio.imread(GOLDEN / "original.png")[..., :3].copy())
    crop = torch.from_numpy(iio.imread(GOLDEN / "crop.png")[..., :3].copy())
    match = box_search.find_box(crop, picture)
    assert match.exact and list(match.box) == meta["box_x1y1x2y2"]
    frames = sorted((GOLDEN / "frames").glob("*.png"))
    expected = sorted((GOLDEN / "full_frames").glob("*.png"))
    assert len(frames) == len(expected) == meta["frames"]
    rendered = torch.from_numpy(np.stack([iio.imread(f)[..., :3] for f in frames]))
    got = seamless_clone.clone_into_picture(rendered, picture, match.box).numpy().astype(np.float64)
    want = np.stack([iio.imread(f)[..., :3] for f in expected]).astype(np.float64)
    diff = np.abs(got - want)
    psnr = 10 * np.log10(255.0**2 / max((diff**2).mean(), 1e-12))
    assert diff.mean() <= 0.5 and diff.max() <= 8 and psnr >= 45, (diff.mean(), diff.max(), psnr)
