"""The Ray tasks and the Ray Train run of one combination (imports Ray).

Everything here is a thin wrapper around `progprune.pipeline`; what passes between
tasks is small dicts, and the models themselves go through the output store. Task
output reaches the job log one line per epoch, prefixed with its combination.

GPU deadlock (ray-project/ray#5790, #32856): a task that holds a GPU and waits for a TorchTrainer
needing another GPU can starve forever. So the prune task, which holds the GPU, ends
before fine-tuning starts; the fine-tune coordinator holds no CPU and no GPU while
`fit()` runs, and only the Train workers hold devices.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile

import ray

from progprune.artifacts import load_artifact, save_artifact
from progprune.config import ComboConfig
from progprune.data import load_dataset
from progprune.pipeline import (BaseInfo, PruneInfo, _noop, base_stage, build_row, device_name,
                                finetune_stage, needs_sparse, now, prune_stage, sparse_stage)
from progprune.pruning import PruneOutcome
from progprune.results import write_rows
from progprune.storage import Store, base_parts, row_parts, sparse_parts
from progprune.training import evaluate, pick_device


# ---- fault injection for the test suite ----------------------------------------------
def _fault(spec: str | None, stage: str, cfg: ComboConfig, store: Store) -> None:
    """PROGPRUNE_FAULT="raise:prune:resnet20:3.0" raises in that stage of that combination;
    "kill:finetune:vgg11:2.0" SIGKILLs the worker process once (a marker in the store
    makes the retry succeed). The driver reads the variable and passes it down."""
    if not spec:
        return
    for item in spec.split(","):
        kind, st, model, speedup = (item.split(":") + ["", "", "", ""])[:4]
        if st != stage or model != cfg.model or float(speedup or 0) != float(cfg.target_speedup):
            continue
        if kind == "raise":
            raise RuntimeError(f"injected failure in {stage} of {cfg.model}@{cfg.target_speedup}x")
        marker = ("faults", f"{cfg.combo_id()}-{stage}")
        if kind == "kill" and not store.exists(*marker):
            store.write_bytes(b"killed", *marker)
            os.kill(os.getpid(), signal.SIGKILL)


def _logger(cfg: ComboConfig, per_base: bool = False):
    """Task output reaches `ray job logs` / `kubectl logs` (the driver runs with
    log_to_driver), one line per event, prefixed with the combination it belongs to."""
    label = (f"{cfg.model} seed {cfg.seed}" if per_base else
             f"{cfg.model} {cfg.method} {cfg.target_speedup:g}x seed {cfg.seed}")
    return lambda msg: print(f"[{label}] {msg.strip()}", flush=True)


def _save(store: Store, model, cfg: ComboConfig, splits, parts: tuple, history=None, meta=None) -> str:
    with tempfile.TemporaryDirectory() as d:
        p = save_artifact(os.path.join(d, parts[-1]), model, model_name=cfg.model,
                          num_classes=splits.num_classes, input_shape=splits.input_shape,
                          history=history, meta=meta)
        return store.put_file(p, *parts)


def _load(store: Store, cfg: ComboConfig, splits, parts: tuple):
    with store.local_copy(*parts) as p:
        return load_artifact(p, model_name=cfg.model, num_classes=splits.num_classes,
                             input_shape=splits.input_shape)


# ---- tasks ----------------------------------------------------------------------------
@ray.remote
def base_task(cfg: ComboConfig, store_uri: str, retrain: bool = False) -> dict:
    """Train (or load) the base model once per (model, dataset, seed) and store it.
    `retrain` (the plan found none, or --force) ignores a stored file from an earlier run."""
    store = Store(store_uri)
    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    if store.exists(*base_parts(cfg)) and not retrain:
        _, info = _load(store, cfg, splits, base_parts(cfg))
        return info["meta"]
    device = pick_device()
    model, info = base_stage(cfg, splits, device, _logger(cfg, per_base=True))
    meta = dataclasses.asdict(info) | {"device": device_name(device), "trained_at": now()}
    _save(store, model, cfg, splits, base_parts(cfg), meta=meta)
    return meta


@ray.remote
def sparse_task(cfg: ComboConfig, store_uri: str, base_meta: dict, retrain: bool = False) -> dict:
    """Sparse learning once per (base, method, settings), stored for every speedup."""
    store = Store(store_uri)
    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    if retrain or not store.exists(*sparse_parts(cfg)):
        model, _ = _load(store, cfg, splits, base_parts(cfg))
        sparse_stage(cfg, model, splits, pick_device(), _logger(cfg))
        _save(store, model, cfg, splits, sparse_parts(cfg), meta={"base": base_meta})
    return base_meta


@ray.remote
def prune_task(cfg: ComboConfig, store_uri: str, base_meta: dict, fault: str | None,
               inline_finetune: bool) -> dict:
    """Progressively prune one combination on this worker's device and store the result.
    With `inline_finetune` (finetune.num_workers == 0) it also fine-tunes here."""
    store = Store(store_uri)
    _fault(fault, "prune", cfg, store)
    device = pick_device()
    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    src = sparse_parts(cfg) if needs_sparse(cfg) else base_parts(cfg)
    model, _ = _load(store, cfg, splits, src)
    log = _logger(cfg)
    pr = prune_stage(cfg, model, splits, device, log)
    out = {"base": base_meta, "prune": _prune_dict(pr), "device": device_name(device),
           "num_classes": splits.num_classes, "started_at": now()}
    parts = ("combos", cfg.combo_id(), "pruned.pt")
    out["artifact"] = _save(store, model, cfg, splits, parts, history=pr.outcome.history,
                            meta={"combo_id": cfg.combo_id()})
    if inline_finetune and pr.outcome.status == "ok":
        _fault(fault, "finetune", cfg, store)
        ft = finetune_stage(cfg, model, splits, device, log)
        out["final"] = evaluate(model, splits.test_x, splits.test_y, splits, device)
        out["finetune_seconds"] = ft.seconds
        out["artifact"] = _save(store, model, cfg, splits, ("combos", cfg.combo_id(), "final.pt"),
                                history=pr.outcome.history, meta={"combo_id": cfg.combo_id()})
    return out


def _prune_dict(pr: PruneInfo) -> dict:
    d = dataclasses.asdict(pr)
    d["outcome"].pop("history")  # large; it lives in the artifact
    return d


def _prune_info(d: dict) -> PruneInfo:
    return PruneInfo(outcome=PruneOutcome(**d["outcome"]), **{k: v for k, v in d.items() if k != "outcome"})


def _base_info(d: dict) -> BaseInfo:
    fields = {f.name for f in dataclasses.fields(BaseInfo)}
    return BaseInfo(**{k: v for k, v in d.items() if k in fields})


def write_fragment(store: Store, row) -> None:
    with tempfile.TemporaryDirectory() as d:
        store.put_file(write_rows([row], os.path.join(d, "row.parquet")), *row_parts(row.combo_id))


@ray.remote(num_cpus=0)
def finetune_task(cfg: ComboConfig, store_uri: str, pruned: dict, ft: dict, fault: str | None) -> dict:
    """Coordinator holding no CPU/GPU: runs the TorchTrainer, then writes the row."""
    store = Store(store_uri)
    final, ft_seconds, artifact = pruned.get("final"), pruned.get("finetune_seconds"), pruned["artifact"]
    workers, resumed = 0, None
    if pruned["prune"]["outcome"]["status"] == "ok" and "final" not in pruned:
        metrics = run_trainer(cfg, store, ft, fault)
        final = (metrics["final_top1"], metrics["final_top5"])
        ft_seconds, artifact, workers = metrics["finetune_seconds"], metrics["artifact"], ft["num_workers"]
        resumed = metrics.get("resumed_from_epoch")
    row = build_row(cfg, base=_base_info(pruned["base"]), prune=_prune_info(pruned["prune"]),
                    final=tuple(final) if final else None, finetune_seconds=ft_seconds,
                    device=pruned["device"], artifact_uri=store.display(*_rel(store, artifact)),
                    started_at=pruned["started_at"], num_classes=pruned["num_classes"],
                    finetune_workers=workers)
    row.finetune_resumed_from_epoch = resumed
    write_fragment(store, row)
    store.delete_tree("train", f"ft-{cfg.combo_id()}")  # bounded storage: final.pt stays
    return dataclasses.asdict(row)


def _rel(store: Store, path: str) -> tuple:
    rel = path[len(store.root):].lstrip("/\\")
    return tuple(rel.replace("\\", "/").split("/"))


# ---- Ray Train ------------------------------------------------------------------------
def _train_loop(config: dict) -> None:
    """The Ray Train worker: progprune's own fit() with Ray at three points —
    DDP wrapping (prepare_model), per-rank sharding, report + checkpoint each epoch."""
    import ray.train
    import ray.train.torch
    import torch

    cfg: ComboConfig = config["cfg"]
    store = Store(config["store"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # a cluster may declare GPUs it does not have (ray start --num-gpus=1 on a CPU
    # machine): use CUDA only where torch really sees it
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    model, info = _load(store, cfg, splits, ("combos", cfg.combo_id(), "pruned.pt"))
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            resume = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)

    def on_epoch(metrics, state):
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save(state(), os.path.join(d, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0 and metrics["epoch"] == 0 and config.get("fault"):
            _wait_registered(store, cfg)  # kill only once the controller holds the checkpoint
            _fault(config["fault"], "finetune", cfg, store)

    res = finetune_stage(cfg, model, splits, device, _logger(cfg) if rank == 0 else _noop,
                         rank=rank, world_size=world,
                         wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=device), on_epoch=on_epoch, resume=resume)
    final = {"final_top1": None, "final_top5": None, "finetune_seconds": res.seconds, "artifact": None,
             "resumed_from_epoch": None if resume is None else int(resume["epoch"])}
    if rank == 0:
        final["final_top1"], final["final_top5"] = evaluate(model, splits.test_x, splits.test_y, splits, device)
        final["artifact"] = _save(store, model, cfg, splits, ("combos", cfg.combo_id(), "final.pt"),
                                  history=None, meta={"combo_id": cfg.combo_id()})  # the model carries its history
        # the coordinator reads this file: a Result's metrics follow checkpoints, not reports
        store.write_bytes(json.dumps(final).encode(), "combos", cfg.combo_id(), "final.json")


def _wait_registered(store: Store, cfg: ComboConfig, timeout: float = 60.0) -> None:
    """report() only queues the checkpoint; the Train controller writes this snapshot when
    it has registered one. Used by fault injection, so the kill tests a real resume."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.exists("train", f"ft-{cfg.combo_id()}", "checkpoint_manager_snapshot.json"):
            return
        time.sleep(0.5)


def run_trainer(cfg: ComboConfig, store: Store, ft: dict, fault: str | None) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # NCCL needs real GPUs; Ray tags nodes that have them with accelerator_type:<model>
    real_gpus = any(k.startswith("accelerator_type:") for k in ray.cluster_resources())
    trainer = TorchTrainer(
        _train_loop,
        torch_config=TorchConfig(backend="nccl" if ft["use_gpu"] and real_gpus else "gloo"),
        train_loop_config={"cfg": cfg, "store": store.uri, "fault": fault},
        scaling_config=ScalingConfig(num_workers=ft["num_workers"], use_gpu=ft["use_gpu"],
                                     resources_per_worker=ft.get("resources_per_worker")),
        # resume needs the latest checkpoint only; the directory goes once the row is written
        run_config=RunConfig(name=f"ft-{cfg.combo_id()}", storage_path=store.uri_of("train"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=ft["max_failures"])),
    )
    store.delete("combos", cfg.combo_id(), "final.json")
    result = trainer.fit()
    if result.error:
        raise result.error
    return json.loads(store.read_bytes("combos", cfg.combo_id(), "final.json"))
