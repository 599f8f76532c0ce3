"""Latency targets on this machine (any runtime): where they land, re-measured in a fresh process, and
what they cost against a MACs target at the same speedup.

For each (model, target): `progprune prune --target-metric latency` (the CLI, in its own
process, as a user runs it), then a fresh process loads the pruned model and times it
against a freshly built dense model of the same architecture (weights do not change a
dense model's time), interleaved, --rounds rounds: the "re-measured" column, which the
landing window [target, 1.05 x target] is judged on. Then, for the pruning-time ratios,
`progprune prune --target-metric macs` twice: at the same number (a 2x MACs target beside a
2x latency target) and at the MACs speedup the latency target reached (the same pruning
work, so the ratio is what finding the target costs). One run: the figures of one (noisy)
machine; the columns beside one another come from the same run.

    python benchmarks/bench_latency.py                       # 4 CIFAR models x 1.5 2 3
    python benchmarks/bench_latency.py --models resnet20 --targets 2 --rounds 100
    .venv-tv/bin/python benchmarks/bench_latency.py --models tv:resnet50 tv:mobilenet_v3_large \
        --size 96 --targets 2                                # torchvision/timm need .venv-tv
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq

REMEASURE = r"""
import json, sys, torch
from progprune.artifacts import load_pruned
from progprune.models import build_model
from progprune.runtimes import get_runtime
from progprune.timing import PairedTimer
path, name, classes, size, batch, rounds, runtime, threads = sys.argv[1:9]
torch.manual_seed(0)
torch.set_num_threads(int(threads))
pruned = load_pruned(path)
shape = (3, int(size), int(size))
base = build_model(name, int(classes), shape).eval()
x = torch.randn(int(batch), *shape)
rt = get_runtime(runtime)
run = lambda m: rt.prepare(m, x, "cpu", "fp32", int(threads))
est = PairedTimer(run(base), x, warmup=10).speedup(run(pruned), int(rounds))
print(json.dumps({"speedup": est.speedup, "low": est.low, "high": est.high}))
"""


def prune(model, target, metric, size, batch, out, threads, runtime) -> dict:
    cmd = [sys.executable, "-m", "progprune", "prune", "--model", model, "--dataset", "synthetic",
           "--image-size", str(size), "--speedup", str(target), "--target-metric", metric,
           "--base-epochs", "0", "--finetune-epochs", "0", "--latency-batch-size", str(batch),
           "--runtime", runtime, "--latency-threads", str(threads), "--output", out, "--force"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode not in (0, 3):  # 3: unreachable, a row like any other
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return pq.read_table(os.path.join(out, "result.parquet")).to_pylist()[0]


def remeasure(out, model, row, size, batch, rounds, threads, runtime) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, "-c", REMEASURE, os.path.join(out, "pruned.pt"), model,
                          str(row["num_classes"]), str(size), str(batch), str(rounds), runtime, str(threads)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg11", "mobilenetv2"])
    ap.add_argument("--targets", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=300, help="rounds of the fresh re-measure")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runtime", default="eager", help="eager, compile, onnxruntime")
    ap.add_argument("--no-macs", action="store_true", help="skip the MACs-target runs (no time ratios)")
    args = ap.parse_args()
    print(f"latency targets, batch {args.batch}, {args.size} px, {args.threads} thread(s), {args.runtime}, cpu")
    head = (f"{'model':<22} {'target':>6} {'status':<11} {'stop rule':>9} {'row':>6} {'re-measured [95%]':>22} "
            f"{'in window':>9} {'MACs x':>7} {'points':>6} {'lat s':>6} {'MACs same no. s':>15} {'ratio':>5} "
            f"{'MACs same MACs s':>16} {'ratio':>5} {'lat x at MACs target':>20}")
    print(head)
    inside = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for target in args.targets:
                out = os.path.join(tmp, f"{model}-{target}")
                row = prune(model, target, "latency", args.size, args.batch, out, args.threads, args.runtime)
                mrow = same = None
                if not args.no_macs:
                    mrow = prune(model, target, "macs", args.size, args.batch, out + "-macs", args.threads,
                                 args.runtime)
                    same = prune(model, round(row["macs_speedup"], 4), "macs", args.size, args.batch,
                                 out + "-same", args.threads, args.runtime)
                if row["status"] == "ok":
                    fresh = remeasure(out, model, row, args.size, args.batch, args.rounds, args.threads, args.runtime)
                    ok = target <= fresh["speedup"] <= 1.05 * target
                    inside, total = inside + ok, total + 1
                    fresh_s = f"{fresh['speedup']:.3f} [{fresh['low']:.3f}, {fresh['high']:.3f}]"
                else:
                    fresh_s, ok = "-", None
                ratios = "".join(
                    f" {r['prune_seconds']:>{w}.1f} {row['prune_seconds'] / r['prune_seconds']:>5.2f}" if r else
                    f" {'-':>{w}} {'-':>5}" for r, w in ((mrow, 15), (same, 16)))
                print(f"{model:<22} {target:>6.2f} {row['status']:<11} {row['achieved_speedup']:>9.3f} "
                      f"{row['latency_speedup']:>6.3f} {fresh_s:>22} "
                      f"{('yes' if ok else 'no') if ok is not None else '-':>9} "
                      f"{row['macs_speedup']:>7.2f} {row['target_points']:>6} {row['prune_seconds']:>6.1f}{ratios} "
                      f"{mrow['latency_speedup'] if mrow else float('nan'):>20.3f}", flush=True)
    print(f"landed in [target, 1.05 x target] when re-measured: {inside} of {total} reached targets")


if __name__ == "__main__":
    main()
