"""facexlib's RetinaFace face detector with a ResNet-50 body, and the post-processing that SadTalker's
``--enhancer gfpgan`` runs on every frame (``FaceRestoreHelper.get_face_landmarks_5(only_center_face=False,
eye_dist_threshold=5)`` with ``det_model='retinaface_resnet50'``), as batched tensor code.

Attribute paths are the checkpoint's keys without DataParallel's ``module.`` prefix (``body.layer1.0.conv2``,
``fpn.merge1``, ``ssh2.conv7x7_3``, ``ClassHead.0.conv1x1`` ...); the body is torchvision's ``resnet50`` up to
``layer4`` (stride on the 3x3 ``conv2`` of each bottleneck, "ResNet v1.5"), no ``avgpool``/``fc``.

Tensor conventions:
* Frames into `detect_faces`: ``(B, 3, H, W) uint8 RGB`` on the device the net lives on; all frames of a
  batch share one size. The net itself sees ``(B, 3, H, W) float32`` BGR minus `BGR_MEAN` (raw 0-255 levels,
  not normalised), at the frame's own size (facexlib's ``use_origin_size=True``; the helper's ``resize=None``).
* Anchors ("priors"): ``(N, 4) float32`` ``(cx, cy, w, h)`` as fractions of the frame's width/height, ordered
  level (stride 8, 16, 32), then row, column, then the level's two anchor sizes; N = 2 * sum over levels of
  ceil(H / stride) * ceil(W / stride). The heads' outputs ``(B, N, 4 | 2 | 10)`` follow the same order.
* Detections: ``(K, 15) float32`` rows ``[x1, y1, x2, y2, score, lx0, ly0, ..., lx4, ly4]`` in frame pixels
  (unclipped: boxes may reach past the frame), landmarks in the template's order: left eye, right eye, nose,
  left and right mouth corners (as seen in the picture); rows in descending score order.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------ facexlib's cfg_re50
BGR_MEAN = (104.0, 117.0, 123.0)                      # subtracted from the BGR float frame
PRIOR_STEPS = (8, 16, 32)                             # stride of the three detection levels
PRIOR_MIN_SIZES = ((16, 32), (64, 128), (256, 512))   # anchor sizes in pixels, per level
ANCHORS_PER_CELL = 2
VARIANCES = (0.1, 0.2)                                # centre and log-size variances of the box encoding
LANDMARK_POINTS = 5

# ------------------------------------------------------------------ SadTalker's call (FaceRestoreHelper)
DETECTION_THRESHOLD = 0.97     # get_face_landmarks_5 calls detect_faces(img, 0.97)
NMS_IOU_THRESHOLD = 0.4        # detect_faces' nms_threshold default
MIN_EYE_DISTANCE_PX = 5.0      # SadTalker's eye_dist_threshold: faces with closer eyes are dropped

# FPN and SSH use LeakyReLU(0.1) when out_channels <= 64 (facexlib's rule for its MobileNet variant), else ReLU.
LEAKY_MAX_CHANNELS = 64
LEAKY_SLOPE = 0.1

DATAPARALLEL_PREFIX = "module."


# ---------------------------------------------------------------------------------------------- the body
class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4 channels), plus shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBody(nn.Module):
    """torchvision's ResNet (bottleneck blocks) from ``conv1`` to ``layer4``.

    ``(B, 3, H, W)`` -> the outputs of layer2, layer3, layer4: ``(B, 4 * layer_widths[i], ceil(H / s),
    ceil(W / s))`` for strides s = 8, 16, 32.
    """

    def __init__(self, stem_width: int = 64, layer_widths: Sequence[int] = (64, 128, 256, 512),
                 layer_blocks: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_width
        for index, (planes, blocks) in enumerate(zip(layer_widths, layer_blocks)):
            stride = 1 if index == 0 else 2
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(inplanes, planes, stride if block == 0 else 1))
                inplanes = planes * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.out_channels = tuple(w * Bottleneck.expansion for w in layer_widths[1:])

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return c2, c3, self.layer4(c3)


# ------------------------------------------------------------------------------------- FPN, SSH, heads
def conv_bn(inp: int, oup: int, leaky: float, kernel: int = 3) -> nn.Sequential:
    """Conv (no bias, same padding) -> BatchNorm -> LeakyReLU(leaky) (0: ReLU); keys ``.0``, ``.1``."""
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.LeakyReLU(negative_slope=leaky, inplace=True))


def conv_bn_no_relu(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, 1, 1, bias=False), nn.BatchNorm2d(oup))


def _leaky_slope(out_channels: int) -> float:
    return LEAKY_SLOPE if out_channels <= LEAKY_MAX_CHANNELS else 0.0


class FPN(nn.Module):
    """Three 1x1 lateral convs, top-down nearest upsampling and 3x3 merges: three ``(B, out, h_l, w_l)``."""

    def __init__(self, in_channels_list: Sequence[int], out_channels: int):
        super().__init__()
        leaky = _leaky_slope(out_channels)
        self.output1 = conv_bn(in_channels_list[0], out_channels, leaky, kernel=1)
        self.output2 = conv_bn(in_channels_list[1], out_channels, leaky, kernel=1)
        self.output3 = conv_bn(in_channels_list[2], out_channels, leaky, kernel=1)
        self.merge1 = conv_bn(out_channels, out_channels, leaky)
        self.merge2 = conv_bn(out_channels, out_channels, leaky)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        output1 = self.output1(features[0])
        output2 = self.output2(features[1])
        output3 = self.output3(features[2])
        output2 = self.merge2(output2 + F.interpolate(output3, size=output2.shape[2:], mode="nearest"))
        output1 = self.merge1(output1 + F.interpolate(output2, size=output1.shape[2:], mode="nearest"))
        return [output1, output2, output3]


class SSH(nn.Module):
    """Single-stage context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches, concatenated, ReLU."""

    def __init__(self, in_channel: int, out_channel: int):
        super().__init__()
        if out_channel % 4:
            raise ValueError(f"SSH needs out_channel divisible by 4, got {out_channel}")
        leaky = _leaky_slope(out_channel)
        self.conv3X3 = conv_bn_no_relu(in_channel, out_channel // 2)
        self.conv5X5_1 = conv_bn(in_channel, out_channel // 4, leaky)
        self.conv5X5_2 = conv_bn_no_relu(out_channel // 4, out_channel // 4)
        self.conv7X7_2 = conv_bn(out_channel // 4, out_channel // 4, leaky)
        self.conv7x7_3 = conv_bn_no_relu(out_channel // 4, out_channel // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv5x5_1 = self.conv5X5_1(x)
        conv7x7_2 = self.conv7X7_2(conv5x5_1)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(conv5x5_1), self.conv7x7_3(conv7x7_2)], dim=1)
        return F.relu(out)


class Head(nn.Module):
    """A 1x1 conv predicting ``values`` numbers per anchor: ``(B, C, h, w)`` -> ``(B, h * w * anchors, values)``
    (anchor a of a cell reads channels ``[a * values, (a + 1) * values)``)."""

    def __init__(self, in_channels: int, values: int, anchors: int = ANCHORS_PER_CELL):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, anchors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """RetinaFace: ResNet body -> FPN -> SSH per level -> class, box and landmark heads per level.

    Input ``(B, 3, H, W) float32``: BGR levels 0-255 minus `BGR_MEAN`. Output, anchors in `prior_boxes` order:
    box regressions ``(B, N, 4)``, class probabilities ``(B, N, 2)`` (softmax; ``[..., 1]`` is the face score)
    and landmark regressions ``(B, N, 10)``, float32, in the encoding `decode_boxes` / `decode_landmarks` undo.

    The defaults are facexlib's ``RetinaFace(network_name='resnet50')``; smaller widths and block counts give
    the same architecture for tests (`TINY_RETINAFACE`).
    """

    def __init__(self, stem_width: int = 64, layer_widths: Sequence[int] = (64, 128, 256, 512),
                 layer_blocks: Sequence[int] = (3, 4, 6, 3), out_channels: int = 256):
        super().__init__()
        self.body = ResNetBody(stem_width, layer_widths, layer_blocks)
        self.fpn = FPN(self.body.out_channels, out_channels)
        self.ssh1 = SSH(out_channels, out_channels)
        self.ssh2 = SSH(out_channels, out_channels)
        self.ssh3 = SSH(out_channels, out_channels)
        levels = len(PRIOR_STEPS)
        self.ClassHead = nn.ModuleList(Head(out_channels, 2) for _ in range(levels))
        self.BboxHead = nn.ModuleList(Head(out_channels, 4) for _ in range(levels))
        self.LandmarkHead = nn.ModuleList(Head(out_channels, 2 * LANDMARK_POINTS) for _ in range(levels))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(x))
        features = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return boxes, F.softmax(logits, dim=-1), landmarks


# facexlib's detector: RetinaFace(network_name='resnet50'), the weights of detection_Resnet50_Final.pth.
FULL_RETINAFACE = dict(stem_width=64, layer_widths=(64, 128, 256, 512), layer_blocks=(3, 4, 6, 3), out_channels=256)
# The same architecture at test size (one bottleneck per layer, 1/8 of the widths; the FPN/SSH then use
# LeakyReLU(0.1) by facexlib's own rule). About 1/250 of the full net's multiply-adds.
TINY_RETINAFACE = dict(stem_width=8, layer_widths=(8, 16, 32, 64), layer_blocks=(1, 1, 1, 1), out_channels=32)


def build_retinaface(tiny: bool = False) -> RetinaFace:
    """facexlib's RetinaFace-R50 (``tiny=False``) or its test-size twin, in eval mode (BatchNorm frozen)."""
    return RetinaFace(**(TINY_RETINAFACE if tiny else FULL_RETINAFACE)).eval()


# ------------------------------------------------------------------------------------- anchors and decode
@functools.lru_cache(maxsize=16)
def _prior_boxes_cpu(height_px: int, width_px: int) -> torch.Tensor:
    rows = []
    for step, sizes in zip(PRIOR_STEPS, PRIOR_MIN_SIZES):
        fh, fw, na = math.ceil(height_px / step), math.ceil(width_px / step), len(sizes)
        # as facexlib: centre (j + 0.5) * step / W and size min_size / W in double, stored as float32
        cy = ((torch.arange(fh, dtype=torch.float64) + 0.5) * step / height_px).view(fh, 1, 1).expand(fh, fw, na)
        cx = ((torch.arange(fw, dtype=torch.float64) + 0.5) * step / width_px).view(1, fw, 1).expand(fh, fw, na)
        sw = (torch.tensor(sizes, dtype=torch.float64) / width_px).view(1, 1, na).expand(fh, fw, na)
        sh = (torch.tensor(sizes, dtype=torch.float64) / height_px).view(1, 1, na).expand(fh, fw, na)
        rows.append(torch.stack([cx, cy, sw, sh], dim=-1).reshape(-1, 4))
    return torch.cat(rows).to(torch.float32)


def prior_boxes(height_px: int, width_px: int, device=None) -> torch.Tensor:
    """Anchors of a ``height_px x width_px`` frame: ``(N, 4) float32`` ``(cx, cy, w, h)`` in fractions of the
    frame (facexlib's ``PriorBox``, unclipped). Built once per size (cached on the CPU), then moved."""
    priors = _prior_boxes_cpu(int(height_px), int(width_px))
    return priors if device is None else priors.to(device)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: Sequence[float] = VARIANCES) -> torch.Tensor:
    """Box regressions ``(..., N, 4)`` and anchors ``(N, 4)`` -> boxes ``(..., N, 4)`` ``(x1, y1, x2, y2)`` in
    fractions of the frame; the float32 operations in facexlib's ``decode`` order."""
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    top_left = centre - size / 2
    return torch.cat([top_left, size + top_left], dim=-1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor, variances: Sequence[float] = VARIANCES) -> torch.Tensor:
    """Landmark regressions ``(..., N, 10)`` -> points ``(..., N, 10)`` ``(x0, y0, ..., x4, y4)`` in fractions
    of the frame (facexlib's ``decode_landm``)."""
    points = pre.unflatten(-1, (LANDMARK_POINTS, 2))
    decoded = priors[:, None, :2] + points * variances[0] * priors[:, None, 2:]
    return decoded.flatten(-2)


# --------------------------------------------------------------------------------------------------- NMS
def _std_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a < b, b, a)          # std::max(a, b): b only when a < b (NaN-safe as in C++)


def _std_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b < a, b, a)          # std::min(a, b)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = NMS_IOU_THRESHOLD) -> torch.Tensor:
    """Greedy non-maximum suppression with the semantics of torchvision's CPU ``nms`` kernel.

    ``boxes (K, 4) float32 (x1, y1, x2, y2)``, ``scores (K,) float32`` -> kept indices ``(M,) int64`` in
    descending score order. Boxes are visited in a stable descending sort of the scores (torchvision's
    ``std::sort`` is stable for the few candidates a frame has); a later box is dropped when its IoU with a
    kept one, computed in float32 as ``inter / (area_i + area_j - inter)``, is ``> iou_threshold`` compared in
    double. One host sync per kept box.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    x1, y1, x2, y2 = boxes[order].unbind(dim=1)
    areas = (x2 - x1) * (y2 - y1)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(boxes.shape[0]):
        if bool(suppressed[i]):
            continue
        keep.append(i)
        rest = slice(i + 1, None)
        w = _std_max(zero, _std_min(x2[i], x2[rest]) - _std_max(x1[i], x1[rest]))
        h = _std_max(zero, _std_min(y2[i], y2[rest]) - _std_max(y1[i], y1[rest]))
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= overlap.double() > iou_threshold
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


# ------------------------------------------------------------------------------------------ detection
@torch.no_grad()
def detect_faces(net: RetinaFace, frames_rgb: torch.Tensor, threshold: float = DETECTION_THRESHOLD,
                 nms_iou: float = NMS_IOU_THRESHOLD,
                 min_eye_distance_px: float = MIN_EYE_DISTANCE_PX) -> List[torch.Tensor]:
    """The faces SadTalker's enhancer finds in each frame, as facexlib returns them.

    ``frames_rgb (B, 3, H, W) uint8 RGB`` on ``net``'s device -> B tensors ``(K_b, 15) float32`` on that device,
    rows ``[x1, y1, x2, y2, score, 5 x (x, y)]`` in frame pixels, in descending score order (``K_b`` may be 0).

    Steps (facexlib ``RetinaFace.detect_faces(img_bgr, 0.97)`` with ``use_origin_size=True``, then
    ``get_face_landmarks_5``): one forward over the batch at the frame size; decode with `VARIANCES`, scale by
    ``(W, H)``; per frame keep scores ``> threshold`` (compared in float32), sort them descending (ties: the
    later anchor first, as numpy's ``argsort()[::-1]``), `nms` at ``nms_iou``, then drop faces whose eye
    distance (landmarks 0 and 1) is ``< min_eye_distance_px``. ``net`` must be in eval mode.
    """
    if frames_rgb.dim() != 4 or frames_rgb.shape[1] != 3 or frames_rgb.dtype != torch.uint8:
        raise ValueError(f"detect_faces takes (B, 3, H, W) uint8 RGB frames, got {tuple(frames_rgb.shape)} "
                         f"{frames_rgb.dtype}")
    height, width = frames_rgb.shape[2:]
    device = frames_rgb.device
    mean = torch.tensor(BGR_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = frames_rgb.flip(1).to(torch.float32) - mean
    loc, conf, landmark_reg = (t.float() for t in net(x))

    priors = prior_boxes(height, width, device)
    scale = torch.tensor([width, height], dtype=torch.float32, device=device)
    boxes = decode_boxes(loc, priors) * scale.repeat(2)
    landmarks = decode_landmarks(landmark_reg, priors) * scale.repeat(LANDMARK_POINTS)
    scores = conf[..., 1]
    passed = scores > torch.tensor(threshold, dtype=torch.float32, device=device)

    out = []
    for b in range(frames_rgb.shape[0]):
        candidates = passed[b].nonzero().flatten().flip(0)   # later anchors first: argsort()[::-1] on ties
        order = candidates[torch.sort(scores[b, candidates], descending=True, stable=True).indices]
        rows = torch.cat([boxes[b, order], scores[b, order, None], landmarks[b, order]], dim=1)
        rows = rows[nms(rows[:, :4], rows[:, 4], nms_iou)]
        dx, dy = rows[:, 5] - rows[:, 7], rows[:, 6] - rows[:, 8]
        out.append(rows[~(torch.sqrt(dx * dx + dy * dy) < min_eye_distance_px)])
    return out


# ----------------------------------------------------------------------------------------- state dicts
def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys without DataParallel's leading ``module.`` (as facexlib's ``init_detection_model``); others kept."""
    return {(k[len(DATAPARALLEL_PREFIX):] if k.startswith(DATAPARALLEL_PREFIX) else k): v
            for k, v in state_dict.items()}
