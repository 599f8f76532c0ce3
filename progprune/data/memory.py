"""The data sets held whole in memory: digits, CIFAR-10/100 and synthetic.

Each loader returns `Splits`, images kept whole as uint8 (N, C, H, W): the set fits in (GPU)
memory, and `batches()` normalises, crops and flips a batch at a time on the device
(airbench style), with no DataLoader and no per-sample Python.

Nothing here downloads. CIFAR is read from the standard python-pickle files with a
restricted unpickler (numpy arrays and plain containers only), so a planted pickle cannot
run code. Validation splits are fixed stratified holdouts that do not depend on the run
seed, so every run of a sweep sees the same train/val/test images.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from progprune.config import DatasetConfig
from progprune.data._registry import need_dir, register_dataset
from progprune.data.batches import batches
from progprune.errors import BadInput

_SPLIT_SEED = 0  # fixed: splits must not move with the run seed
_CHUNK_BYTES = 16 * 2**20  # at most this much is converted at a time (resizing, drawing, statistics)
# what the chunks cost beyond the images: their temporaries, and what malloc keeps of them
_CHUNKS_KEPT = 8 * _CHUNK_BYTES


def _chunk(size: int, bytes_per_value: int = 4) -> int:
    """Images of 3 x size x size per chunk of at most _CHUNK_BYTES, at `bytes_per_value` (>= 1)."""
    return max(1, _CHUNK_BYTES // (bytes_per_value * 3 * size * size))


def _fill(n: int, channels: int, size: int, make, bytes_per_value: int) -> torch.Tensor:
    """uint8 (n, channels, size, size) images, made a chunk at a time: `make(start, stop)`
    returns those images as floats (0..255), rounded and clamped here. Memory: the result
    plus one chunk of `make`'s temporaries (`bytes_per_value` a value), never a float copy
    of the whole set."""
    out = torch.empty((n, channels, size, size), dtype=torch.uint8)
    step = _chunk(size, bytes_per_value)
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[start:stop] = make(start, stop).round_().clamp_(0, 255)
    return out


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
    eval_batch_size: int | None = None  # dataset.eval_batch_size, set by load_dataset

    def size(self, split: str) -> int:
        return len(getattr(self, f"{split}_y"))

    def batches(self, split: str, batch_size: int, *, device="cpu", **kw):
        """Normalised batches of `split` ("train", "val", "test") on `device`; keywords as
        `batches()`. The interface every data set offers (see `progprune.data.folder` too)."""
        return batches(getattr(self, f"{split}_x"), getattr(self, f"{split}_y"), batch_size,
                       mean=self.mean, std=self.std, device=device, **kw)


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
    """Per-channel mean and std (ddof=1) of uint8 images on the 0..1 scale, summed a chunk
    at a time in float64 (no float copy of the whole set)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in x.split(max(1, _chunk(x.shape[-1]) // 2)):  # float64: twice the bytes
        p = part.transpose(0, 1).reshape(x.shape[1], -1).double().div_(255)
        total += p.sum(1)
        squares += p.square_().sum(1)
        del p  # before the next chunk's
    n = x.numel() // x.shape[1]
    var = (squares - total * total / n) / max(n - 1, 1)
    return tuple((total / n).tolist()), tuple(var.clamp_min(0).sqrt().clamp_min(1e-3).tolist())


# ---- digits ----------------------------------------------------------------------------


DIGITS = 1797


@register_dataset("digits", num_classes=10, memory=lambda cfg: 4 * DIGITS * cfg.image_size ** 2 + _CHUNKS_KEPT,
                  doc="scikit-learn's 1,797 8x8 digits, upsampled; no files needed")
def _load_digits(cfg: DatasetConfig, seed: int) -> Splits:
    """scikit-learn's 1,797 8x8 digits, upsampled to 3 x image_size x image_size (default
    32); fixed 70/15/15 split. Peak memory: the one grey channel plus the three of the
    splits cut from it (4 bytes a pixel), and one chunk of floats."""
    from sklearn.datasets import load_digits

    d = load_digits()
    s = cfg.image_size
    small = torch.from_numpy(d.images).float().mul_(255 / 16)[:, None]  # 0..16 -> 0..255
    grey = _fill(len(small), 1, s, lambda a, b: F.interpolate(small[a:b], size=(s, s), mode="bilinear",
                                                              align_corners=False), 4)
    x = grey.expand(-1, 3, -1, -1)  # RGB, copied only by the split
    y = torch.from_numpy(d.target).long()
    n_hold = round(0.15 * len(y))
    (test_x, test_y), (val_x, val_y), (train_x, train_y) = _split(x, y, (n_hold, n_hold))
    mean, std = _mean_std(train_x)
    return Splits("digits", 10, (3, s, s), train_x, train_y, val_x, val_y, test_x, test_y, mean, std)


# ---- CIFAR -----------------------------------------------------------------------------

CIFAR_IMAGES, CIFAR_TRAIN = 60_000, 50_000  # both CIFARs: 50,000 train + 10,000 test
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
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises nearly any type: a bad file
        raise BadInput(f"{path}: not a CIFAR python-pickle data file ({e}); "
                       "use the 'python version' archive from cs.toronto.edu/~kriz") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a dict in a CIFAR pickle, got {type(obj).__name__}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _check_cifar(cfg: DatasetConfig) -> None:
    spec = _CIFAR[cfg.name]
    files = [*spec["train"], spec["test"], spec["meta"]]
    d = need_dir(cfg, ", ".join(files))
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
    if len(labels) != len(data):
        raise BadInput(f"{path}: {len(data)} images but {len(labels)} labels; each image needs one label "
                       "(replace the file with the archive's)")
    if len(labels) and not 0 <= labels.min() <= labels.max() < classes:
        bad = labels[(labels < 0) | (labels >= classes)]
        raise BadInput(f"{path}: {len(bad)} of {len(labels)} labels are outside 0..{classes - 1} (first: "
                       f"{int(bad[0])}); replace the file with the archive's")
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def _read_cifar(cfg: DatasetConfig):
    """The 32-px train and test images and labels, every file checked (also what
    `load_dataset` reads up front: bad files are refused before any work)."""
    spec = _CIFAR[cfg.name]
    d = Path(cfg.data_dir).expanduser()
    _read_pickle(d / spec["meta"])  # validates the meta file the same way
    parts = [_cifar_arrays(d / f, spec["label"], spec["classes"]) for f in spec["train"]]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return x, y, *_cifar_arrays(d / spec["test"], spec["label"], spec["classes"])


def _load_cifar(cfg: DatasetConfig, seed: int) -> Splits:
    spec = _CIFAR[cfg.name]
    x, y, test_x, test_y = _read_cifar(cfg)
    x, test_x = _resize(x, cfg.image_size), _resize(test_x, cfg.image_size)
    (val_x, val_y), (train_x, train_y) = _split(x, y, (round(0.1 * len(y)),))
    s = cfg.image_size
    return Splits(cfg.name, spec["classes"], (3, s, s), train_x, train_y, val_x, val_y,
                  test_x, test_y, spec["mean"], spec["std"])


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) images resized to size x size (bilinear, antialiased), a chunk at
    a time so the float copy stays small; unchanged when already that size."""
    if x.shape[-2:] == (size, size):
        return x
    return _fill(len(x), x.shape[1], size, lambda a, b: F.interpolate(
        x[a:b].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False), 4)


def _cifar_memory(cfg: DatasetConfig) -> int:
    """Peak bytes: the 32-px originals (and their pickles), the resized images, and the
    train/val splits cut from the resized training images."""
    return 2 * CIFAR_IMAGES * 3 * 32 * 32 + (CIFAR_IMAGES + CIFAR_TRAIN) * 3 * cfg.image_size ** 2 + _CHUNKS_KEPT


for _name, _classes in (("cifar10", 10), ("cifar100", 100)):
    register_dataset(_name, check=_check_cifar, num_classes=_classes, data_dir=True, memory=_cifar_memory,
                     verify=_read_cifar,
                     doc=f"CIFAR-{_classes}, the extracted 'python version' archive in data_dir")(_load_cifar)


# ---- synthetic -------------------------------------------------------------------------


def _check_synthetic(cfg: DatasetConfig) -> None:
    if cfg.num_classes is not None and cfg.num_classes < 2:
        raise BadInput(f"synthetic needs >= 2 classes, got {cfg.num_classes}", field="dataset.num_classes")
    if cfg.image_size < 1:
        raise BadInput(f"must be >= 1, got {cfg.image_size}", field="dataset.image_size")
    if cfg.synthetic_samples < 1:
        raise BadInput(f"must be >= 1, got {cfg.synthetic_samples}", field="dataset.synthetic_samples")


SYNTHETIC_CLASSES = 10  # when dataset.num_classes is unset


def _synthetic_sizes(cfg: DatasetConfig) -> tuple[int, int, int]:
    n = cfg.synthetic_samples
    return n, max(1, n // 4), max(1, n // 4)


def _synthetic_memory(cfg: DatasetConfig) -> int:
    """Peak bytes: the images (one byte a pixel) and the prototypes, plus one chunk of floats."""
    k = cfg.num_classes or SYNTHETIC_CLASSES
    return (sum(_synthetic_sizes(cfg)) + 4 * k) * 3 * cfg.image_size ** 2 + _CHUNKS_KEPT


@register_dataset("synthetic", check=_check_synthetic, num_classes=lambda cfg: cfg.num_classes or SYNTHETIC_CLASSES,
                  memory=_synthetic_memory,
                  doc="seeded noise around one prototype per class, for smoke tests; no files needed")
def _load_synthetic(cfg: DatasetConfig, seed: int) -> Splits:
    """Seeded noise around one random prototype per class: learnable, for smoke tests only.
    Drawn a chunk at a time straight into uint8, so memory peaks at the images' own bytes."""
    k, s = cfg.num_classes or SYNTHETIC_CLASSES, cfg.image_size
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 256, (k, 3, s, s), generator=g).float()

    def draw(m):
        y = torch.randint(0, k, (m,), generator=g)
        # chunked draws are the draws of one call; noise: uint8 + its float + the prototypes'
        noise = lambda a, b: torch.randint(0, 256, (b - a, 3, s, s), generator=g, dtype=torch.uint8).float()  # noqa: E731
        return _fill(m, 3, s, lambda a, b: noise(a, b).mul_(0.4).add_(protos[y[a:b]].mul_(0.6)), 9), y

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = map(draw, _synthetic_sizes(cfg))
    mean, std = _mean_std(train_x)
    return Splits("synthetic", k, (3, s, s), train_x, train_y, val_x, val_y, test_x, test_y, mean, std)

