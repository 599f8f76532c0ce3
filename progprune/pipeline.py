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
import importlib.metadata as _md
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from progprune import __version__
from progprune.artifacts import prior_history
from progprune.config import ComboConfig
from progprune.errors import CombinationFailed
from progprune.export import export_beside, record_exports
from progprune.records import BaseInfo, Finetuned, Log, Pruned, _noop, now
from progprune.results import ResultRow, compose
from progprune.storage.layout import PRUNE_LAYOUT
from progprune.tasks import needs_sparse, task_of
from progprune.training import device_label

__all__ = ["BaseInfo", "Finetuned", "Log", "Pruned", "needs_sparse", "now"]

def versions() -> dict:
    def v(pkg):
        try:
            return _md.version(pkg)
        except _md.PackageNotFoundError:
            return None

    return {"torch_version": torch.__version__, "torch_pruning_version": v("torch-pruning"),
            "ray_version": v("ray"), "progprune_version": __version__}


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
        "control": cfg.control, "task": cfg.task,
    }


def build_row(cfg: ComboConfig, *records, error: str | None = None, **columns) -> ResultRow:
    """The combination's row: its settings' columns, then each record's own (`Pruned`,
    `Finetuned`; None for a stage that did not run), then `columns`. `error` makes it a
    failed row whatever the records say."""
    failed = {"status": "failed", "error": error} if error else {}
    return compose(config_columns(cfg), versions(), {"finished_at": now()}, *records, columns, failed)


# ---- one combination: the stages in order ----------------------------------------------
def prune_combination(cfg: ComboConfig, model: nn.Module, base: BaseInfo | None, data, device,
                      log: Log = _noop) -> Pruned:
    """Stage 3: prune `model` in place (it comes out of stages 1-2 or the store)."""
    started = now()
    return Pruned(base, task_of(cfg).prune_stage(cfg, model, data, device, log), device_label(device),
                  data.num_classes, started)


def finetune_combination(cfg: ComboConfig, model: nn.Module, data, device, log: Log = _noop,
                         **fit_kwargs) -> Finetuned:
    """Stage 4 as every runner runs it (this process, a Ray task, Ray Train's rank 0):
    fine-tune, then measure the kept weights on the test set."""
    task = task_of(cfg)
    seconds = task.finetune_stage(cfg, model, data, device, log, **fit_kwargs).seconds
    m = task.evaluate(model, data, "test", device)
    return Finetuned(m["top1"], m["top5"], seconds, perplexity=m.get("perplexity"))


def finish_combination(cfg: ComboConfig, pruned: Pruned, finetune: Callable[[], Finetuned]) -> ResultRow:
    """Stage 4 when the target was reached, by `finetune` (here, in a Ray task or on Ray
    Train), then stage 5, the row. A diverged fine-tune raises `TrainingDiverged` (a
    `CombinationFailed`)."""
    ft = finetune() if pruned.status == "ok" else None
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


def _base_line(info: BaseInfo) -> str:
    ppl = f" perplexity {info.perplexity:.3f}" if info.perplexity is not None else ""
    return f"base: test top-1 {info.top1:.4f} top-5 {info.top5:.4f}{ppl} ({info.source})"


def run_stages(cfg: ComboConfig, out_dir: str | None, device, log: Log = _noop, shown_dir: str | None = None,
               *, base: tuple | None = None, keep_base: bool = False, artifact: str = PRUNE_LAYOUT.artifact) -> Ran:
    """Every stage in this process, through the combination's task. A combination that
    fails (`CombinationFailed`: a training that diverges) ends as a failed row, without an
    artifact (its weights are not finite). `out_dir` receives `artifact`; `shown_dir` is
    where it will live once the caller moves it (the row names it; the caller writes the
    row). `base` (model, BaseInfo): start from a copy of that base instead of stage 1;
    `keep_base`: keep a copy of it in `Ran.base`."""
    task = task_of(cfg)
    started, info, pruned, kept = now(), None, None, None
    data = task.load_data(cfg)
    try:
        if base is None:
            model, info = task.base_stage(cfg, data, device, log)
            log(_base_line(info))
        else:
            model, info = copy.deepcopy(base[0]), base[1]
        kept = (copy.deepcopy(model), info) if keep_base else None
        task.sparse_stage(cfg, model, data, device, log)
        pruned = prune_combination(cfg, model, info, data, device, log)
        pruned.started_at = started
        if out_dir:  # the model as it ends, fine-tuned or not
            pruned.artifact = os.path.join(shown_dir or out_dir, artifact)
        row = finish_combination(cfg, pruned, lambda: finetune_combination(cfg, model, data, device, log))
    except KeyboardInterrupt:
        raise
    except (CombinationFailed, SystemExit, GeneratorExit) as e:  # what ran so far stays in the row; no artifact
        # SystemExit/GeneratorExit: the model's own code (a forward) tried to end the run
        error = str(e) if isinstance(e, CombinationFailed) else (
            f"model {cfg.model!r} raised {type(e).__name__}"
            f"{f'({e.code!r})' if isinstance(e, SystemExit) else ''} during the run; a model's "
            "forward must return its logits, not end the process")
        row = build_row(cfg, Pruned(info, pruned.prune if pruned else None, device_label(device),
                                    data.num_classes, started), error=error)
    history = pruned.prune.outcome.history if pruned and pruned.prune else None
    if out_dir and row.status != "failed":
        path = task.save(os.path.join(out_dir, artifact), model, cfg, data, history=history,
                         meta={**task.run_meta(cfg, data), "target_speedup": cfg.target_speedup})
        record_exports(row, cfg.export, lambda: [os.path.join(shown_dir or out_dir, os.path.basename(p))
                                                 for p in export_beside(path, cfg.export)])
    # the caller writes the row, once it knows where the artifact ends up
    return Ran(row, kept, None if history is None else prior_history(model) + history)
