"""The causal-LM task: Hugging Face causal LMs (`hf:PATH`) on the `text` data set.

Data: the model's own tokenizer over the text files, cached as token ids and streamed in
`seq_len` blocks (`progprune.data.text`). Base: the model's own weights (trained further only
when `base_training.epochs` asks). Pruning: the declared groups of `progprune.lm.groups`
(heads as whole KV groups, MLP channels, optionally the hidden size and whole layers),
progressively to a `params` or `macs` (per token) target (`progprune.lm.prune`).
Metrics: next-token top-1/top-5 and perplexity (exp of the mean next-token loss), before
pruning, after it and after fine-tuning. Training is `progprune.training.fit`, the loop
every task shares (the loss over each token's prediction); artifacts are one file each
(`progprune.lm.artifact`), exported by `progprune export --format hf`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from progprune.config import ComboConfig
from progprune.errors import BadInput, Problem, SpecError
from progprune.pruning.progress import PruneProgress
from progprune.records import BaseInfo, Log, _noop
from progprune.tasks._registry import TASKS, Task
from progprune.training import calibration_batch, evaluate_metrics, fit

# the spec's method names that mean something for a causal LM (progprune.lm.prune's
# importances); the BatchNorm-based and DepGraph-only methods do not
LM_METHODS = ("l1", "l2", "random", "taylor")
LM_TARGET_METRICS = ("params", "macs")


@dataclass
class LmOutcome:
    status: str  # ok (a target out of reach is refused before any work)
    history: list = field(default_factory=list)  # per step: params, macs, widths


@dataclass
class LmPruneInfo:
    outcome: LmOutcome
    result: object  # progprune.lm.prune.LmPruneResult
    target: float
    top1: float
    top5: float
    perplexity: float

    def columns(self) -> dict:
        r = self.result
        return {
            "status": self.outcome.status, "error": None, "achieved_speedup": r.achieved,
            "macs_speedup": r.base_macs / r.macs, "overshoot_pct": (r.achieved / self.target - 1) * 100,
            "base_macs": r.base_macs, "base_params": r.base_params, "pruned_macs": r.macs, "pruned_params": r.params,
            "compression_ratio": r.base_params / r.params, "prune_steps": r.steps, "prune_seconds": r.seconds,
            "pruned_top1": self.top1, "pruned_perplexity": self.perplexity, "pruned_shape": shape_json(r),
        }


def shape_json(r) -> str:
    import json

    heads = r.heads or (None, None)
    return json.dumps({"num_attention_heads": heads[0], "num_key_value_heads": heads[1],
                       "intermediate_size": r.intermediate, "hidden_size": r.hidden, "num_hidden_layers": r.layers})


def perplexity_of(nll: float) -> float:
    return math.exp(min(nll, 700.0))  # exp(700) ~ 1e304: a finite number for any finite loss


class CausalLM(Task):
    name = "causal_lm"
    doc = "Hugging Face causal LMs (hf:PATH) on the text data set; perplexity, next-token top-1"

    # ---- data and models ----------------------------------------------------------------
    def load_data(self, cfg: ComboConfig):
        from progprune.data.text import load_text
        from progprune.lm.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
        data = load_text(cfg.dataset, tokenizer, seed=cfg.seed)
        data.tokenizer = tokenizer
        return data

    def base_stage(self, cfg: ComboConfig, data, device, log: Log = _noop):
        from progprune.lm.models import load

        t0 = time.perf_counter()
        model, _ = load(cfg.model)
        model.config.use_cache = False  # training and evaluation see whole blocks
        source, res = "hf", None
        if cfg.base.epochs > 0:
            log(f"training base {cfg.model} on {data.name} for {cfg.base.epochs} epochs")
            res = fit(model, data, cfg.base, device, seed=cfg.seed, stage="base training",
                      on_epoch=lambda m, _s: log(f"  base epoch {m['epoch'] + 1}/{cfg.base.epochs} "
                                                 f"loss {m['loss']:.3f} val {m['val_top1']:.4f}"))
            source = "trained"
        model.to(device)
        m = self.evaluate(model, data, "test", device)
        return model, BaseInfo(source, m["top1"], m["top5"], res.best_val_top1 if res else None,
                               cfg.base.epochs, time.perf_counter() - t0, perplexity=m["perplexity"])

    # ---- pruning ------------------------------------------------------------------------
    def prune_stage(self, cfg: ComboConfig, model, data, device, log: Log = _noop):
        from progprune.lm.prune import prune_lm

        p = cfg.prune
        model.to(device).eval()
        calib = calibration_batch(data, device, n=8, seed=cfg.seed)[0] if cfg.method == "taylor" else None
        log(f"pruning {cfg.model} with {cfg.method} to {cfg.target_speedup}x {p.target_metric} "
            f"({'/'.join(p.dims)}, {p.iterative_steps} steps)")
        progress = PruneProgress(cfg.target_speedup, p.iterative_steps, log)
        result = prune_lm(model, cfg.target_speedup, metric=p.target_metric, importance=cfg.method,
                          steps=p.iterative_steps, dims=tuple(p.dims), seed=cfg.seed, calib=calib,
                          seq_len=data.input_shape[0],
                          on_step=lambda step, steps, achieved: progress(step, achieved))
        log(f"  ok: {result.achieved:.4f}x {p.target_metric} ({result.base_macs / result.macs:.4f}x MACs) "
            f"after {result.steps} steps in {result.seconds:.1f}s")
        m = self.evaluate(model, data, "test", device)
        return LmPruneInfo(LmOutcome("ok", list(result.history)), result, cfg.target_speedup,
                           m["top1"], m["top5"], m["perplexity"])

    # ---- training and metrics -----------------------------------------------------------
    def finetune_stage(self, cfg: ComboConfig, model, data, device, log: Log = _noop, on_epoch=None, **fit_kwargs):
        n = cfg.finetune.epochs
        if n > 0:
            log(f"fine-tuning for {n} epochs")
        checkpointing = cfg.finetune.gradient_checkpointing
        if checkpointing:  # transformers 5.24 names it activation checkpointing (the old name is deprecated)
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()

        def epoch_done(m, state):
            log(f"  finetune epoch {m['epoch'] + 1}/{n} loss {m['loss']:.3f} "
                f"(perplexity {perplexity_of(m['loss']):.2f}) val top-1 {m['val_top1']:.4f}")
            if on_epoch:
                on_epoch(m, state)

        try:
            return fit(model, data, cfg.finetune, device, seed=cfg.seed, on_epoch=epoch_done, stage="fine-tune",
                       **fit_kwargs)
        finally:
            if checkpointing:
                (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()

    def evaluate(self, model, data, split, device) -> dict:
        m = evaluate_metrics(model, data, split, device)
        return {"top1": m["top1"], "top5": m["top5"], "perplexity": perplexity_of(m["nll"])}

    # ---- artifacts ----------------------------------------------------------------------
    def save(self, path, model, cfg, data, history=None, meta=None):
        from progprune.lm.artifact import save_lm

        return save_lm(path, model, getattr(data, "tokenizer", None), history=history, meta=meta)

    def load(self, path, cfg, data):
        from progprune.lm.artifact import load_lm

        model, _, info = load_lm(path)
        model.config.use_cache = False
        return model, info

    def run_meta(self, cfg, data):
        return {"combo_id": cfg.combo_id(), "task": self.name, "seq_len": data.input_shape[0]}

    def preflight(self, spec) -> int:
        """Each model's family can be pruned and its tokenizer loads (offline); the first
        one's vocabulary size. The text itself is tokenized (and cached) by the tasks, on
        the nodes that read it."""
        from transformers import AutoConfig

        from progprune.lm.models import FAMILIES, load_tokenizer, local_dir

        problems, vocab = [], None
        for i, m in enumerate(spec.models):
            try:
                path = local_dir(m.name, download=False)
                if path is None:  # hf:org/name not cached on the driver: the workers fetch it
                    continue
                config = AutoConfig.from_pretrained(path, local_files_only=True)
                kind = config.model_type
                if kind not in FAMILIES:
                    raise BadInput(f"model architecture {kind!r} is not supported for pruning; supported: "
                                   f"{', '.join(sorted(FAMILIES))}")
                tok = load_tokenizer(m.name)
                rows = getattr(config, "vocab_size", None)
                if rows is not None and len(tok) > rows:  # ids past the embedding: another model's tokenizer
                    raise BadInput(f"its tokenizer has {len(tok):,} tokens but the model's embedding has {rows:,} "
                                   "rows: save the model's own tokenizer beside it")
                vocab = vocab or len(tok)
            except (BadInput, ValueError, OSError) as e:
                problems.append(f"models[{i}]: {getattr(e, 'message', None) or str(e).splitlines()[0]}")
        if problems:
            raise SpecError(problems)
        return vocab

    # ---- the spec -----------------------------------------------------------------------
    def spec_problems(self, spec) -> list[Problem]:
        """What a causal-LM spec cannot run: image-only models, data, methods and targets."""
        out = []
        for i, m in enumerate(spec.models):
            if not m.name.startswith("hf:"):
                out.append(Problem(f"models[{i}]", f"{m.name!r} is not a causal LM: task causal_lm prunes hf:PATH "
                                   "models (a directory written by save_pretrained)"))
            elif m.checkpoint:
                out.append(Problem(f"models[{i}].checkpoint", "an hf: model is its own base; remove checkpoint"))
        if spec.dataset.name != "text":
            out.append(Problem("dataset.name", f"task causal_lm reads the text data set, not {spec.dataset.name!r}"))
        for i, e in enumerate(spec.methods):
            if e.name not in LM_METHODS:
                out.append(Problem(f"methods[{i}]", f"{e.name} does not apply to causal LMs (it ranks channels by "
                                   f"BatchNorm or Torch-Pruning's groups); use one of {', '.join(LM_METHODS)}"))
        for metric in spec.pruning.target_metric:
            if metric not in LM_TARGET_METRICS:
                out.append(Problem("pruning.target_metric", f"{metric} targets are for images; causal LMs prune "
                                   f"to {' or '.join(LM_TARGET_METRICS)}"))
        if spec.controls:
            out.append(Problem("controls", "controls run for image_classification only; remove controls"))
        if spec.export:
            out.append(Problem("export", "a causal LM exports with `progprune export PRUNED.pt --format hf`; "
                               "remove export"))
        if spec.evaluation.runtime != "eager":
            out.append(Problem("evaluation.runtime", "causal LMs are measured eagerly; remove runtime"))
        return out


def image_only_problems(spec) -> list[Problem]:
    """What an image spec cannot run: hf: models and LM-only settings."""
    out = [Problem(f"models[{i}]", f"{m.name!r} is a Hugging Face causal LM: set task: causal_lm")
           for i, m in enumerate(spec.models) if m.name.startswith("hf:")]
    if spec.dataset.name == "text":
        out.append(Problem("dataset.name", "the text data set is for task causal_lm (with hf: models)"))
    return out


TASKS.register(CausalLM.name, CausalLM())
