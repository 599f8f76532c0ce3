"""CIFAR ResNets (He et al. 2016, option B shortcuts) as in Torch-Pruning's benchmarks.

Same layers as `reproduce/engine/models/cifar/resnet_tiny.py` (registered there as
resnet20..resnet110), so base MACs/params match the published tables: widths 16/16/32/64,
3x3 convs without bias, 1x1 conv + BN projection where the shape changes, AvgPool2d(8),
Linear classifier. ResNet-56, 10 classes: 127.12 M MACs, 0.86 M params at 1x3x32x32.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from progprune.models._registry import register_model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, widths=(16, 16, 32, 64)):
        super().__init__()
        assert (depth - 2) % 6 == 0, "basic-block CIFAR ResNet depth is 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        stages = []
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = [BasicBlock(cin, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AvgPool2d(8)  # 32x32 input -> 8x8 after two stride-2 stages
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(x.flatten(1))


@register_model
def resnet20(num_classes: int) -> nn.Module:
    return CifarResNet(20, num_classes)


@register_model
def resnet32(num_classes: int) -> nn.Module:
    return CifarResNet(32, num_classes)


@register_model
def resnet44(num_classes: int) -> nn.Module:
    return CifarResNet(44, num_classes)


@register_model
def resnet56(num_classes: int) -> nn.Module:
    return CifarResNet(56, num_classes)


@register_model
def resnet110(num_classes: int) -> nn.Module:
    return CifarResNet(110, num_classes)
