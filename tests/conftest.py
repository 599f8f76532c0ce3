"""Shared fixtures. Keep this small: helpers used by one file live in that file; helpers
used by several live in helpers.py."""
from __future__ import annotations

import pytest
import torch

from progprune.config import DatasetConfig
from progprune.data import load_dataset


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), every test that starts
    or uses a Ray cluster runs on one worker, one after another: the session cluster is
    started once, and two workers' clusters never compete for the 2 CPUs each declares.
    The other tests spread over the remaining workers meanwhile."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))


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


@pytest.fixture(scope="session")
def cluster():
    """One 2-CPU local Ray cluster (`ray start --head` on 127.0.0.1) for every end-to-end
    sweep that needs nothing special of it: started once per session, on first use
    (test_sweep, test_sweep_faults, test_sweep_takeover). Its environment is the one each
    of those files gave its own cluster (run_env()); what a test varies (faults, lease,
    hostname) it passes to its driver, never to the cluster. Clusters of another shape
    (a GPU, token auth, another Python) stay with their tests."""
    from helpers import run_env
    from raycluster import LocalRay

    with LocalRay(num_cpus=2, env=run_env()) as c:
        yield c
