"""The task seam: what a combination's stages need from what is being pruned.

A task owns its data, its loss and metrics, its base model, how it prunes (which layers
stay whole, the example input it traces and counts with), and how its models are saved
and reloaded. The pipeline (`progprune.pipeline`), the Ray layer (`progprune.cluster`), the
store and the report call a task through `Task` and know nothing image- or text-specific.
Tasks register in `TASKS` (the spec's `task:`; `progprune models` lists each); the package's
`__init__` imports them to fill it, so this module imports neither.
"""
from __future__ import annotations

from progprune.config import ComboConfig
from progprune.records import BaseInfo, Log, _noop
from progprune.registry import Registry


def needs_sparse(cfg: ComboConfig) -> bool:
    """Whether the combination learns sparsity before pruning (regularised methods)."""
    return cfg.sparse is not None and cfg.sparse.epochs > 0


class Task:
    """One kind of model and data. Every stage takes the combination's settings, the
    task's data object (`load_data`) and a device; models are plain torch modules."""

    name: str = ""
    doc: str = ""
    base_info: type = BaseInfo  # the base stage's record (rebuilt from a stored base's meta)

    def load_data(self, cfg: ComboConfig):
        """The data object every stage reads: `num_classes`, `input_shape`, `size(split)`,
        `batches(split, ...)` (x, y) as `progprune.training.fit` consumes them."""
        raise NotImplementedError

    def base_stage(self, cfg: ComboConfig, data, device, log: Log = _noop):
        """(model, BaseInfo): the base model, loaded or trained, measured on the test split."""
        raise NotImplementedError

    def sparse_stage(self, cfg: ComboConfig, model, data, device, log: Log = _noop):
        return None

    def prune_stage(self, cfg: ComboConfig, model, data, device, log: Log = _noop):
        """Prune `model` in place to the target; the record (`columns()`, `.outcome`)."""
        raise NotImplementedError

    def finetune_stage(self, cfg: ComboConfig, model, data, device, log: Log = _noop, on_epoch=None, **fit_kwargs):
        """Fine-tune in place (`progprune.training.fit`'s keywords: Ray Train's rank,
        world_size, wrap, resume); the FitResult."""
        raise NotImplementedError

    def evaluate(self, model, data, split: str, device) -> dict:
        """{"top1", "top5"} and any of the task's own figures ("perplexity")."""
        raise NotImplementedError

    def save(self, path: str, model, cfg: ComboConfig, data, history=None, meta=None) -> str:
        raise NotImplementedError

    def load(self, path: str, cfg: ComboConfig, data):
        """(model, info dict with "meta" and "pruning_history") from what `save` wrote."""
        raise NotImplementedError

    def preflight(self, spec) -> int:
        """A sweep driver's checks before any task starts (SpecError); the class count rows
        of combinations that fail before they measure it carry."""
        raise NotImplementedError

    def run_meta(self, cfg: ComboConfig, data) -> dict:
        """What a run's artifact records beside its weights (exports carry it on)."""
        return {"combo_id": cfg.combo_id()}


TASKS: Registry[Task] = Registry("task", field="task")


def get_task(name: str) -> Task:
    return TASKS.get(name)


def task_of(cfg: ComboConfig) -> Task:
    return TASKS.get(cfg.task)
