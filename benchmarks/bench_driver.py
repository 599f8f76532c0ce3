"""The sweep driver's own cost per combination, and its peak memory, at 100 and 1,000 combinations.

Trivial stages, so what is left is the driver: resnet20 on a synthetic 2-class dataset
(16 train images at 3x32x32, 4 val, 4 test), base training 0 epochs, pruning 5 linear steps,
fine-tuning 0 epochs without Ray Train (finetune.num_workers 0: the fine-tune task
trains on the prune task's resources), latency 1 repeat;
speedups 1.2/1.5/2/3 x seeds 0..N/4-1, so N combinations (N prune tasks, N fine-tune
coordinators, N/4 base tasks). Each N runs `progprune.sweep.run` in a fresh child process
on an embedded Ray with --cpus CPUs, so the driver's figures are that process's own:

- wall: `sweep.run` from call to return (Ray start-up, plan, loop, results.parquet, report);
- loop: the scheduling loop (`cluster.execute`), as it reports itself;
- tasks: the sum of every Ray task's execution time, from Ray's timeline (`ray.timeline()`,
  read just before the driver shuts Ray down by a second driver process, so that its events
  never count in the measured driver's memory; the dump itself is left out of wall);
- driver CPU: user+sys of the driver process (`getrusage(RUSAGE_SELF)`; Ray's own daemons and
  workers are other processes), in total and in the loop, per combination;
- overhead: (loop - tasks / CPUs) / N, the wall time per combination that the cluster's
  CPUs do not explain (the issue's "wall minus the tasks' own time, divided by N");
- peak RSS: the driver's `ru_maxrss`, and its RSS before Ray starts; growth between the
  two N vs the rows' size (results.parquet, and the rows as Python objects).

    python benchmarks/bench_driver.py                  # N = 100 and 1000
    python benchmarks/bench_driver.py --n 100 500      # other sizes
    python benchmarks/bench_driver.py --n 200 --profile  # cProfile of the driver, top 25
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

SPEEDUPS = [1.2, 1.5, 2.0, 3.0]


def spec_dict(n: int, out: str, steps: int, max_concurrent: int) -> dict:
    if n % len(SPEEDUPS):
        sys.exit(f"--n: {n} is not a multiple of {len(SPEEDUPS)} (speedups x seeds)")
    return {
        "name": f"bench-driver-{n}",
        "dataset": {"name": "synthetic", "num_classes": 2, "synthetic_samples": 16, "image_size": 32},
        "models": ["resnet20"],
        "speedups": SPEEDUPS,
        "methods": ["group_norm"],
        "seeds": list(range(n // len(SPEEDUPS))),
        "base_training": {"epochs": 0, "augment": False},
        "finetune": {"epochs": 0, "num_workers": 0, "augment": False, "use_gpu": False},
        "pruning": {"global_pruning": True, "iterative_steps": steps},
        "evaluation": {"latency_batch_size": 1, "latency_repeats": 1},
        "resources": {"gpus_per_task": 0, "cpus_per_task": 1, "max_concurrent": max_concurrent},
        "output": out,
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """One sweep of N combinations in this (fresh) process; writes its figures as JSON."""
    os.environ.pop("RAY_ADDRESS", None)  # embedded cluster, never a shared one
    from rich.console import Console

    import progprune.cluster as cluster
    from progprune import sweep
    from progprune.spec import load_spec_dict

    marks: dict = {}
    events: dict = {}  # task name -> [count, seconds]
    connect = cluster.connect

    def timed_connect(address, num_cpus=None):
        """The real connect, on --cpus CPUs; its closer first reads Ray's timeline."""
        marks["connect"] = (time.perf_counter(), _cpu())
        close = connect(address, num_cpus=args.cpus)
        marks["connected"] = (time.perf_counter(), _cpu())

        def close_after_timeline():
            import ray

            marks["loop_end"] = (time.perf_counter(), _cpu())
            # another process reads the timeline: parsed here, its events for N=1,000
            # (~10,000) would add ~30 MiB to this driver's peak RSS, which is what we measure
            gcs = ray.get_runtime_context().gcs_address
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--timeline-of", gcs,
                                "--json", args.json + ".tasks"], env=os.environ,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if p.returncode:
                sys.exit(f"reading the timeline failed (exit {p.returncode}):\n{p.stdout[-3000:]}")
            with open(args.json + ".tasks") as f:
                events.update(json.load(f))
            marks["timeline_s"] = time.perf_counter() - marks["loop_end"][0]
            close()

        return close_after_timeline

    cluster.connect = timed_connect  # sweep.run imports the module and calls cluster.connect
    spec = load_spec_dict(spec_dict(args.child, args.out, args.steps, args.max_concurrent))
    log = open(args.log, "w")
    console = Console(file=log, highlight=False, markup=False, width=160)
    rss0 = _rss_mib()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), _cpu()
    rc = sweep.run(spec, console=console)
    t1, c1 = time.perf_counter(), _cpu()
    if prof:
        import io
        import pstats

        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        with open(args.log + ".profile", "w") as f:
            f.write(s.getvalue())
    log.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    loop_s = None
    with open(args.log) as f:
        for line in f:  # "N/N combinations finished (0 failed) in 123s"
            if "combinations finished" in line:
                loop_s = float(line.rsplit(" in ", 1)[1].rstrip().rstrip("s"))

    tasks = events

    import pyarrow.parquet as pq

    from progprune.results import read_rows

    path = os.path.join(args.out, "results.parquet")
    rows = read_rows(path)
    statuses: dict = {}
    errors: dict = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.error:
            errors[r.error[:300]] = errors.get(r.error[:300], 0) + 1
    gc_before = _rss_mib()
    held = [read_rows(path) for _ in range(5)]  # the rows as Python objects: RSS per copy
    rows_mib = (_rss_mib() - gc_before) / 5
    del held
    res = {
        "n": args.child, "rc": rc, "statuses": statuses, "errors": errors, "rows": len(rows),
        "wall_s": t1 - t0 - marks.get("timeline_s", 0.0), "timeline_s": marks.get("timeline_s"),
        "ray_start_s": marks["connected"][0] - marks["connect"][0],
        "loop_s": loop_s,
        "after_loop_s": t1 - marks["loop_end"][0] - marks["timeline_s"],
        "driver_cpu_s": c1 - c0,
        "loop_cpu_s": marks["loop_end"][1] - marks["connected"][1],
        "tasks": tasks, "task_s": sum(s for _, s in tasks.values()),
        "rss_start_mib": rss0, "peak_rss_mib": peak,
        "parquet_mib": os.path.getsize(path) / 2**20,
        "parquet_in_memory_mib": pq.read_table(path).nbytes / 2**20, "rows_objects_mib": rows_mib,
        "profile": bool(args.profile),
    }
    with open(args.json, "w") as f:
        json.dump(res, f)


def task_times(gcs: str, out: str) -> None:
    """Every task's execution time from Ray's timeline, summed per task name, read by a
    second driver attached to the benchmark's cluster (so the measured one never holds it)."""
    import logging

    import ray

    ray.init(address=gcs, _node_ip_address="127.0.0.1", logging_level=logging.ERROR, log_to_driver=False)
    tasks: dict = {}
    for e in ray.timeline():
        if e.get("ph") == "X" and str(e.get("cat", "")).startswith("task::"):
            name = e["cat"].split("::", 1)[1]
            n, s = tasks.get(name, (0, 0.0))
            tasks[name] = (n + 1, s + e["dur"] / 1e6)
    ray.shutdown()
    with open(out, "w") as f:
        json.dump(tasks, f)


def run_child(n: int, args, tmp: str) -> dict:
    out, log, js = (os.path.join(tmp, f"{x}-{n}") for x in ("out", "log", "res"))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--out", out, "--log", log,
           "--json", js, "--cpus", str(args.cpus), "--steps", str(args.steps),
           "--max-concurrent", str(args.max_concurrent)] + (["--profile"] if args.profile else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0 or not os.path.exists(js):
        tail = open(log).read()[-3000:] if os.path.exists(log) else ""
        sys.exit(f"N={n}: child failed (exit {p.returncode}):\n{p.stdout[-4000:]}\n{tail}")
    with open(js) as f:
        res = json.load(f)
    res["process_s"] = time.perf_counter() - t0
    if args.profile:
        with open(log + ".profile") as f:
            print(f"--- cProfile of the driver, N={n} (cumulative, top 25) ---\n{f.read()}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="combination counts")
    ap.add_argument("--cpus", type=int, default=2, help="the embedded Ray's CPUs")
    ap.add_argument("--steps", type=int, default=5, help="pruning.iterative_steps")
    ap.add_argument("--max-concurrent", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="cProfile the driver (slows it)")
    ap.add_argument("--keep", help="work in a temp dir under this folder (logs readable while it runs)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--timeline-of", help=argparse.SUPPRESS)
    for a in ("--out", "--log", "--json"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.timeline_of:
        return task_times(args.timeline_of, args.json)
    if args.child:
        return child(args)

    import torch

    from progprune.cluster import window_size

    print(f"setup: {_common.cpu_name()}, {os.cpu_count()} cores, CPU only; python {platform.python_version()}, "
          f"torch {torch.__version__}, ray {md.version('ray')}, torch-pruning {md.version('torch-pruning')}; "
          f"resnet20, synthetic 2 classes, 16 train images at 3x32x32; speedups "
          f"{'/'.join(f'{s:g}' for s in SPEEDUPS)} x N/4 seeds; base 0 epochs, {args.steps} pruning steps, "
          f"fine-tune 0 epochs without Ray Train, latency 1 repeat; embedded Ray ({args.cpus} CPUs), 1 CPU per task, "
          f"submission window {window_size(args.max_concurrent)}; "
          f"one child process per N{' (cProfile on: slower)' if args.profile else ''}; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-driver-", dir=args.keep) as tmp:
        for n in args.n:
            r = run_child(n, args, tmp)
            results.append(r)
            t = ", ".join(f"{k} {c} x {s / c:.2f}s" for k, (c, s) in sorted(r["tasks"].items()))
            print(f"  N={n}: exit {r['rc']}, rows {r['statuses']}; process {r['process_s']:.0f}s; Ray start "
                  f"{r['ray_start_s']:.1f}s, after the loop {r['after_loop_s']:.1f}s (timeline dump "
                  f"{r['timeline_s']:.1f}s, not counted); tasks: {t}", flush=True)
            for err, c in r["errors"].items():
                print(f"    {c} rows failed: {err}")
    print(f"load average at end {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores: above that, other work "
          "shared them)")
    cols = [("N", "{:>6}", lambda r: r["n"]),
            ("wall s", "{:>8.1f}", lambda r: r["wall_s"]),
            ("loop s", "{:>7.1f}", lambda r: r["loop_s"]),
            ("tasks s", "{:>8.1f}", lambda r: r["task_s"]),
            ("ovh s/combo", "{:>11.3f}", lambda r: (r["loop_s"] - r["task_s"] / args.cpus) / r["n"]),
            ("drv CPU s/combo", "{:>15.4f}", lambda r: r["driver_cpu_s"] / r["n"]),
            ("loop CPU s/combo", "{:>16.4f}", lambda r: r["loop_cpu_s"] / r["n"]),
            ("RSS start MiB", "{:>13.0f}", lambda r: r["rss_start_mib"]),
            ("peak RSS MiB", "{:>12.0f}", lambda r: r["peak_rss_mib"]),
            ("parquet MiB", "{:>11.2f}", lambda r: r["parquet_mib"]),
            ("rows obj MiB", "{:>12.2f}", lambda r: r["rows_objects_mib"])]
    header = " | ".join(f"{c:>{len(fmt.format(0))}}" for c, fmt, _ in cols)
    print(header)
    print("-" * len(header))
    for r in results:
        print(" | ".join(fmt.format(f(r)) for _, fmt, f in cols))
    if len(results) >= 2:
        a, b = results[0], results[-1]
        grow = b["peak_rss_mib"] - a["peak_rss_mib"]
        rows = b["rows_objects_mib"] - a["rows_objects_mib"]
        print(f"peak RSS {a['n']} -> {b['n']}: +{grow:.0f} MiB ({grow * 1024 / (b['n'] - a['n']):.1f} KiB per "
              f"combination); the rows themselves: +{rows:.2f} MiB as Python objects, "
              f"+{b['parquet_in_memory_mib'] - a['parquet_in_memory_mib']:.2f} MiB as Arrow")
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common

    main()
