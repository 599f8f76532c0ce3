"""The controls a method's result stands against (README "Controls"), run by the same stages.

- random: the spec's progressive loop with random importance, seeded by the row's seed, to
  the same target by the same rule, from the same base model: a `ComboConfig` whose method
  is `random` and whose `control` says so, which the pipeline runs as any combination.
- scratch: a method combination's pruned architecture (its layer widths and head counts, as
  its pruning history gives them), re-initialised and trained from scratch (Liu et al.,
  "Rethinking the Value of Network Pruning"): `scratch_row`, here.

The re-initialisation: the model is built afresh with the model family's own initialisation,
drawn from a seed derived from the row's seed (`init_seed`: never the base model's own
initial weights, which start from the seed itself), then the method's pruning history is
replayed on it, removing the channels the method removed. No weight comes from a trained
model. No Ray here: `progprune prune --control` runs these in its process, a sweep in tasks.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from progprune.config import ComboConfig
from progprune.data import Splits, load_dataset
from progprune.errors import CombinationFailed
from progprune.macs import count_exact
from progprune.models import build_model, example_inputs
from progprune.pipeline import Log, _noop, build_row, now, run_stages
from progprune.tasks.image import measure_pair
from progprune.pruning import replay_history
from progprune.results import ResultRow
from progprune.storage.layout import PRUNE_LAYOUT
from progprune.training import device_label, evaluate, fit


def init_seed(seed: int) -> int:
    """The scratch control's initialisation seed: derived from the row's seed, apart from
    the base model's (which starts from torch.manual_seed(seed))."""
    return int.from_bytes(hashlib.sha256(f"progprune scratch init {seed}".encode()).digest()[:4], "big")


def fresh(cfg: ComboConfig, splits: Splits) -> nn.Module:
    """The unpruned architecture, initialised from `init_seed` (the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(cfg.seed))
        return build_model(cfg.model, splits.num_classes, splits.input_shape)


@torch.enable_grad()  # DepGraph traces with autograd
def scratch_model(cfg: ComboConfig, history: list, splits: Splits) -> nn.Module:
    """The method's pruned architecture with freshly initialised weights."""
    model = fresh(cfg, splits)
    replay_history(model, history, example_inputs(splits.input_shape))
    return model


@dataclass
class Scratch:
    """The scratch control's figures: the architecture's counts against the unpruned one,
    its latency (timed as every latency column), and its accuracy after training."""
    base_macs: int
    base_params: int
    macs: int
    params: int
    top1: float
    top5: float
    epochs: int
    seconds: float
    latency: tuple  # (base, pruned) training.Latency
    achieved: float  # speedup in the target's metric
    target: float
    architecture_of: str

    def columns(self) -> dict:
        lb, lp = self.latency
        return {
            "status": "ok", "achieved_speedup": self.achieved, "overshoot_pct": (self.achieved / self.target - 1) * 100,
            "macs_speedup": self.base_macs / self.macs, "compression_ratio": self.base_params / self.params,
            "base_macs": self.base_macs, "base_params": self.base_params, "pruned_macs": self.macs,
            "pruned_params": self.params, "final_top1": self.top1, "final_top5": self.top5,
            "scratch_epochs": self.epochs, "scratch_seconds": self.seconds, "architecture_of": self.architecture_of,
            "base_latency_ms": lb.median_ms, "pruned_latency_ms": lp.median_ms, "latency_speedup": lp.speedup,
            "base_latency_iqr_ms": lb.iqr_ms, "pruned_latency_iqr_ms": lp.iqr_ms, "latency_threads": lb.threads,
            "latency_noisy": lb.noisy or lp.noisy,
            # none of the method's training: the scratch control's is scratch_epochs
            "base_epochs": 0, "sparse_epochs": 0, "finetune_epochs": 0,
        }


def scratch_stage(cfg: ComboConfig, model: nn.Module, splits: Splits, device, log: Log = _noop) -> Scratch:
    """Train the re-initialised architecture `model` in place with `cfg.scratch`; measure it."""
    x = example_inputs(splits.input_shape)
    full = fresh(cfg, splits)
    (base_macs, base_params), (macs, params) = count_exact(full, x), count_exact(model, x)
    n = cfg.scratch.epochs
    log(f"scratch control: {cfg.model} in {cfg.method}'s {cfg.target_speedup:g}x architecture "
        f"({base_macs / macs:.3f}x MACs, {base_params / params:.3f}x params), re-initialised; training {n} epochs")
    t0 = time.perf_counter()
    fit(model, splits, cfg.scratch, device, seed=cfg.seed, stage="scratch training",
        on_epoch=lambda m, _s: log(f"  scratch epoch {m['epoch'] + 1}/{n} loss {m['loss']:.3f} "
                                   f"val {m['val_top1']:.4f}"))
    seconds = time.perf_counter() - t0
    model.to(device)
    top1, top5 = evaluate(model, splits, "test", device)
    lb, lp = measure_pair(cfg, full.to(device), model, splits, device)
    achieved = {"macs": base_macs / macs, "params": base_params / params}.get(
        cfg.prune.target_metric, lp.speedup)  # latency: timed again, as the row's column
    log(f"  scratch: test top-1 {top1:.4f} top-5 {top5:.4f}")
    return Scratch(base_macs, base_params, macs, params, top1, top5, n, seconds, (lb, lp), achieved,
                   cfg.target_speedup, cfg.architecture_of().combo_id())


def scratch_row(cfg: ComboConfig, history: list | None, status: str, device, log: Log = _noop,
                save: Callable[[nn.Module, Splits], str | None] | None = None) -> ResultRow:
    """The scratch control's row, given the method combination's pruning `history` and the
    `status` its row ended with: only an architecture that reached the target is trained
    (else the row says why not). `save(model, splits)` stores the trained model and says where."""
    started = now()
    if status != "ok" or history is None:
        why = (f"no architecture to train: the {cfg.method} prune of this target ended "
               f"{status or 'without a row'}")
        return build_row(cfg, {"status": "unreachable" if status == "unreachable" else "failed", "error": why,
                               "architecture_of": cfg.architecture_of().combo_id(), "started_at": started})
    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    where = {"device": device_label(device), "num_classes": splits.num_classes, "started_at": started}
    try:
        model = scratch_model(cfg, history, splits)
        info = scratch_stage(cfg, model, splits, device, log)
    except CombinationFailed as e:  # a diverged training: the row says so, no artifact
        return build_row(cfg, where, {"architecture_of": cfg.architecture_of().combo_id()}, error=str(e))
    row = build_row(cfg, where, info)
    if save is not None:
        row.artifact_uri = save(model, splits)
    return row


def run_with_controls(cfgs: list[ComboConfig], out_dir: str | None, device, log: Log = _noop,
                      shown_dir: str | None = None) -> list[ResultRow]:
    """`progprune prune` with `--control`: the method's combination (`cfgs[0]`), then its
    controls (`SweepSpec.combinations()` order) in this process, the random control from the
    same base model (not trained again), the scratch control from the method's pruning."""
    from progprune.artifacts import save_artifact
    from progprune.export import run_meta

    method, *controls = cfgs
    ran = run_stages(method, out_dir, device, log, shown_dir, keep_base=any(c.control == "random" for c in controls))
    rows = [ran.row]
    for c in controls:
        name = PRUNE_LAYOUT.control(c.control)
        log("")
        log(f"control: {c.control}")
        if c.control == "random":  # --export writes the method's model only
            c = c.model_copy(update={"export": ()})
            rows.append(run_stages(c, out_dir, device, log, shown_dir, base=ran.base, artifact=name).row)
            continue

        def save(model, splits, name=name, c=c):
            if not out_dir:
                return None
            save_artifact(os.path.join(out_dir, name), model, model_name=c.model, num_classes=splits.num_classes,
                          input_shape=splits.input_shape, history=ran.history,
                          meta={**run_meta(c.combo_id(), splits), "target_speedup": c.target_speedup})
            return os.path.join(shown_dir or out_dir, name)
        rows.append(scratch_row(c, ran.history, ran.row.status, device, log, save))
    return rows
