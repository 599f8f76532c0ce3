"""imagefolder: a folder of images too large for memory, decoded a batch at a time.

Digits and CIFAR are held whole on the device (`progprune.data.memory`); an image folder is
streamed: a split keeps only each image's path and label, and DataLoader worker processes
decode, crop and resize the images of one batch at a time, so memory stays flat however
large the folder grows (ImageNet's 1.28 M training images would be ~190 GB decoded).

- Paths live in one numpy bytes array, not a list of Python strings: forked workers read
  it without touching reference counts, so its pages stay shared (no copy-on-write).
- The recipes are the standard ones: training takes a random-resized crop (scale
  0.08-1, aspect 3/4-4/3) resized to `image_size` plus a horizontal flip; evaluation
  resizes the shorter side to `image_size / 0.875` and takes the centre crop.
- On an accelerator, workers hand back uint8 crops (a quarter of float32's bytes through
  shared memory and over PCIe) and the device normalises the batch, as for the sets held in
  memory; pinned memory and non-blocking copies on CUDA. On the CPU the workers normalise,
  in parallel, instead of the training process.
- Each image's crop and flip are drawn from its own seed, drawn for the epoch from the
  caller's generator, so results depend on the seed, never on the number of workers.
- An unreadable image is skipped and counted (stderr names the first one); a pass over a
  split that reads no image at all is an error naming the first file.
- JPEGs much larger than the crop are decoded at a reduced scale (libjpeg's DCT scaling,
  never below the crop's resolution): photos straight from a camera cost a fraction.
"""
from __future__ import annotations

import math
import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from progprune.config import DatasetConfig
from progprune.data._registry import check_num_classes, need_dir, register_dataset
from progprune.data.batches import sample_order
from progprune.errors import BadInput, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
EVAL_CROP = 0.875  # evaluation resizes to image_size / 0.875, then centre-crops image_size
_LAYOUT = "train/<class>/<images> and val/<class>/<images> (optional test/<class>/...)"


def _class_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(class_dir: Path, skipped: list | None = None):
    """Image paths under a class folder (recursively: a folder's images sorted, then its
    subfolders sorted), a generator.

    Links are followed (images or folders on other storage are common), except where that
    would list images twice or under another label: a link to a folder that holds this
    class (`loop -> ..`: a cycle, whose listing never ended), a link into the data folder's
    splits outside this class (`x -> ../../val/dog`: another class's or split's images), and
    a folder listed already. Each skip is appended to `skipped` as (path relative to the
    split, why). Links are told apart by the directory entry (no extra call per image)."""
    split_dir = class_dir.parent
    splits = [os.path.realpath(split_dir.parent / s) for s in ("train", "val", "test")]
    own = os.path.realpath(class_dir)
    seen = {own}

    def within(real: str, d: str) -> bool:
        return real == d or real.startswith(d + os.sep)

    def foreign(real: str) -> str:  # why a link's target is not this class's ("": it is)
        if within(real, own):
            return ""
        if within(own, real):
            return "link to a folder holding this class (a cycle)"
        return "link into another class or split" if any(within(real, s) for s in splits) else ""

    def skip(path: str, why: str) -> None:
        if skipped is not None:
            skipped.append((os.path.relpath(path, split_dir), why))

    def walk(d: str):
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        subdirs = []
        for e in entries:
            link = e.is_symlink()
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append((e.path, link))
            elif e.name.lower().endswith(SUFFIXES) and not e.name.startswith("."):
                why = link and foreign(os.path.realpath(e.path))
                if why:
                    skip(e.path, why)
                else:
                    yield e.path
        for path, link in subdirs:
            real = os.path.realpath(path)
            why = (link and foreign(real)) or ("a folder listed already" if real in seen else "")
            if why:
                skip(path, why)
                continue
            seen.add(real)
            yield from walk(path)

    yield from walk(str(class_dir))


def _check_imagefolder(cfg: DatasetConfig) -> None:
    """Layout checks without decoding: splits and class folders agree, none is empty."""
    root = need_dir(cfg, _LAYOUT)
    for split in ("train", "val"):
        if not (root / split).is_dir() or not _class_dirs(root / split):
            raise BadInput(f"{root / split} is missing or has no class folders; imagefolder "
                           f"expects {_LAYOUT}", field="dataset.data_dir")
    classes = _class_dirs(root / "train")
    if len(classes) < 2:  # one class: every prediction is right, 100% top-1 means nothing
        raise BadInput(f"{root / 'train'} has {len(classes)} class folder; classification "
                       "needs at least 2", field="dataset.data_dir")
    if cfg.test_split == "test" and not (root / "test").is_dir():
        raise BadInput(f"{root / 'test'} is missing; add a test/ split, or set the test split to "
                       "val to report accuracy on the validation images", field="dataset.data_dir")
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        have = _class_dirs(root / split)
        extra, missing = sorted(set(have) - set(classes)), sorted(set(classes) - set(have))
        if extra:
            raise BadInput(f"{root / split} has classes not in train/: {_few(extra)}",
                           field="dataset.data_dir")
        if missing:  # accuracy on a subset of the classes would mislead
            raise BadInput(f"{root / split} lacks classes of train/: {_few(missing)}",
                           field="dataset.data_dir")
        empty = [c for c in classes if next(_images(root / split / c), None) is None]
        if empty:
            where, more = root / split, ""
            if len(empty) < len(classes):
                where = root / split / empty[0]
                more = f"; nor do {len(empty) - 1} more class folders" if len(empty) > 1 else ""
            raise BadInput(f"{where} holds no images ({', '.join(SUFFIXES)}){more}; add images or "
                           "remove the class from every split", field="dataset.data_dir")
        _check_readable(root / split, classes)
    check_num_classes(cfg, len(classes))


def _check_readable(split_dir: Path, classes: list[str]) -> None:
    """Some image of the split decodes: tried in listing order, so one image where the
    first reads; a split none of whose images reads is refused here, before any work (the
    pass over it would find that only after pruning or a base epoch)."""
    first, tried = None, 0
    for cls in classes:
        for path in _images(split_dir / cls):
            tried += 1
            try:
                decode(path, 8, False, 0)
                return
            except Exception as e:  # noqa: BLE001 - PIL raises many types on a bad file
                first = first or (os.path.relpath(path, split_dir), one_line(e, with_type=True))
    if first:
        raise BadInput(f"{split_dir}: none of its {tried} images could be read (first: {first[0]}: "
                       f"{first[1]}); replace or remove them", field="dataset.data_dir")


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")


def loader_workers(cfg: DatasetConfig) -> int:
    """cfg.loader_workers, else one fewer than the CPUs this process may use (Ray sets
    OMP_NUM_THREADS to a task's num_cpus), at most 16."""
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    cpus = len(os.sched_getaffinity(0))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        cpus = min(cpus, int(omp))
    return min(16, cpus - 1)


# ---- decoding (in the workers) ----------------------------------------------------------
def random_resized_crop(w: int, h: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, width, height) of a random crop covering `scale` of the area with an
    aspect ratio in `ratio` (log-uniform); ten tries, then the centre crop clamped to
    `ratio`: the algorithm of torchvision's RandomResizedCrop."""
    area, log_ratio = w * h, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    if w / h < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def centre_crop_box(w: int, h: int, size: int):
    """(left, top, width, height), in source pixels, of the centre `size` crop after the
    shorter side is resized to int(size / 0.875): torchvision's Resize + CenterCrop."""
    short = int(size / EVAL_CROP)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    scale_x, scale_y = w / nw, h / nh
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return left * scale_x, top * scale_y, size * scale_x, size * scale_y


def decode(path: str, size: int, train: bool, seed: int) -> np.ndarray:
    """One image as a uint8 (size, size, 3) array: the training crop of `seed`, or the
    evaluation crop. Any mode (grayscale, palette, RGBA, CMYK) becomes RGB."""
    from PIL import Image

    with warnings.catch_warnings(), Image.open(path) as im:
        warnings.simplefilter("ignore")  # palette transparency, EXIF quirks: converted below
        w, h = im.size
        if train:
            rng = random.Random(seed)
            left, top, cw, ch = random_resized_crop(w, h, rng)
            flip = rng.random() < 0.5
        else:
            left, top, cw, ch = centre_crop_box(w, h, size)
            flip = False
        # decode at a reduced scale where the crop keeps >= `size` pixels each way
        im.draft("RGB", (math.ceil(w * size / cw), math.ceil(h * size / ch)))
        fx, fy = im.size[0] / w, im.size[1] / h
        im = im.convert("RGB")
        box = (left * fx, top * fy, (left + cw) * fx, (top + ch) * fy)
        if train:  # crop, then resize: torchvision's resized_crop, edge pixels included
            im = im.crop(tuple(round(v) for v in box))
            box = None
        # evaluation resizes the region of the whole image (the filter sees past the crop's
        # edge, as resizing the whole image and then cropping does, at a fraction of the cost)
        out = np.asarray(im.resize((size, size), Image.BILINEAR, box=box))
    return np.ascontiguousarray(out[:, ::-1]) if flip else out.copy()  # writable, for torch


class _Images(Dataset):
    """Items are (position, seed) pairs from the epoch's sampler list. With `norm` (mean and
    std, 0..255 scale, (3, 1, 1)) each image leaves its worker normalised (float CHW), else
    as uint8 HWC for the device to normalise."""

    def __init__(self, root: str, paths: np.ndarray, labels: np.ndarray, size: int, train: bool, norm=None):
        self.root, self.paths, self.labels, self.size, self.train = root, paths, labels, size, train
        self.norm = norm

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        i, seed = item
        try:
            img = torch.from_numpy(decode(os.path.join(self.root, os.fsdecode(self.paths[i])), self.size,
                                          self.train, seed))
            label = int(self.labels[i])
        except Exception:  # noqa: BLE001 - PIL raises many types on a bad file: skipped and counted
            img, label = torch.zeros(self.size, self.size, 3, dtype=torch.uint8), -1
        if self.norm:
            img = img.permute(2, 0, 1).float().sub_(self.norm[0]).div_(self.norm[1])
        return img, label, i


# ---- the split ----------------------------------------------------------------------------
@dataclass
class FolderSplits:
    """An image folder's splits as paths + labels; `batches()` streams them. Offers the
    same interface as the in-memory `Splits` (size, batches, mean, std, input_shape)."""

    name: str
    num_classes: int
    input_shape: tuple
    mean: tuple
    std: tuple
    workers: int
    eval_batch_size: int | None = None  # dataset.eval_batch_size, set by load_dataset
    files: dict = field(default_factory=dict)  # split -> (dir, paths bytes array, labels)
    skipped: dict = field(default_factory=dict)  # split -> unreadable relative paths seen
    _reported: dict = field(default_factory=dict)

    def size(self, split: str) -> int:
        return len(self.files[split][2])

    def batches(self, split: str, batch_size: int, *, device="cpu", shuffle: bool = False,
                augment: bool = False, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1, drop_last: bool = False):
        """Normalised float batches of `split` on `device`; shuffling, sharding and
        drop_last as the in-memory sets (`progprune.data.batches.batches`); augment: the training
        crop and flip, else the evaluation crop."""
        d, paths, labels = self.files[split]
        device = torch.device(device)
        idx = sample_order(len(labels), batch_size, shuffle=shuffle, generator=generator, rank=rank,
                           world_size=world_size, drop_last=drop_last)
        # one seed per image, drawn alike on every rank (shared generator), then sharded
        seeds = (torch.randint(0, 2**62, (len(labels),), generator=generator)[idx] if augment
                 else torch.zeros(len(idx), dtype=torch.int64))
        mean = torch.tensor(self.mean, device=device).view(-1, 1, 1) * 255
        std = torch.tensor(self.std, device=device).view(-1, 1, 1) * 255
        # on an accelerator, uint8 crops cross to it (a quarter of float32's bytes) and it
        # normalises them; on the CPU the workers do, in parallel, not the training process
        on_cpu = device.type == "cpu"
        loader = DataLoader(_Images(str(d), paths, labels, self.input_shape[-1], augment, (mean, std) if on_cpu else None),
                            batch_size=batch_size, sampler=list(zip(idx.tolist(), seeds.tolist())),
                            num_workers=self.workers, pin_memory=device.type == "cuda",
                            prefetch_factor=(2 if on_cpu else 4) if self.workers else None)  # batches ahead
        seen = 0
        try:
            for x, y, pos in loader:
                ok = y >= 0
                if not ok.all():
                    self.skipped.setdefault(split, set()).update(os.fsdecode(paths[i]) for i in pos[~ok].tolist())
                    x, y = x[ok], y[ok]
                    if not len(y):
                        continue
                seen += len(y)
                if not on_cpu:
                    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()
                    x = x.sub_(mean).div_(std)  # in place: a new tensor
                yield x, y.to(device, non_blocking=True)
        finally:
            self._report(split, d)
        if not seen and len(idx):
            bad = sorted(self.skipped.get(split, ()))
            raise BadInput(f"{d}: none of its {len(labels)} images could be read (first: {bad[0]}: "
                           f"{_why(d / bad[0])}); replace or remove them", field="dataset.data_dir")

    def _report(self, split: str, d: Path) -> None:
        bad = self.skipped.get(split, set())
        if len(bad) > self._reported.get(split, 0):  # once per new file, not every epoch
            self._reported[split] = len(bad)
            first = sorted(bad)[0]
            print(f"imagefolder: skipped {len(bad)} unreadable image(s) of {self.size(split)} in {d} "
                  f"(first: {first}: {_why(d / first)})", file=sys.stderr, flush=True)


def _why(path: Path) -> str:
    try:
        decode(str(path), 8, False, 0)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on a bad file: its reason, for the message
        return one_line(e, with_type=True)
    return "read on retry"


def _listing(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    paths, labels, skipped = [], [], []
    for label, cls in enumerate(classes):
        found = [os.fsencode(os.path.relpath(p, split_dir)) for p in _images(split_dir / cls, skipped)]
        paths += found
        labels += [label] * len(found)
    if skipped:
        print(f"imagefolder: skipped {len(skipped)} link(s) or folder(s) in {split_dir} that would list images "
              f"twice or under another label (first: {skipped[0][0]}: {skipped[0][1]}); links may point within "
              "their class folder or outside the data folder",
              file=sys.stderr, flush=True)
    return np.array(paths, dtype=bytes), np.array(labels, dtype=np.int64)


@register_dataset("imagefolder", check=_check_imagefolder, data_dir=True,
                  num_classes=lambda cfg: len(_class_dirs(Path(cfg.data_dir).expanduser() / "train")),
                  doc=f"a folder of images, streamed: {_LAYOUT}")
def _load_imagefolder(cfg: DatasetConfig, seed: int) -> FolderSplits:
    root = Path(cfg.data_dir).expanduser()
    classes = _class_dirs(root / "train")
    s = cfg.image_size
    splits = FolderSplits("imagefolder", len(classes), (3, s, s), IMAGENET_MEAN, IMAGENET_STD,
                          loader_workers(cfg))
    for split in ("train", "val", "test"):
        source = "val" if split == "test" and cfg.test_split == "val" else split
        if source in splits.files:
            splits.files[split] = splits.files[source]
        elif (root / source).is_dir():
            splits.files[split] = (root / source, *_listing(root / source, classes))
    return splits
