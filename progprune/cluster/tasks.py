"""The Ray tasks and the Ray Train run of one combination (imports Ray). Read top to bottom:
setup (logging, the store), tasks, Ray Train, results.

The stages and their order are `progprune.pipeline`'s: the prune task runs
`prune_combination`, the fine-tune coordinator runs `finish_combination` with Ray Train (or
this task) as its fine-tune runner. What passes between tasks is the pipeline's own
dataclasses (`BaseInfo`, `Pruned`, `ResultRow`); the models go through the output store.
Task output reaches the job log one line per epoch, prefixed with its combination.

GPU deadlock (ray-project/ray#5790, #32856): a task that holds a GPU and waits for a TorchTrainer
needing another GPU can starve forever. So the prune task, which holds the GPU, ends
before fine-tuning starts; the fine-tune coordinator holds no CPU and no GPU while
`fit()` runs, and only the Train workers hold devices.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import ray

from progprune import pipeline
from progprune.artifacts import load_artifact
from progprune.config import ComboConfig, ResourcesConfig
from progprune.export import export_artifact, record_exports
from progprune.pipeline import BaseInfo, Finetuned, Pruned
from progprune.tasks import needs_sparse, task_of
from progprune.results import ResultRow, write_rows
from progprune.storage import LAYOUT, Store
from progprune.storage.layout import export_name
from progprune.training import device_label, pick_device


# ---- setup: logging and the store -----------------------------------------------------
def _logger(cfg: ComboConfig, per_base: bool = False):
    """Task output reaches `ray job logs` / `kubectl logs` (the driver runs with
    log_to_driver), one line per event, prefixed with the combination it belongs to."""
    control = {"random": " control", "scratch": " scratch"}.get(cfg.control, "")
    label = (f"{cfg.model} seed {cfg.seed}" if per_base else
             f"{cfg.model} {cfg.method}{control} {cfg.target_speedup:g}x seed {cfg.seed}")

    def log(msg: str) -> None:
        # sys.stdout, not print(): Ray Train's workers replace print() with one that logs
        # to the console and also echoes to Ray's stdout wrapper (RAY_TRAIN_ENABLE_PRINT_PATCH),
        # so every Train worker line would reach the job log twice
        sys.stdout.write(f"[{label}] {msg.strip()}\n")
        sys.stdout.flush()

    return log


def _save(store: Store, model, cfg: ComboConfig, data, parts: tuple, history=None, meta=None) -> str:
    """Store the model's artifact; returns its location as rows show it."""
    with tempfile.TemporaryDirectory() as d:
        store.put_file(task_of(cfg).save(os.path.join(d, parts[-1]), model, cfg, data, history, meta), *parts)
    return store.display(*parts)


def _load(store: Store, cfg: ComboConfig, data, parts: tuple):
    with store.local_copy(*parts) as p:
        return task_of(cfg).load(p, cfg, data)


# ---- tasks ----------------------------------------------------------------------------
@ray.remote
def base_task(cfg: ComboConfig, store_uri: str, retrain: bool = False) -> BaseInfo:
    """Train (or load) the base model once per (model, dataset, seed) and store it.
    `retrain` (the plan found none, or --force) ignores a stored file from an earlier run."""
    store, task = Store(store_uri), task_of(cfg)
    data = task.load_data(cfg)
    if store.exists(*LAYOUT.base(cfg)) and not retrain:
        _, info = _load(store, cfg, data, LAYOUT.base(cfg))
        names = {f.name for f in dataclasses.fields(task.base_info)}
        return task.base_info(**{k: v for k, v in info["meta"].items() if k in names})
    device = pick_device()
    model, base = task.base_stage(cfg, data, device, _logger(cfg, per_base=True))
    meta = dataclasses.asdict(base) | {"device": device_label(device), "trained_at": pipeline.now()}
    _save(store, model, cfg, data, LAYOUT.base(cfg), meta=meta)
    return base


@ray.remote
def sparse_task(cfg: ComboConfig, store_uri: str, base: BaseInfo, retrain: bool = False) -> BaseInfo:
    """Sparse learning once per (base, method, settings), stored for every speedup."""
    store, task = Store(store_uri), task_of(cfg)
    data = task.load_data(cfg)
    if retrain or not store.exists(*LAYOUT.sparse(cfg)):
        model, _ = _load(store, cfg, data, LAYOUT.base(cfg))
        task.sparse_stage(cfg, model, data, pick_device(), _logger(cfg))
        _save(store, model, cfg, data, LAYOUT.sparse(cfg), meta={"base": dataclasses.asdict(base)})
    return base


@ray.remote
def prune_task(cfg: ComboConfig, store_uri: str, base: BaseInfo) -> Pruned:
    """Stage 3 of one combination on this worker's device; the pruned model goes to the store."""
    store, task = Store(store_uri), task_of(cfg)
    device = pick_device()
    data = task.load_data(cfg)
    src = LAYOUT.sparse(cfg) if needs_sparse(cfg) else LAYOUT.base(cfg)
    model, _ = _load(store, cfg, data, src)
    pruned = pipeline.prune_combination(cfg, model, base, data, device, _logger(cfg))
    history = pruned.prune.outcome.history
    pruned.artifact = _save(store, model, cfg, data, LAYOUT.pruned(cfg), history=history,
                            meta=task.run_meta(cfg, data))
    pruned.prune.outcome.history = []  # large; it lives in the artifact
    return pruned


@ray.remote(num_cpus=0)
def finetune_task(cfg: ComboConfig, store_uri: str, pruned: Pruned, resources: ResourcesConfig) -> ResultRow:
    """Stage 4 and the row. With Train workers (`cfg.finetune.num_workers` > 0) this
    coordinator holds no CPU/GPU and runs the TorchTrainer, each worker taking
    `resources.cpus_per_task` CPUs; with none, the driver gives it the prune task's
    resources and it fine-tunes here."""
    store = Store(store_uri)
    if cfg.finetune.num_workers:
        runner = lambda: run_trainer(cfg, store, resources)  # noqa: E731
    else:
        runner = lambda: _finetune_here(cfg, store)  # noqa: E731
    row = pipeline.finish_combination(cfg, pruned, runner)
    if cfg.export and row.status != "failed":  # beside the artifact the row names, through the store
        record_exports(row, cfg.export, lambda: _export(store, cfg, LAYOUT.final(cfg) if row.status == "ok"
                                                        else LAYOUT.pruned(cfg)))
    write_fragment(store, row)
    store.delete_tree(*LAYOUT.train_run(cfg.combo_id()))  # bounded storage: final.pt stays
    return row


def _export(store: Store, cfg: ComboConfig, parts: tuple) -> list[str]:
    """cfg.export's formats of the stored artifact at `parts`, stored beside it; where they are."""
    uris = []
    with store.local_copy(*parts) as artifact, tempfile.TemporaryDirectory() as d:
        for fmt in cfg.export:
            name = export_name(parts[-1], fmt)
            store.put_file(export_artifact(artifact, fmt, os.path.join(d, name), trust_factory=True),
                           *parts[:-1], name)
            uris.append(store.display(*parts[:-1], name))
    return uris


def _finetune_here(cfg: ComboConfig, store: Store) -> Finetuned:
    device, task = pick_device(), task_of(cfg)
    data = task.load_data(cfg)
    model, _ = _load(store, cfg, data, LAYOUT.pruned(cfg))
    ft = pipeline.finetune_combination(cfg, model, data, device, _logger(cfg))
    ft.artifact = _save(store, model, cfg, data, LAYOUT.final(cfg), meta=task.run_meta(cfg, data))
    return ft


@ray.remote
def scratch_task(cfg: ComboConfig, store_uri: str, method: Pruned | None, status: str | None = None) -> ResultRow:
    """The scratch control of a method combination (`cfg.architecture_of()`): its pruned
    architecture, from the pruned.pt its prune task stored, re-initialised and trained here.
    `method`: that prune task's result (it ran in this sweep); else `status`, its stored row's."""
    from progprune.controls import scratch_row

    store = Store(store_uri)
    arch = cfg.architecture_of()
    if method is not None:
        status = method.prune.outcome.status if method.prune else "failed"
    history = None
    if status == "ok":
        with store.local_copy(*LAYOUT.pruned(arch)) as p:
            history = load_artifact(p, model_name=cfg.model)[1]["pruning_history"]

    def save(model, splits):
        return _save(store, model, cfg, splits, LAYOUT.final(cfg), history=history,
                     meta=task_of(cfg).run_meta(cfg, splits))
    row = scratch_row(cfg, history, status, pick_device(), _logger(cfg), save)
    write_fragment(store, row)
    return row


# ---- Ray Train ------------------------------------------------------------------------
def _train_loop(config: dict) -> None:
    """The Ray Train worker: progprune's own fine-tune with Ray at three points — DDP
    wrapping (prepare_model), per-rank sharding, report + checkpoint each epoch. Rank 0
    ends with one more report: the test-set figures, with the fine-tuned model as its
    checkpoint (what `Result.metrics` / `Result.checkpoint` hand the coordinator)."""
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
    task = task_of(cfg)
    data = task.load_data(cfg)
    model, _ = _load(store, cfg, data, LAYOUT.pruned(cfg))
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            if os.path.exists(os.path.join(d, "final.pt")):
                # a worker died after the closing report: the run had finished, say so again
                with open(os.path.join(d, "finetuned.json"), encoding="utf-8") as f:
                    final = json.load(f)
                ray.train.report(final if rank == 0 else {},
                                 checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
                return
            resume = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)

    def on_epoch(metrics, state):
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save(state(), os.path.join(d, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    fit_kwargs = dict(rank=rank, world_size=world, on_epoch=on_epoch, resume=resume,
                      wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=device))
    if rank:
        task.finetune_stage(cfg, model, data, device, **fit_kwargs)
        ray.train.report({})  # every rank reports as often as rank 0
        return
    ft = pipeline.finetune_combination(cfg, model, data, device, _logger(cfg), **fit_kwargs)
    ft.resumed_from_epoch = None if resume is None else int(resume["epoch"])
    with tempfile.TemporaryDirectory() as d:  # the model carries its own history
        task.save(os.path.join(d, "final.pt"), model, cfg, data, meta=task.run_meta(cfg, data))
        figures = dataclasses.asdict(ft)
        with open(os.path.join(d, "finetuned.json"), "w", encoding="utf-8") as f:
            json.dump(figures, f)  # for a restart after this report (above)
        ray.train.report(figures, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_trainer(cfg: ComboConfig, store: Store, resources: ResourcesConfig) -> Finetuned:
    """Fine-tune on Ray Train (`cfg.finetune`'s workers, GPU use and restarts); the figures
    come back as the result's metrics, the model as its checkpoint, which goes to the
    store's final.pt."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ft = cfg.finetune
    # NCCL needs real GPUs; Ray tags nodes that have them with accelerator_type:<model>
    real_gpus = any(k.startswith("accelerator_type:") for k in ray.cluster_resources())
    trainer = TorchTrainer(
        _train_loop,
        torch_config=TorchConfig(backend="nccl" if ft.use_gpu and real_gpus else "gloo"),
        train_loop_config={"cfg": cfg, "store": store.uri},
        scaling_config=ScalingConfig(num_workers=ft.num_workers, use_gpu=ft.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_task}),
        # resume needs the latest checkpoint only; the directory goes once the row is written
        run_config=RunConfig(name=LAYOUT.train_run(cfg.combo_id())[-1], storage_path=store.uri_of(*LAYOUT.train),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=ft.max_failures),
                             # Train's lifecycle INFO lines (per run and per report) stay in
                             # Ray's log files; the job log keeps the combination's own lines
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    done = Finetuned(**result.metrics)
    with result.checkpoint.as_directory() as d:
        store.put_file(os.path.join(d, "final.pt"), *LAYOUT.final(cfg))
    done.artifact, done.workers = store.display(*LAYOUT.final(cfg)), ft.num_workers
    return done


# ---- results --------------------------------------------------------------------------
def write_fragment(store: Store, row: ResultRow) -> None:
    """The combination's row, as `rows/<combo_id>.parquet`: the source of truth for resume."""
    with tempfile.TemporaryDirectory() as d:
        store.put_file(write_rows([row], os.path.join(d, "row.parquet")), *LAYOUT.row(row.combo_id))
