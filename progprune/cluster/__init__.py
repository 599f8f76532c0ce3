"""The Ray layer, all of it: connecting (with token auth), the scheduling loop, and (in
`progprune.cluster.tasks`) the tasks and the Ray Train run. Read top to bottom:
connection, then the loop (setup, tasks, Train, results); then tasks.py.

This module imports Ray only when it connects: the embedded cluster's token auth must be
set in the environment before Ray is first imported.
"""
from __future__ import annotations

import os
import re
import socket
import time
from collections import deque

from progprune.errors import BadInput, one_line
from progprune.pipeline import build_row, needs_sparse
from progprune.results import ResultRow


# ---- Ray connection -------------------------------------------------------------------
def probe(address: str) -> None:
    """Fail in seconds when nothing listens at the address (ray.init would retry long)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--address: expected HOST:PORT (or ray://HOST:PORT), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise BadInput(f"--address: no Ray cluster answers at {address} ({e.strerror or e}); "
                             "start one with `ray start --head` or omit --address for an embedded one")


def connect(address: str | None, num_cpus: int | None = None):
    """Attach to a cluster, or start an embedded one on 127.0.0.1. Returns a closer."""
    import logging

    address = address or os.environ.get("RAY_ADDRESS")
    # Ray folds log lines that differ only in words with digits ("[resnet20 ... 2x] epoch
    # 3/10 ...") into "[repeated Nx]": every combination's own line must reach the job log
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
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
        probe(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError) as e:  # no cluster ("auto"), versions, auth
            raise BadInput(f"--address: cannot connect to the Ray cluster at {address} (--address or "
                           f"RAY_ADDRESS): {one_line(e, limit=300)}; start one with `ray start --head`, or "
                           "omit --address and unset RAY_ADDRESS for an embedded one") from None
    else:  # address="local": always a fresh cluster of our own, never one found in /tmp/ray
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=True)
    _quiet_worker_logs(embedded=not address)
    return lambda: ray.shutdown()


# ---- resources: what the spec asks of a node, checked before anything is written --------
_GPU_WAY = ("set resources.gpus_per_task: 0 and finetune.use_gpu: false to run on CPUs, or run on a "
            "cluster with GPU nodes")


def _asks(spec) -> list[tuple[str, str, dict]]:
    """(field, who, resources one of them needs on a single node), for each kind of task a
    sweep schedules: the prune task (also the in-task fine-tune), and each Ray Train worker."""
    r, ft = spec.resources, spec.finetune
    asks = [("resources.gpus_per_task" if r.gpus_per_task else "resources.cpus_per_task", "a prune task",
             {"CPU": r.cpus_per_task, "GPU": r.gpus_per_task})]
    if ft.num_workers:
        asks.append(("finetune.use_gpu" if ft.use_gpu else "resources.cpus_per_task", "each Ray Train worker",
                     {"CPU": r.cpus_per_task, "GPU": 1 if ft.use_gpu else 0}))
    return [(f, who, {k: v for k, v in need.items() if v}) for f, who, need in asks]


def _fits(need: dict, node: dict) -> bool:
    return all(float(node.get(k, 0)) >= v for k, v in need.items())


def _show(res: dict) -> str:
    return ", ".join(f"{float(res.get(k, 0)):g} {k}" for k in ("CPU", "GPU"))


def _refusal(field: str, who: str, need: dict, where: str, have: str) -> BadInput:
    way = (_GPU_WAY if "GPU" in need and field != "resources.cpus_per_task" else
           "lower resources.cpus_per_task, or run on a cluster with larger nodes")
    return BadInput(f"{field}: {who} asks for {_show(need)} on one node, but {where} has {have}, so it would "
                    f"wait forever; {way}")


def check_local_resources(spec) -> None:
    """Refuse a spec the embedded Ray of this machine cannot schedule (it would queue
    forever): GPUs as torch.cuda sees them, CPUs as os.cpu_count() counts them (Ray never
    sees more). Imports no Ray."""
    asks = _asks(spec)
    gpus = 0
    if any("GPU" in need for _, _, need in asks):
        import torch

        gpus = torch.cuda.device_count()
    here = {"CPU": os.cpu_count() or 1, "GPU": gpus}
    for field, who, need in asks:
        if not _fits(need, here):
            raise _refusal(field, who, need, "the embedded Ray of this machine (no --address)",
                           f"{_show(here)}{' (torch.cuda sees no GPU)' if not gpus else ''}")


def _v1_autoscaler(status: bytes | None) -> bool:
    """Whether Ray's v1 autoscaler status (JSON in the GCS) comes from an autoscaler that
    can add nodes. `ray start --head` runs a read-only monitor that writes it too: it names
    each node's type after the node itself ("node_<id>"); a real one names its groups."""
    import json

    if not status:
        return False
    mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def check_resources(spec, address: str, warn=print) -> None:
    """Refuse, after connecting and before submitting anything, a spec that no node of the
    cluster can schedule now, nor any node group its autoscaler may add. Where an
    autoscaler runs without stating its node groups (Ray's v1 autoscaler), what it may add
    is unknown: a line to `warn`, not a refusal."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    groups, autoscaler = [], False
    try:  # the autoscaler's node groups (v2; KubeRay, cluster launcher): what it may still add
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        config = state.get_cluster_config()
        groups = [dict(g.resources) for g in (config.node_group_configs if config else ())
                  if g.max_count != 0]
        autoscaler = bool(config) or _v1_autoscaler(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS))
    except Exception:  # noqa: BLE001 - private API (Ray is pinned): without it, the nodes alone
        pass
    for field, who, need in _asks(spec):
        if any(_fits(need, n) for n in [*nodes, *groups]):
            continue
        have = "; ".join(f"a node with {_show(n)}" for n in nodes[:4]) or "no node"
        if len(nodes) > 4:
            have += f" (and {len(nodes) - 4} more)"
        if autoscaler and not groups:
            warn(f"warning: {field}: {who} asks for {_show(need)} on one node, and no node of the Ray cluster at "
                 f"{address} has that now ({have}); its autoscaler must add one, or the sweep waits")
            continue
        if groups:
            have += " and no autoscaler node group offers more"
        raise _refusal(field, who, need, f"the Ray cluster at {address}", have)


# Ray Train 2.60 lines that LoggingConfig(log_level="WARNING") (set on every Train run) does
# not reach: the per-report INFO line comes from a logger named by its file path, not
# "ray.train.*", and the controller's core worker logs an internal PreemptionWatcher notice
# at error level. Matched narrowly; Ray's own log files keep them.
_CHATTER = re.compile(r"Reporting training result \d+: TrainingReport\(|core_worker\.cc:\d+: "
                      r"Actor with class name: 'PreemptionWatcher' .* max_restarts > 0")


def _quiet_worker_logs(embedded: bool) -> None:
    """Keep the job log to the sweep's own lines. Without this, a fine-tune printed two lines
    per epoch, and on the embedded cluster (no dashboard, so no state API) Ray Train's
    placement-group cleaner, which cannot work there, warned once a second per Train run
    (203 of 355 lines of a 4-combination sweep)."""
    try:  # Ray's own printer, private (Ray is pinned); elsewhere the log stays as Ray prints it
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def quiet(print_logs):
        def handler(data):
            if embedded and data.get("actor_name") == "PlacementGroupCleaner":
                return
            lines = [line for line in data.get("lines", ()) if not _CHATTER.search(line)]
            if lines:
                print_logs({**data, "lines": lines})
        return handler

    dispatcher.handlers = [(name, quiet(h) if name == "ray_print_logs" else h)
                           for name, h in dispatcher.handlers]


# ---- the scheduling loop ---------------------------------------------------------------
# The submission window: at most this many combinations in flight (prune queued or running,
# pruned and waiting for a Train slot, or fine-tuning), refilled in plan order as rows come
# in. Every submitted task costs the driver ~11 KiB (its spec, its refs) however long it
# waits, so the window keeps the driver's memory independent of the sweep's size, and
# `ray.wait` sees at most this many refs. It is still far more than a cluster runs at once,
# so an autoscaler sees more pending demand than it has workers and grows to its maximum.
WINDOW_MIN = 64


def window_size(max_concurrent: int) -> int:
    """Combinations in flight at most: 64, or 4x the Train runs allowed if that is more."""
    return max(WINDOW_MIN, 4 * max_concurrent)


def execute(plan, max_concurrent: int, progress, num_classes: int, table, lease,
            window: int | None = None) -> int:
    """The scheduling loop: base and sparse tasks once each, then per combination a prune
    task and its fine-tune coordinator; rows stream into `table` as they finish. At most
    `window` combinations (default `window_size(max_concurrent)`) are in flight at once."""
    import ray

    from progprune.cluster.tasks import (base_task, finetune_task, prune_task, scratch_task, sparse_task,
                                         write_fragment)

    # setup: what each task asks for
    spec, store = plan.spec, plan.store
    res = spec.resources
    window = max(1, window or window_size(max_concurrent))
    task_opts = {"num_gpus": res.gpus_per_task, "num_cpus": res.cpus_per_task}
    # a GPU prune task exits after each call (Ray's default for GPU tasks) to free CUDA memory
    in_task = not spec.finetune.num_workers
    # no Train workers: the coordinator fine-tunes itself, on the prune task's resources
    ft_opts = {"max_retries": 1, **(task_opts if in_task else {})}

    # tasks: bases and sparse learning once each, shared by the combinations that need
    # them. Bases are few (models x seeds) and long: all of them start at once. The driver
    # lets go of a base's or a sparse model's ref once its last combination is submitted
    # (the submitted tasks hold their own), so finished ones do not pile up.
    bases, sparse = {}, {}
    for key, cfg in plan.bases_train.items():
        bases[key] = base_task.options(**task_opts, max_retries=2).remote(cfg, store.uri, retrain=True)
    for key, cfg in plan.bases_reuse.items():  # loading a stored/checkpoint base is cheap
        bases[key] = base_task.options(num_cpus=res.cpus_per_task, max_retries=2).remote(cfg, store.uri)
    users: dict = {}  # base or sparse key -> combinations not submitted yet that need it
    for cfg in plan.todo:
        for key in _upstream_keys(cfg):
            users[key] = users.get(key, 0) + 1

    def upstream(cfg):
        """The ref a combination's prune task takes (sparse model, else base)."""
        ref = bases[cfg.base_key()]
        if needs_sparse(cfg):
            key = cfg.sparse_key()
            if key not in sparse:
                sparse[key] = sparse_task.options(**task_opts, max_retries=2).remote(
                    cfg, store.uri, ref, retrain=key in plan.sparse_run)
            ref = sparse[key]
        return ref

    # Prune tasks are queued ahead of the cluster, up to the window, so that an autoscaling
    # cluster sees the demand and grows to it; `max_concurrent` bounds only the Ray Train
    # runs in flight (each costs head memory, ray #65443). In-task fine-tuning
    # (num_workers 0) has no Train run.
    t_start = time.perf_counter()
    todo = deque(plan.todo)  # not submitted yet, in plan order
    prunes: dict = {}  # prune ref -> cfg
    pruned: deque = deque()  # (prune ref, cfg) waiting for a Train slot
    running: dict = {}  # coordinator ref -> cfg
    scratches: dict = {}  # scratch control ref -> cfg (it trains in its own task)
    # a method's prune ref, kept until its scratch control (later in plan order) takes it
    architectures = {c.architecture_of().combo_id() for c in plan.todo if c.control == "scratch"}
    arch_refs: dict = {}
    done = failed = 0
    while todo or prunes or pruned or running or scratches:
        # the window: more prune tasks as combinations finish
        while todo and len(prunes) + len(pruned) + len(running) + len(scratches) < window:
            cfg = todo.popleft()
            if cfg.control == "scratch":  # after its method's prune (this run's, or the stored row's)
                arch = cfg.architecture_of().combo_id()
                ref = arch_refs.pop(arch, None)
                status = None if ref else table.statuses().get(arch)
                scratches[scratch_task.options(**task_opts, max_retries=1).remote(cfg, store.uri, ref, status)] = cfg
                continue
            ref = prune_task.options(**task_opts, max_retries=1).remote(cfg, store.uri, upstream(cfg))
            prunes[ref] = cfg
            if cfg.combo_id() in architectures:
                arch_refs[cfg.combo_id()] = ref
            for key in _upstream_keys(cfg):
                users[key] -= 1
                if not users[key]:  # its last combination is submitted
                    (sparse if key[0] == "sparse" else bases).pop(key[1], None)
        # Train: a coordinator per pruned combination, as slots allow
        while pruned and (in_task or len(running) < max_concurrent):
            p, cfg = pruned.popleft()
            running[finetune_task.options(**ft_opts).remote(cfg, store.uri, p, res)] = cfg
        progress.update(done, failed, len(running), len(todo) + len(prunes) + len(pruned), len(scratches))
        refs = [*running, *scratches, *prunes]
        ready, _ = ray.wait(refs, num_returns=1, timeout=2.0)
        if ready:  # take everything that is ready: one pass per batch, not per ref
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        # results: a coordinator returns the combination's row (a failed prune fails it too)
        for ref in ready:
            if ref in prunes:
                pruned.append((ref, prunes.pop(ref)))
                continue
            cfg = running.pop(ref) if ref in running else scratches.pop(ref)
            try:
                row: ResultRow = ray.get(ref)
            # broad on purpose: a task runs the user's models and Torch-Pruning, and Ray adds
            # its own failures (worker died, out of memory); each fails this combination only
            except Exception as e:
                row = build_row(cfg, error=failure_line(e), num_classes=num_classes)
                kept = table.statuses().get(row.combo_id)
                if kept in ("ok", "unreachable"):  # never replace a finished row with a failure
                    progress.note(f"kept the earlier {kept} row of {cfg.model} {cfg.method} "
                                  f"{cfg.target_speedup}x seed {cfg.seed}; this rerun failed: {row.error}")
                    failed += 1
                    done += 1
                    continue
                write_fragment(store, row)
            if row.status == "failed":
                failed += 1
            done += 1
            table.add(row)
            progress.row(row)
        table.flush()  # at a bounded rate: results.parquet stays at most one interval behind
        lease.check()  # stop if another driver took the output over
    progress.close(done, failed, time.perf_counter() - t_start)
    return failed


def _upstream_keys(cfg) -> list:
    """The base's key, and the sparse model's where the method has one (tagged apart); none
    for a scratch control (it trains its method's architecture from scratch)."""
    if cfg.control == "scratch":
        return []
    keys = [("base", cfg.base_key())]
    if needs_sparse(cfg):
        keys.append(("sparse", cfg.sparse_key()))
    return keys


_TRACEBACK = ("File ", "Traceback", "^", "~")


def failure_line(e: BaseException) -> str:
    """A Ray task failure on one line: the innermost error. Ray wraps the task's exception
    (`cause`), and Ray Train nests the worker's traceback in its message, so this takes the
    last line that is not traceback (errors.one_line takes the first), cut as one_line cuts."""
    cause = getattr(e, "cause", None) or e
    lines = [ln.strip() for ln in f"{type(cause).__name__}: {cause}".splitlines() if ln.strip()]
    tail = [ln for ln in lines if not ln.startswith(_TRACEBACK)]
    return one_line(RuntimeError(tail[-1] if tail else lines[-1]), limit=500)
