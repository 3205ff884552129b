"""Every mode SadTalker's face renderer has, end to end through `sfr render` with tiny weights:
full/extfull (73 coefficients), still, expression scale, head-pose control, windowed inputs,
sources of any size and shape, and 512-pixel frames from SadTalker_V0.0.2_512.safetensors.

Each mode's frames are checked against an independent computation: SadTalker's target semantics and
keypoint transform written out here from its formulas (generate_facerender_batch.py, make_animation.py),
fed through the plain modules (no inference rewrites, no engine), judged by ``assert_frames_close``."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import assert_frames_close, frame_gap, to_uint8
from sfr_cli.checkpoints import find_checkpoints, load_networks, write_random_checkpoints
from sfr_cli.cli import sfr
from sfr_cli.coeffs import prepare_semantics
from sfr_cli.config import CONFIG_DIR, load_config

FRAMES = 5


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    rng = np.random.default_rng(11)
    driving = (0.4 * rng.standard_normal((FRAMES, 70))).astype(np.float32)
    source = (0.4 * rng.standard_normal((1, 73))).astype(np.float32)
    np.save(folder / "coeffs.npy", driving)
    np.save(folder / "source73.npy", source)
    np.save(folder / "source70.npy", source[:, :70])
    windows = prepare_semantics(driving, source[0, :70]).windows(0, FRAMES)
    np.save(folder / "windows.npy", windows)
    np.save(folder / "windows4d.npy", windows[None])
    Image.fromarray((rng.random((96, 72, 3)) * 255).astype(np.uint8)).save(folder / "face.png")
    return folder


def render(job, tiny_checkpoints, out, *extra, coeffs="coeffs.npy", source_coeffs="source70.npy"):
    args = ["render", "--coeffs", str(job / coeffs), "--source-coeffs", str(job / source_coeffs),
            "--source", str(job / "face.png"), "--checkpoint-dir", str(tiny_checkpoints), "--config", "tiny",
            "--frames-dir", str(out), "--device", "cpu", "--quiet", *extra]
    result = CliRunner().invoke(sfr, args)
    assert result.exit_code == 0, result.output
    frames = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])
    assert frames.shape[0] == FRAMES and frames.dtype == np.uint8
    return frames


@pytest.fixture(scope="module")
def crop_frames(job, tiny_checkpoints, tmp_path_factory):
    return render(job, tiny_checkpoints, tmp_path_factory.mktemp("crop") / "f")


# --- SadTalker's arithmetic, written out independently of sfr's coeffs.py, geometry.py and engine.py ---

def sadtalker_windows(driving, source_row, *, full=False, still=False, expression_scale=1.0):
    """get_facerender_data's target semantics: ``(N, C, 27)`` float32, C = 73 in full mode else 70.

    Columns :64 scaled by the expression scale; full mode appends the source's 3 crop columns (70:73)
    to every frame; still mode replaces columns 64: (pose, translation, crop) by the source's; frame
    i's window holds frames i-13 .. i+13 clamped to the clip."""
    target = driving[:, :70].astype(np.float32).copy()
    target[:, :64] = target[:, :64] * np.float32(expression_scale)
    if full:
        target = np.concatenate([target, np.repeat(source_row[None, 70:73], len(target), axis=0)], axis=1)
    if still:
        target[:, 64:] = source_row[None, 64:target.shape[1]]
    n = len(target)
    return np.stack([target[[min(max(j, 0), n - 1) for j in range(i - 13, i + 14)]].T for i in range(n)])


def sadtalker_keypoints(kp_canonical, pose, yaw=None, pitch=None, roll=None):
    """keypoint_transformation in float64: bin logits -> degrees (3 per bin from -99) unless the angle is
    given; degrees -> radians with SadTalker's 3.14; R = R_pitch(x) R_yaw(y) R_roll(z); t keeps only y;
    then the expression offsets. ``kp_canonical (B, K, 3)`` -> ``(B, K, 3)`` float32 tensor."""
    def degrees(logits):
        logits = logits.double().numpy()
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        return (weights * np.arange(logits.shape[1])).sum(axis=1) * 3 - 99

    y, p, r = (degrees(pose[name]) if given is None else np.asarray(given, np.float64)
               for name, given in (("yaw", yaw), ("pitch", pitch), ("roll", roll)))
    y, p, r = y / 180 * 3.14, p / 180 * 3.14, r / 180 * 3.14
    one, zero = np.ones_like(y), np.zeros_like(y)
    pitch_mat = np.stack([one, zero, zero, zero, np.cos(p), -np.sin(p), zero, np.sin(p), np.cos(p)], 1)
    yaw_mat = np.stack([np.cos(y), zero, np.sin(y), zero, one, zero, -np.sin(y), zero, np.cos(y)], 1)
    roll_mat = np.stack([np.cos(r), -np.sin(r), zero, np.sin(r), np.cos(r), zero, zero, zero, one], 1)
    rot = pitch_mat.reshape(-1, 3, 3) @ yaw_mat.reshape(-1, 3, 3) @ roll_mat.reshape(-1, 3, 3)
    kp = kp_canonical.double().numpy()
    t = pose["t"].double().numpy() * np.array([0.0, 1.0, 0.0])
    exp = pose["exp"].double().numpy().reshape(kp.shape[0], -1, 3)
    return torch.from_numpy(np.einsum("bmp,bkp->bkm", rot, kp) + t[:, None] + exp).float()


@pytest.fixture(scope="module")
def plain_nets(tiny_checkpoints):
    """The plain modules from the tiny checkpoints: 70-coefficient mapping (crop) and 73 (full)."""
    return {70: load_networks(load_config(CONFIG_DIR / "tiny.yaml"), find_checkpoints(tiny_checkpoints)),
            73: load_networks(load_config(CONFIG_DIR / "tiny_still.yaml"),
                              find_checkpoints(tiny_checkpoints, preprocess="full"))}


@pytest.fixture(scope="module")
def source_image(job):
    """SadTalker's source path: img_as_float32, skimage resize to 256 x 256, channels first."""
    from skimage import transform, util

    image = util.img_as_float32(np.array(Image.open(job / "face.png")))
    return np.ascontiguousarray(transform.resize(image, (256, 256, 3)).transpose(2, 0, 1), dtype=np.float32)


def expected_frames(job, plain_nets, source_image, *, source_coeffs="source70.npy", yaw=None, pitch=None,
                    roll=None, **semantics):
    """SadTalker's frames for this job, computed without sfr's windows, pose math or engine."""
    driving, source_row = np.load(job / "coeffs.npy"), np.load(job / source_coeffs)[0]
    windows = sadtalker_windows(driving, source_row, **semantics)
    count = windows.shape[1]
    nets = plain_nets[count]
    source_window = np.repeat(source_row[:count, None], 27, axis=1)[None]
    with torch.no_grad():
        image = torch.from_numpy(source_image)[None].expand(FRAMES, -1, -1, -1)
        kp_canonical = nets.kp_detector(image)
        kp_source = sadtalker_keypoints(kp_canonical, nets.mapping(torch.from_numpy(source_window).expand(FRAMES, -1, -1)))
        kp_driving = sadtalker_keypoints(kp_canonical, nets.mapping(torch.from_numpy(windows)), yaw, pitch, roll)
        return to_uint8(nets.generator(image, kp_driving, kp_source)["prediction"])


def assert_sadtalkers_answer(frames, expected, crop_frames, what):
    assert_frames_close(frames, expected, f"{what} against SadTalker's arithmetic")
    # the check can fail: ignoring this control would leave the crop frames, far from the expected ones
    assert frame_gap(expected, crop_frames)[0] > 1, f"{what}: expected frames barely differ from crop's"


@pytest.mark.heavy
def test_non_square_source_renders_square_frames(crop_frames):
    assert crop_frames.shape == (FRAMES, 256, 256, 3)
    assert crop_frames.std() > 1, "frames should not be flat"


@pytest.mark.heavy
def test_crop_frames_are_sadtalkers(job, plain_nets, source_image, crop_frames):
    assert_frames_close(crop_frames, expected_frames(job, plain_nets, source_image), "crop")


@pytest.mark.heavy
@pytest.mark.parametrize("coeffs", ["windows.npy", "windows4d.npy"])
def test_windowed_inputs_give_the_same_frames(job, tiny_checkpoints, tmp_path, crop_frames, coeffs):
    np.testing.assert_array_equal(render(job, tiny_checkpoints, tmp_path / "f", coeffs=coeffs), crop_frames)


@pytest.mark.heavy
@pytest.mark.parametrize("preprocess", ["resize", "extcrop"])
def test_crop_family_modes_render_like_crop(job, tiny_checkpoints, tmp_path, crop_frames, preprocess):
    frames = render(job, tiny_checkpoints, tmp_path / "f", "--preprocess", preprocess)
    np.testing.assert_array_equal(frames, crop_frames)


# extfull is full's twin in the modes table; make test-fast renders full only
@pytest.mark.heavy
@pytest.mark.parametrize("preprocess", ["full", pytest.param("extfull", marks=pytest.mark.slow)])
def test_full_modes_use_the_73_coefficient_mapping(job, tiny_checkpoints, tmp_path, crop_frames, plain_nets,
                                                   source_image, preprocess):
    frames = render(job, tiny_checkpoints, tmp_path / "f", "--preprocess", preprocess, source_coeffs="source73.npy")
    expected = expected_frames(job, plain_nets, source_image, source_coeffs="source73.npy", full=True)
    assert_sadtalkers_answer(frames, expected, crop_frames, preprocess)


@pytest.mark.heavy
def test_still_full_mode_keeps_the_source_pose_and_crop(job, tiny_checkpoints, tmp_path, crop_frames, plain_nets,
                                                        source_image):
    frames = render(job, tiny_checkpoints, tmp_path / "f", "--preprocess", "full", "--still",
                    source_coeffs="source73.npy")
    expected = expected_frames(job, plain_nets, source_image, source_coeffs="source73.npy", full=True, still=True)
    assert_sadtalkers_answer(frames, expected, crop_frames, "full --still")


# (CLI options, independent semantics): camera angles as SadTalker's gen_camera_pose makes them for 5
# frames, written out by hand: one value is held; 0,30 sweeps 7.5 degrees a frame and holds the last
# value reached; 10,-10,5 sweeps 35/4 = 8.75 degrees a frame, down then up.
CONTROLS = [
    (["--still"], dict(still=True)),
    (["--expression-scale", "0"], dict(expression_scale=0.0)),
    pytest.param(["--expression-scale", "1.5"], dict(expression_scale=1.5), marks=pytest.mark.slow),
    (["--yaw", "0,30"], dict(yaw=[0.0, 7.5, 15.0, 22.5, 22.5])),
    (["--pitch", "-15"], dict(pitch=[-15.0] * FRAMES)),
    (["--roll", "10,-10,5"], dict(roll=[10.0, 1.25, -7.5, -10.0, -1.25])),
    pytest.param(["--yaw", "20", "--pitch", "-10,10", "--roll", "5", "--still"],
                 dict(yaw=[20.0] * FRAMES, pitch=[-10.0, -5.0, 0.0, 5.0, 5.0], roll=[5.0] * FRAMES, still=True),
                 marks=pytest.mark.slow),  # make test-fast keeps one case of each control
]


@pytest.mark.heavy
@pytest.mark.parametrize("options, semantics", CONTROLS,
                         ids=[" ".join(c.values[0] if hasattr(c, "values") else c[0]) for c in CONTROLS])
def test_each_control_gives_sadtalkers_frames(job, tiny_checkpoints, tmp_path, crop_frames, plain_nets,
                                              source_image, options, semantics):
    frames = render(job, tiny_checkpoints, tmp_path / "f", *options)
    expected = expected_frames(job, plain_nets, source_image, **semantics)
    assert_sadtalkers_answer(frames, expected, crop_frames, " ".join(options))


@pytest.mark.heavy
def test_expression_scale_one_is_the_default(job, tiny_checkpoints, tmp_path, crop_frames):
    frames = render(job, tiny_checkpoints, tmp_path / "f", "--expression-scale", "1.0")
    np.testing.assert_array_equal(frames, crop_frames)


@pytest.mark.slow  # 512-pixel frames: four times the work of every other render here
def test_512_frames_from_the_512_safetensors_file(job, tmp_path):
    folder = tmp_path / "ck512"
    write_random_checkpoints(folder, load_config(CONFIG_DIR / "tiny.yaml"), load_config(CONFIG_DIR / "tiny_still.yaml"),
                             layout="safetensors", size_px=512)
    assert (folder / "SadTalker_V0.0.2_512.safetensors").is_file()
    args = ["render", "--coeffs", str(job / "coeffs.npy"), "--source", str(job / "face.png"),
            "--checkpoint-dir", str(folder), "--config", "tiny", "--size", "512",
            "--frames-dir", str(tmp_path / "f"), "--device", "cpu", "--quiet", "--batch-size", "2"]
    result = CliRunner().invoke(sfr, args)
    assert result.exit_code == 0, result.output
    first = np.asarray(Image.open(tmp_path / "f" / "000000.png"))
    assert first.shape == (512, 512, 3)
    assert len(list((tmp_path / "f").glob("*.png"))) == FRAMES
