"""A sweep's wall time vs the same combinations one after another in one process.

One small spec (written to a temp dir): resnet20 + vgg11, speedups 1.5/2/3, group_norm
global, seed 0, base 3 epochs, fine-tune 2 epochs, on a synthetic 10-class dataset
(--samples train images at 3x32x32, a quarter of that each for val and test). Variants:

- sequential: `pipeline.run_combination` per combination in this process, as
  `progprune prune` runs it: each combination trains its own base model;
- sequential, shared base: the base is trained once per (model, seed) with
  `tasks.image.base_stage`, saved, and each combination loads it via `base_checkpoint`:
  this separates the base-sharing win from the parallelism win;
- sweep, Ray Train: `progprune sweep SPEC --output D` as a subprocess (embedded Ray,
  2 CPUs, cpus_per_task 1, max_concurrent 2), fine-tuning in 1 Ray Train worker;
- sweep, in-task: the same with finetune.num_workers 0 (fine-tune inside the prune task,
  no Ray Train start-up).

The sequential variants use torch's default thread count (one per core, 2 here), as
`progprune prune` does; sweep tasks run 1 thread each, two at a time. Each wall time covers
everything the user waits for (Ray start-up, data loading, writing results). The machine
has only 2 cores, so the sweep's parallelism is capped at 2 tasks: on a cluster the
parallel part scales, the base-sharing part does not change.

    python benchmarks/bench_sweep.py                 # all four variants, 1 round
    python benchmarks/bench_sweep.py --rounds 2      # order alternates between rounds
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

from progprune.artifacts import save_artifact
from progprune.data import load_dataset
from progprune.pipeline import run_combination
from progprune.tasks.image import base_stage
from progprune.spec import load_spec

from _common import cpu_name


def write_spec(path: str, args, num_workers: int) -> str:
    spec = {
        "name": f"bench-sweep-w{num_workers}",
        "dataset": {"name": "synthetic", "num_classes": 10, "synthetic_samples": args.samples},
        "models": args.models,
        "speedups": args.speedups,
        "methods": ["group_norm"],
        "seeds": [0],
        "base_training": {"epochs": args.base_epochs, "lr": 0.05, "schedule": "cosine",
                          "batch_size": 64, "augment": False},
        "finetune": {"epochs": args.finetune_epochs, "lr": 0.01, "schedule": "cosine",
                     "batch_size": 64, "augment": False, "num_workers": num_workers, "use_gpu": False},
        "pruning": {"global_pruning": True, "iterative_steps": 400},
        "evaluation": {"latency_batch_size": 1, "latency_repeats": 10},
        "resources": {"gpus_per_task": 0, "cpus_per_task": 1, "max_concurrent": 2},
        "output": os.path.join(os.path.dirname(path), "unused-output"),
    }
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


def run_sequential(spec_path: str, out: str, shared_base: bool) -> dict:
    t0 = time.perf_counter()
    combos = load_spec(spec_path).combinations()
    device = torch.device("cpu")
    bases, trained = {}, 0
    for i, cfg in enumerate(combos):
        if shared_base:
            key = cfg.base_key()
            if key not in bases:  # once per (model, dataset, seed, base settings)
                splits = load_dataset(cfg.dataset, seed=cfg.seed)
                model, _ = base_stage(cfg, splits, device)
                trained += 1
                bases[key] = save_artifact(os.path.join(out, f"base-{key}.pt"), model, model_name=cfg.model,
                                           num_classes=splits.num_classes, input_shape=splits.input_shape)
            cfg = cfg.model_copy(update={"base_checkpoint": bases[key]})
        d = os.path.join(out, f"combo-{i}")
        os.makedirs(d)
        row = run_combination(cfg, d, device)
        trained += row.base_epochs > 0  # a row's base_epochs is 0 when its base came from a checkpoint
        assert row.status == "ok", (row.model, row.target_speedup, row.status, row.error)
    return {"seconds": time.perf_counter() - t0, "bases": trained, "combos": len(combos)}


def run_sweep(spec_path: str, out: str, log: str) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "progprune")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded cluster, never a shared one
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([exe, "sweep", spec_path, "--output", out], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        with open(log) as f:
            sys.exit(f"sweep failed (exit {rc}):\n{f.read()[-4000:]}")
    bases = os.listdir(os.path.join(out, "bases")) if os.path.isdir(os.path.join(out, "bases")) else []
    rows = os.listdir(os.path.join(out, "rows"))
    return {"seconds": seconds, "bases": len(bases), "combos": len(rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "vgg11"])
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--samples", type=int, default=384, help="synthetic train images")
    ap.add_argument("--base-epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="runs per variant, order alternating; medians")
    ap.add_argument("--variants", nargs="+", default=["sequential", "sequential-shared", "sweep-train", "sweep-intask"],
                    choices=["sequential", "sequential-shared", "sweep-train", "sweep-intask"])
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        specs = {w: write_spec(os.path.join(tmp, f"spec-w{w}.yaml"), args, w) for w in (0, 1)}
        n_combos = len(args.models) * len(args.speedups)
        print(f"setup: {cpu_name()}, {os.cpu_count()} cores, CPU only; python {platform.python_version()}, "
              f"torch {torch.__version__}, ray {md.version('ray')}; {n_combos} combinations "
              f"({' + '.join(args.models)} x {'/'.join(f'{s:g}' for s in args.speedups)}x, group_norm global, "
              f"400 steps, seed 0); synthetic 10 classes, {args.samples} train + {args.samples // 4} val + "
              f"{args.samples // 4} test at 3x32x32; base {args.base_epochs} epochs, fine-tune "
              f"{args.finetune_epochs} epochs, batch 64; sequential: 1 process, {torch.get_num_threads()} torch "
              f"threads; sweep: embedded Ray (2 CPUs), 1 CPU per task, max_concurrent 2; "
              f"{args.rounds} round(s), order alternating, medians; load average at start "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        runs = {v: [] for v in args.variants}
        n = 0
        for r in range(args.rounds):
            for v in (args.variants if r % 2 == 0 else args.variants[::-1]):
                n += 1
                out = os.path.join(tmp, f"run-{n}-{v}")
                os.makedirs(out)
                if v.startswith("sequential"):
                    res = run_sequential(specs[1], out, shared_base=v == "sequential-shared")
                else:
                    res = run_sweep(specs[1 if v == "sweep-train" else 0], out, os.path.join(tmp, f"log-{n}.txt"))
                runs[v].append(res)
                print(f"  round {r} {v:<18} {res['seconds']:7.1f}s  {res['combos']} combinations, "
                      f"{res['bases']} base trainings", flush=True)
    med = {v: statistics.median(x["seconds"] for x in rs) for v, rs in runs.items()}
    print(f"load average at end {os.getloadavg()[0]:.1f} (2 cores: above 2 means other work shared them)")
    ref = med.get("sequential") or next(iter(med.values()))
    header = f"{'variant':<18} | {'base trainings':>14} | {'wall s':>8} | {'vs sequential':>13}"
    print(header)
    print("-" * len(header))
    for v, rs in runs.items():
        print(f"{v:<18} | {rs[0]['bases']:>14d} | {med[v]:>8.1f} | {med[v] / ref:>13.3f}")
    if "sequential-shared" in med and "sequential" in med:
        for v in ("sweep-train", "sweep-intask"):
            if v in med:
                print(f"{v}: base sharing alone {med['sequential'] / med['sequential-shared']:.2f}x faster, "
                      f"the sweep's parallelism on 2 cores a further "
                      f"{med['sequential-shared'] / med[v]:.2f}x (sequential-shared / {v})")
    return med


if __name__ == "__main__":
    main()
