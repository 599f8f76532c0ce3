"""imagefolder at scale: memory that stays flat as the folder grows, and a loader as fast as
torchvision's.

1. memory: `progprune prune` (a prune plus one base epoch, fine-tuning off) on a folder of N
   JPEGs (shorter side 256 px, the other 256-384; 224-px crops), for two N. Peak memory of
   the whole process tree (the CLI and its DataLoader workers), sampled every 50 ms as the
   sum of PSS (proportional set size: pages shared between the forked workers and their
   parent count once), next to what the extra images would take decoded at 224 px.
2. loader: images/s of one training epoch through progprune's streaming loader
   (`progprune.data.folder`: RandomResizedCrop 224 + flip in the workers, uint8 batches,
   normalised after) against torchvision's `ImageFolder` + `DataLoader` with the same
   transforms (RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize), the same
   worker count and batch size, on the same folder. Both end with a normalised float batch
   of the same shape. Epochs alternate (pp, tv, pp, tv, ...), medians reported.
   Needs torchvision (the .venv-tv environment: `make .venv-tv`).

    python benchmarks/bench_data.py                         # N = 300 and 2400, both parts
    python benchmarks/bench_data.py --n 300 2400 --part memory
    .venv-tv/bin/python benchmarks/bench_data.py --part loader --workers 2 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_name  # noqa: E402

CLASSES = 10
VAL = 240  # validation images, every N
MODEL = """\
import torch.nn as nn


def build(num_classes):
    # a small network at 224 px: a stride-4 stem keeps the compute far below decoding's
    return nn.Sequential(
        nn.Conv2d(3, 16, 7, stride=4, padding=3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
"""


def make_folder(root: Path, n_train: int, seed: int = 0) -> Path:
    """n_train JPEGs in CLASSES class folders (+ VAL in val/, the same for every N, so
    evaluation batches are alike): smooth colour fields with noise, shorter side 256, the
    other 256-384, quality 90, like a resized photo set."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", VAL)):
        for i in range(n):
            d = root / split / f"c{i % CLASSES:02d}"
            d.mkdir(parents=True, exist_ok=True)
            long = int(rng.integers(256, 385))
            w, h = (long, 256) if i % 2 else (256, long)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            base = rng.uniform(0, 255, 3)[None, None] + np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 80
            img = np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=90)
    return root


# ---- 1. memory --------------------------------------------------------------------------------
def _tree_pss(pid: int) -> int:
    """Bytes of PSS of `pid` and all its descendants, from /proc (smaps_rollup)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier and c not in tree]
        tree.update(kids)
        frontier = kids
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:")) * 1024
        except (OSError, StopIteration):
            pass
    return total


def memory_run(folder: Path, workers: int, work: Path) -> dict:
    (work / "bench_tiny_model.py").write_text(MODEL)
    out = work / f"run-{folder.name}"
    cmd = [sys.executable, "-m", "progprune", "prune", "--model", "py:bench_tiny_model:build",
           "--dataset", "imagefolder", "--data-dir", str(folder), "--test-split", "val",
           "--image-size", "224", "--speedup", "1.5", "--iterative-steps", "20", "--base-epochs", "1",
           "--finetune-epochs", "0", "--batch-size", "64", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])}
    if workers is not None:
        env["OMP_NUM_THREADS"] = str(workers + 1)  # loader workers: one fewer than the CPUs
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    log, _ = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"progprune prune failed ({proc.returncode}):\n{log}")
    return {"peak_mib": peak[0] / 2**20, "seconds": time.perf_counter() - t0}


# ---- 2. loader ---------------------------------------------------------------------------------
def loader_epochs(folder: Path, workers: int, batch: int, repeats: int) -> list[tuple[str, float]]:
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from progprune.config import DatasetConfig
    from progprune.data import load_dataset
    from progprune.data.folder import IMAGENET_MEAN, IMAGENET_STD

    splits = load_dataset(DatasetConfig(name="imagefolder", data_dir=str(folder), image_size=224,
                                        test_split="val", loader_workers=workers))
    tv = ImageFolder(str(folder / "train"), T.Compose([
        T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    assert len(tv) == splits.size("train")

    def ours(epoch):
        g = torch.Generator().manual_seed(epoch)
        return sum(len(y) for _, y in splits.batches("train", batch, shuffle=True, augment=True, generator=g))

    def theirs(epoch):
        torch.manual_seed(epoch)
        loader = DataLoader(tv, batch_size=batch, shuffle=True, num_workers=workers)  # prefetch 2, as ours on CPU
        return sum(len(y) for x, y in loader)

    times = []
    for r in range(repeats):
        for name, fn in (("progprune", ours), ("torchvision", theirs)) if r % 2 == 0 else \
                (("torchvision", theirs), ("progprune", ours)):
            t0 = time.perf_counter()
            n = fn(r)
            times.append((name, n / (time.perf_counter() - t0)))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[300, 2400], help="training images per folder")
    ap.add_argument("--part", choices=["memory", "loader", "both"], default="both")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, both loaders")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="loader epochs per side")
    args = ap.parse_args()

    import torch

    print(f"setup: {cpu_name()}, {os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.1f}; python "
          f"{platform.python_version()}, torch {torch.__version__}; {args.workers} loader worker(s), "
          f"batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folders = {n: make_folder(tmp / f"jpegs-{n}", n) for n in args.n}
        sizes = {n: sum(p.stat().st_size for p in folders[n].rglob("*.jpg")) / 2**20 for n in args.n}
        print(f"made {', '.join(f'{n} (+{VAL} val) JPEGs, {sizes[n]:.0f} MiB' for n in args.n)} "
              f"in {time.perf_counter() - t0:.0f} s")
        if args.part in ("memory", "both"):
            print("\nmemory: progprune prune (prune + 1 base epoch), peak PSS of the process tree")
            res = {n: memory_run(folders[n], args.workers, tmp) for n in args.n}
            for n in args.n:
                print(f"  N = {n:5d}: peak {res[n]['peak_mib']:7.1f} MiB   ({res[n]['seconds']:.0f} s)")
            lo, hi = min(args.n), max(args.n)
            decoded = (hi - lo) * 224 * 224 * 3 / 2**20
            print(f"  growth {res[hi]['peak_mib'] - res[lo]['peak_mib']:+.1f} MiB for {hi - lo} more images "
                  f"(decoded at 224 px they would be {decoded:.0f} MiB)")
        if args.part in ("loader", "both"):
            n = max(args.n)
            print(f"\nloader: one training epoch of {n} images, images/s (higher is better), "
                  f"{args.repeats} epochs each, alternating")
            times = loader_epochs(folders[n], args.workers, args.batch, args.repeats)
            med = {k: statistics.median(v for name, v in times if name == k) for k in ("progprune", "torchvision")}
            ratios = []
            for a, b in zip(times[::2], times[1::2]):  # each pair ran back to back: same load
                pp, tv = (a[1], b[1]) if a[0] == "progprune" else (b[1], a[1])
                ratios.append(pp / tv)
                print(f"  {a[0]:12s} {a[1]:7.1f}   {b[0]:12s} {b[1]:7.1f} img/s   progprune/torchvision {ratios[-1]:.2f}x")
            print(f"  median: progprune {med['progprune']:.1f}, torchvision {med['torchvision']:.1f} img/s "
                  f"({med['progprune'] / med['torchvision']:.2f}x); median of the paired ratios "
                  f"{statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
