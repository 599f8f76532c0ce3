"""Fine-tuning throughput through Ray Train vs a plain PyTorch loop, side by side.

Both fine-tune the same pruned model (resnet20, 10 classes, pruned to --speedup with global
group_norm from a seeded init) on the same data (digits, 1,257 train images at 3x32x32 by
default) with `progprune.training.fit` and the same TrainConfig:

- plain: `fit` in this process, torch.set_num_threads(--threads);
- Ray Train: a TorchTrainer with ScalingConfig(num_workers=1, resources_per_worker=
  {"CPU": --threads}) on an embedded `ray.init(num_cpus=2)`, whose loop is a copy of
  `progprune.cluster.tasks._train_loop`: load data and artifact, `prepare_model`, `fit` with an
  on_epoch that calls `ray.train.report` with (or without) a checkpoint of fit's state,
  then evaluate + save the final artifact on rank 0.

Both sides do the same per-combination work around `fit` (load dataset, load artifact,
final test evaluation + save), so the only difference is Ray Train. Ray sets
OMP_NUM_THREADS to the worker's CPUs, so its torch uses --threads threads, as the plain
loop does; the worker's real `torch.get_num_threads()` is printed.

Per-epoch samples/s come from on_epoch timestamps inside the loop (epoch k = stamp k minus
stamp k-1, so report + checkpoint of epoch k-1 are charged to epoch k); epoch 0 is warm-up
and shown apart. Start-up per combination = wall time around the whole call (trainer.fit(),
or the plain equivalent) minus the sum of all epoch times. The Ray cluster itself is
started once before any run (a sweep starts it once too) and stays up during the plain
runs, so its idle load falls on both. Runs alternate order per round; cells are medians.

    python benchmarks/bench_train.py                       # 1 thread, 4 epochs, 2 rounds
    python benchmarks/bench_train.py --threads 2 --rounds 3
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import os
import platform
import statistics
import tempfile
import time

import torch

from progprune.artifacts import load_artifact, save_artifact
from progprune.config import DatasetConfig, PruneConfig, TrainConfig
from progprune.data import load_dataset
from progprune.models import build_model, example_inputs
from progprune.pruning import make_pruner, progressive_prune
from progprune.training import evaluate, fit

from _common import cpu_name


def make_pruned(path: str, model_name: str, dataset: DatasetConfig, speedup: float, seed: int) -> dict:
    splits = load_dataset(dataset, seed=seed)
    torch.manual_seed(seed)
    model = build_model(model_name, splits.num_classes).eval()
    ex = example_inputs(splits.input_shape)
    cfg = PruneConfig(method="group_norm")
    pruner = make_pruner(model, ex, cfg, splits.num_classes)
    out = progressive_prune(model, pruner, ex, speedup, cfg)
    save_artifact(path, model, model_name=model_name, num_classes=splits.num_classes,
                  input_shape=splits.input_shape, history=out.history)
    return {"achieved": out.achieved_speedup, "train": splits.size("train"), "val": splits.size("val"),
            "params": sum(p.numel() for p in model.parameters())}


def _combination(job: dict, device, on_epoch=None, wrap=None) -> dict:
    """What one combination's fine-tune does around `fit`, on either side."""
    splits = load_dataset(job["dataset"], seed=job["seed"])
    model, info = load_artifact(job["artifact"], model_name=job["model"],
                                num_classes=splits.num_classes, input_shape=splits.input_shape)
    stamps = []

    def stamp(metrics, state):
        stamps.append(time.perf_counter())
        if on_epoch:
            on_epoch(metrics, state)

    t_fit = time.perf_counter()
    fit(model, splits, job["train"], device, seed=job["seed"], on_epoch=stamp, wrap=wrap)
    top1, _ = evaluate(model, splits, "test", device)
    with tempfile.TemporaryDirectory() as d:
        save_artifact(os.path.join(d, "final.pt"), model, model_name=job["model"],
                      num_classes=splits.num_classes, input_shape=splits.input_shape,
                      history=info["pruning_history"])
    epochs = [stamps[0] - t_fit] + [b - a for a, b in zip(stamps, stamps[1:])]
    return {"epochs": epochs, "threads": torch.get_num_threads(), "top1": top1}


def run_plain(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    r = _combination(job, torch.device("cpu"))
    r["wall"] = time.perf_counter() - t0
    return r


def _ray_loop(config: dict) -> None:
    """progprune.cluster.tasks._train_loop, with timestamps written where the driver reads them."""
    import ray.train
    import ray.train.torch

    t_start = time.time()
    job = config["job"]
    rank = ray.train.get_context().get_world_rank()

    def on_epoch(metrics, state):
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0 and job["checkpoint"]:
                torch.save(state(), os.path.join(d, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    device = torch.device("cpu")
    r = _combination(job, device, on_epoch=on_epoch,
                     wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=device))
    r["loop_start"], r["loop_end"] = t_start, time.time()
    r["omp"] = os.environ.get("OMP_NUM_THREADS")
    with open(config["out"], "w") as f:
        json.dump(r, f)


def run_ray(job: dict, tmp: str, name: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = os.path.join(tmp, f"{name}.json")
    t0_wall, t0 = time.time(), time.perf_counter()
    trainer = TorchTrainer(
        _ray_loop, torch_config=TorchConfig(backend="gloo"),
        train_loop_config={"job": job, "out": out},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": job["threads"]}),
        run_config=RunConfig(name=name, storage_path=os.path.join(tmp, "train")),
    )
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    with open(out) as f:
        r = json.load(f)
    r["wall"] = wall
    r["before_loop"] = r["loop_start"] - t0_wall
    r["after_loop"] = (t0_wall + wall) - r["loop_end"]
    return r


def _summary(runs: list[dict], samples: int) -> dict:
    steady = [statistics.median(r["epochs"][1:]) for r in runs]
    return {
        "sps": samples / statistics.median(steady),
        "epoch0": statistics.median(r["epochs"][0] for r in runs),
        "startup": statistics.median(r["wall"] - sum(r["epochs"]) for r in runs),
        "wall": statistics.median(r["wall"] for r in runs),
        "threads": sorted({r["threads"] for r in runs}),
        "before": statistics.median(r.get("before_loop", 0.0) for r in runs),
        "after": statistics.median(r.get("after_loop", 0.0) for r in runs),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="digits", help="digits, or synthetic (see --samples)")
    ap.add_argument("--samples", type=int, default=3000, help="synthetic only: train samples")
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=4, help="epoch 0 is warm-up, shown apart")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="worker CPUs = torch threads, both sides")
    ap.add_argument("--rounds", type=int, default=2, help="runs per cell, order alternating; medians")
    ap.add_argument("--no-ckpt-variant", action="store_true", help="also run Ray Train reporting without checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (epoch 0 is warm-up)")

    import ray

    dataset = (DatasetConfig(name="synthetic", num_classes=10, synthetic_samples=args.samples)
               if args.dataset == "synthetic" else DatasetConfig(name=args.dataset))
    train = TrainConfig(epochs=args.epochs, lr=0.01, batch_size=args.batch_size, schedule="cosine",
                        augment=False)
    with tempfile.TemporaryDirectory() as tmp:
        art = os.path.join(tmp, "pruned.pt")
        info = make_pruned(art, args.model, dataset, args.speedup, args.seed)
        samples = (info["train"] // args.batch_size) * args.batch_size  # fit drops the last partial batch
        job = {"model": args.model, "dataset": dataset, "seed": args.seed, "artifact": art,
               "train": train, "threads": args.threads, "checkpoint": True}
        print(f"setup: {cpu_name()}, {os.cpu_count()} cores, CPU only; python {platform.python_version()}, "
              f"torch {torch.__version__}, ray {md.version('ray')}; {args.model} pruned to "
              f"{info['achieved']:.3f}x MACs ({info['params']:,} params, group_norm global), "
              f"{args.dataset}: {info['train']} train ({samples} per epoch, batch {args.batch_size}) + "
              f"{info['val']} val evaluated each epoch; {args.epochs} epochs; {args.threads} CPU(s) = torch "
              f"threads per side; Ray Train: 1 worker, gloo, embedded ray.init(num_cpus=2); "
              f"{args.rounds} rounds, order alternating, medians; load average at start "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=False)
        try:
            variants = [("plain", None), ("ray+ckpt", True)] + ([("ray-report-only", False)] if args.no_ckpt_variant else [])
            runs = {v: [] for v, _ in variants}
            n = 0
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for v, ckpt in order:
                    if ckpt is None:
                        res = run_plain(job)
                    else:
                        n += 1
                        res = run_ray(dict(job, checkpoint=ckpt), tmp, f"bench-{n}")
                    runs[v].append(res)
                    print(f"  round {r} {v:<15} wall {res['wall']:6.2f}s  epochs "
                          f"{' '.join(f'{e:.2f}' for e in res['epochs'])}s  threads {res['threads']}"
                          + (f" (OMP_NUM_THREADS={res['omp']})" if "omp" in res else ""), flush=True)
        finally:
            ray.shutdown()
    s = {v: _summary(rs, samples) for v, rs in runs.items()}
    print(f"load average at end {os.getloadavg()[0]:.1f} (2 cores: above 2 means other work shared them)")
    plain = s["plain"]
    header = (f"{'variant':<15} | {'threads':>7} | {'samples/s':>9} | {'vs plain':>8} | {'epoch 0 s':>9} | "
              f"{'start-up s':>10} | {'+start-up s':>11} | {'fit() wall s':>12}")
    print(header)
    print("-" * len(header))
    for v, x in s.items():
        print(f"{v:<15} | {','.join(map(str, x['threads'])):>7} | {x['sps']:>9.1f} | {x['sps'] / plain['sps']:>8.3f} | "
              f"{x['epoch0']:>9.2f} | {x['startup']:>10.2f} | {x['startup'] - plain['startup']:>11.2f} | "
              f"{x['wall']:>12.2f}")
    for v, x in s.items():
        if v != "plain":
            print(f"{v}: of its start-up, {x['before']:.2f}s before the worker loop began and "
                  f"{x['after']:.2f}s after it ended")
    print("samples/s: steady epochs (1..E-1), median per run then over runs; start-up = wall - sum of epochs; "
          "+start-up = start-up minus plain's (the fixed Ray Train cost per combination)")
    return s


if __name__ == "__main__":
    main()
