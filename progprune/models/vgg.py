"""CIFAR VGG with BatchNorm as in Torch-Pruning's benchmarks (`vgg11`..`vgg19` there map
to the `_bn` variants of `reproduce/engine/models/cifar/vgg.py`).

Architecture facts kept for comparable MACs: five conv blocks (3x3 convs with bias, each
followed by BN, ReLU between convs; the block's last ReLU is applied in forward), max-pool
after blocks 0-2 only at 32x32 input (block 4 runs at 4x4), global average pool, a single
Linear(512, num_classes). VGG-19, 100 classes: 512.73 M MACs, 20.09 M params.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from progprune.models._registry import register_model

_CFGS = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(widths: list[int], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True)]
        cin = w
    return nn.Sequential(*layers[:-1])  # last ReLU is in forward, as upstream


class CifarVGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int):
        super().__init__()
        cins = [3] + [c[-1] for c in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _block(c, cin) for c, cin in zip(cfg, cins)
        )
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)  # used only for 64x64 inputs, as upstream
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(x.flatten(1))


@register_model
def vgg11(num_classes: int) -> nn.Module:
    return CifarVGG(_CFGS["vgg11"], num_classes)


@register_model
def vgg13(num_classes: int) -> nn.Module:
    return CifarVGG(_CFGS["vgg13"], num_classes)


@register_model
def vgg16(num_classes: int) -> nn.Module:
    return CifarVGG(_CFGS["vgg16"], num_classes)


@register_model
def vgg19(num_classes: int) -> nn.Module:
    return CifarVGG(_CFGS["vgg19"], num_classes)
