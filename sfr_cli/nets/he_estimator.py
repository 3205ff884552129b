"""SadTalker's ``HEEstimator`` (head pose and expression from an image).

sfr renders from coefficients and never runs it; it exists so that random checkpoints carry its keys
like SadTalker's files do and so that ``checkpoints inspect`` can check them.
"""

from __future__ import annotations

from torch import nn


class ResBottleneck(nn.Module):
    def __init__(self, in_features, stride):
        super().__init__()
        q = in_features // 4
        self.conv1 = nn.Conv2d(in_features, q, kernel_size=1)
        self.conv2 = nn.Conv2d(q, q, kernel_size=3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(q, in_features, kernel_size=1)
        self.norm1 = nn.BatchNorm2d(q, affine=True)
        self.norm2 = nn.BatchNorm2d(q, affine=True)
        self.norm3 = nn.BatchNorm2d(in_features, affine=True)
        self.stride = stride
        if stride != 1:
            self.skip = nn.Conv2d(in_features, in_features, kernel_size=1, stride=stride)
            self.norm4 = nn.BatchNorm2d(in_features, affine=True)


def _stage(prefix, count, features):
    stage = nn.Sequential()
    for i in range(count):
        stage.add_module(f"{prefix}_{i}", ResBottleneck(features, stride=1))
    return stage


class HEEstimator(nn.Module):
    """Parameter layout only (widths 256-2048 are fixed in SadTalker; ``block_expansion`` is the stem)."""

    def __init__(self, block_expansion, image_channel, max_features, num_bins=66, num_kp=15):
        super().__init__()
        self.conv1 = nn.Conv2d(image_channel, block_expansion, kernel_size=7, padding=3, stride=2)
        self.norm1 = nn.BatchNorm2d(block_expansion, affine=True)
        self.conv2 = nn.Conv2d(block_expansion, 256, kernel_size=1)
        self.norm2 = nn.BatchNorm2d(256, affine=True)
        self.block1 = _stage("b1", 3, 256)
        self.conv3 = nn.Conv2d(256, 512, kernel_size=1)
        self.norm3 = nn.BatchNorm2d(512, affine=True)
        self.block2 = ResBottleneck(512, stride=2)
        self.block3 = _stage("b3", 3, 512)
        self.conv4 = nn.Conv2d(512, 1024, kernel_size=1)
        self.norm4 = nn.BatchNorm2d(1024, affine=True)
        self.block4 = ResBottleneck(1024, stride=2)
        self.block5 = _stage("b5", 5, 1024)
        self.conv5 = nn.Conv2d(1024, max_features, kernel_size=1)
        self.norm5 = nn.BatchNorm2d(max_features, affine=True)
        self.block6 = ResBottleneck(max_features, stride=2)
        self.block7 = _stage("b7", 2, max_features)
        self.fc_roll = nn.Linear(max_features, num_bins)
        self.fc_pitch = nn.Linear(max_features, num_bins)
        self.fc_yaw = nn.Linear(max_features, num_bins)
        self.fc_t = nn.Linear(max_features, 3)
        self.fc_exp = nn.Linear(max_features, 3 * num_kp)
