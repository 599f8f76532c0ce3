"""The sweep driver: plan the grid, submit Ray tasks, stream rows in, merge the table.

Resume is by construction: every finished combination leaves `rows/<combo_id>.parquet`
(and base models `bases/…pt`) in the output, so a rerun plans only what is missing.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import yaml

from progprune.artifacts import load_artifact
from progprune.config import ComboConfig
from progprune.data import load_dataset
from progprune.errors import ProgpruneError, SpecError
from progprune.pipeline import build_row, needs_sparse
from progprune.results import ResultRow, write_rows
from progprune.spec import SweepSpec
from progprune.storage import Store, base_parts, row_parts, sparse_parts

FINISHED = ("ok", "unreachable")


@dataclass
class Plan:
    spec: SweepSpec
    store: Store
    combos: list[ComboConfig]
    done: dict = field(default_factory=dict)  # combo_id -> status of rows kept
    todo: list[ComboConfig] = field(default_factory=list)
    bases_train: dict = field(default_factory=dict)  # base_key -> cfg (to train)
    bases_reuse: dict = field(default_factory=dict)  # base_key -> cfg (stored or checkpoint)
    sparse_run: dict = field(default_factory=dict)
    sparse_reuse: dict = field(default_factory=dict)


def make_plan(spec: SweepSpec, store: Store, force: bool = False) -> Plan:
    plan = Plan(spec, store, spec.combinations())
    existing = set(store.list("rows"))
    for cfg in plan.combos:
        status = None
        if not force and os.path.basename(row_parts(cfg.combo_id())[-1]) in existing:
            status = _row_status(store, cfg)
        if status in FINISHED:
            plan.done[cfg.combo_id()] = status
            continue
        plan.todo.append(cfg)
        key = cfg.base_key()
        if cfg.base_checkpoint is None and not store.exists(*base_parts(cfg)):
            plan.bases_train.setdefault(key, cfg)
        else:
            plan.bases_reuse.setdefault(key, cfg)
        if needs_sparse(cfg):
            target = plan.sparse_reuse if store.exists(*sparse_parts(cfg)) else plan.sparse_run
            target.setdefault(cfg.sparse_key(), cfg)
    return plan


def _row_status(store: Store, cfg: ComboConfig) -> str | None:
    try:
        with store.local_copy(*row_parts(cfg.combo_id())) as p:
            return pq.read_table(p, columns=["status"]).column(0)[0].as_py()
    except Exception:
        return None  # unreadable fragment: run it again


def preflight(spec: SweepSpec) -> int:
    """Checks that need the data: class count, and base checkpoints that really load."""
    splits = load_dataset(spec.dataset, seed=spec.seeds[0])
    problems = []
    for i, m in enumerate(spec.models):
        if m.checkpoint:
            try:
                load_artifact(m.checkpoint, model_name=m.name, num_classes=splits.num_classes,
                              input_shape=splits.input_shape)
            except ProgpruneError as e:
                problems.append(f"models[{i}].checkpoint: {e}")
    if problems:
        raise SpecError(problems)
    return splits.num_classes


def print_plan(plan: Plan, out) -> None:
    s = plan.spec
    r = s.resources
    out(f"sweep {s.name}: {len(plan.combos)} combinations "
        f"({len(s.models)} models x {len(s.speedups)} speedups x {len(s.methods)} methods x {len(s.seeds)} seeds)")
    out(f"  output   {plan.store.display()}")
    out(f"  to run   {len(plan.todo)}; already done (kept) {len(plan.done)}")
    out(f"  base models: train {len(plan.bases_train)}, reuse {len(plan.bases_reuse)}")
    if plan.sparse_run or plan.sparse_reuse:
        out(f"  sparse learning: run {len(plan.sparse_run)}, reuse {len(plan.sparse_reuse)}")
    ft = s.finetune
    out(f"  resources: prune task {r.gpus_per_task} GPU / {r.cpus_per_task} CPU; fine-tune "
        f"{ft.num_workers} Ray Train worker(s), use_gpu={ft.use_gpu}; max {r.max_concurrent} concurrent")
    for cfg in plan.combos:
        state = plan.done.get(cfg.combo_id(), "todo")
        out(f"  [{state:>11}] {cfg.combo_id()}  {cfg.model:<12} {cfg.method:<11} "
            f"{cfg.target_speedup:>6}x seed {cfg.seed}")


def merge(store: Store, combos: list[ComboConfig]) -> list[ResultRow]:
    """Merge this spec's fragments into results.parquet (atomically), one row each."""
    from progprune.results import read_rows

    rows = []
    for cfg in combos:
        if store.exists(*row_parts(cfg.combo_id())):
            with store.local_copy(*row_parts(cfg.combo_id())) as p:
                rows.extend(read_rows(p))
    with tempfile.TemporaryDirectory() as d:
        store.put_file(write_rows(rows, os.path.join(d, "results.parquet")), "results.parquet")
    return rows


# ---- Ray connection -------------------------------------------------------------------
def _probe(address: str) -> None:
    """Fail in seconds when nothing listens at the address (ray.init would retry long)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ProgpruneError(f"--address: expected HOST:PORT (or ray://HOST:PORT), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise ProgpruneError(f"--address: no Ray cluster answers at {address} ({e.strerror or e}); "
                             "start one with `ray start --head` or omit --address for an embedded one")


def connect(address: str | None, num_cpus: int | None = None):
    """Attach to a cluster, or start an embedded one on 127.0.0.1. Returns a closer."""
    import logging

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray 2.60 listens on every interface whatever the node IP; token auth is what
        # keeps others out, so the embedded cluster always has it. Set before Ray is
        # imported: it reads the mode once.
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
            import secrets  # a token for this cluster only; its processes inherit it

            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    import ray

    if address:
        _probe(address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return lambda: ray.shutdown()
    # address="local": always a fresh cluster of our own, never one found in /tmp/ray
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)
    return lambda: ray.shutdown()


# ---- run ------------------------------------------------------------------------------
def run(spec: SweepSpec, *, address: str | None = None, force: bool = False, dry_run: bool = False,
        max_concurrent: int | None = None, console=None) -> int:
    from rich.console import Console

    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:  # job logs: wide enough for the table
            console = Console(highlight=False, width=160)
    out = console.print
    store = Store(spec.output)
    num_classes = preflight(spec)
    if dry_run:
        print_plan(make_plan(spec, store, force), out)
        return 0
    store.check_writable()
    with store.lock():
        plan = make_plan(spec, store, force)
        print_plan(plan, out)
        store.write_bytes(yaml.safe_dump(spec.to_dict(), sort_keys=False).encode(), "spec.resolved.yaml")
        failed = 0
        if plan.todo:
            close = connect(address)
            try:
                failed = _execute(plan, max_concurrent or spec.resources.max_concurrent, console, num_classes)
            finally:
                close()
        rows = merge(store, plan.combos)
        _final(rows, store, console)
    return 1 if any(r.status == "failed" for r in rows) or failed else 0


def _execute(plan: Plan, max_concurrent: int, console, num_classes: int) -> int:
    import ray

    from progprune.cluster import base_task, finetune_task, prune_task, sparse_task, write_fragment

    spec, store = plan.spec, plan.store
    fault = os.environ.get("PROGPRUNE_FAULT")
    res = spec.resources
    task_opts = {"num_gpus": res.gpus_per_task, "num_cpus": res.cpus_per_task}
    # a GPU prune task exits after each call (Ray's default for GPU tasks) to free CUDA memory
    ft = {"num_workers": spec.finetune.num_workers, "use_gpu": spec.finetune.use_gpu,
          "max_failures": spec.finetune.max_failures,
          "resources_per_worker": {"CPU": res.cpus_per_task} if spec.finetune.num_workers else None}
    inline = spec.finetune.num_workers == 0

    bases, sparse = {}, {}
    for key, cfg in plan.bases_train.items():
        bases[key] = base_task.options(**task_opts, max_retries=2).remote(cfg, store.uri)
    for key, cfg in plan.bases_reuse.items():  # loading a stored/checkpoint base is cheap
        bases[key] = base_task.options(num_cpus=res.cpus_per_task, max_retries=2).remote(cfg, store.uri)

    def upstream(cfg):
        if needs_sparse(cfg):
            key = cfg.sparse_key()
            if key not in sparse:
                sparse[key] = sparse_task.options(**task_opts, max_retries=2).remote(
                    cfg, store.uri, bases[cfg.base_key()])
            return sparse[key]
        return bases[cfg.base_key()]

    pending = list(plan.todo)
    running: dict = {}  # final ref -> (cfg, t0)
    done = failed = 0
    t_start = time.perf_counter()
    durations = []
    progress = _Progress(console, len(pending))
    while pending or running:
        while pending and len(running) < max_concurrent:
            cfg = pending.pop(0)
            p = prune_task.options(**task_opts, max_retries=1).remote(cfg, store.uri, upstream(cfg), fault, inline)
            f = finetune_task.options(max_retries=1).remote(cfg, store.uri, p, ft, fault)
            running[f] = (cfg, time.perf_counter())
        progress.update(done, failed, len(running), durations, max_concurrent, len(pending))
        ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
        for ref in ready:
            cfg, t0 = running.pop(ref)
            durations.append(time.perf_counter() - t0)
            try:
                row = ResultRow(**ray.get(ref))
            except Exception as e:  # the combination failed: record it and go on
                row = build_row(cfg, error=_one_line(e), started_at=None, num_classes=num_classes)
                write_fragment(store, row)
            if row.status == "failed":
                failed += 1
            done += 1
            progress.log(_row_line(row))
            merge(store, plan.combos)  # the table on disk is always current
    progress.close(done, failed, time.perf_counter() - t_start)
    return failed


def _one_line(e: Exception) -> str:
    """The innermost error message of a Ray task failure, on one line."""
    cause = getattr(e, "cause", None) or e
    msg = f"{type(cause).__name__}: {cause}"
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    tail = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "~"))]
    return (tail[-1] if tail else lines[-1] if lines else type(e).__name__)[:500]


def _row_line(row: ResultRow) -> str:
    if row.status == "failed":
        return f"FAILED {row.model} {row.method} {row.target_speedup}x seed {row.seed}: {row.error}"
    acc = "" if row.final_top1 is None else f" top-1 {100 * row.base_top1:.2f} -> {100 * row.final_top1:.2f}%"
    return (f"{row.status:<11} {row.model} {row.method} {row.target_speedup}x seed {row.seed}: "
            f"{row.achieved_speedup:.3f}x MACs, {row.latency_speedup:.2f}x latency{acc}")


class _Progress:
    """rich live progress on a terminal; plain lines (for `ray job logs`) otherwise."""

    def __init__(self, console, total: int):
        self.console, self.total, self.live = console, total, None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.live = Progress(TextColumn("[bold]sweep"), BarColumn(), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=console, transient=True)
            self.task = self.live.add_task("", total=total)
            self.live.start()
        self.last = ""

    def update(self, done, failed, running, durations, conc, pending):
        eta = "?"
        if durations:
            mean = sum(durations) / len(durations)
            eta = f"{mean * (pending + running) / max(conc, 1):.0f}s"
        text = f"{done}/{self.total} done, {failed} failed, {running} running, ETA {eta}"
        if self.live:
            self.live.update(self.task, completed=done, description=text)
        elif text != self.last:
            self.console.print(text)
        self.last = text

    def log(self, line: str) -> None:
        self.console.print(line)

    def close(self, done: int, failed: int, seconds: float) -> None:
        if self.live:
            self.live.stop()
        self.console.print(f"{done}/{self.total} combinations finished ({failed} failed) in {seconds:.0f}s")


def _final(rows: list[ResultRow], store: Store, console) -> None:
    from rich.table import Table

    t = Table(title=f"results ({store.display('results.parquet')})")
    for c in ("model", "method", "seed", "target", "achieved", "params", "latency", "base top-1",
              "pruned", "final", "status"):
        t.add_column(c, justify="left" if c in ("model", "method", "status") else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    num = lambda v, f="{:.3f}x": "-" if v is None else f.format(v)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r.model, r.method, r.target_speedup, r.seed)):
        t.add_row(r.model, r.method, str(r.seed), f"{r.target_speedup}x", num(r.achieved_speedup),
                  num(r.compression_ratio, "{:.2f}x"), num(r.latency_speedup, "{:.2f}x"), pct(r.base_top1),
                  pct(r.pruned_top1), pct(r.final_top1), r.status)
    console.print(t)
    try:
        from progprune.report import build_report

        if store.local:
            rep = build_report(store.path("results.parquet"), store.path("report"))
            console.print(f"report: {rep.get('report')}")
    except ProgpruneError as e:
        console.print(f"report skipped: {e}")

