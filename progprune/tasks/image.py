"""The image-classification task (the default): data sets from `progprune.data`, models
from `progprune.models`, Torch-Pruning's DepGraph pruning (`progprune.pruning`), top-1/top-5,
latency in the spec's runtime, `pruned.pt` artifacts (`progprune.artifacts`).

Its stages are plain functions (`base_stage`, `sparse_stage`, `prune_stage`,
`finetune_stage`); `ImageClassification` hands them to the pipeline through the task seam.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from progprune.artifacts import load_artifact, load_base_weights, save_artifact
from progprune.config import ComboConfig
from progprune.data import Splits, load_dataset
from progprune.errors import BadInput, SpecError
from progprune.export import run_meta
from progprune.models import build_model, check_input_size, example_inputs
from progprune.pruning import PruneOutcome, get_method, make_pruner, prune_to_target, why_unreachable
from progprune.pruning.progress import PruneProgress
from progprune.records import BaseInfo, Log, _noop
from progprune.runtimes import get_runtime, latency_round_to, torch_threads
from progprune.tasks._registry import TASKS, Task, needs_sparse
from progprune.timing import PairedTimer
from progprune.training import FitResult, calibration_batch, evaluate, fit, measure_latency_stats, recalibrate_bn


# ---- stage 1: the base model ----------------------------------------------------------
def base_stage(cfg: ComboConfig, splits: Splits, device, log: Log = _noop) -> tuple[nn.Module, BaseInfo]:
    """Load the base model from cfg.base_checkpoint, or train it from a seeded init."""
    t0 = time.perf_counter()
    if cfg.base_checkpoint:
        model, _ = load_base_weights(cfg.base_checkpoint, cfg.model, splits.num_classes,
                                     splits.input_shape, reset_head=cfg.reset_head, seed=cfg.seed)
        source = "checkpoint"
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, splits.num_classes, splits.input_shape)
        source = "trained" if cfg.base.epochs > 0 else "init"
    # before any training: the image size, what the forward returns, the class count
    check_input_size(model, cfg.model, splits.input_shape, splits.num_classes)
    if source == "trained" or needs_sparse(cfg):  # nothing to prune (or ignore patterns that
        # leave nothing): said before the training, not after it (make_pruner raises)
        make_pruner(model, example_inputs(splits.input_shape), cfg.prune, splits.num_classes)
    res = None
    if source == "trained":
        log(f"training base {cfg.model} on {splits.name} for {cfg.base.epochs} epochs")
        res = fit(model, splits, cfg.base, device, seed=cfg.seed, stage="base training",
                  on_epoch=lambda m, _s: log(f"  base epoch {m['epoch'] + 1}/{cfg.base.epochs} "
                                             f"loss {m['loss']:.3f} val {m['val_top1']:.4f}"))
    model.to(device)
    top1, top5 = evaluate(model, splits, "test", device)
    return model, BaseInfo(source, top1, top5, res.best_val_top1 if res else None,
                           cfg.base.epochs if source != "checkpoint" else 0,
                           time.perf_counter() - t0)


# ---- stage 2: sparse learning (regularized methods only) ------------------------------
def sparse_stage(cfg: ComboConfig, model: nn.Module, splits: Splits, device, log: Log = _noop) -> FitResult | None:
    """Train with the pruner's regularizer (reference: loss.backward(); regularize; step)."""
    if not needs_sparse(cfg):
        return None
    model.to(device)
    ex = example_inputs(splits.input_shape).to(device)
    pruner = make_pruner(model, ex, cfg.prune, splits.num_classes, cfg.sparse)
    sl = cfg.sparse
    log(f"sparse learning ({cfg.method}) for {sl.epochs} epochs, reg {sl.reg}")
    update = getattr(pruner, "update_reg", None)
    return fit(model, splits, sl.training(), device, seed=cfg.seed,
               after_backward=lambda m: pruner.regularize(m),
               after_epoch=(lambda e: update()) if update else None,
               select_best=True, stage="sparse learning")  # the reference keeps its best epoch


# ---- stage 3: progressive pruning -----------------------------------------------------
@dataclass
class PruneInfo:
    outcome: PruneOutcome
    pruned_top1: float
    pruned_top5: float
    base_latency_ms: float
    pruned_latency_ms: float
    base_latency_iqr_ms: float | None = None
    pruned_latency_iqr_ms: float | None = None
    latency_threads: int | None = None
    latency_noisy: bool | None = None  # the spread is too large to trust the medians
    pruned_top1_bn: float | None = None  # after BatchNorm statistics re-estimated on train data
    unpruned_top1: tuple[float, float] | None = None  # (top-1, top-5) of the model as pruned,
    # measured when sparse learning changed it from the base
    unreachable: str | None = None  # why the target was not reached (status "unreachable")
    round_to: int | None = None  # the channel multiple pruned to (a latency target's default)
    # the median of the paired rounds' base ms / pruned ms (training.Latency.speedup); None:
    # the ratio of the medians
    latency_speedup: float | None = None

    def columns(self) -> dict:
        o = self.outcome
        return {
            "status": o.status, "error": self.unreachable, "achieved_speedup": o.achieved_speedup,
            "macs_speedup": o.macs_speedup, "achieved_ci_low": o.metric_low, "achieved_ci_high": o.metric_high,
            "target_points": o.metric_points, "overshoot_pct": o.overshoot_pct, "round_to": self.round_to,
            "base_macs": o.base_macs, "base_params": o.base_params, "pruned_macs": o.macs, "pruned_params": o.params,
            "compression_ratio": o.base_params / o.params, "prune_steps": o.steps, "prune_seconds": o.seconds,
            "crossing": o.crossing, "crossing_cut": o.crossing_cut, "macs_counter": o.macs_counter,
            "pruned_top1": self.pruned_top1, "pruned_top1_bn": self.pruned_top1_bn,
            "base_latency_ms": self.base_latency_ms, "pruned_latency_ms": self.pruned_latency_ms,
            "latency_speedup": self.latency_speedup or self.base_latency_ms / self.pruned_latency_ms,
            "base_latency_iqr_ms": self.base_latency_iqr_ms, "pruned_latency_iqr_ms": self.pruned_latency_iqr_ms,
            "latency_threads": self.latency_threads, "latency_noisy": self.latency_noisy,
        }


def prune_stage(cfg: ComboConfig, model: nn.Module, splits: Splits, device, log: Log = _noop) -> PruneInfo:
    """Prune `model` in place to cfg.target_speedup; measure latency before and after, in
    the spec's runtime, precision and threads (checked first: nothing is pruned for a timing
    that cannot run here)."""
    ev = cfg.evaluation
    get_runtime(ev.runtime).check(device, ev.precision)
    model.to(device).eval()
    unpruned = evaluate(model, splits, "test", device) if needs_sparse(cfg) else None
    base_copy = copy.deepcopy(model)  # timed against the pruned model, interleaved
    ex = example_inputs(splits.input_shape).to(device)
    settings = prune_settings(cfg, device)
    pruner = make_pruner(model, ex, settings, splits.num_classes, cfg.sparse)
    method = get_method(cfg.method)
    calib = calibration_batch(splits, device, seed=cfg.seed) if method.gradients else None
    metric = settings.target_metric
    log(f"pruning {cfg.model} with {cfg.method} to {cfg.target_speedup}x {metric} "
        f"({'global' if cfg.prune.global_pruning else 'local'}, {cfg.prune.iterative_steps} steps)")
    timer, prepare = _latency_timer(cfg, base_copy, splits, device) if metric == "latency" else (None, None)
    torch.manual_seed(cfg.seed)  # random importance draws from the global generator
    progress = PruneProgress(cfg.target_speedup if metric == "macs" else None, cfg.prune.iterative_steps, log)
    outcome = prune_to_target(model, pruner, ex, cfg.target_speedup, settings, timer=timer, prepare=prepare,
                              calib=calib, on_step=progress, log=log)
    macs = f" ({outcome.macs_speedup:.4f}x MACs)" if metric != "macs" else ""
    log(f"  {outcome.status}: {outcome.achieved_speedup:.4f}x {metric}{macs} after {outcome.steps} steps "
        f"({outcome.overshoot_pct:+.3f}% vs target) in {outcome.seconds:.1f}s")
    if outcome.macs_counter != "fast":  # once per prune, and in the row (macs_counter)
        log(f"  MACs counted by Torch-Pruning's count_ops_and_params after every step (slower; the crossing "
            f"step is taken whole): the fast counter is not used for {cfg.model}: {outcome.macs_fallback}")
    elif outcome.heads_whole and outcome.crossing == "fine":
        log("  the crossing step was taken whole: attention heads are pruned whole (timm's Attention), and "
            "a step cannot be cut channel by channel through a head")
    top1, top5 = evaluate(model, splits, "test", device)
    recal = copy.deepcopy(model)  # fine-tuning starts from the pruned model as it is
    recalibrate_bn(recal, splits, device, seed=cfg.seed)
    top1_bn, _ = evaluate(recal, splits, "test", device)
    del recal
    lb, lp = measure_pair(cfg, base_copy, model, splits, device)
    del base_copy
    return PruneInfo(outcome, top1, top5, lb.median_ms, lp.median_ms, lb.iqr_ms, lp.iqr_ms,
                     lb.threads, lb.noisy or lp.noisy, top1_bn, unpruned,
                     None if outcome.status == "ok" else why_unreachable(outcome, settings, cfg.target_speedup),
                     settings.round_to, lp.speedup)


def measure_pair(cfg: ComboConfig, base: nn.Module, model: nn.Module, splits: Splits, device):
    """(base, model) latencies, timed interleaved as every latency column is: the spec's
    runtime, precision, batch size, repeats and threads."""
    ev = cfg.evaluation
    return measure_latency_stats([base, model], splits.input_shape, device, ev.latency_batch_size,
                                 repeats=ev.latency_repeats, runtime=ev.runtime, precision=ev.precision,
                                 threads=ev.threads)


def prune_settings(cfg: ComboConfig, device):
    """What the prune runs with: the spec's `pruning:`, and for a latency target that sets
    no round_to, the channel multiple its runtime prefers on this device (the row says which)."""
    p = cfg.prune
    if p.target_metric != "latency" or p.round_to is not None:
        return p
    return p.model_copy(update={"round_to": latency_round_to(cfg.evaluation.runtime, device)})


def _latency_timer(cfg: ComboConfig, base: nn.Module, splits: Splits, device):
    """A latency target's timer of `base` and how a candidate is prepared: the spec's
    runtime, precision, batch size and threads, as every latency column is measured."""
    ev, rt = cfg.evaluation, get_runtime(cfg.evaluation.runtime)
    x = torch.randn(ev.latency_batch_size, *splits.input_shape, device=device)
    threads = ev.threads or torch.get_num_threads()

    def prepare(m):
        return rt.prepare(m, x, device, ev.precision, threads)
    return PairedTimer(prepare(base), x, scope=lambda: torch_threads(ev.threads)), prepare


# ---- stage 4: fine-tuning -------------------------------------------------------------
def finetune_stage(cfg: ComboConfig, model: nn.Module, splits: Splits, device, log: Log = _noop,
                   on_epoch=None, **fit_kwargs) -> FitResult:
    """Fine-tune the pruned model (a fresh optimizer: pruning replaced the parameters).
    One log line per epoch; `on_epoch(metrics, state)` runs after it (Ray Train reports)."""
    n = cfg.finetune.epochs
    if n > 0:
        log(f"fine-tuning for {n} epochs")

    def epoch_done(m, state):
        log(f"  finetune epoch {m['epoch'] + 1}/{n} loss {m['loss']:.3f} val {m['val_top1']:.4f}")
        if on_epoch:
            on_epoch(m, state)

    return fit(model, splits, cfg.finetune, device, seed=cfg.seed, on_epoch=epoch_done, stage="fine-tune",
               **fit_kwargs)


class ImageClassification(Task):
    name = "image_classification"
    doc = "image classifiers (registry, torchvision, timm, py:) on image data sets; top-1/top-5"

    def load_data(self, cfg):
        return load_dataset(cfg.dataset, seed=cfg.seed)

    def base_stage(self, cfg, data, device, log=_noop):
        return base_stage(cfg, data, device, log)

    def sparse_stage(self, cfg, model, data, device, log=_noop):
        return sparse_stage(cfg, model, data, device, log)

    def prune_stage(self, cfg, model, data, device, log=_noop):
        return prune_stage(cfg, model, data, device, log)

    def finetune_stage(self, cfg, model, data, device, log=_noop, on_epoch=None, **fit_kwargs):
        return finetune_stage(cfg, model, data, device, log, on_epoch=on_epoch, **fit_kwargs)

    def evaluate(self, model, data, split, device):
        top1, top5 = evaluate(model, data, split, device)
        return {"top1": top1, "top5": top5}

    def save(self, path, model, cfg, data, history=None, meta=None):
        return save_artifact(path, model, model_name=cfg.model, num_classes=data.num_classes,
                             input_shape=data.input_shape, history=history, meta=meta)

    def load(self, path, cfg, data):
        return load_artifact(path, model_name=cfg.model, num_classes=data.num_classes, input_shape=data.input_shape)

    def run_meta(self, cfg, data):
        return run_meta(cfg.combo_id(), data)

    def preflight(self, spec) -> int:
        """The driver's checks that need the data: base checkpoints that really load, models
        that take the data's image size; the class count."""
        splits = load_dataset(spec.dataset, seed=spec.seeds[0])
        problems = []
        for i, m in enumerate(spec.models):
            try:
                if m.checkpoint:
                    model, _ = load_base_weights(m.checkpoint, m.name, splits.num_classes, splits.input_shape,
                                                 reset_head=m.reset_head)
                else:
                    model = build_model(m.name, splits.num_classes, splits.input_shape)
            except BadInput as e:
                problems.append(f"models[{i}].checkpoint: {e}")
                continue
            try:
                check_input_size(model, m.name, splits.input_shape, splits.num_classes)
            except BadInput as e:
                problems.append(str(e))
        if problems:
            raise SpecError(problems)
        return splits.num_classes


TASKS.register(ImageClassification.name, ImageClassification())
