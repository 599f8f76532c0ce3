"""The scheduling loop's submission window (issue 13 §3) on a real local Ray: `cluster.execute`
submits real Ray tasks and takes them back with Ray's own `ray.wait`/`ray.get`. Only the four
stage tasks are swapped for trivial `@ray.remote` functions (no model, no data: what is
tested is the window, not the stages or Ray Train), and the driver counts their submissions
(`Counted`) against the rows in the results table. The driver's other parts are the real
ones: `make_plan`, `ResultsTable`, the output's lock, `_Progress`, `write_fragment`.
A sweep larger than the window ends with exactly one row per combination, in plan order of
submission, while no more than the window's combinations are ever in flight, and the window
is filled; Train runs (fine-tune coordinators with num_workers > 0, counted as they are
submitted) stay capped at `max_concurrent`; the driver's refs (Ray's own reference table)
stay bounded by the window.
"""
from __future__ import annotations

import io
import logging
import os
import secrets
import shutil
import tempfile
import time

import pytest

pytest.importorskip("ray")
import ray  # noqa: E402
from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: E402
from rich.console import Console  # noqa: E402

import progprune.cluster as cluster  # noqa: E402
import progprune.cluster.tasks as tasks  # noqa: E402
from progprune.results import ResultRow  # noqa: E402
from progprune.spec import load_spec_dict  # noqa: E402
from progprune.storage import Store, row_parts  # noqa: E402
from progprune.sweep import _Progress, _table, make_plan  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this module's own, in-process, as `cluster.connect` starts the embedded one:
    never another cluster on this machine (no RAY_ADDRESS, address="local"), with token auth
    on a token of its own (in the environment: Ray would otherwise write ~/.ray/auth_token).
    The environment is restored afterwards."""
    names = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    reset_auth_token_state()  # Ray read the mode when imported: read it again
    temp = tempfile.mkdtemp(prefix="ppw-", dir="/tmp")  # short: Ray's socket paths live in it
    try:
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(saved)
        reset_auth_token_state()


def _refs_held() -> int:
    """Objects the driver's core worker holds references to (Ray's own reference table)."""
    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


class Counted:
    """A real remote function whose submissions the driver records before Ray gets them:
    `.options(...).remote(...)` is Ray's own, and returns Ray's own ObjectRef."""

    def __init__(self, watch, kind, fn):
        self.watch, self.kind, self.fn = watch, kind, fn

    def options(self, **opts):
        fn, watch, kind = self.fn.options(**opts), self.watch, self.kind

        class Submit:
            def remote(self, *args, **kwargs):
                watch.submitted(kind, args)
                return fn.remote(*args, **kwargs)

        return Submit()


class Watch:
    """Driver-side bookkeeping: a combination is in flight from its prune submission until
    its row is in the table (a fine-tune coordinator in flight is one more row to come)."""

    def __init__(self, table):
        self.table = table
        self.calls: dict[str, list] = {}
        self.max_in_flight = self.max_train = self.max_refs = 0

    def submitted(self, kind, args):
        self.calls.setdefault(kind, []).append(args[0])  # the cfg: holding the refs would count them
        rows = len(self.table)
        if kind == "prune":
            self.max_in_flight = max(self.max_in_flight, len(self.calls["prune"]) - rows)
        if kind == "finetune" and args[0].finetune.num_workers:  # a Ray Train run
            self.max_train = max(self.max_train, len(self.calls["finetune"]) - rows)
        self.max_refs = max(self.max_refs, _refs_held())

    def cfgs(self, kind):
        return self.calls.get(kind, [])


def _spec(tmp_path, seeds: int, num_workers: int = 0, methods=("group_norm",)):
    return load_spec_dict({
        "name": "window", "dataset": {"name": "synthetic", "num_classes": 2, "synthetic_samples": 16},
        "models": ["resnet20"], "speedups": [1.5, 2.0], "methods": list(methods),
        "seeds": list(range(seeds)),
        "finetune": {"epochs": 1, "num_workers": num_workers, "use_gpu": False},
        "resources": {"gpus_per_task": 0, "cpus_per_task": 1, "max_concurrent": 2},
        "output": str(tmp_path / "out")})


def _run(monkeypatch, spec, window, fail=()):
    """`cluster.execute` on the real plan, table, lease and progress of `spec`'s output, with
    trivial stage tasks; they check that each gets its own upstream's value."""
    fails = frozenset(fail)

    # defined here, so that Ray pickles them by value (workers cannot import this file)
    @ray.remote
    def base(cfg, uri, retrain=False):
        return ("base", cfg.base_key())

    @ray.remote
    def sparse(cfg, uri, base, retrain=False):
        assert base == ("base", cfg.base_key()) and retrain
        return base

    @ray.remote
    def prune(cfg, uri, base):
        assert base == ("base", cfg.base_key()), base
        return ("pruned", cfg.combo_id())

    @ray.remote(num_cpus=0)
    def finetune(cfg, uri, pruned, resources):
        assert pruned == ("pruned", cfg.combo_id()), pruned
        if cfg.combo_id() in fails:
            raise RuntimeError("injected failure")
        assert resources.cpus_per_task == 1  # the typed settings, as the driver passes them
        if cfg.finetune.num_workers:
            time.sleep(0.05)  # a "Train run" lasts long enough for the next to start beside it
        return ResultRow(combo_id=cfg.combo_id(), sweep=cfg.sweep, model=cfg.model, dataset=cfg.dataset.name,
                         method=cfg.method, seed=cfg.seed, target_speedup=float(cfg.target_speedup),
                         achieved_speedup=float(cfg.target_speedup), latency_speedup=1.0,
                         status="ok", finetune_workers=cfg.finetune.num_workers)

    store = Store(spec.output)
    table = _table(store, spec.combinations())
    plan = make_plan(spec, store, statuses=table.statuses())
    watch = Watch(table)
    for name, kind, fn in (("base_task", "base", base), ("sparse_task", "sparse", sparse),
                           ("prune_task", "prune", prune), ("finetune_task", "finetune", finetune)):
        monkeypatch.setattr(tasks, name, Counted(watch, kind, fn))
    progress = _Progress(Console(file=io.StringIO(), highlight=False, markup=False), len(plan.todo))
    with store.lock(settle_s=0, on_wait=lambda s: None) as lease:
        failed = cluster.execute(plan, spec.resources.max_concurrent, progress, 2, table, lease, window=window)
    return watch, table, failed, store


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_sweep_larger_than_the_window_keeps_it_and_ends_with_one_row_each(local_ray, monkeypatch, tmp_path,
                                                                           num_workers):
    spec = _spec(tmp_path, seeds=12, num_workers=num_workers)  # 24 combinations, window 4
    combos = spec.combinations()
    watch, table, failed, _ = _run(monkeypatch, spec, window=4)
    assert failed == 0
    assert [r.combo_id for r in table.rows()] == [c.combo_id() for c in combos]  # one row each
    assert all(r.status == "ok" for r in table.rows())
    assert watch.cfgs("prune") == combos  # every combination once, in plan order
    assert sorted(c.combo_id() for c in watch.cfgs("finetune")) == sorted(c.combo_id() for c in combos)
    assert len(watch.cfgs("base")) == 12  # the bases still start all at once
    assert watch.max_in_flight == 4  # the window, filled and never exceeded
    # what the driver holds (Ray's own reference table): the window's refs, the last batch
    # taken (the loop's lists keep it until the next wait) and the bases not yet used up,
    # not one per combination (17-19 here; a window of 10**6 gives 25-35)
    assert watch.max_refs <= 2 * 4 + 12 + 2, watch.max_refs
    if num_workers:  # Ray Train runs in flight, capped apart from the window, and reached
        assert watch.max_train == spec.resources.max_concurrent


def test_without_a_window_argument_the_default_bounds_the_prunes_in_flight(local_ray, monkeypatch, tmp_path):
    """`window_size` reads WINDOW_MIN when called: set to 6 here (the real 64 would need a
    sweep of more than 64 combinations), so that 20 combinations overfill it."""
    monkeypatch.setattr(cluster, "WINDOW_MIN", 6)
    spec = _spec(tmp_path, seeds=10)  # 20 combinations > the default window, max(6, 4 x 2) = 8
    watch, table, failed, _ = _run(monkeypatch, spec, window=None)
    assert len(table) == 20 and failed == 0
    assert watch.max_in_flight == cluster.window_size(spec.resources.max_concurrent) == 8


def test_failures_and_sparse_models_through_the_window(local_ray, monkeypatch, tmp_path):
    spec = _spec(tmp_path, seeds=4, methods=["group_norm", "group_sl"])  # 16 combinations, window 3
    combos = spec.combinations()
    bad = combos[-1].combo_id()
    watch, table, failed, store = _run(monkeypatch, spec, window=3, fail=[bad])
    assert failed == 1
    # the driver writes the failed combination's fragment (the tasks here write none)
    assert store.list("rows") == [os.path.basename(row_parts(bad)[-1])]
    assert [r.combo_id for r in table.rows()] == [c.combo_id() for c in combos]
    (row,) = [r for r in table.rows() if r.combo_id == bad]
    assert row.status == "failed" and "injected failure" in row.error
    assert len(watch.cfgs("sparse")) == len({c.sparse_key() for c in combos if c.prune.method == "group_sl"})
    assert watch.cfgs("prune") == combos
    assert watch.max_in_flight == 3
