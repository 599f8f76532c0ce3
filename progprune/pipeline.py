"""The stages of one combination, each a function with plain inputs and outputs, and
their order, in one place (bottom of this file).

Stages 1-2 (base, sparse learning) are shared by the combinations of a base; stages 3-5
(prune, fine-tune, the row) are one combination's, arranged by `prune_combination` and
`finish_combination`, which take the fine-tune runner as a parameter: `progprune prune`
runs everything in this process (`run_combination`); `progprune sweep` runs the same two
functions in Ray tasks, with Ray Train (or a task) as the runner (`progprune.cluster`).
No Ray import here.
"""
from __future__ import annotations

import copy
import datetime as _dt
import importlib.metadata as _md
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from progprune import __version__
from progprune.artifacts import load_base_weights, prior_history, save_artifact
from progprune.config import ComboConfig
from progprune.data import Splits, load_dataset
from progprune.models import build_model, check_input_size, example_inputs
from progprune.pruning import PruneOutcome, get_method, make_pruner, prune_to_target, why_unreachable
from progprune.pruning.progress import PruneProgress
from progprune.errors import CombinationFailed
from progprune.export import export_beside, record_exports, run_meta
from progprune.runtimes import get_runtime, latency_round_to, torch_threads
from progprune.results import ResultRow, compose, write_rows
from progprune.storage.layout import PRUNE_LAYOUT
from progprune.timing import PairedTimer
from progprune.training import (FitResult, calibration_batch, device_label, evaluate, fit,
                                measure_latency_stats, recalibrate_bn)

Log = Callable[[str], None]


def _noop(msg: str) -> None:
    pass


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    def v(pkg):
        try:
            return _md.version(pkg)
        except _md.PackageNotFoundError:
            return None

    return {"torch_version": torch.__version__, "torch_pruning_version": v("torch-pruning"),
            "ray_version": v("ray"), "progprune_version": __version__}


# ---- stage 1: the base model ----------------------------------------------------------
@dataclass
class BaseInfo:
    source: str  # "trained", "checkpoint" or "init" (0 epochs: seeded random weights)
    top1: float
    top5: float
    val_top1: float | None
    epochs: int
    seconds: float

    def columns(self) -> dict:
        return {"base_top1": self.top1, "base_top5": self.top5}


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
def needs_sparse(cfg: ComboConfig) -> bool:
    return cfg.sparse is not None and cfg.sparse.epochs > 0


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
            "latency_speedup": self.base_latency_ms / self.pruned_latency_ms,
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
                     settings.round_to)


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


# ---- stage 5: the row -----------------------------------------------------------------
def config_columns(cfg: ComboConfig) -> dict:
    """The row's columns that the settings decide, whatever ran."""
    sl = cfg.sparse
    return {
        "combo_id": cfg.combo_id(), "sweep": cfg.sweep, "model": cfg.model, "dataset": cfg.dataset.name,
        "method": cfg.method + ("-nosl" if sl is not None and sl.epochs == 0 else ""),
        "seed": cfg.seed, "target_speedup": float(cfg.target_speedup), "target_metric": cfg.prune.target_metric,
        "global_pruning": cfg.prune.global_pruning, "iterative_steps": cfg.prune.iterative_steps,
        "round_to": cfg.prune.round_to, "base_epochs": cfg.base.epochs if not cfg.base_checkpoint else 0,
        "sparse_epochs": sl.epochs if sl else 0, "sparse_reg": sl.reg if sl else None,
        "finetune_epochs": cfg.finetune.epochs, "finetune_global_batch": cfg.finetune.batch_size,
        "latency_batch_size": cfg.evaluation.latency_batch_size, "runtime": cfg.evaluation.runtime,
        "precision": cfg.evaluation.precision, "reset_head": cfg.reset_head,
        "base_checkpoint_sha256": cfg.base_checkpoint_sha256, "config_json": cfg.model_dump_json(),
        "control": cfg.control,
    }


def build_row(cfg: ComboConfig, *records, error: str | None = None, **columns) -> ResultRow:
    """The combination's row: its settings' columns, then each record's own (`Pruned`,
    `Finetuned`; None for a stage that did not run), then `columns`. `error` makes it a
    failed row whatever the records say."""
    failed = {"status": "failed", "error": error} if error else {}
    return compose(config_columns(cfg), versions(), {"finished_at": now()}, *records, columns, failed)


# ---- one combination: the stages in order ----------------------------------------------
@dataclass
class Pruned:
    """What stage 3 hands to stage 4: the figures so far, and where the pruned model is
    stored (None while it stays in this process)."""
    base: BaseInfo | None
    prune: PruneInfo | None  # None: the combination failed before stage 3 finished
    device: str
    num_classes: int
    started_at: str
    artifact: str | None = None

    def columns(self) -> dict:
        cols = {"device": self.device, "num_classes": self.num_classes, "started_at": self.started_at,
                "artifact_uri": self.artifact, "finetune_workers": 0}
        cols |= self.base.columns() if self.base else {}
        if self.prune:
            cols |= self.prune.columns()
            if self.prune.unpruned_top1 and self.base:  # the base of a sparse method is what it pruned
                cols["base_top1_pre_sparse"] = self.base.top1
                cols["base_top1"], cols["base_top5"] = self.prune.unpruned_top1
        return cols


@dataclass
class Finetuned:
    """What a fine-tune runner returns: test-set figures of the kept weights."""
    top1: float
    top5: float
    seconds: float
    artifact: str | None = None  # where the fine-tuned model is stored
    workers: int = 0  # Ray Train workers (0: fine-tuned in one process)
    resumed_from_epoch: int | None = None  # Ray Train restarted from this epoch's checkpoint

    def columns(self) -> dict:
        cols = {"final_top1": self.top1, "final_top5": self.top5, "finetune_seconds": self.seconds,
                "finetune_workers": self.workers, "finetune_resumed_from_epoch": self.resumed_from_epoch}
        return cols | ({"artifact_uri": self.artifact} if self.artifact else {})


def prune_combination(cfg: ComboConfig, model: nn.Module, base: BaseInfo | None, splits: Splits,
                      device, log: Log = _noop) -> Pruned:
    """Stage 3: prune `model` in place (it comes out of stages 1-2 or the store)."""
    started = now()
    return Pruned(base, prune_stage(cfg, model, splits, device, log), device_label(device),
                  splits.num_classes, started)


def finetune_combination(cfg: ComboConfig, model: nn.Module, splits: Splits, device, log: Log = _noop,
                         **fit_kwargs) -> Finetuned:
    """Stage 4 as every runner runs it (this process, a Ray task, Ray Train's rank 0):
    fine-tune, then measure the kept weights on the test set."""
    seconds = finetune_stage(cfg, model, splits, device, log, **fit_kwargs).seconds
    top1, top5 = evaluate(model, splits, "test", device)
    return Finetuned(top1, top5, seconds)


def finish_combination(cfg: ComboConfig, pruned: Pruned, finetune: Callable[[], Finetuned]) -> ResultRow:
    """Stage 4 when the target was reached, by `finetune` (here, in a Ray task or on Ray
    Train), then stage 5, the row. A diverged fine-tune raises `TrainingDiverged` (a
    `CombinationFailed`)."""
    ft = finetune() if pruned.prune.outcome.status == "ok" else None
    return build_row(cfg, pruned, ft)


def run_combination(cfg: ComboConfig, out_dir: str | None, device, log: Log = _noop,
                    shown_dir: str | None = None) -> ResultRow:
    """Every stage in this process: what `progprune prune` runs (`run_stages`' row)."""
    return run_stages(cfg, out_dir, device, log, shown_dir).row


@dataclass
class Ran:
    """A combination run in this process: its row, and for the controls that follow it here
    (progprune.controls) its base model and the pruning it did."""
    row: ResultRow
    base: tuple | None = None  # (the base model before sparse learning and pruning, BaseInfo)
    history: list | None = None  # the pruning done (None: it did not get that far)


def run_stages(cfg: ComboConfig, out_dir: str | None, device, log: Log = _noop, shown_dir: str | None = None,
               *, base: tuple | None = None, keep_base: bool = False, artifact: str = PRUNE_LAYOUT.artifact) -> Ran:
    """Every stage in this process. A combination that fails (`CombinationFailed`: a
    training that diverges) ends as a failed row, without an artifact (its weights are not
    finite). `out_dir` receives `artifact`; `shown_dir` is where it will live once the caller
    moves it (the row names it; the caller writes the row). `base` (model, BaseInfo): start
    from a copy of that base instead of stage 1; `keep_base`: keep a copy of it in `Ran.base`."""
    started, info, pruned, kept = now(), None, None, None
    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    try:
        if base is None:
            model, info = base_stage(cfg, splits, device, log)
            log(f"base: test top-1 {info.top1:.4f} top-5 {info.top5:.4f} ({info.source})")
        else:
            model, info = copy.deepcopy(base[0]), base[1]
        kept = (copy.deepcopy(model), info) if keep_base else None
        sparse_stage(cfg, model, splits, device, log)
        pruned = prune_combination(cfg, model, info, splits, device, log)
        pruned.started_at = started
        if out_dir:  # the model as it ends, fine-tuned or not
            pruned.artifact = os.path.join(shown_dir or out_dir, artifact)
        row = finish_combination(cfg, pruned, lambda: finetune_combination(cfg, model, splits, device, log))
    except KeyboardInterrupt:
        raise
    except (CombinationFailed, SystemExit, GeneratorExit) as e:  # what ran so far stays in the row; no artifact
        # SystemExit/GeneratorExit: the model's own code (a forward) tried to end the run
        error = str(e) if isinstance(e, CombinationFailed) else (
            f"model {cfg.model!r} raised {type(e).__name__}"
            f"{f'({e.code!r})' if isinstance(e, SystemExit) else ''} during the run; a model's "
            "forward must return its logits, not end the process")
        row = build_row(cfg, Pruned(info, pruned.prune if pruned else None, device_label(device),
                                    splits.num_classes, started), error=error)
    history = pruned.prune.outcome.history if pruned and pruned.prune else None
    if out_dir and row.status != "failed":
        path = save_artifact(os.path.join(out_dir, artifact), model, model_name=cfg.model,
                             num_classes=splits.num_classes, input_shape=splits.input_shape, history=history,
                             meta={**run_meta(cfg.combo_id(), splits), "target_speedup": cfg.target_speedup})
        record_exports(row, cfg.export, lambda: [os.path.join(shown_dir or out_dir, os.path.basename(p))
                                                 for p in export_beside(path, cfg.export)])
    return Ran(row, kept, None if history is None else prior_history(model) + history)  # the caller writes the row, once it knows where the artifact ends up
