"""The data-set registry: the names users write in `dataset.name`, each with its loader,
its cheap check and what it reads, and the checks every data set shares.

Loaders register here (`progprune.data.memory`, `progprune.data.folder`); this module
imports neither, so there is no circle: the package's `__init__` imports them to fill it.
"""
from __future__ import annotations

import math
import os
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
    num_classes: int | Callable[[DatasetConfig], int] | None  # fixed, or from cfg/files (cheap); None: unknown
    data_dir: bool  # reads its images from dataset.data_dir (else needs no files)
    doc: str  # one line for `progprune datasets`
    # held in memory: the bytes its loader needs at its peak (images held + what loading
    # copies), from cfg alone; None: streamed (or unknown), nothing to estimate
    memory: Callable[[DatasetConfig], int] | None = None
    # reads the set's files to check them (what `check` is too cheap to see: a corrupt
    # CIFAR pickle), without building the set; `load_dataset` calls it up front
    verify: Callable[[DatasetConfig], object] | None = None

    def classes(self, cfg: DatasetConfig) -> int | None:
        return self.num_classes(cfg) if callable(self.num_classes) else self.num_classes


DATASETS: Registry[Entry] = Registry("dataset", field="dataset.name")


def register_dataset(name: str, *, check: Callable[[DatasetConfig], None] | None = None,
                     num_classes: int | Callable[[DatasetConfig], int] | None = None, data_dir: bool = False,
                     memory: Callable[[DatasetConfig], int] | None = None,
                     verify: Callable[[DatasetConfig], object] | None = None, doc: str = ""):
    """Register `fn(cfg, seed) -> Splits` under `name`; `check(cfg)` must not load data;
    `num_classes`: the class count, or `f(cfg)` working it out cheaply; `memory(cfg)`: the
    bytes an in-memory set needs at its peak (refused up front when they cannot fit);
    `verify(cfg)`: reads the files to check them, for `load_dataset` to call up front;
    `doc`: one line for `progprune datasets`."""

    def deco(fn):
        DATASETS.register(name, Entry(fn, check or (lambda cfg: None), num_classes, data_dir, doc, memory, verify))
        return fn

    return deco


def list_datasets() -> list[str]:
    return DATASETS.names()


def check_dataset(cfg: DatasetConfig, files: bool = True) -> None:
    """Cheap checks (no data set is loaded): known name, a data_dir only where the set
    reads one, memory enough to hold an in-memory set, and with `files` the set's own
    checks (files present, class count agrees, each split has a readable image)."""
    entry = DATASETS.get(cfg.name)
    if cfg.num_classes is not None and (isinstance(cfg.num_classes, bool) or
                                        not isinstance(cfg.num_classes, int) or cfg.num_classes < 1):
        raise BadInput(f"must be a positive integer, got {cfg.num_classes!r}", field="dataset.num_classes")
    if cfg.data_dir and not entry.data_dir:  # recorded, never read: the user meant another set
        readers = ", ".join(n for n, e in DATASETS.items() if e.data_dir)
        raise BadInput(f"{cfg.name} reads no files, so {cfg.data_dir} would be ignored; remove it, or "
                       f"name the data set that reads it ({readers})", field="dataset.data_dir")
    if isinstance(entry.num_classes, int):
        check_num_classes(cfg, entry.num_classes)
    if entry.memory is not None:
        check_memory(cfg, entry.memory)
    if files or not (entry.data_dir and cfg.data_dir):  # without files: that it is set, at least
        entry.check(cfg)


def load_dataset(cfg: DatasetConfig, seed: int = 0) -> "Dataset":
    """`cfg`'s data set, checked (`check_dataset`, and its files read by its `verify`); its
    images load at first use (see `Dataset`). `seed` only affects `synthetic` (real splits
    are fixed)."""
    check_dataset(cfg)
    verify = DATASETS.get(cfg.name).verify
    if verify is not None:
        verify(cfg)
    return Dataset(cfg, seed)


class Dataset:
    """A data set: its shape at once, its images at first use.

    `name`, `num_classes` and `input_shape` come from the config (a folder's from its class
    folders), so what needs only them (a sweep driver's checks, its dry run) never
    materialises an image. Any other attribute (`size`, `batches`, `mean`, `std`, the
    tensors) loads the set once, through its registered loader: `Splits` (held in memory)
    or `FolderSplits` (streamed), which offer the same interface; `loaded` is that object.
    """

    def __init__(self, cfg: DatasetConfig, seed: int = 0):
        self._cfg, self._seed, self._loaded = cfg, seed, None
        self.name = cfg.name
        self.num_classes = DATASETS.get(cfg.name).classes(cfg)
        self.input_shape = (3, cfg.image_size, cfg.image_size)
        if self.num_classes is None:  # a loader registered without a class count: ask it
            self.num_classes = self.loaded.num_classes

    @property
    def loaded(self):
        if self._loaded is None:
            cfg = self._cfg
            splits = DATASETS.get(cfg.name).load(cfg, self._seed)
            check_num_classes(cfg, splits.num_classes)
            splits.mean, splits.std = cfg.mean or splits.mean, cfg.std or splits.std  # the spec's, if set
            splits.eval_batch_size = cfg.eval_batch_size
            self._loaded = splits
        return self._loaded

    def __getattr__(self, name):  # only for what __init__ did not set
        if name.startswith("_"):  # copy/pickle probes, and _loaded before __init__ ran
            raise AttributeError(name)
        return getattr(self.loaded, name)


def check_num_classes(cfg: DatasetConfig, actual: int) -> None:
    if cfg.num_classes is not None and cfg.num_classes != actual:
        raise BadInput(
            f"{cfg.name} has {actual} classes, got {cfg.num_classes}; remove it or set it to match",
            field="dataset.num_classes")


def check_memory(cfg: DatasetConfig, memory: Callable[[DatasetConfig], int]) -> None:
    """An in-memory set needing `memory(cfg)` bytes (at its loader's peak) must fit in half
    of this machine's memory (the rest: the models, batches, workers); else one line with
    the figures and what to change, before any work."""
    have, need = machine_memory(), memory(cfg)
    if need <= have // 2:
        return
    s = cfg.image_size
    fits = max(1, math.isqrt(int(s * s * (have // 2) / need)))  # the bytes grow with the pixels
    while fits > 1 and memory(cfg.model_copy(update={"image_size": fits})) > have // 2:
        fits -= 1
    more = ", fewer dataset.synthetic_samples" if cfg.name == "synthetic" else ""
    raise BadInput(f"{cfg.name} at {s} px is held in memory: about {_gb(need)} while it loads, more than "
                   f"half of this machine's {_gb(have)}; use an image size <= {fits}{more}, or an image "
                   "folder (imagefolder streams its images from disk)", field="dataset.image_size")


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's (cgroup) limit."""
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            have = min(have, int(text))
    return have


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def need_dir(cfg: DatasetConfig, expected: str) -> Path:
    """cfg.data_dir as an existing directory; `expected` words what the set reads there."""
    if not cfg.data_dir:
        raise BadInput(f"{cfg.name} reads {expected} from a directory; set its data directory", field="dataset.data_dir")
    d = Path(cfg.data_dir).expanduser()
    if not d.is_dir():
        raise BadInput(f"{d} is not a directory; {cfg.name} expects {expected} there", field="dataset.data_dir")
    return d
