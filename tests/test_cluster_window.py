"""The scheduling loop's submission window (issue 13 §3), without a cluster: `cluster.execute`
runs against a stand-in for Ray's task API that finishes one task per `ray.wait`, oldest
first. A sweep larger than the window ends with exactly one row per combination, in plan
order of submission, while no more than the window's combinations (and so their task
refs) are ever in flight; Train runs stay capped at `max_concurrent`.
"""
from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
import ray  # noqa: E402

import progprune.cluster as cluster  # noqa: E402
import progprune.cluster.tasks as tasks  # noqa: E402
from progprune.spec import load_spec_dict  # noqa: E402
from progprune.sweep import Plan  # noqa: E402


class Ref:
    """An ObjectRef stand-in: done once the scheduler ran its task."""

    def __init__(self, sched, kind, fn, args):
        self.sched, self.kind, self.fn, self.args = sched, kind, fn, args
        self.done, self.value, self.error = False, None, None
        self.train = kind == "finetune" and bool(args[3]["num_workers"])  # a Ray Train run


class Scheduler:
    def __init__(self):
        self.pending: list[Ref] = []  # submission order
        self.live = weakref.WeakSet()  # every Ref anything still holds
        self.submitted: dict[str, list] = {}
        self.in_flight = self.max_in_flight = self.max_live = self.max_train = 0
        self.train = 0

    def task(self, kind, fn):
        sched = self

        class Remote:
            def options(self, **_):
                return self

            def remote(self, *args, **_):
                ref = Ref(sched, kind, fn, args)
                sched.pending.append(ref)
                sched.live.add(ref)
                sched.submitted.setdefault(kind, []).append(args[0])
                if kind == "prune":
                    sched.in_flight += 1
                    sched.max_in_flight = max(sched.max_in_flight, sched.in_flight)
                if ref.train:
                    sched.train += 1
                    sched.max_train = max(sched.max_train, sched.train)
                return ref

        return Remote()

    def wait(self, refs, num_returns=1, timeout=None, fetch_local=True):
        self.max_live = max(self.max_live, len(self.live))
        if self.pending:  # one more task finishes; a task's arguments go with it
            ref = self.pending.pop(0)
            try:
                ref.value = ref.fn(*ref.args)
            except Exception as e:
                ref.error = e
            ref.done, ref.args = True, None
            self.train -= ref.train
        ready = [r for r in refs if r.done][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def get(self, ref):
        if ref.kind == "finetune":
            self.in_flight -= 1
        if ref.error:
            raise ref.error
        return ref.value


def _spec(tmp_path, seeds: int, num_workers: int = 0, methods=("group_norm",)):
    return load_spec_dict({
        "name": "window", "dataset": {"name": "synthetic", "num_classes": 2, "synthetic_samples": 16},
        "models": ["resnet20"], "speedups": [1.5, 2.0], "methods": list(methods),
        "seeds": list(range(seeds)),
        "finetune": {"epochs": 1, "num_workers": num_workers, "use_gpu": False},
        "resources": {"gpus_per_task": 0, "cpus_per_task": 1, "max_concurrent": 2},
        "output": str(tmp_path / "out")})


class Table:
    def __init__(self):
        self.rows = []

    def add(self, row):
        self.rows.append(row)

    def statuses(self):
        return {}

    def flush(self, force=False):
        return self.rows


def _run(monkeypatch, spec, window, fail=()):
    sched = Scheduler()
    fails = set(fail)

    def finetune(cfg, uri, pruned, ft):
        if cfg.combo_id() in fails:
            raise RuntimeError("injected failure")
        return SimpleNamespace(status="ok", combo_id=cfg.combo_id(), workers=ft["num_workers"])

    for name, kind, fn in (("base_task", "base", lambda cfg, uri, retrain=False: "base"),
                           ("sparse_task", "sparse", lambda cfg, uri, base, retrain=False: base),
                           ("prune_task", "prune", lambda cfg, uri, base: "pruned"),
                           ("finetune_task", "finetune", finetune)):
        monkeypatch.setattr(tasks, name, sched.task(kind, fn))
    written = []
    monkeypatch.setattr(tasks, "write_fragment", lambda store, row: written.append(row.combo_id))
    monkeypatch.setattr(ray, "wait", sched.wait)
    monkeypatch.setattr(ray, "get", sched.get)
    combos = spec.combinations()
    plan = Plan(spec, SimpleNamespace(uri="memory://"), combos, todo=list(combos),
                bases_train={c.base_key(): c for c in combos})
    progress = SimpleNamespace(update=lambda *a: None, row=lambda r: None, note=lambda s: None,
                               close=lambda *a: None)
    table = Table()
    failed = cluster.execute(plan, spec.resources.max_concurrent, progress, 2, table,
                             SimpleNamespace(check=lambda: None), window=window)
    return sched, table, failed, written


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_sweep_larger_than_the_window_keeps_it_and_ends_with_one_row_each(monkeypatch, tmp_path, num_workers):
    spec = _spec(tmp_path, seeds=20, num_workers=num_workers)  # 40 combinations, window 5
    combos = spec.combinations()
    sched, table, failed, _ = _run(monkeypatch, spec, window=5)
    assert failed == 0
    assert sorted(r.combo_id for r in table.rows) == sorted(c.combo_id() for c in combos)  # one row each
    assert sched.submitted["prune"] == combos  # every combination once, in plan order
    assert len(sched.submitted["base"]) == 20  # the bases still start all at once
    assert sched.max_in_flight == 5  # the window, filled and never exceeded
    # what the driver holds: the window's refs and the bases not yet used up, not one per combination
    assert sched.max_live <= 2 * 5 + 20 + 1, sched.max_live
    if num_workers:
        assert sched.max_train <= spec.resources.max_concurrent


def test_without_a_window_argument_the_default_bounds_the_prunes_in_flight(monkeypatch, tmp_path):
    spec = _spec(tmp_path, seeds=50)  # 100 combinations > the default window of 64
    sched, table, failed, _ = _run(monkeypatch, spec, window=None)
    assert len(table.rows) == 100 and failed == 0
    assert sched.max_in_flight == cluster.window_size(spec.resources.max_concurrent) == cluster.WINDOW_MIN


def test_failures_and_sparse_models_through_the_window(monkeypatch, tmp_path):
    spec = _spec(tmp_path, seeds=4, methods=["group_norm", "group_sl"])  # 16 combinations
    combos = spec.combinations()
    bad = combos[-1].combo_id()
    sched, table, failed, written = _run(monkeypatch, spec, window=3, fail=[bad])
    assert failed == 1 and written == [bad]  # the driver writes the failed combination's fragment
    assert sorted(r.combo_id for r in table.rows) == sorted(c.combo_id() for c in combos)
    (row,) = [r for r in table.rows if r.combo_id == bad]
    assert row.status == "failed" and "injected failure" in row.error
    assert len(sched.submitted["sparse"]) == len({c.sparse_key() for c in combos if c.prune.method == "group_sl"})
    assert sched.max_in_flight == 3
