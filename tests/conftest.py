"""Shared fixtures. Keep this small: helpers used by one file live in that file."""
from __future__ import annotations

import pytest
import torch

from progprune.config import DatasetConfig
from progprune.data import load_dataset


@pytest.fixture(scope="session")
def synthetic_splits():
    """A small seeded, learnable 10-class synthetic dataset (3x32x32 uint8)."""
    return load_dataset(DatasetConfig(name="synthetic", num_classes=10, synthetic_samples=512), seed=0)


@pytest.fixture
def calib(synthetic_splits):
    """A fixed normalised batch of 8 training images and labels, for gradient importances."""
    s = synthetic_splits
    mean = torch.tensor(s.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(s.std).view(1, -1, 1, 1) * 255
    return (s.train_x[:8].float() - mean) / std, s.train_y[:8]
