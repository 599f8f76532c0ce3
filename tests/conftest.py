"""Shared fixtures. Keep this small: helpers used by one file live in that file; helpers
used by several live in helpers.py."""
from __future__ import annotations

import pytest
import torch

from progprune.config import DatasetConfig
from progprune.data import load_dataset


# Under pytest-xdist (`make test-main` runs `-n 2 --dist loadgroup`) the tests of one
# xdist_group run on one worker, one after another, while the rest spreads over both workers.
# "ray": every test that starts or uses a Ray cluster (the session `cluster` below, a LocalRay
# of its own, an embedded Ray, whose dashboard agent takes the fixed port 52365, `ray job
# submit`): the session cluster is started once, and none meets another on a port.
# "ray-own": tests marked `ray(own_cluster=True)`, which start only clusters of their own
# (LocalRay: `ray start --head` on free ports, a temp dir of its own; no embedded Ray, not the
# session `cluster`), so they may run on the other worker beside the "ray" group.
# "docker": test_image.py, which starts and stops its own dockerd and builds one image; its
# containers run with --network none, so the embedded Ray in one binds nothing on this
# machine and it may run beside the Ray tests.
GROUP_OF_MARKER = {"ray": "ray", "docker": "docker"}  # a test with both goes with docker
OWN_CLUSTER_GROUP = "ray-own"


def _groups(item) -> list[str]:
    groups = [g for m, g in GROUP_OF_MARKER.items() if item.get_closest_marker(m) is not None]
    ray = item.get_closest_marker("ray")
    if ray is not None and ray.kwargs.get("own_cluster"):
        groups[groups.index("ray")] = OWN_CLUSTER_GROUP
    return groups


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    loadgroup = getattr(config.option, "loadgroup", False)  # set in xdist's workers under --dist loadgroup
    for item in items:
        groups = _groups(item)
        if "cluster" in getattr(item, "fixturenames", ()) and "ray" not in groups:
            # one session cluster per xdist worker: a user outside the group would start a second
            raise pytest.UsageError(f"{item.nodeid} uses the session `cluster` fixture: mark it "
                                    "@pytest.mark.ray, without own_cluster (tests/conftest.py)")
        if groups and loadgroup:
            item.add_marker(pytest.mark.xdist_group(groups[-1]))
            _join_group(item, groups[-1])


def _join_group(item, group: str) -> None:
    """What pytest-xdist's loadgroup does with the xdist_group mark: the node id becomes
    "<id>@<group>", which its scheduler splits to keep a group on one worker. xdist 3.8 sets
    `item._nodeid`, which pytest 9.2 no longer reads (an item's id is `item._id`), so there
    the groups were silently ignored and Ray tests ran on both workers at once."""
    if hasattr(item, "_id"):
        try:
            from _pytest.nodeid import coerce_node_id
        except ImportError:  # a pytest whose ids xdist's own `_nodeid` still sets
            return
        item._id = coerce_node_id(f"{item.nodeid}@{group}")


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
