"""What the stages of one combination hand each other, whatever the task: the base
model's figures (`BaseInfo`), the prune stage's (`Pruned`, around a task's own prune
record) and the fine-tune's (`Finetuned`). Each record says which row columns it measured
(`columns()`); `progprune.results.compose` lays them over one another. No torch, no Ray.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Callable

Log = Callable[[str], None]


def _noop(msg: str) -> None:
    pass


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class BaseInfo:
    source: str  # "trained", "checkpoint", "init" (0 epochs: seeded random weights) or "hf" (a causal LM's own weights)
    top1: float  # images: top-1 accuracy; causal LMs: next-token top-1
    top5: float
    val_top1: float | None
    epochs: int
    seconds: float
    perplexity: float | None = None  # causal LMs: exp(mean next-token loss) on the test split

    def columns(self) -> dict:
        cols = {"base_top1": self.top1, "base_top5": self.top5}
        return cols | ({"base_perplexity": self.perplexity} if self.perplexity is not None else {})


@dataclass
class Pruned:
    """What stage 3 hands to stage 4: the figures so far, and where the pruned model is
    stored (None while it stays in this process). `prune` is the task's prune record
    (`columns()`, `.outcome.status`, `.outcome.history`); None: the combination failed
    before stage 3 finished."""
    base: BaseInfo | None
    prune: object | None
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
            unpruned = getattr(self.prune, "unpruned_top1", None)
            if unpruned and self.base:  # the base of a sparse method is what it pruned
                cols["base_top1_pre_sparse"] = self.base.top1
                cols["base_top1"], cols["base_top5"] = unpruned
        return cols

    @property
    def status(self) -> str:
        return self.prune.outcome.status if self.prune else "failed"


@dataclass
class Finetuned:
    """What a fine-tune runner returns: test-set figures of the kept weights."""
    top1: float
    top5: float
    seconds: float
    artifact: str | None = None  # where the fine-tuned model is stored
    workers: int = 0  # Ray Train workers (0: fine-tuned in one process)
    resumed_from_epoch: int | None = None  # Ray Train restarted from this epoch's checkpoint
    perplexity: float | None = None  # causal LMs

    def columns(self) -> dict:
        cols = {"final_top1": self.top1, "final_top5": self.top5, "finetune_seconds": self.seconds,
                "finetune_workers": self.workers, "finetune_resumed_from_epoch": self.resumed_from_epoch}
        if self.perplexity is not None:
            cols["final_perplexity"] = self.perplexity
        return cols | ({"artifact_uri": self.artifact} if self.artifact else {})
