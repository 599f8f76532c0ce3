"""Plain PyTorch training, evaluation and latency. No Ray here.

`fit` is the one training loop: base training, sparse learning (with the pruner's
regularizer after each backward) and fine-tuning all call it, in-process for
`progprune prune` and as the body of the Ray Train worker for sweeps. Ray touches it
only through its arguments (`rank`/`world_size` for sharding, `wrap` for DDP,
`on_epoch` for reporting/checkpoints, `resume` for restarts).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from progprune.config import EvaluationConfig, TrainConfig
from progprune.data import Splits
from progprune.errors import CombinationFailed
from progprune.models import logits_of
from progprune.runtimes import get_runtime, torch_threads
from progprune.timing import Timer, from_times


def pick_device(use_gpu: bool | None = None) -> torch.device:
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


class TrainingDiverged(CombinationFailed):
    """The loss (or the weights) stopped being finite: the run failed, it is not bad input.

    `stage` names the training that diverged ("base training", "sparse learning",
    "fine-tune"), so the pipeline's failed row says which; `epoch` is 1-based.
    """

    def __init__(self, stage: str, epoch: int, lr: float, detail: str, loss: float | None = None):
        self.stage, self.epoch, self.lr, self.loss = stage, epoch, lr, loss
        super().__init__(f"{stage} diverged: {detail} at epoch {epoch} (lr {lr:g}); lower the learning rate")


class NonFiniteOutputs(CombinationFailed):
    """Evaluation met nan/inf logits: the model gives no usable predictions, so the run
    failed (its row says so) rather than reporting an accuracy of arbitrary argmaxes."""

    def __init__(self, split: str, bad: int, of: int, stage: str | None = None):
        self.split = split
        what = (f"{stage}: before any update, " if stage else "") + "the model's outputs are not finite"
        cannot = "no accuracy can be measured" if stage is None else "no learning rate is to blame"
        super().__init__(f"{what} (nan or inf) for {bad} of the first {of} {split} images: {cannot} "
                         "(non-finite weights, or a forward that divides by zero)")


@torch.no_grad()
def evaluate(model: nn.Module, splits: Splits, split: str, device) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (fractions) of `model` on `split` ("val", "test", "train"),
    in batches of the data set's `eval_batch_size` (the spec's dataset.eval_batch_size).

    Always fp32 (no autocast): a reported accuracy must not depend on whether the GPU
    has bf16 or fp16. Only training uses mixed precision. Outputs that are not finite
    (nan/inf logits) raise `NonFiniteOutputs`: argmax over NaNs is no accuracy.
    """
    m = evaluate_metrics(model, splits, split, device)
    return m["top1"], m["top5"]


@torch.no_grad()
def evaluate_metrics(model: nn.Module, splits: Splits, split: str, device) -> dict:
    """`evaluate`'s top-1 and top-5 and the mean cross-entropy ("nll", nats) over every
    prediction of `split`: one per image, or one per token for a causal LM, whose logits
    are (batch, tokens, vocab) against targets (batch, tokens)."""
    model.eval()
    device = torch.device(device)
    correct1 = correct5 = total = 0
    nll = 0.0
    for xb, yb in splits.batches(split, splits.eval_batch_size, device=device):
        with torch.autocast(device.type, enabled=False):  # also inside a caller's autocast
            out = logits_of(model(xb)).float()
        out, yb = _flat(out, yb)
        if not torch.isfinite(out).all():
            raise NonFiniteOutputs(split, int((~torch.isfinite(out)).any(dim=1).sum()), len(out))
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(yb.view(-1, 1))
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        nll += F.cross_entropy(out, yb, reduction="sum").item()
        total += len(yb)
    n = max(total, 1)
    return {"top1": correct1 / n, "top5": correct5 / n, "nll": nll / n}


def _flat(out: torch.Tensor, y: torch.Tensor):
    """(predictions, classes) and (predictions,): a causal LM's (batch, tokens, vocab)
    logits against (batch, tokens) targets become one prediction per token."""
    return (out.reshape(-1, out.shape[-1]), y.reshape(-1)) if out.dim() > 2 else (out, y)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, splits: Splits, device, batches: int = 20, batch_size: int = 128,
                   seed: int = 0) -> int:
    """Re-estimate every BatchNorm's running statistics on `batches` training batches, in place.

    Pruning leaves each BN with statistics measured on the unpruned network's inputs; a
    few forward passes in train mode (cumulative average, momentum=None) replace them
    without touching any weight. Only BN layers switch to train mode (dropout stays off);
    the batches are a seeded draw without augmentation. Returns the number of images seen
    (0 when the model has no BatchNorm). The model is left in eval mode.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    model.eval()
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over every batch seen
        m.train()
    gen = torch.Generator().manual_seed(seed)
    seen = 0
    try:
        for i, (xb, _) in enumerate(splits.batches("train", batch_size, shuffle=True, generator=gen, device=device,
                                                   drop_last=splits.size("train") > batch_size)):
            if i >= batches:
                break
            model(xb)
            seen += len(xb)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
    return seen


@dataclass(frozen=True)
class Latency:
    """One model's forward-pass timing: the median and its spread over the timed runs."""

    median_ms: float
    iqr_ms: float  # interquartile range (p75 - p25) of the timed runs
    runs: int
    threads: int  # intra-op threads during the measurement (torch's; onnxruntime's session)
    device: str  # as the row's `device` column: "cpu" or "cuda:<GPU name>"
    noisy: bool  # iqr_ms > noisy_rel_iqr * median_ms: too spread out to trust one figure
    runtime: str  # progprune.runtimes: what ran the forward (eager, onnxruntime, ...)
    precision: str  # fp32, fp16, bf16
    # the first model timed / this one: the median of the rounds' paired ratios, as a latency
    # target's stop rule estimates it (progprune.timing.from_times); 1.0 for the first model
    speedup: float = 1.0

    @property
    def rel_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")


def device_label(device) -> str:
    """The device a figure was measured on, as the results table's `device` column spells
    it: "cuda:<GPU name>" (the GPU model, which decides the latency), else the device type."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@torch.no_grad()
def measure_latency_stats(models, input_shape, device, batch_size: int = 1, warmup: int = 5,
                          repeats: int = 20, noisy_rel_iqr: float = 0.25, runtime: str | None = None,
                          precision: str | None = None, threads: int | None = None) -> list[Latency]:
    """Time each model's forward in `repeats` rounds after warm-up, in `runtime` at
    `precision` (progprune.runtimes) with `threads` intra-op threads (None: torch's as they
    are); per model the median, the interquartile range and whether that spread is too
    large to trust, and its speedup over the first model (the median of the rounds' paired
    ratios: the statistic a latency target stops on, so a row's latency_speedup and its
    stop rule's estimate differ only by noise). runtime/precision None: the schema's defaults
    (evaluation.runtime, ...).

    The one timer (progprune.timing.Timer), as a latency target's stop rule times: in each
    round every model the fastest of a burst of forwards, the models interleaved (the
    order reversed every other round) so that load from anything else on the machine falls
    on all alike: their ratio is what a speedup claim rests on. Each runtime's prepared
    forward returns when its result is ready (it synchronises a GPU), so the wall clock
    around it is what a caller of that runtime waits. The models are left as they were
    (eval mode).
    """
    runtime = runtime or EvaluationConfig.model_fields["runtime"].default
    precision = precision or EvaluationConfig.model_fields["precision"].default
    rt = get_runtime(runtime)
    rt.check(device, precision)
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    device = torch.device(device)
    x = torch.randn(batch_size, *input_shape, device=device)
    timer = Timer(x)
    with torch_threads(threads) as n_threads:
        runs = []
        for m in models:
            m.eval()
            runs.append(rt.prepare(m, x, device, precision, n_threads))
        for run in runs:
            timer.warm(run, warmup)
        times = timer.rounds(runs, repeats)
    label = device_label(device)
    out = []
    for t in times:
        paired = from_times(times[0], t).speedup
        median = statistics.median(t)
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else (t[0],) * 3
        iqr = q3 - q1
        out.append(Latency(median_ms=median, iqr_ms=iqr, runs=len(t), threads=n_threads, device=label,
                           noisy=len(t) < 5 or iqr > noisy_rel_iqr * median, runtime=runtime,
                           precision=precision, speedup=paired))
    return out


@dataclass
class FitResult:
    epochs: int
    best_epoch: int  # chosen on validation, -1 if no epoch ran
    best_val_top1: float | None
    seconds: float
    history: list = field(default_factory=list)  # per epoch: {"epoch", "loss", "val_top1", "lr"}


def _scheduler(opt, cfg: TrainConfig, epochs: int):
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))


def _per_step_schedule(opt, cfg: TrainConfig, total_steps: int):
    """adamw: the learning rate per batch: linear warm-up over `cfg.warmup` of the steps,
    then cosine to 0 (or multistep's milestones, in epochs turned to steps by the caller)."""
    warm = int(cfg.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        left = max(total_steps - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, left) / left))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)


def fit(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    device: torch.device,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
    select_best: bool = True,
    stage: str = "training",
) -> FitResult:
    """Train `model` in place with SGD + momentum and cfg's schedule; keep the weights of
    the epoch with the best validation top-1 (never the test set).

    on_epoch(metrics, state) is called after every epoch; `state()` returns a dict that
    `resume=` accepts to continue from that epoch (model, optimizer, best so far); it
    holds only tensors and plain values, so it loads with weights_only=True. The schedule
    is replayed rather than stored (MultiStepLR keeps a Counter, which is not plain data).

    A non-finite loss, or weights that are no longer finite after an epoch, raise
    `TrainingDiverged` naming `stage` ("base training", "sparse learning", "fine-tune"):
    a diverged run must never pass for a finished one.
    """
    t0 = time.perf_counter()
    model.to(device)
    net = wrap(model) if wrap else model
    opt = _optimizer(net.parameters(), cfg)
    per_rank = max(1, cfg.batch_size // world_size)
    drop_last = splits.size("train") > cfg.batch_size
    # adamw steps its schedule per batch (warm-up, then cosine); sgd per epoch
    per_step = cfg.optimizer == "adamw"
    steps_per_epoch = max(1, (splits.size("train") // cfg.batch_size) if drop_last else
                          math.ceil(splits.size("train") / cfg.batch_size))
    sched = _per_step_schedule(opt, cfg, cfg.epochs * steps_per_epoch) if per_step else _scheduler(opt, cfg, cfg.epochs)
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    start_epoch, best_top1, best_epoch, best_state, history = 0, -1.0, -1, None, []
    if resume:
        model.load_state_dict(resume["model"])
        start_epoch = int(resume["epoch"]) + 1
        with warnings.catch_warnings():  # replaying the schedule, not skipping an optimizer step
            warnings.simplefilter("ignore")
            for _ in range(start_epoch * (steps_per_epoch if per_step else 1)):
                sched.step()
        # after the replay: the saved optimizer state carries the lr the schedule had reached
        opt.load_state_dict(resume["optimizer"])
        best_top1, best_epoch = float(resume["best_top1"]), int(resume["best_epoch"])
        best_state = resume.get("best_model")
        history = list(resume.get("history", []))

    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        total_loss, n = 0.0, 0
        # cfg.batch_size is the global batch: each of the world_size workers takes its share,
        # so DDP keeps the recipe's batch and learning rate (the spec checks it divides)
        for xb, yb in splits.batches("train", per_rank, shuffle=True, augment=cfg.augment, generator=gen,
                                     device=device, rank=rank, world_size=world_size, drop_last=drop_last):
            with _autocast(device):
                out, target = _flat(logits_of(net(xb)), yb)
                loss = F.cross_entropy(out, target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if after_backward:
                scaler.unscale_(opt)
                after_backward(model)
            scaler.step(opt)
            scaler.update()
            if per_step:
                sched.step()
            value = loss.item()  # CPU-GPU sync once per batch; fine at this size
            if not math.isfinite(value):
                if epoch == start_epoch and n == 0 and resume is None and not torch.isfinite(out).all():
                    # the first batch, before any update: no learning rate is to blame
                    raise NonFiniteOutputs("train", int((~torch.isfinite(out)).any(dim=1).sum()), len(out),
                                           stage=stage)
                raise TrainingDiverged(stage, epoch + 1, opt.param_groups[0]["lr"], f"loss {value}", value)
            total_loss += value * len(yb)
            n += len(yb)
        bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:  # the last step can turn weights to nan behind a finite loss
            raise TrainingDiverged(stage, epoch + 1, opt.param_groups[0]["lr"], f"non-finite weights ({bad})")
        if not per_step:
            sched.step()
        if after_epoch:
            after_epoch(epoch)
        val_top1, _ = evaluate(model, splits, "val", device)
        if val_top1 > best_top1:
            best_top1, best_epoch = val_top1, epoch
            best_state = copy.deepcopy(model.state_dict()) if select_best else None
        metrics = {"epoch": epoch, "loss": total_loss / max(n, 1), "val_top1": val_top1,
                   "lr": opt.param_groups[0]["lr"]}
        history.append(metrics)
        if on_epoch:
            on_epoch(metrics, lambda: {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "epoch": epoch, "best_top1": best_top1,
                "best_epoch": best_epoch, "best_model": best_state, "history": history,
            })
    if select_best and best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(epochs=cfg.epochs, best_epoch=best_epoch,
                     best_val_top1=None if best_epoch < 0 else best_top1,
                     seconds=time.perf_counter() - t0, history=history)


def calibration_batch(splits: Splits, device, n: int = 64, seed: int = 0):
    """A fixed batch from the training split (a seeded draw, no augmentation: evaluation's
    view of the images, at the size the model sees), for gradient-based importance."""
    gen = torch.Generator().manual_seed(seed)
    return next(iter(splits.batches("train", min(n, splits.size("train")), shuffle=True, generator=gen,
                                    device=device)))
