"""The data-set registry: the names users write in `dataset.name`, each with its loader,
its cheap check and what it reads, and the checks every data set shares.

Loaders register here (`progprune.data.memory`, `progprune.data.folder`); this module
imports neither, so there is no circle: the package's `__init__` imports them to fill it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from progprune.config import DatasetConfig
from progprune.errors import BadInput
from progprune.registry import Registry


@dataclass(frozen=True)
class Entry:
    load: Callable  # (cfg, seed) -> an object with size, batches, mean, std, input_shape, num_classes
    check: Callable[[DatasetConfig], None]  # cheap: must not load data
    num_classes: int | None  # fixed class count; None: from cfg or the files
    data_dir: bool  # reads its images from dataset.data_dir (else needs no files)
    doc: str  # one line for `progprune datasets`


DATASETS: Registry[Entry] = Registry("dataset", field="dataset.name")


def register_dataset(name: str, *, check: Callable[[DatasetConfig], None] | None = None,
                     num_classes: int | None = None, data_dir: bool = False, doc: str = ""):
    """Register `fn(cfg, seed) -> Splits` under `name`; `check(cfg)` must not load data;
    `doc`: one line for `progprune datasets`."""

    def deco(fn):
        DATASETS.register(name, Entry(fn, check or (lambda cfg: None), num_classes, data_dir, doc))
        return fn

    return deco


def list_datasets() -> list[str]:
    return DATASETS.names()


def check_dataset(cfg: DatasetConfig) -> None:
    """Cheap checks (no image is read): known name, files present, class count agrees."""
    entry = DATASETS.get(cfg.name)
    if cfg.num_classes is not None and (isinstance(cfg.num_classes, bool) or
                                        not isinstance(cfg.num_classes, int) or cfg.num_classes < 1):
        raise BadInput(f"must be a positive integer, got {cfg.num_classes!r}", field="dataset.num_classes")
    if entry.num_classes is not None:
        check_num_classes(cfg, entry.num_classes)
    entry.check(cfg)


def load_dataset(cfg: DatasetConfig, seed: int = 0):
    """Load `cfg`: `Splits` (held in memory) or `FolderSplits` (streamed), which offer the
    same interface. `seed` only affects `synthetic` (real splits are fixed)."""
    check_dataset(cfg)
    splits = DATASETS.get(cfg.name).load(cfg, seed)
    check_num_classes(cfg, splits.num_classes)
    splits.mean, splits.std = cfg.mean or splits.mean, cfg.std or splits.std  # the spec's, if set
    return splits


def check_num_classes(cfg: DatasetConfig, actual: int) -> None:
    if cfg.num_classes is not None and cfg.num_classes != actual:
        raise BadInput(
            f"{cfg.name} has {actual} classes, got {cfg.num_classes}; remove it or set it to match",
            field="dataset.num_classes")


def need_dir(cfg: DatasetConfig, expected: str) -> Path:
    """cfg.data_dir as an existing directory; `expected` words what the set reads there."""
    if not cfg.data_dir:
        raise BadInput(f"{cfg.name} reads {expected} from a directory; set its data directory", field="dataset.data_dir")
    d = Path(cfg.data_dir).expanduser()
    if not d.is_dir():
        raise BadInput(f"{d} is not a directory; {cfg.name} expects {expected} there", field="dataset.data_dir")
    return d
