"""progprune's progressive loop vs Torch-Pruning's reference loop, side by side.

Both prune the same seeded model with the same pruner settings (global group_norm, linear
schedule, pruning_ratio=1.0, 400 steps by default) to each target speedup. The reference
is Torch-Pruning's `reproduce/main.py::progressive_pruning`, reimplemented literally below:
`pruner.step()`, then `tp.utils.count_ops_and_params` (deep copy + forward) after every
step, stop at the first step that reaches the target or at the step cap. progprune's loop
is `progprune.pruning.progressive_prune` with the default `crossing="fine"`; the last
column says how it cut its last step (`whole`/`prefix`/`subset`, channels pruned/selected).

Timing covers the loop only (pruner construction, i.e. DepGraph tracing, is the same for
both and excluded), in one process, with the order of the two alternating per repeat and
a fixed thread count. Each cell is the median over --repeats.

    python benchmarks/bench_progressive.py             # ResNet-56, targets 1.5 2 2.55 3 4
    python benchmarks/bench_progressive.py --quick     # ResNet-20, target 2 (smoke check)
    python benchmarks/bench_progressive.py --zoo       # torchvision/timm zoo at 2x (needs .venv-tv)

With --zoo each model of ZOO (CNNs at 64 px, the ViT at --vit-size) is pruned to 2x with
both loops, interleaved as above; the zoo's models are freshly initialised (BN scales 1.0,
a tie-broken magnitude ranking), as the issue-25 table had them.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch_pruning as tp

from progprune.config import PruneConfig
from progprune.models import build_model, example_inputs
from progprune.pruning import make_pruner, progressive_prune

from _common import cpu_name

NUM_CLASSES = 10


def reference_loop(pruner, model, speed_up, example_inputs):
    """Torch-Pruning reproduce/main.py `progressive_pruning`, as published."""
    model.eval()
    base_ops, _ = tp.utils.count_ops_and_params(model, example_inputs=example_inputs)
    current_speed_up = 1
    while current_speed_up < speed_up:
        pruner.step(interactive=False)
        pruned_ops, _ = tp.utils.count_ops_and_params(model, example_inputs=example_inputs)
        current_speed_up = float(base_ops) / pruned_ops
        if pruner.current_step == pruner.iterative_steps:
            break
    return current_speed_up


# the zoo (issue 25): model -> input size (None: --vit-size)
ZOO = {"tv:efficientnet_b0": 64, "tv:convnext_tiny": 64, "tv:googlenet": 64, "tv:mobilenet_v3_large": 64,
       "tv:vit_b_32": None}
_SIZE: dict = {}  # model -> input size for this run (default 32: the CIFAR networks)


def _setup(model_name, seed, steps, global_pruning, bn_spread=False):
    torch.manual_seed(seed)
    size = _SIZE.get(model_name, 32)
    model = build_model(model_name, NUM_CLASSES, (3, size, size)).eval()
    if bn_spread:  # BN scales spread out as training leaves them (a fresh init has all 1.0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.2, 1.5)
    ex = example_inputs((3, size, size))
    cfg = PruneConfig(method="group_norm", global_pruning=global_pruning, iterative_steps=steps)
    return model, ex, make_pruner(model, ex, cfg, NUM_CLASSES), cfg


def run_reference(model_name, target, seed, steps, global_pruning, bn_spread=False):
    model, ex, pruner, _ = _setup(model_name, seed, steps, global_pruning, bn_spread)
    t0 = time.perf_counter()
    with torch.enable_grad():
        achieved = reference_loop(pruner, model, target, ex)
    seconds = time.perf_counter() - t0
    return {"achieved": achieved, "steps": pruner.current_step, "seconds": seconds}


def run_progprune(model_name, target, seed, steps, global_pruning, bn_spread=False):
    model, ex, pruner, cfg = _setup(model_name, seed, steps, global_pruning, bn_spread)
    t0 = time.perf_counter()
    out = progressive_prune(model, pruner, ex, target, cfg)  # crossing="fine", the default
    seconds = time.perf_counter() - t0
    return {"achieved": out.achieved_speedup, "steps": out.steps, "seconds": seconds, "status": out.status,
            "cut": f"{out.crossing_cut} {out.crossing_channels[0]}/{out.crossing_channels[1]}, {out.macs_counter}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 2.55, 3.0, 4.0])
    ap.add_argument("--steps", type=int, default=400, help="iterative_steps (Torch-Pruning: 400)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the median is shown")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local", action="store_true", help="local instead of global pruning")
    ap.add_argument("--bn-spread", action="store_true", help="BN scales uniform in [0.2, 1.5] (as trained)")
    ap.add_argument("--quick", action="store_true", help="resnet20, target 2 only (smoke check)")
    ap.add_argument("--zoo", action="store_true", help="the torchvision zoo (ZOO) at 2x, one row a model")
    ap.add_argument("--zoo-models", nargs="+", help="with --zoo: these models of ZOO only")
    ap.add_argument("--vit-size", type=int, default=224, help="with --zoo: the ViT's input size (native: 224)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.targets = "resnet20", [2.0]
    torch.set_num_threads(args.threads)
    if args.zoo:
        return zoo(args)

    print(f"setup: {cpu_name()}, {torch.get_num_threads()} torch thread(s); python {platform.python_version()}, "
          f"torch {torch.__version__}, torch-pruning {md.version('torch-pruning')}; {args.model} "
          f"({NUM_CLASSES} classes, 1x3x32x32), group_norm {'local' if args.local else 'global'}, "
          f"{args.steps} steps, seed {args.seed}{', BN scales spread' if args.bn_spread else ''}, "
          f"median of {args.repeats}")
    header = (f"{'target':>6} | {'steps ref':>9} {'steps pp':>8} | {'achieved ref':>12} {'achieved pp':>11} | "
              f"{'over ref %':>10} {'over pp %':>9} | {'s ref':>7} {'s pp':>7} | {'pp/ref':>6} | last step pp")
    print(header)
    print("-" * len(header))
    ratios = {}
    for i, target in enumerate(args.targets):
        refs, pps = [], []
        for r in range(args.repeats):
            kw = dict(model_name=args.model, target=target, seed=args.seed, steps=args.steps,
                      global_pruning=not args.local, bn_spread=args.bn_spread)
            if (i + r) % 2 == 0:  # alternate who runs first, so drift falls on both
                refs.append(run_reference(**kw))
                pps.append(run_progprune(**kw))
            else:
                pps.append(run_progprune(**kw))
                refs.append(run_reference(**kw))
        ref, pp = refs[0], pps[0]  # same seed: the achieved figures are identical across repeats
        s_ref = statistics.median(x["seconds"] for x in refs)
        s_pp = statistics.median(x["seconds"] for x in pps)
        ratios[target] = s_pp / s_ref
        flag = "" if pp.get("status", "ok") == "ok" else f"  ({pp['status']})"
        print(f"{target:>6g} | {ref['steps']:>9d} {pp['steps']:>8d} | {ref['achieved']:>12.4f} "
              f"{pp['achieved']:>11.4f} | {100 * (ref['achieved'] / target - 1):>10.3f} "
              f"{100 * (pp['achieved'] / target - 1):>9.3f} | {s_ref:>7.2f} {s_pp:>7.2f} | "
              f"{ratios[target]:>6.2f} | {pp['cut']}{flag}", flush=True)
    return ratios


def zoo(args):
    models = args.zoo_models or list(ZOO)
    for name in models:
        _SIZE[name] = ZOO[name] or args.vit_size
    print(f"setup: {cpu_name()}, {torch.get_num_threads()} torch thread(s); python {platform.python_version()}, "
          f"torch {torch.__version__}, torch-pruning {md.version('torch-pruning')}; target 2x, group_norm "
          f"{'local' if args.local else 'global'}, {args.steps} steps, seed {args.seed}, median of {args.repeats}")
    header = (f"{'model':>22} {'px':>4} | {'steps ref':>9} {'steps pp':>8} | {'achieved ref':>12} {'achieved pp':>11} | "
              f"{'s ref':>7} {'s pp':>7} | {'pp/ref':>6} | last step pp, counter")
    print(header)
    print("-" * len(header))
    ratios = {}
    for i, name in enumerate(models):
        refs, pps = [], []
        for r in range(args.repeats):
            kw = dict(model_name=name, target=2.0, seed=args.seed, steps=args.steps, global_pruning=not args.local)
            first, second = (run_reference, run_progprune) if (i + r) % 2 == 0 else (run_progprune, run_reference)
            a, b = first(**kw), second(**kw)
            (refs, pps)[first is run_progprune].append(a)
            (refs, pps)[second is run_progprune].append(b)
        ref, pp = refs[0], pps[0]
        s_ref = statistics.median(x["seconds"] for x in refs)
        s_pp = statistics.median(x["seconds"] for x in pps)
        ratios[name] = s_pp / s_ref
        flag = "" if pp["status"] == "ok" else f"  ({pp['status']})"
        print(f"{name:>22} {_SIZE[name]:>4} | {ref['steps']:>9d} {pp['steps']:>8d} | {ref['achieved']:>12.4f} "
              f"{pp['achieved']:>11.4f} | {s_ref:>7.2f} {s_pp:>7.2f} | {ratios[name]:>6.2f} | {pp['cut']}{flag}",
              flush=True)
    return ratios


if __name__ == "__main__":
    main()
