"""What `pruning.round_to` does to latency at the same MACs speedup, eager and onnxruntime.

For each model, each round_to (1 = none, 8, 16, 32) prunes the same seeded model with
group_norm to the same MACs target (2x by default), then times the pruned model against the
dense one, interleaved, in each runtime and batch size (progprune.timing.PairedTimer: the
median of the rounds' speedups, each side the fastest of 3 forwards, with its 95%
interval). One process, one run: the columns beside one another come from the same run.

    python benchmarks/bench_round_to.py
    python benchmarks/bench_round_to.py --models resnet56 --batches 1 --rounds 40
"""
from __future__ import annotations

import argparse
import copy
import platform

import torch

from progprune.config import PruneConfig
from progprune.models import build_model, example_inputs
from progprune.pruning import make_pruner, progressive_prune
from progprune.runtimes import get_runtime
from progprune.timing import PairedTimer

from _common import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "mobilenetv2", "vgg11"])
    ap.add_argument("--round-to", nargs="+", type=int, default=[1, 8, 16, 32])
    ap.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"round_to at {args.speedup}x MACs, {args.size} px, {args.threads} thread(s); {cpu_name()}, "
          f"{platform.python_version()}, torch {torch.__version__}")
    print(f"{'model':<12} {'round_to':>8} {'MACs x':>7} " +
          " ".join(f"{rt[:4]} b{b:<3} latency x [95%]".rjust(30) for rt in args.runtimes for b in args.batches))
    shape = (3, args.size, args.size)
    for name in args.models:
        for rt_n in args.round_to:
            torch.manual_seed(0)
            dense = build_model(name, 10, shape).eval()
            model = copy.deepcopy(dense)
            ex = example_inputs(shape)
            cfg = PruneConfig(round_to=None if rt_n == 1 else rt_n)
            out = progressive_prune(model, make_pruner(model, ex, cfg, 10), ex, args.speedup, cfg)
            cells = []
            for runtime in args.runtimes:
                rt = get_runtime(runtime)
                for b in args.batches:
                    x = torch.randn(b, *shape)
                    timer = PairedTimer(rt.prepare(dense, x, "cpu", "fp32", args.threads), x)
                    est = timer.speedup(rt.prepare(model, x, "cpu", "fp32", args.threads), args.rounds)
                    cells.append(f"{est.speedup:.3f} [{est.low:.3f}, {est.high:.3f}]")
            print(f"{name:<12} {rt_n:>8} {out.macs_speedup:>7.3f} " + " ".join(c.rjust(30) for c in cells),
                  flush=True)


if __name__ == "__main__":
    main()
