"""The sweep driver: plan the grid, check before any work, hold the output's lease, and
hand the plan to the Ray layer (`progprune.cluster`); no Ray import here.

Resume is by construction: every finished combination leaves `rows/<combo_id>.parquet`
(and base models `bases/…pt`) in the output, so a rerun plans only what is missing.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field


from progprune.config import ComboConfig
from progprune.errors import BadInput, sigterm_unwinds
from progprune.tasks import get_task, needs_sparse
from progprune.results import ResultRow, rows_to_table
from progprune.spec import SweepSpec, check_runtime, dump_yaml
from progprune.storage import LAYOUT, Store
from progprune.table import ResultsTable

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


def make_plan(spec: SweepSpec, store: Store, force: bool = False,
              statuses: dict | None = None, combos: list[ComboConfig] | None = None) -> Plan:
    """What is left to run. `statuses` (combo_id -> status of its stored row) comes from
    the results table, which read every fragment once; `combos` is the spec's grid where
    the caller has expanded it already."""
    plan = Plan(spec, store, spec.combinations() if combos is None else combos)
    if statuses is None:
        statuses = _table(store, plan.combos).statuses()
    for cfg in plan.combos:
        status = None if force else statuses.get(cfg.combo_id())
        if status in FINISHED:
            plan.done[cfg.combo_id()] = status
            continue
        plan.todo.append(cfg)
        if cfg.control == "scratch":  # trains its method's architecture: no base, no sparse model
            continue
        key = cfg.base_key()
        # --force retrains what it reruns: a broken stored base must not fail good rows
        if cfg.base_checkpoint is None and (force or not store.exists(*LAYOUT.base(cfg))):
            plan.bases_train.setdefault(key, cfg)
        else:
            plan.bases_reuse.setdefault(key, cfg)
        if needs_sparse(cfg):
            stored = not force and store.exists(*LAYOUT.sparse(cfg))
            target = plan.sparse_reuse if stored else plan.sparse_run
            target.setdefault(cfg.sparse_key(), cfg)
    return plan


def _table(store: Store, combos: list[ComboConfig]) -> ResultsTable:
    table = ResultsTable(store, [c.combo_id() for c in combos])
    table.load()
    return table


def preflight(spec: SweepSpec) -> int:
    """Checks that need the data, by the spec's task (images: class count, base checkpoints
    that really load, models that take the data's image size); the class count (a causal
    LM's: its vocabulary)."""
    # the tasks' kind of device (the image's packages are the driver's: onnxruntime's providers)
    check_runtime(spec, "cuda" if spec.resources.gpus_per_task > 0 else "cpu")
    return get_task(spec.task).preflight(spec)


def print_plan(plan: Plan, out) -> None:
    s = plan.spec
    r = s.resources
    metrics = s.pruning.target_metric
    axes = f" x {len(metrics)} target metrics" if metrics != ("macs",) else ""
    controls = f"; controls: {', '.join(s.controls)}" if s.controls else ""
    out(f"sweep {s.name}: {len(plan.combos)} combinations ({len(s.models)} models x {len(s.speedups)} speedups"
        f"{axes} x {len(s.methods)} methods x {len(s.seeds)} seeds{controls})")
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
        metric = f" {cfg.prune.target_metric:<7}" if axes else ""
        out(f"  [{state:>11}] {cfg.combo_id()}  {cfg.model:<12} {_method_label(cfg.method, cfg.control):<20} "
            f"{cfg.target_speedup:>6}x{metric} seed {cfg.seed}")


# ---- run ------------------------------------------------------------------------------
def run(spec: SweepSpec, *, address: str | None = None, force: bool = False, dry_run: bool = False,
        max_concurrent: int | None = None, break_lock: bool = False, replace_sweep: bool = False,
        console=None) -> int:
    from rich.console import Console

    if console is None:  # markup off: user text ('progprune[torchvision]', paths) prints as is
        console = Console(highlight=False, markup=False)
        if not console.is_terminal:  # job logs: wide enough for the table
            console = Console(highlight=False, markup=False, width=160)
    out = console.print
    _check_env_settings()
    store = Store(spec.output)  # a bucket: probed on first use, in bounded time
    _check_owner(store, spec, replace_sweep)
    store.check_kinds(LAYOUT.files, LAYOUT.dirs)
    store.check_writable(probe_write=False)  # what the file system says now: one rule for both
    from progprune import cluster  # the Ray layer (imports Ray only when it connects)

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:  # the embedded Ray is this machine: what it lacks is known now
        cluster.check_local_resources(spec)
    num_classes = preflight(spec)
    if dry_run:  # what the run would refuse, without writing anything
        print_plan(make_plan(spec, store, force), out)
        return 0
    # SIGTERM (Kubernetes, `kill`, `ray job stop`) ends a sweep as Ctrl-C does: finished rows
    # merged, lock and temporary files removed, the embedded Ray shut down
    with sigterm_unwinds() as sigterm:
        return _run(spec, store, cluster, address, force, max_concurrent, break_lock, num_classes, console,
                    sigterm)


def _run(spec, store, cluster, address, force, max_concurrent, break_lock, num_classes, console, sigterm) -> int:
    out = console.print
    close = None
    try:
        if address:  # an existing cluster: connected (and its resources checked) before anything is written
            close = cluster.connect(address)
            sigterm.install()  # Ray's driver installs its own crash handler for SIGTERM
            cluster.check_resources(spec, address, warn=out)
        store.check_writable()
        with store.lock(break_lock=break_lock, on_wait=out) as lease:
            combos = spec.combinations()
            table = _table(store, combos)
            plan = make_plan(spec, store, force, table.statuses(), combos)
            print_plan(plan, out)
            store.write_bytes(dump_yaml(spec).encode(), *LAYOUT.spec)
            failed = 0
            if plan.todo:
                try:
                    if close is None:
                        close = cluster.connect(None)
                        sigterm.install()
                    progress = _Progress(console, len(plan.todo))
                    failed = cluster.execute(plan, max_concurrent or spec.resources.max_concurrent,
                                             progress, num_classes, table, lease)
                except KeyboardInterrupt:
                    _merge_on_interrupt(table)
                    raise
            rows = table.flush(force=True)
            _final(rows, store, console)
    finally:
        if close is not None:
            close()
    return 1 if any(r.status == "failed" for r in rows) or failed else 0


def _check_env_settings() -> None:
    """The PROGPRUNE_* settings a run reads only later (the lock's lease and settle time, the
    table's rewrite interval), read now: a bad value is one line before any work, and a dry
    run refuses what the run would."""
    from progprune.storage import lease_seconds, settle_seconds
    from progprune.table import interval_seconds

    lease_seconds()
    settle_seconds()
    interval_seconds()


def _merge_on_interrupt(table: ResultsTable) -> None:
    """Ctrl-C or SIGTERM: results.parquet gets every row finished so far (the table is
    rewritten at a bounded rate, so it may lag), read back from the fragments, which
    hold the rows of tasks the driver had not collected yet too."""
    try:
        table.load()
        table.flush(force=True)
    except KeyboardInterrupt:  # a second Ctrl-C: the fragments stay, the next run merges them
        pass


def _check_owner(store: Store, spec: SweepSpec, replace: bool) -> None:
    """An output belongs to one sweep name: another sweep would replace its table. A folder
    that holds what a sweep writes (results.parquet, rows/, ...) but no spec.resolved.yaml
    is not a sweep's output (a sweep writes its spec before anything else): refused too."""
    if replace:
        return
    if not store.exists(*LAYOUT.spec):
        found = [p[-1] for p in (*LAYOUT.files, *LAYOUT.dirs) if p != LAYOUT.lock and store.exists(*p)]
        if found:
            raise BadInput(
                f"{store.display()} holds {', '.join(found)} but no {LAYOUT.spec[-1]}, so it is not "
                "this sweep's output (another sweep's table, or one made by hand); choose another "
                "--output, or pass --replace-sweep to let this sweep replace it", field="output")
        return
    import yaml

    try:
        doc = yaml.safe_load(store.read_bytes(*LAYOUT.spec))
    except (OSError, ValueError, yaml.YAMLError):  # unreadable: the lock and the rows still protect it
        return
    owner = doc.get("name") if isinstance(doc, dict) else None
    if owner and owner != spec.name:
        raise BadInput(
            f"output {store.display()} holds sweep {owner!r}, not {spec.name!r}; choose another "
            "--output, or pass --replace-sweep to let this sweep take it over", field="output")


def _method_label(method: str, control: str | None) -> str:
    """How a row's method reads in the plan and row lines: a control says so."""
    return {"random": "random (control)", "scratch": f"{method} (scratch)"}.get(control, method)


def _row_line(row: ResultRow) -> str:
    metric = "" if row.target_metric in (None, "macs") else f" {row.target_metric}"
    what = f"{row.model} {_method_label(row.method, row.control)} {row.target_speedup}x{metric} seed {row.seed}"
    if row.status == "failed":
        return f"FAILED {what}: {row.error}"
    if row.achieved_speedup is None:  # a scratch control without an architecture
        return f"{row.status:<11} {what}: {row.error}"
    base = "" if row.base_top1 is None else f"{100 * row.base_top1:.2f} -> "
    acc = "" if row.final_top1 is None else f" top-1 {base}{100 * row.final_top1:.2f}%"
    macs = row.macs_speedup if row.macs_speedup is not None else row.achieved_speedup  # a row of before issue 20
    if row.final_perplexity is not None or row.base_perplexity is not None:  # a causal LM: lower is better
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        return (f"{row.status:<11} {what}: {row.achieved_speedup:.3f}x {row.target_metric}, {macs:.3f}x MACs, "
                f"perplexity {f(row.base_perplexity)} -> {f(row.final_perplexity)}")
    latency = "" if row.latency_speedup is None else f", {row.latency_speedup:.2f}x latency"
    return f"{row.status:<11} {what}: {macs:.3f}x MACs{latency}{acc}"


HEARTBEAT_S = 60.0  # plain-text progress: a line at least this often while nothing changes


class _Progress:
    """rich live progress on a terminal; plain lines (for `ray job logs`) otherwise."""

    def __init__(self, console, total: int):
        self.console, self.total, self.live = console, total, None
        self.t0 = time.monotonic()
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.live = Progress(TextColumn("[bold]sweep"), BarColumn(), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=console, transient=True)
            self.task = self.live.add_task("", total=total)
            self.live.start()
        self.last, self.printed = None, 0.0

    def update(self, done: int, failed: int, running: int, queued: int, scratch: int = 0):
        """One status line; ETA from the throughput so far (rows per second). `scratch`:
        scratch controls submitted (waiting for their method's prune, or training)."""
        elapsed = time.monotonic() - self.t0
        eta = f"{elapsed / done * (self.total - done):.0f}s" if done else "?"
        scratch_text = f"{scratch} scratch controls, " if scratch else ""
        text = (f"{done}/{self.total} done, {failed} failed, {running} fine-tuning, {scratch_text}{queued} queued, "
                f"ETA {eta}")
        if self.live:
            self.live.update(self.task, completed=done, description=text)
        elif (done, failed, running, queued, scratch) != self.last or time.monotonic() - self.printed >= HEARTBEAT_S:
            # a log file gets a line when the counts move, else one per HEARTBEAT_S (not one per
            # loop turn: the ETA alone changes every 2 s)
            self.console.print(text)
            self.printed = time.monotonic()
        self.last = (done, failed, running, queued, scratch)

    def row(self, row: ResultRow) -> None:
        self.console.print(_row_line(row), markup=False)

    def note(self, line: str) -> None:
        self.console.print(line, markup=False)

    def close(self, done: int, failed: int, seconds: float) -> None:
        if self.live:
            self.live.stop()
        self.console.print(f"{done}/{self.total} combinations finished ({failed} failed) in {seconds:.0f}s")


def _final(rows: list[ResultRow], store: Store, console) -> None:
    """The results tables (`progprune report`'s own), and the report beside the table."""
    from progprune.report import build_report, frame_of, show

    console.print(f"results: {store.display(*LAYOUT.results)}")
    if store.local:
        try:
            rep = build_report(store.path(*LAYOUT.results), store.path(*LAYOUT.report), console=console)
            console.print(f"report: {rep['report']}")
            return
        except BadInput as e:
            console.print(f"report skipped: {e}")
    show(frame_of(rows_to_table(rows)), console)
