"""Datasets, plus a batch iterator doing augmentation as tensor ops.

A registry of loaders keyed by the name users write in `dataset.name`. Every loader returns
an object with `size(split)`, `batches(split, ...)`, `mean`, `std`, `input_shape` and
`num_classes`. digits, CIFAR and synthetic return `Splits`, images kept whole as uint8
(N, C, H, W): the set fits in (GPU) memory, and `batches()` normalises, crops and flips a
batch at a time on the device (airbench style), with no DataLoader and no per-sample
Python. imagefolder streams instead (`progprune.folder`): its images are decoded per batch.

Nothing here downloads. CIFAR is read from the standard python-pickle files with a
restricted unpickler (numpy arrays and plain containers only), so a planted pickle cannot
run code. Validation splits are fixed stratified holdouts that do not depend on the run
seed, so every run of a sweep sees the same train/val/test images.
"""
from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from progprune.config import DatasetConfig
from progprune.errors import BadInput

_SPLIT_SEED = 0  # fixed: splits must not move with the run seed


@dataclass
class Splits:
    name: str
    num_classes: int
    input_shape: tuple  # (C, H, W)
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]  # per channel, 0..1 scale
    std: tuple[float, ...]

    def size(self, split: str) -> int:
        return len(getattr(self, f"{split}_y"))

    def batches(self, split: str, batch_size: int, *, device="cpu", **kw):
        """Normalised batches of `split` ("train", "val", "test") on `device`; keywords as
        `batches()`. The interface every data set offers (see `progprune.folder` too)."""
        return batches(getattr(self, f"{split}_x"), getattr(self, f"{split}_y"), batch_size,
                       mean=self.mean, std=self.std, device=device, **kw)


@dataclass(frozen=True)
class _Entry:
    load: Callable[[DatasetConfig, int], Splits]
    check: Callable[[DatasetConfig], None]
    num_classes: int | None  # fixed class count; None: from cfg or the files


DATASETS: dict[str, _Entry] = {}


def register_dataset(name: str, *, check: Callable[[DatasetConfig], None] | None = None,
                     num_classes: int | None = None):
    """Register `fn(cfg, seed) -> Splits` under `name`; `check(cfg)` must not load data."""

    def deco(fn):
        assert name not in DATASETS, f"dataset {name!r} registered twice"
        DATASETS[name] = _Entry(fn, check or (lambda cfg: None), num_classes)
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def check_dataset(cfg: DatasetConfig) -> None:
    """Cheap checks (no image is read): known name, files present, class count agrees."""
    entry = _entry(cfg.name)
    if cfg.num_classes is not None and (isinstance(cfg.num_classes, bool) or
                                        not isinstance(cfg.num_classes, int) or cfg.num_classes < 1):
        raise BadInput(f"must be a positive integer, got {cfg.num_classes!r}", field="dataset.num_classes")
    if entry.num_classes is not None:
        _check_num_classes(cfg, entry.num_classes)
    entry.check(cfg)


def load_dataset(cfg: DatasetConfig, seed: int = 0) -> Splits:
    """Load `cfg` as uint8 tensors. `seed` only affects `synthetic` (real splits are fixed)."""
    check_dataset(cfg)
    splits = DATASETS[cfg.name].load(cfg, seed)
    _check_num_classes(cfg, splits.num_classes)
    splits.mean, splits.std = cfg.mean or splits.mean, cfg.std or splits.std  # the spec's, if set
    return splits


def _entry(name: str) -> _Entry:
    if name not in DATASETS:
        raise BadInput(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}", field="dataset.name")
    return DATASETS[name]


def _check_num_classes(cfg: DatasetConfig, actual: int) -> None:
    if cfg.num_classes is not None and cfg.num_classes != actual:
        raise BadInput(
            f"{cfg.name} has {actual} classes, got {cfg.num_classes}; remove it or set it to match",
            field="dataset.num_classes")


# ---- batches -------------------------------------------------------------------------


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, mean, std, shuffle: bool = False,
            augment: bool = False, generator: torch.Generator | None = None, device="cpu",
            rank: int = 0, world_size: int = 1, drop_last: bool = False,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalised float x, int64 y) batches on `device` from uint8 `x`.

    Shuffling draws one permutation from `generator` (a CPU generator): ranks that seed it
    alike agree on it. With `world_size > 1` rank r takes positions r, r+W, ... of that
    permutation, like DistributedSampler: shards are disjoint and equal; the tail is wrapped
    around to pad the last shard (drop_last=False) or trimmed (drop_last=True, which also
    drops an incomplete last batch). Augmentation is a random crop of the image padded by 4
    (reflect; zeros below 5 pixels) and a horizontal flip, drawn per sample from `generator` and applied as batched tensor ops.
    """
    idx = sample_order(len(x), batch_size, shuffle=shuffle, generator=generator, rank=rank,
                       world_size=world_size, drop_last=drop_last)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    idx = idx.to(x.device)
    for start in range(0, len(idx), batch_size):
        b = idx[start:start + batch_size]
        xb = x[b].to(device, non_blocking=True).float()
        if augment:
            xb = _augment(xb, generator)
        yield (xb - mean_t) / std_t, y[b.to(y.device)].to(device, non_blocking=True)


def sample_order(n: int, batch_size: int, *, shuffle: bool = False, generator=None, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> torch.Tensor:
    """The positions rank `rank` visits in one epoch over `n` samples, in order (see
    `batches`); its length is a multiple of batch_size when drop_last."""
    if batch_size < 1:
        raise BadInput(f"batch_size: must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise BadInput(f"rank: must be in [0, world_size={world_size}), got {rank}")
    idx = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        total = per_rank * world_size
        if total > n:
            idx = idx.repeat(math.ceil(total / n))
        idx = idx[:total][rank::world_size]
    return idx[:(len(idx) // batch_size) * batch_size] if drop_last else idx


def _augment(x: torch.Tensor, generator: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    # draw on the CPU generator (reproducible, shared across ranks), then move the few ints
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    mode = "reflect" if min(h, w) > pad else "constant"  # reflect needs pad < side
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = torch.where(flip[:, None], dx[:, None] + torch.arange(w - 1, -1, -1, device=x.device),
                       dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]  # crop and flip in one gather


# ---- helpers ---------------------------------------------------------------------------


def _stratified_order(y: np.ndarray, seed: int = _SPLIT_SEED) -> np.ndarray:
    """A permutation of range(len(y)) whose every prefix is (nearly) stratified.

    Within each class the samples are shuffled; sample with rank r in a class of n_c is
    keyed (r + 0.5) / n_c, so any prefix holds round(frac * n_c) +- 1 of each class, even
    for classes too small for sklearn's stratified splitter.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    keys = np.empty(len(y))
    for c in np.unique(y):
        members = perm[y[perm] == c]
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    return perm[np.argsort(keys[perm], kind="stable")]


def _split(x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...]):
    """Stratified, fixed split: returns [part of size sizes[0], ..., rest] as (x, y) pairs."""
    order = torch.from_numpy(_stratified_order(y.numpy()))
    parts, start = [], 0
    for s in (*sizes, len(y) - sum(sizes)):
        sel = order[start:start + s].sort().values
        parts.append((x[sel], y[sel]))
        start += s
    return parts


def _mean_std(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float().div_(255).transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(xf.mean(1).tolist()), tuple(xf.std(1).clamp_min(1e-3).tolist())


def _need_dir(cfg: DatasetConfig, expected: str) -> Path:
    if not cfg.data_dir:
        raise BadInput(f"{cfg.name} reads {expected} from a directory; set its data directory", field="dataset.data_dir")
    d = Path(cfg.data_dir).expanduser()
    if not d.is_dir():
        raise BadInput(f"{d} is not a directory; {cfg.name} expects {expected} there", field="dataset.data_dir")
    return d


# ---- digits ----------------------------------------------------------------------------


@register_dataset("digits", num_classes=10)
def _load_digits(cfg: DatasetConfig, seed: int) -> Splits:
    """scikit-learn's 1,797 8x8 digits, upsampled to 3 x image_size x image_size (default
    32); fixed 70/15/15 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.from_numpy(d.images).float().mul_(255 / 16)[:, None]  # 0..16 -> 0..255
    s = cfg.image_size
    img = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False)
    x = img.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    n_hold = round(0.15 * len(y))
    (test_x, test_y), (val_x, val_y), (train_x, train_y) = _split(x, y, (n_hold, n_hold))
    mean, std = _mean_std(train_x)
    return Splits("digits", 10, (3, s, s), train_x, train_y, val_x, val_y, test_x, test_y, mean, std)


# ---- CIFAR -----------------------------------------------------------------------------

_CIFAR = {  # files, label key, class count, normalisation of Torch-Pruning's recipes
    "cifar10": dict(train=[f"data_batch_{i}" for i in range(1, 6)], test="test_batch", meta="batches.meta",
                    label=b"labels", classes=10,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),
    "cifar100": dict(train=["train"], test="test", meta="meta", label=b"fine_labels", classes=100,
                     mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
}

_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    *(("builtins", t) for t in ("list", "dict", "tuple", "set", "frozenset", "bytearray",
                                "bytes", "str", "int", "float", "complex", "bool", "slice")),
    *(("__builtin__", t) for t in ("list", "dict", "tuple", "set", "frozenset", "bytearray",
                                   "bytes", "str", "int", "float", "complex", "bool", "slice")),
}


class _DataUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _DataUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as e:  # any parse failure is a bad file, not a bug here
        raise BadInput(f"{path}: not a CIFAR python-pickle data file ({e}); "
                             "use the 'python version' archive from cs.toronto.edu/~kriz") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a dict in a CIFAR pickle, got {type(obj).__name__}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _check_cifar(cfg: DatasetConfig) -> None:
    spec = _CIFAR[cfg.name]
    files = [*spec["train"], spec["test"], spec["meta"]]
    d = _need_dir(cfg, ", ".join(files))
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise BadInput(
            f"{d} lacks {', '.join(missing)} for {cfg.name} (expected "
            f"{', '.join(files)}: the extracted 'python version' archive; progprune never downloads)",
            field="dataset.data_dir")


def _cifar_arrays(path: Path, label_key: bytes, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _read_pickle(path)
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError) as e:
        raise BadInput(f"{path}: malformed CIFAR batch ({e!r}); expected b'data' (N x 3072 uint8) "
                             f"and {label_key!r}") from None
    if len(labels) != len(data) or (len(labels) and not 0 <= labels.min() <= labels.max() < classes):
        raise BadInput(f"{path}: {len(data)} images but {len(labels)} labels, or labels outside 0..{classes - 1}")
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def _load_cifar(cfg: DatasetConfig, seed: int) -> Splits:
    spec = _CIFAR[cfg.name]
    d = Path(cfg.data_dir).expanduser()
    _read_pickle(d / spec["meta"])  # validates the meta file the same way
    parts = [_cifar_arrays(d / f, spec["label"], spec["classes"]) for f in spec["train"]]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_x, test_y = _cifar_arrays(d / spec["test"], spec["label"], spec["classes"])
    x, test_x = _resize(x, cfg.image_size), _resize(test_x, cfg.image_size)
    (val_x, val_y), (train_x, train_y) = _split(x, y, (round(0.1 * len(y)),))
    s = cfg.image_size
    return Splits(cfg.name, spec["classes"], (3, s, s), train_x, train_y, val_x, val_y,
                  test_x, test_y, spec["mean"], spec["std"])


def _resize(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, H, W) images resized to size x size (bilinear, antialiased), a chunk at
    a time so the float copy stays small; unchanged when already that size."""
    if x.shape[-2:] == (size, size):
        return x
    return torch.cat([F.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
                      for part in x.split(chunk)]) if len(x) else x.new_zeros((0, x.shape[1], size, size))


register_dataset("cifar10", check=_check_cifar, num_classes=10)(_load_cifar)
register_dataset("cifar100", check=_check_cifar, num_classes=100)(_load_cifar)


# ---- synthetic -------------------------------------------------------------------------


def _check_synthetic(cfg: DatasetConfig) -> None:
    if cfg.num_classes is not None and cfg.num_classes < 2:
        raise BadInput(f"synthetic needs >= 2 classes, got {cfg.num_classes}", field="dataset.num_classes")
    if cfg.image_size < 1:
        raise BadInput(f"must be >= 1, got {cfg.image_size}", field="dataset.image_size")
    if cfg.synthetic_samples < 1:
        raise BadInput(f"must be >= 1, got {cfg.synthetic_samples}", field="dataset.synthetic_samples")


@register_dataset("synthetic", check=_check_synthetic)
def _load_synthetic(cfg: DatasetConfig, seed: int) -> Splits:
    """Seeded noise around one random prototype per class: learnable, for smoke tests only."""
    k, s, n = cfg.num_classes or 10, cfg.image_size, cfg.synthetic_samples
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 256, (k, 3, s, s), generator=g).float()

    def draw(m):
        y = torch.randint(0, k, (m,), generator=g)
        noise = torch.randint(0, 256, (m, 3, s, s), generator=g).float()
        return (0.6 * protos[y] + 0.4 * noise).round_().to(torch.uint8), y

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = draw(n), draw(max(1, n // 4)), draw(max(1, n // 4))
    mean, std = _mean_std(train_x)
    return Splits("synthetic", k, (3, s, s), train_x, train_y, val_x, val_y, test_x, test_y, mean, std)


import progprune.folder  # noqa: E402,F401 - registers imagefolder (it streams; see that module)
