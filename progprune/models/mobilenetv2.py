"""CIFAR MobileNetV2 as in Torch-Pruning's benchmarks (`reproduce/engine/models/cifar/
mobilenetv2.py`, itself from weiaicunzai/pytorch-cifar100).

Quirks kept on purpose so MACs compare 1:1: the stem is a 1x1 conv with padding=1 (32x32 ->
34x34), every conv has a bias, stages keep stride 1 until stage 2, and the classifier is a
1x1 Conv2d(1280, num_classes) after global average pooling, not a Linear.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from progprune.models._registry import register_model


class LinearBottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int = 6):
        super().__init__()
        hidden = cin * t
        self.residual = nn.Sequential(
            nn.Conv2d(cin, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1),
            nn.BatchNorm2d(cout),
        )
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x):
        out = self.residual(x)
        return out + x if self.use_skip else out


def _stage(repeat: int, cin: int, cout: int, stride: int, t: int) -> nn.Sequential:
    blocks = [LinearBottleneck(cin, cout, stride, t)]
    blocks += [LinearBottleneck(cout, cout, 1, t) for _ in range(repeat - 1)]
    return nn.Sequential(*blocks)


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(True))
        self.stage1 = LinearBottleneck(32, 16, 1, 1)
        self.stage2 = _stage(2, 16, 24, 2, 6)
        self.stage3 = _stage(3, 24, 32, 2, 6)
        self.stage4 = _stage(4, 32, 64, 2, 6)
        self.stage5 = _stage(3, 64, 96, 1, 6)
        self.stage6 = _stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleneck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(True))
        self.conv2 = nn.Conv2d(1280, num_classes, 1)

    def forward(self, x):
        x = self.stage1(self.pre(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.stage7(self.stage6(self.stage5(x)))
        x = F.adaptive_avg_pool2d(self.conv1(x), 1)
        return self.conv2(x).flatten(1)


@register_model
def mobilenetv2(num_classes: int) -> nn.Module:
    return CifarMobileNetV2(num_classes)
