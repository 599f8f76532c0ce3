"""Tiny datasets written in the real on-disk formats, for tests anywhere in the suite.

`write_cifar10(dir)` / `write_cifar100(dir)` write the python-pickle layout of the
'python version' archives (dicts with bytes keys, b'data' an N x 3072 uint8 array);
`write_imagefolder(dir)` writes train/val[/test]/<class>/*.png|jpg. Each returns the
directory to put in `DatasetConfig.data_dir`.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np


def _batch(rng, n: int, label_key: bytes, classes: int, name: bytes) -> dict:
    labels = [int(i % classes) for i in range(n)]
    rng.shuffle(labels)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {b"batch_label": name, label_key: labels, b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, per_batch: int = 10, n_test: int = 20, seed: int = 0) -> Path:
    """5 train batches of `per_batch` images (labels cycle 0..9), a test batch and meta."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        _dump(_batch(rng, per_batch, b"labels", 10, f"training batch {i} of 5".encode()), root / f"data_batch_{i}")
    _dump(_batch(rng, n_test, b"labels", 10, b"testing batch 1 of 1"), root / "test_batch")
    _dump({b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer",
                                                  "dog", "frog", "horse", "ship", "truck")],
           b"num_cases_per_batch": per_batch, b"num_vis": 3072}, root / "batches.meta")
    return root


def write_cifar100(root, n_train: int = 60, n_test: int = 20, used_classes: int = 20, seed: int = 0) -> Path:
    """`train`, `test`, `meta`; fine labels cycle over the first `used_classes` of 100."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        b = _batch(rng, n, b"fine_labels", used_classes, name.encode())
        b[b"coarse_labels"] = [lab // 5 for lab in b[b"fine_labels"]]
        _dump(b, root / name)
    _dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
           b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, root / "meta")
    return root


def write_imagefolder(root, classes=("cat", "dog", "frog"), n_train: int = 4, n_val: int = 2,
                      n_test: int = 0, size=(20, 14), seed: int = 0) -> Path:
    """PNG images (one JPEG per class in train) of `size` (w, h) under train/val[/test]."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for cls in classes if n else ():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                ext = "jpg" if split == "train" and i == 0 else "png"
                Image.fromarray(arr).save(d / f"{i}.{ext}")
            (d / "notes.txt").write_text("not an image; must be skipped")
    return root


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(path, marker) -> Path:
    """A pickle that would run `touch marker` via os.system if unpickled naively."""
    path = Path(path)
    _dump({b"data": _Exploit(Path(marker)), b"labels": [0]}, path)
    return path
