"""progprune.controls and the report's paired differences (progprune.report._controls): the
scratch control's architecture and initialisation, and the intervals recomputed here
independently from the rows."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from progprune.config import DatasetConfig
from progprune.controls import fresh, init_seed, scratch_model
from progprune.data import load_dataset
from progprune.models import build_model, example_inputs
from progprune.pruning import make_pruner, progressive_prune
from progprune.report import _controls as C
from progprune.report._tables import prepared
from progprune.results import COLUMNS
from progprune.spec import load_spec_dict


def _spec(**over):
    base = {"name": "c", "dataset": {"name": "synthetic", "num_classes": 4, "synthetic_samples": 64},
            "models": ["resnet20"], "speedups": [2.0], "methods": ["group_norm", "l1"], "seeds": [0, 1],
            "controls": ["random", "scratch"], "base_training": {"epochs": 2}, "finetune": {"epochs": 1},
            "pruning": {"iterative_steps": 40}}
    return load_spec_dict({**base, **over})


def test_the_scratch_architecture_is_the_methods_with_weights_never_trained():
    """Widths equal the method's pruned model's (every parameter's shape); no weight equals the
    pruned model's, nor the base model's initial weights (seeded by the row's seed)."""
    spec = _spec()
    cfg = next(c for c in spec.combinations() if c.control == "scratch")
    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # as the pipeline's base: the base model starts from the seed
    base = build_model(cfg.model, splits.num_classes, splits.input_shape)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    ex = example_inputs(splits.input_shape)
    pruner = make_pruner(base, ex, cfg.prune, splits.num_classes)
    out = progressive_prune(base, pruner, ex, cfg.target_speedup, settings=cfg.prune)
    assert out.status == "ok"
    scratch = scratch_model(cfg, out.history, splits)
    mine, theirs = scratch.state_dict(), base.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    weights = [k for k, v in mine.items() if k.endswith("weight") and v.dim() > 1]
    assert len(weights) > 10
    for k in weights:
        assert not torch.equal(mine[k], theirs[k]), k
    # nor the base model's own initial weights, cut to the same channels (the base starts from the seed)
    assert not torch.equal(mine["conv1.weight"], init["conv1.weight"][: mine["conv1.weight"].shape[0]])
    again = scratch_model(cfg, out.history, splits)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in mine.items())  # seeded: reproducible
    assert init_seed(0) != init_seed(1) and init_seed(0) != 0
    assert sum(p.numel() for p in fresh(cfg, splits).parameters()) > sum(p.numel() for p in scratch.parameters())


def _rows(values: dict) -> pd.DataFrame:
    """Rows of one operating point: {(method, control, seed): final top-1}."""
    recs = []
    for (method, control, seed), top1 in values.items():
        rec = dict.fromkeys(COLUMNS)
        rec.update(dataset="synthetic", model="resnet20", method=method, control=control, seed=seed,
                   target_speedup=2.0, target_metric="macs", status="ok", final_top1=top1)
        recs.append(rec)
    return prepared(pd.DataFrame(recs, columns=list(COLUMNS)))


def test_paired_differences_and_intervals_recomputed_from_the_rows():
    gn = {0: 0.90, 1: 0.85, 2: 0.88}
    rnd = {0: 0.80, 1: 0.76, 2: 0.79}
    scr = {0: 0.91, 1: 0.83, 2: 0.90}
    df = _rows({**{("group_norm", None, s): v for s, v in gn.items()},
                **{("random", "random", s): v for s, v in rnd.items()},
                **{("group_norm", "scratch", s): v for s, v in scr.items()}})
    got = C.differences(df).set_index("control")
    assert list(got.index) == ["random", "scratch"] and (got["method"] == "group_norm").all()
    for control, theirs in (("random", rnd), ("scratch", scr)):
        d = [100 * (gn[s] - theirs[s]) for s in gn]
        mean = sum(d) / 3
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
        half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2), from a table
        r = got.loc[control]
        assert r["n"] == 3
        assert (r["mean"], r["low"], r["high"]) == pytest.approx((mean, mean - half, mean + half))
    assert got.loc["random", "verdict"] == "method higher"  # [+7.9, +10.8] points
    assert got.loc["scratch", "verdict"] == "not distinguishable at 3 seeds"


def test_one_seed_gives_no_interval_and_unpaired_seeds_are_left_out():
    df = _rows({("l1", None, 0): 0.9, ("l1", None, 1): 0.8, ("random", "random", 1): 0.7,
                ("random", "random", 2): 0.1})
    (r,) = C.differences(df).to_dict("records")
    assert r["n"] == 1 and r["mean"] == pytest.approx(10.0) and math.isnan(r["low"])
    assert r["verdict"] == "one seed: no interval can be given"
    assert C.differences(_rows({("l1", None, 0): 0.9})).empty  # no control: no comparison


def test_controls_combo_ids_do_not_depend_on_the_methods():
    one, two = _spec(methods=["group_norm"]), _spec(methods=["group_norm", "l1", "l2"])
    ids = lambda s, control: {c.combo_id() for c in s.combinations() if c.control == control}  # noqa: E731
    assert ids(one, "random") == ids(two, "random") and len(ids(one, "random")) == 2
    assert ids(one, "scratch") < ids(two, "scratch")  # each method's own; group_norm's unchanged
    plain = load_spec_dict({"name": "c", "models": ["resnet20"], "speedups": [2.0], "methods": ["random"],
                            "seeds": [0, 1], "base_training": {"epochs": 2}, "finetune": {"epochs": 1},
                            "dataset": {"name": "synthetic", "num_classes": 4, "synthetic_samples": 64},
                            "pruning": {"iterative_steps": 40}})
    assert not ids(one, "random") & {c.combo_id() for c in plain.combinations()}  # a control says so
    scratch = [c for c in two.combinations() if c.control == "scratch"]
    methods = {c.combo_id(): c for c in two.combinations() if c.control is None}
    assert all(c.architecture_of().combo_id() in methods for c in scratch)
    assert {c.scratch.epochs for c in scratch} == {3}  # base 2 + fine-tune 1, stated in the resolved spec
    assert two.scratch.epochs == 3
    order = [(c.method, c.control, c.seed) for c in one.combinations()]
    assert order == [("group_norm", None, 0), ("group_norm", None, 1), ("random", "random", 0),
                     ("random", "random", 1), ("group_norm", "scratch", 0), ("group_norm", "scratch", 1)]
