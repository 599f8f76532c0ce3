"""A user's own model for the `py:real_model_factory:build` tests: a residual add and a
channel concat, built by a factory that takes num_classes= (tests/test_real_models.py)."""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24))
        self.left = nn.Sequential(nn.Conv2d(24, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16))
        self.right = nn.Sequential(nn.Conv2d(24, 20, 1, stride=2, bias=False), nn.BatchNorm2d(20))
        self.mix = nn.Sequential(nn.Conv2d(36, 40, 3, padding=1, bias=False), nn.BatchNorm2d(40), nn.ReLU())
        self.fc = nn.Linear(40, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))  # residual add
        x = torch.cat([self.left(x), self.right(x)], dim=1)  # channel concat
        x = self.mix(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int) -> nn.Module:
    return Net(num_classes)


def not_a_module(num_classes: int):
    return {"num_classes": num_classes}
