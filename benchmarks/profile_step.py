"""Where progprune's progressive loop spends its time on one model: cProfile over the loop only.

    python benchmarks/profile_step.py tv:googlenet            # 64 px, 400 steps, target 2x
    python benchmarks/profile_step.py tv:vit_b_32 --size 224 --top 40
    python benchmarks/profile_step.py tv:googlenet --reference  # Torch-Pruning's own loop

The pruner is built as bench_progressive.py builds it (group_norm, global, fresh weights);
building it (DepGraph tracing) is outside the profile. Prints the cumulative-time table
restricted to --top rows, and the seconds of the loop.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from progprune.config import PruneConfig
from progprune.models import build_model, example_inputs
from progprune.pruning import make_pruner, progressive_prune


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--sort", default="cumulative")
    ap.add_argument("--reference", action="store_true", help="profile Torch-Pruning's own loop instead")
    ap.add_argument("--out", help="also dump the raw profile here (pstats)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    model = build_model(args.model, 10, shape).eval()
    ex = example_inputs(shape)
    cfg = PruneConfig(method="group_norm", global_pruning=True, iterative_steps=args.steps)
    pruner = make_pruner(model, ex, cfg, 10)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    if args.reference:
        from bench_progressive import reference_loop
        with torch.enable_grad():
            prof.runcall(reference_loop, pruner, model, args.target, ex)
        what = f"reference, {pruner.current_step} steps"
    else:
        out = prof.runcall(progressive_prune, model, pruner, ex, args.target, cfg)
        what = f"progprune, {out.steps} steps, {out.achieved_speedup:.5f}x, {out.macs_counter}"
    print(f"{args.model} {args.size} px: {what}, {time.perf_counter() - t0:.2f} s (profiled)")
    stats = pstats.Stats(prof)
    if args.out:
        stats.dump_stats(args.out)
    stats.strip_dirs().sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
