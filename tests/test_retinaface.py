"""sfr_cli.nets.retinaface: facexlib's RetinaFace-R50 and the enhancer's face detection, against the upstream
golden (golden-enhance/meta.json), torchvision's NMS semantics, the weight file's layout, and tiny weights."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sfr_cli import detector_weights
from sfr_cli.nets import retinaface as rf

from conftest import one_torch_thread

# The brief's tolerances against the upstream run; the reference's own noise (another torch thread count)
# moves detections by 3e-5 (meta.json noise_floor.detections), so these leave room for another CPU or a GPU.
POINT_TOL_PX = 0.01
SCORE_TOL = 1e-4
# Tiny random weights (rf.TINY_RETINAFACE) screened like the golden's seed: 1-3 faces on each golden face
# frame and 2 on sample_face_256.png, scores at least 0.001 from 0.97 there; the flat frame peaks at 0.12.
TINY_SEED = detector_weights.TINY_SEED


def read_rgb(path) -> torch.Tensor:
    """A PNG as ``(1, 3, H, W) uint8 RGB``."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def golden(reference_dir):
    meta = json.loads((reference_dir / "golden-enhance" / "meta.json").read_text())
    frames = torch.cat([read_rgb(reference_dir / "golden-enhance" / f["frame"]) for f in meta["frames"]])
    wanted = [torch.tensor(f["detections"], dtype=torch.float32).reshape(-1, 15) for f in meta["frames"]]
    return frames, wanted, meta


@pytest.fixture(scope="module")
def full_net(enhancer_reference_weights):
    state = torch.load(enhancer_reference_weights / "detection_Resnet50_Final.pth", weights_only=True)
    net = rf.build_retinaface()
    net.load_state_dict(rf.strip_module_prefix(state), strict=True)
    return net


@pytest.fixture(scope="module")
def tiny_net():
    net = rf.build_retinaface(tiny=True)
    net.load_state_dict(detector_weights.random_state_dict(net, TINY_SEED), strict=True)
    return net


def assert_detections_close(got, want, what):
    assert got.shape == want.shape, f"{what}: {got.shape[0]} face(s), expected {want.shape[0]}"
    if len(want):
        points = torch.cat([got[:, :4] - want[:, :4], got[:, 5:] - want[:, 5:]], dim=1).abs().max().item()
        score = (got[:, 4] - want[:, 4]).abs().max().item()
        assert points <= POINT_TOL_PX and score <= SCORE_TOL, f"{what}: points off by {points} px, score by {score}"


# ------------------------------------------------------------------------------------------ the layout
def test_full_size_module_has_the_weight_files_keys_and_shapes(reference_dir):
    manifest = json.loads((reference_dir / "enhancer_state_dict_manifest.json").read_text())
    entries = manifest["detection_Resnet50_Final.pth"]
    with torch.device("meta"):
        state = rf.build_retinaface().state_dict()
    stored = {key: (shape, dtype) for key, shape, dtype in entries}
    assert all(key.startswith("module.") for key in stored)
    expected = {key[len("module."):]: value for key, value in stored.items()}
    assert list(state) == list(expected), "keys differ (or their order)"
    for key, tensor in state.items():
        shape, dtype = expected[key]
        assert list(tensor.shape) == shape and str(tensor.dtype) == f"torch.{dtype}", key


def test_module_prefix_is_accepted_with_and_without(tiny_net):
    plain = detector_weights.random_state_dict(tiny_net, TINY_SEED)
    prefixed = {"module." + key: value for key, value in plain.items()}
    mixed = {("module." + key if i % 2 else key): value for i, (key, value) in enumerate(plain.items())}
    for state in (plain, prefixed, mixed):
        stripped = rf.strip_module_prefix(state)
        assert list(stripped) == list(plain)
        net = rf.build_retinaface(tiny=True)
        net.load_state_dict(stripped, strict=True)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), plain.values()))
    assert rf.strip_module_prefix({"body.module.x": 1}) == {"body.module.x": 1}   # only a leading prefix


# ------------------------------------------------------------------------------------- the golden run
@pytest.mark.heavy
def test_golden_frames_give_upstreams_faces(full_net, golden):
    """Each golden frame alone: facexlib's faces, in its order, within 0.01 px and 1e-4; the flat one none."""
    frames, wanted, meta = golden
    with one_torch_thread():
        for i, want in enumerate(wanted):
            got = rf.detect_faces(full_net, frames[i:i + 1])
            assert len(got) == 1 and got[0].dtype == torch.float32
            assert_detections_close(got[0], want, meta["frames"][i]["frame"])
    assert [len(w) for w in wanted] == [1, 1, 2, 0]


@pytest.mark.heavy
def test_a_batch_detects_what_each_frame_does_alone(full_net, golden):
    frames, wanted, meta = golden
    with one_torch_thread():
        batched = rf.detect_faces(full_net, frames)
        alone = [rf.detect_faces(full_net, frames[i:i + 1])[0] for i in range(len(frames))]
    assert len(batched) == len(frames)
    for i, (got, one, want) in enumerate(zip(batched, alone, wanted)):
        assert_detections_close(got, one, f"frame {i} batched vs alone")
        assert_detections_close(got, want, f"frame {i} batched vs upstream")


@pytest.mark.heavy
def test_random_weights_at_full_width_are_the_reference_file(enhancer_reference_weights):
    """random_state_dict draws and conditions like make_enhancer_checkpoints.py: bit for bit at seed 14."""
    state = rf.strip_module_prefix(
        torch.load(enhancer_reference_weights / "detection_Resnet50_Final.pth", weights_only=True))
    with torch.device("meta"):
        net = rf.build_retinaface()
    mine = detector_weights.random_state_dict(net, 14)
    assert list(mine) == list(state)
    different = [key for key in state if not torch.equal(mine[key], state[key])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


# --------------------------------------------------------------------------------------------------- NMS
def reference_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float):
    """torchvision's CPU kernel, one float32 scalar at a time: stable descending order, float32 IoU,
    '> threshold' in double."""
    boxes = boxes.astype(np.float32)
    order = sorted(range(len(scores)), key=lambda k: -float(scores[k]))
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    suppressed, keep = [False] * len(scores), []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[pos + 1:]:
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            h = max(np.float32(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = w * h
            with np.errstate(invalid="ignore", divide="ignore"):     # empty boxes: 0 / 0
                overlap = inter / (areas[i] + areas[j] - inter)
            assert overlap.dtype == np.float32
            if float(overlap) > threshold:
                suppressed[j] = True
    return keep


def random_boxes(rng, n):
    """Clustered boxes (many overlaps near 0.4), repeated boxes, and scores with exact and near ties."""
    centres = rng.uniform(0, 100, (3, 2))[rng.integers(0, 3, n)] + rng.normal(0, 6, (n, 2))
    sizes = rng.uniform(10, 40, (n, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
    boxes[n // 2:n // 2 + 3] = boxes[0]                       # identical boxes
    scores = rng.uniform(0.97, 1.0, n).astype(np.float32)
    scores[: n // 3] = scores[n // 3]                          # exact ties
    scores[n // 3 + 1] = np.nextafter(scores[n // 3], np.float32(1))   # a near tie
    return boxes, scores


def test_nms_is_torchvisions_kernel():
    rng = np.random.default_rng(7)
    kept_some = suppressed_some = 0
    for n in (1, 2, 5, 12, 16, 40):
        for _ in range(20):
            boxes, scores = random_boxes(rng, n) if n > 4 else (
                rng.uniform(0, 30, (n, 4)).astype(np.float32), rng.uniform(0, 1, n).astype(np.float32))
            boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
            for threshold in (0.4, 0.1, 0.7):
                got = rf.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).tolist()
                assert got == reference_nms(boxes, scores, threshold), (n, threshold)
                kept_some += len(got) > 1
                suppressed_some += len(got) < n
    assert kept_some and suppressed_some


def test_nms_compares_a_float32_iou_in_double():
    """IoU 40/100 is 0.4f = 0.40000000596 > 0.4: torchvision drops the box (a float32 compare would keep it)."""
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 4], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.99, 0.98, 0.985])
    assert rf.nms(boxes, scores, 0.4).tolist() == [0, 2]
    assert rf.nms(boxes, scores, 0.41).tolist() == [0, 2, 1]
    assert rf.nms(boxes[:0], scores[:0]).shape == (0,)


# ----------------------------------------------------------------------------------- anchors and decode
def test_prior_boxes_follow_facexlibs_loops():
    height, width = 250, 300
    want = []
    for step, sizes in zip(rf.PRIOR_STEPS, rf.PRIOR_MIN_SIZES):
        for i, j in itertools.product(range(math.ceil(height / step)), range(math.ceil(width / step))):
            for size in sizes:
                want.append([(j + 0.5) * step / width, (i + 0.5) * step / height, size / width, size / height])
    got = rf.prior_boxes(height, width)
    assert got.dtype == torch.float32 and torch.equal(got, torch.tensor(want, dtype=torch.float32))
    assert rf.prior_boxes(height, width) is got                # built once per size


def test_decoding_zero_regressions_gives_the_anchors(tiny_net):
    priors = rf.prior_boxes(64, 96)
    boxes = rf.decode_boxes(torch.zeros(2, len(priors), 4), priors)
    assert torch.allclose(boxes[1, :, :2], priors[:, :2] - priors[:, 2:] / 2)
    assert torch.allclose(boxes[1, :, 2:], priors[:, :2] + priors[:, 2:] / 2)
    points = rf.decode_landmarks(torch.ones(2, len(priors), 10), priors)
    assert torch.allclose(points[0, :, 8:], priors[:, :2] + 0.1 * priors[:, 2:])
    x = torch.zeros(1, 3, 64, 96)
    loc, conf, landmarks = tiny_net(x)
    assert loc.shape == (1, len(priors), 4) and conf.shape == (1, len(priors), 2)
    assert landmarks.shape == (1, len(priors), 10)


# ------------------------------------------------------------------------------------ tiny random weights
def test_tiny_random_weights_find_faces_and_not_on_a_flat_frame(tiny_net, golden, reference_dir):
    frames, _, _ = golden
    face = read_rgb(reference_dir / "sample_face_256.png")
    found = rf.detect_faces(tiny_net, face)[0]
    assert len(found) >= 1
    assert (found[:, 4] > rf.DETECTION_THRESHOLD).all() and (found[:-1, 4] >= found[1:, 4]).all()
    assert len(rf.detect_faces(tiny_net, frames[3:4])[0]) == 0        # golden-enhance's flat grey frame
    assert all(len(f) >= 1 for f in rf.detect_faces(tiny_net, frames[:3]))


def test_tiny_batch_is_batch_independent(tiny_net, golden):
    frames, _, _ = golden
    batched = rf.detect_faces(tiny_net, frames)
    for i in range(len(frames)):
        assert_detections_close(batched[i], rf.detect_faces(tiny_net, frames[i:i + 1])[0], f"frame {i}")


def test_faces_with_close_eyes_are_dropped(tiny_net, golden):
    """Landmark heads moved so that both eyes land on one point: every face goes at 5 px, none at 0."""
    frames, _, _ = golden
    net = rf.build_retinaface(tiny=True)
    state = detector_weights.random_state_dict(net, TINY_SEED)
    for level in range(len(rf.PRIOR_STEPS)):
        state[f"LandmarkHead.{level}.conv1x1.weight"].zero_()
        bias = state[f"LandmarkHead.{level}.conv1x1.bias"].view(rf.ANCHORS_PER_CELL, 5, 2)
        bias[:, 1] = bias[:, 0]
    net.load_state_dict(state)
    assert sum(len(f) for f in rf.detect_faces(net, frames)) == 0
    kept = rf.detect_faces(net, frames, min_eye_distance_px=0.0)
    assert [len(f) for f in kept] == [len(f) for f in rf.detect_faces(tiny_net, frames)]
    assert all(torch.equal(f[:, 5:7], f[:, 7:9]) for f in kept)


def test_random_state_dict_is_deterministic_and_conditioned(tiny_net):
    a = detector_weights.random_state_dict(tiny_net, 3)
    b = detector_weights.random_state_dict(tiny_net, 3)
    c = detector_weights.random_state_dict(tiny_net, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.layer1.0.conv2.weight"], c["body.layer1.0.conv2.weight"])
    for key, value in a.items():
        if key.endswith(".weight") and value.dim() == 4:       # zero-sum conv filters
            assert value.flatten(1).sum(1).abs().max() < 1e-4 * value.abs().max() * value[0].numel(), key
    assert a["ClassHead.1.conv1x1.bias"].tolist() == [0, -12, 0, -4]
    assert a["ClassHead.2.conv1x1.bias"].tolist() == [0, -2, 0, -12]


def test_detect_faces_rejects_float_frames(tiny_net):
    with pytest.raises(ValueError, match="uint8"):
        rf.detect_faces(tiny_net, torch.zeros(1, 3, 32, 32))
