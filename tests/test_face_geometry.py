"""The face enhancer's geometry and paste-back (imaging.face_align, imaging.face_blend, imaging.resize) against OpenCV's own
outputs stored in tests/data (scripts/make_enhancer_opencv_fixtures.py, OpenCV 4.14) and against the
upstream golden (golden-enhance: landmarks -> matrices -> aligned faces; restored faces + masks ->
enhanced frames). No weights needed."""

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from sfr_cli.imaging import face_align, face_blend
from sfr_cli.imaging.resize import resize_lanczos4

DATA = Path(__file__).resolve().parent / "data" / "opencv_enhancer_cases.npz"
# the OpenCV cases run on the CPU and, where CUDA is (the `gpu` marker), on the GPU: same bits expected
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def cases():
    return np.load(DATA)


def indices(data, prefix):
    return sorted({int(k[len(prefix):].split("_")[0]) for k in data.files if k.startswith(prefix)
                   and k[len(prefix)].isdigit()})


def chw(image: np.ndarray, device="cpu") -> torch.Tensor:
    """(H, W[, C]) -> (1, C, H, W)."""
    image = image[..., None] if image.ndim == 2 else image
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device)


def hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).cpu().numpy()


def warp_names(data):
    return [k[len("warp_"):-len("_in")] for k in data.files if k.startswith("warp_") and k.endswith("_in")]


# --------------------------------------------------------------------------------------------------
# warpAffine
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_warp_affine_matches_opencv(cases, device):
    names = warp_names(cases)
    assert {"align", "edge", "outside", "mask64", "mask32"} <= set(names)
    for name in names:
        image, expected = cases[f"warp_{name}_in"], cases[f"warp_{name}_out"]
        expected = expected[..., None] if expected.ndim == 2 else expected
        matrix = torch.from_numpy(cases[f"warp_{name}_matrix"])[None]
        border = cases[f"warp_{name}_border"].tolist()
        got = hwc(face_align.warp_affine(chw(image, device), matrix, expected.shape[0], expected.shape[1], border)[0])
        assert got.dtype == expected.dtype, name
        if image.dtype == np.float32:
            # OpenCV's single-channel float path sums the four taps in another order: one float32 ulp
            np.testing.assert_allclose(got, expected, rtol=0, atol=2.5e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=name)  # uint8 and float64: bit for bit


def test_warp_affine_box_batch_and_image_index(cases):
    image = torch.from_numpy(cases["warp_align_in"]).permute(2, 0, 1)
    images = torch.stack([image, image.flip(1)])
    matrices = torch.from_numpy(np.stack([cases["warp_align_matrix"], cases["warp_edge_matrix"],
                                          cases["warp_general_matrix"]]))
    full = face_align.warp_affine(images, matrices, 40, 44, (1, 2, 3), image_index=torch.tensor([1, 0, 1]))
    for n, frame in enumerate([1, 0, 1]):
        alone = face_align.warp_affine(images[frame : frame + 1], matrices[n : n + 1], 40, 44, (1, 2, 3))
        assert torch.equal(full[n], alone[0])
    part = face_align.warp_affine(images, matrices, 40, 44, (1, 2, 3), box=(5, 7, 31, 40),
                                  image_index=torch.tensor([1, 0, 1]))
    assert torch.equal(part, full[:, :, 7:40, 5:31])


def test_warp_footprint_bounds_everything_but_the_border(cases):
    rng = np.random.default_rng(3)
    mask = torch.from_numpy(cases["warp_mask64_in"])[None, None]
    face = torch.ones(1, 3, 36, 36, dtype=torch.uint8)
    tight = 0
    for i in range(12):
        scale, angle = rng.uniform(0.4, 1.4), rng.uniform(-np.pi, np.pi)
        linear = scale * np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        centre = np.array([40.0, 35.0]) + rng.uniform(-1, 1, 2) * (10 if i % 2 else 45)  # inside, or over an edge
        matrix = torch.from_numpy(np.concatenate([linear, (centre - linear @ [18.0, 18.0])[:, None]], 1))[None]
        x0, y0, x1, y1 = face_align.warp_footprint(matrix, 36, 36, 70, 80)[0].tolist()
        warped = face_align.warp_affine(mask, matrix, 70, 80)[0, 0]
        touched = face_align.warp_affine(face, matrix, 70, 80)[0, 0] > 0
        outside = torch.ones_like(touched)
        outside[y0:y1, x0:x1] = False
        assert not touched[outside].any() and (warped[outside] == 0).all(), i
        if 0 < x0 and x1 < 80 and 0 < y0 and y1 < 70:  # not clipped: tight, within a few pixels of the warp
            ys, xs = torch.nonzero(touched, as_tuple=True)
            gaps = (int(xs.min()) - x0, x1 - 1 - int(xs.max()), int(ys.min()) - y0, y1 - 1 - int(ys.max()))
            assert max(gaps) <= 4, (i, gaps)
            tight += 1
    assert tight >= 3


def test_invert_affine_matches_opencv(cases):
    for i in indices(cases, "invert"):
        got = face_align.invert_affine(torch.from_numpy(cases[f"invert{i}_in"]))
        np.testing.assert_array_equal(got.numpy(), cases[f"invert{i}_out"])


# --------------------------------------------------------------------------------------------------
# estimateAffinePartial2D(LMEDS)
# --------------------------------------------------------------------------------------------------
def test_similarity_lmeds_matches_opencv(cases):
    template = face_align.face_template()
    dropped = 0
    for i in indices(cases, "lmeds"):
        points = cases[f"lmeds{i}_points"]
        expected = cases[f"lmeds{i}_matrix"]
        got = face_align.similarity_lmeds(torch.from_numpy(points), template).numpy()
        # same inliers and the same Levenberg-Marquardt steps: equal up to the solver's last bits
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9, err_msg=f"lmeds case {i}")
        dropped += int((~cases[f"lmeds{i}_inliers"]).sum())
    assert dropped >= 3  # the outlier cases exercise the inlier choice


def test_similarity_lmeds_drops_an_outlier_that_least_squares_follows():
    template = face_align.face_template().float()
    truth = torch.tensor([[0.3, 0.05, 17.0], [-0.05, 0.3, 40.0]], dtype=torch.float64)
    points = (face_align.invert_affine(truth)[:, :2] @ template.double().T).T + face_align.invert_affine(truth)[:, 2]
    points[3] += torch.tensor([9.0, -7.0], dtype=torch.float64)
    got = face_align.similarity_lmeds(points.float())
    assert torch.allclose(got, truth, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# resize(INTER_LANCZOS4)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_resize_lanczos4_matches_opencv(cases, device):
    assert len(indices(cases, "resize")) >= 6
    for i in indices(cases, "resize"):
        image, expected = cases[f"resize{i}_in"], cases[f"resize{i}_out"]
        expected = expected[..., None] if expected.ndim == 2 else expected
        got = hwc(resize_lanczos4(chw(image, device), expected.shape[0], expected.shape[1])[0])
        np.testing.assert_array_equal(got, expected, err_msg=f"resize case {i}")


def test_resize_lanczos4_is_batch_independent_and_flat_stays_flat():
    rng = np.random.default_rng(5)
    frames = torch.from_numpy(rng.integers(0, 256, (3, 2, 11, 14), dtype=np.uint8))
    together = resize_lanczos4(frames, 22, 28)
    assert torch.equal(together, torch.cat([resize_lanczos4(f[None], 22, 28) for f in frames]))
    flat = torch.full((1, 3, 9, 7), 200, dtype=torch.uint8)
    assert torch.equal(resize_lanczos4(flat, 18, 14), torch.full((1, 3, 18, 14), 200, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# paste
# --------------------------------------------------------------------------------------------------
def paste_inputs(cases, i, device="cpu"):
    faces = sorted(int(k[len(f"paste{i}_affine"):]) for k in cases.files if k.startswith(f"paste{i}_affine"))
    restored = torch.stack([chw(cases[f"paste{i}_restored{k}"], device)[0] for k in faces])
    masks = torch.stack([torch.from_numpy(cases[f"paste{i}_mask{k}"]) for k in faces]).to(device)
    affines = torch.stack([torch.from_numpy(cases[f"paste{i}_affine{k}"]) for k in faces]).to(device)
    return chw(cases[f"paste{i}_frame"], device), restored, masks, affines, float(cases[f"paste{i}_upscale"])


@pytest.mark.parametrize("device", DEVICES)
def test_paste_back_matches_opencv_paste(cases, device):
    assert len(indices(cases, "paste")) == 3
    for i in indices(cases, "paste"):
        frame, restored, masks, affines, upscale = paste_inputs(cases, i, device)
        frame_index = torch.zeros(len(restored), dtype=torch.int64, device=device)
        got = face_blend.blend_restored_faces(frame, restored, masks, affines, frame_index, upscale)
        expected = cases[f"paste{i}_out"]
        np.testing.assert_array_equal(hwc(got[0]), expected, err_msg=f"paste case {i}")
        assert (hwc(got[0]) != hwc(face_blend.upsample_background(frame, upscale)[0])).mean() > 0.2


def test_paste_faces_batched_frames_keep_their_own_faces(cases):
    frame_a, restored_a, masks_a, affines_a, _ = paste_inputs(cases, 0)
    frame_b, restored_b, masks_b, affines_b, _ = paste_inputs(cases, 1)
    frames = torch.cat([frame_b, frame_a, frame_a.flip(2)])
    restored = torch.cat([restored_b[:1], restored_a, restored_b[1:]])
    masks = torch.cat([masks_b[:1], masks_a, masks_b[1:]])
    affines = torch.cat([affines_b[:1], affines_a, affines_b[1:]])
    frame_index = torch.tensor([0, 1, 0])  # frame 0's faces interleaved with frame 1's; frame 2 has none
    got = face_blend.blend_restored_faces(frames, restored, masks, affines, frame_index, 2)
    np.testing.assert_array_equal(hwc(got[0]), cases["paste1_out"])
    np.testing.assert_array_equal(hwc(got[1]), cases["paste0_out"])
    assert torch.equal(got[2], face_blend.upsample_background(frames[2:], 2)[0])


def test_paste_offset_and_inverse_affines():
    matrix = torch.tensor([[[2.4, 0.1, 100.0], [-0.1, 2.4, -300.0]]], dtype=torch.float64)
    for upscale, offset in ((2, 1.0), (1, 0.0), (4, 2.0)):
        got = face_blend.paste_inverse_affines(matrix, upscale)
        plain = face_align.invert_affine(matrix) * upscale
        assert torch.equal(got[..., :2], plain[..., :2])
        assert torch.equal(got[..., 2], plain[..., 2] + offset)


# --------------------------------------------------------------------------------------------------
# the upstream golden (no weights: its stored landmarks, restored faces and masks)
# --------------------------------------------------------------------------------------------------
def golden(reference_dir):
    root = reference_dir / "golden-enhance"
    return root, json.loads((root / "meta.json").read_text())


def frame_chw(path: Path) -> torch.Tensor:
    return torch.from_numpy(iio.imread(path)).permute(2, 0, 1)[None]


def golden_matrices(meta):
    return [list(face_align.align_matrices(torch.tensor(frame["landmarks_5"]).reshape(-1, 5, 2)))
            for frame in meta["frames"]]


def test_golden_affine_matrices(reference_dir):
    _, meta = golden(reference_dir)
    worst = 0.0
    for frame, matrices in zip(meta["frames"], golden_matrices(meta)):
        for got, expected, inverse in zip(matrices, frame["affine_matrices"], frame["inverse_affines_paste"]):
            worst = max(worst, float((got - torch.tensor(expected, dtype=torch.float64)).abs().max()))
            paste = face_blend.paste_inverse_affines(got[None], 2)[0]
            assert float((paste - torch.tensor(inverse, dtype=torch.float64)).abs().max()) < 1e-9
    # noise floor: another thread count moves the matrices by 8e-5; measured 2.3e-13
    assert worst < 1e-6, worst


def test_golden_aligned_faces(reference_dir):
    root, meta = golden(reference_dir)
    for frame, matrices in zip(meta["frames"], golden_matrices(meta)):
        if not matrices:
            continue
        image = frame_chw(root / frame["frame"])
        faces = face_align.align_faces(image, torch.stack(matrices), torch.zeros(len(matrices), dtype=torch.long))
        for face, path in zip(faces, frame["faces"]):
            expected = iio.imread(root / path)  # PNGs hold RGB, like the frames
            diff = np.abs(hwc(face).astype(int) - expected)
            # bit for bit (the noise floor allows 4 levels on 0.015 % of values: the 1/32 px grid)
            assert diff.max() == 0, (path, diff.max(), (diff > 0).mean())


def test_golden_paste(reference_dir):
    root, meta = golden(reference_dir)
    for frame, matrices in zip(meta["frames"], golden_matrices(meta)):
        image = frame_chw(root / frame["frame"])
        expected = iio.imread(root / frame["enhanced"])
        count = len(matrices)
        restored = torch.stack([frame_chw(root / p)[0] for p in frame["restored"]]) if count else \
            torch.zeros(0, 3, 512, 512, dtype=torch.uint8)
        masks = torch.stack([torch.from_numpy(np.load(root / p)) for p in frame["masks"]]) if count else \
            torch.zeros(0, 512, 512)
        affines = torch.stack(matrices) if count else torch.zeros(0, 2, 3, dtype=torch.float64)
        got = hwc(face_blend.blend_restored_faces(image, restored, masks, affines, torch.zeros(count, dtype=torch.long), 2)[0])
        diff = np.abs(got.astype(int) - expected)
        if count == 0:  # no face: the 2x Lanczos-4 of the frame, bit for bit
            np.testing.assert_array_equal(got, expected)
        # the stored masks are float32 of upstream's float64: at most a level on 0.013 % of values
        assert diff.max() <= 4 and (diff > 0).mean() <= 0.005, (frame["frame"], diff.max(), (diff > 0).mean())
