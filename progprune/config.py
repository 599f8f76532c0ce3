"""Settings of one combination (model x dataset x method x seed x target speedup).

These frozen dataclasses are the contract between the CLI (`progprune prune`), the sweep
spec (`progprune sweep`) and the pipeline: both front ends build a `ComboConfig` and hand
it to the same stage functions. Hash keys derived here decide what a rerun may reuse.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "digits"
    data_dir: str | None = None  # cifar10/cifar100/imagefolder read from here, never download
    num_classes: int | None = None  # synthetic: class count; others: checked against the data
    image_size: int = 32  # imagefolder/synthetic: square side in pixels
    synthetic_samples: int = 512  # synthetic only: train samples (val/test get a quarter each)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine" or "multistep"
    milestones: tuple[int, ...] = ()  # multistep: epochs at which lr *= gamma
    gamma: float = 0.1
    augment: bool = True  # random crop with padding + horizontal flip


@dataclass(frozen=True)
class SparseConfig:
    """Sparse-learning phase, run before pruning by the regularized methods only."""

    epochs: int = 0
    lr: float = 0.01
    reg: float = 5e-4
    delta_reg: float = 1e-4  # growing_reg: regularization growth per epoch
    batch_size: int = 128
    milestones: tuple[int, ...] = ()


@dataclass(frozen=True)
class PruneConfig:
    method: str = "group_norm"
    global_pruning: bool = True
    iterative_steps: int = 400
    max_pruning_ratio: float = 1.0
    round_to: int | None = None
    tolerance: float = 0.005  # accept achieved speedup in [target, target * (1 + tolerance)]


@dataclass(frozen=True)
class ComboConfig:
    model: str
    dataset: DatasetConfig
    target_speedup: float
    prune: PruneConfig = field(default_factory=PruneConfig)
    seed: int = 0
    base: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0))
    base_checkpoint: str | None = None
    sparse: SparseConfig = field(default_factory=SparseConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0, lr=0.01))
    latency_batch_size: int = 1
    latency_repeats: int = 20
    sweep: str = ""  # display only: not part of any key

    @property
    def method(self) -> str:
        return self.prune.method

    # ---- keys deciding reuse -------------------------------------------------------
    def base_key(self) -> str:
        """Identity of the base model: same key -> the same trained (or loaded) weights."""
        return _digest(
            {
                "model": self.model,
                "dataset": dataclasses.asdict(self.dataset),
                "seed": self.seed,
                "base": dataclasses.asdict(self.base) if not self.base_checkpoint else None,
                "checkpoint": self.base_checkpoint,
            }
        )

    def sparse_key(self) -> str:
        """Identity of the sparse-learned model (base + method + SL settings)."""
        p = self.prune
        return _digest(
            {
                "base": self.base_key(),
                "method": p.method,
                "global": p.global_pruning,
                "max_ratio": p.max_pruning_ratio,
                "round_to": p.round_to,
                "sparse": dataclasses.asdict(self.sparse),
            }
        )

    def combo_id(self) -> str:
        """Stable hash of every setting that changes this combination's result row."""
        from progprune.pruning import get_method  # lazy: pruning imports this module

        d = dataclasses.asdict(self)
        d.pop("sweep")
        if not get_method(self.prune.method).sparse:
            d.pop("sparse")  # settings a method never reads must not change its identity
        return _digest(d)


def _digest(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
