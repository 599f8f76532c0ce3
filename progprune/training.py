"""Plain PyTorch training, evaluation and latency. No Ray here.

`fit` is the one training loop: base training, sparse learning (with the pruner's
regularizer after each backward) and fine-tuning all call it, in-process for
`progprune prune` and as the body of the Ray Train worker for sweeps. Ray touches it
only through its arguments (`rank`/`world_size` for sharding, `wrap` for DDP,
`on_epoch` for reporting/checkpoints, `resume` for restarts).
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from progprune.config import TrainConfig
from progprune.data import Splits, batches


def pick_device(use_gpu: bool | None = None) -> torch.device:
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: nn.Module, x, y, splits: Splits, device, batch_size: int = 512) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (fractions) of `model` on uint8 images `x`."""
    model.eval()
    correct1 = correct5 = total = 0
    for xb, yb in batches(x, y, batch_size, mean=splits.mean, std=splits.std, device=device):
        with _autocast(device):
            out = model(xb)
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(yb.view(-1, 1))
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        total += len(yb)
    return correct1 / max(total, 1), correct5 / max(total, 1)


@torch.no_grad()
def measure_latency(models, input_shape, device, batch_size: int = 1,
                    warmup: int = 5, repeats: int = 20) -> list[float]:
    """Median wall time of one forward pass in ms for each model, after warm-up.

    The models are timed interleaved (a, b, a, b, ...) so that load from anything else on
    the machine falls on both alike: their ratio is what a speedup claim rests on.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    x = torch.randn(batch_size, *input_shape, device=device)
    for m in models:
        m.eval()
        for _ in range(warmup):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                m(x)
                end.record()
                torch.cuda.synchronize()
                times[i].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                m(x)
                times[i].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]


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
) -> FitResult:
    """Train `model` in place with SGD + momentum and cfg's schedule; keep the weights of
    the epoch with the best validation top-1 (never the test set).

    on_epoch(metrics, state) is called after every epoch; `state()` returns a dict that
    `resume=` accepts to continue from that epoch (model, optimizer, best so far); it
    holds only tensors and plain values, so it loads with weights_only=True. The schedule
    is replayed rather than stored (MultiStepLR keeps a Counter, which is not plain data).
    """
    t0 = time.perf_counter()
    model.to(device)
    net = wrap(model) if wrap else model
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=False)
    sched = _scheduler(opt, cfg, cfg.epochs)
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    start_epoch, best_top1, best_epoch, best_state, history = 0, -1.0, -1, None, []
    if resume:
        model.load_state_dict(resume["model"])
        start_epoch = int(resume["epoch"]) + 1
        with warnings.catch_warnings():  # replaying the schedule, not skipping an optimizer step
            warnings.simplefilter("ignore")
            for _ in range(start_epoch):
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
        for xb, yb in batches(splits.train_x, splits.train_y, cfg.batch_size, mean=splits.mean,
                              std=splits.std, shuffle=True, augment=cfg.augment, generator=gen,
                              device=device, rank=rank, world_size=world_size, drop_last=len(splits.train_x) > cfg.batch_size * world_size):
            with _autocast(device):
                loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if after_backward:
                scaler.unscale_(opt)
                after_backward(model)
            scaler.step(opt)
            scaler.update()
            total_loss += loss.item() * len(yb)  # CPU-GPU sync once per batch; fine at this size
            n += len(yb)
        sched.step()
        if after_epoch:
            after_epoch(epoch)
        val_top1, _ = evaluate(model, splits.val_x, splits.val_y, splits, device)
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
    """A fixed batch from the training split, for gradient-based importance."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.train_x), generator=gen)[: min(n, len(splits.train_x))]
    return next(batches(splits.train_x[idx], splits.train_y[idx], len(idx), mean=splits.mean,
                        std=splits.std, device=device))
