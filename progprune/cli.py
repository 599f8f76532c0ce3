"""The `progprune` command. Thin: parse, build a config, call the library, map errors.

Exit codes: 0 done, 1 anything unexpected (or failed combinations in a sweep),
2 bad input (one line, no traceback, nothing written), 3 target unreachable.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from functools import wraps

import click

from progprune.errors import ProgpruneError


def _friendly(fn):
    """Turn the project's errors into one line on stderr and exit 2."""

    @wraps(fn)
    def inner(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ProgpruneError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 2))

    return inner


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.UsageError as e:
            # one line, not click's multi-line usage block
            click.echo(f"error: {e.format_message()} (see '{ctx.command_path} --help')", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="progprune")
def main():
    """FLOPs-targeted progressive structured pruning, run at scale on Ray."""


@main.command("models")
def models_cmd():
    """List the registered model names."""
    from progprune.models import list_models

    for name in list_models():
        click.echo(name)
    click.echo("tv:NAME (any torchvision classification model; pip install 'progprune[torchvision]')")


@main.command("methods")
def methods_cmd():
    """List the pruning methods."""
    from progprune.pruning import METHODS

    for m in METHODS.values():
        tag = " [sparse learning]" if m.sparse else ""
        click.echo(f"{m.name:12s} {m.doc}{tag}")


def _speedup(ctx, param, value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise click.BadParameter(f"must be a number > 1, got {value!r}")
    if not v > 1.0 or v != v or v == float("inf"):
        raise click.BadParameter(f"must be a number > 1, got {value!r}")
    return v


def _nonneg(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


@main.command("prune")
@click.option("--model", required=True, help="registry name (see `progprune models`) or tv:NAME")
@click.option("--dataset", default="digits", show_default=True, help="digits, cifar10, cifar100, imagefolder, synthetic")
@click.option("--data-dir", default=None, help="dataset directory (cifar10/cifar100/imagefolder); never downloads")
@click.option("--num-classes", type=int, default=None, help="synthetic: class count; others: checked against the data")
@click.option("--speedup", required=True, callback=_speedup, help="target MACs speedup (base MACs / pruned MACs), > 1")
@click.option("--method", default="group_norm", show_default=True, help="see `progprune methods`")
@click.option("--global/--local", "global_pruning", default=True, show_default=True, help="global or per-layer ranking")
@click.option("--iterative-steps", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--max-pruning-ratio", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--round-to", type=click.IntRange(min=1), default=None, help="keep channel counts multiples of N")
@click.option("--checkpoint", type=str, default=None, help="base model (progprune artifact or state_dict); else it is trained")
@click.option("--base-epochs", type=int, default=15, show_default=True, callback=_nonneg, help="0 keeps the seeded random init")
@click.option("--base-lr", type=float, default=0.05, show_default=True)
@click.option("--sl-epochs", type=int, default=10, show_default=True, callback=_nonneg, help="sparse learning (slim, group_slim, group_sl, growing_reg)")
@click.option("--reg", type=float, default=5e-4, show_default=True, help="sparse-learning regularization")
@click.option("--finetune-epochs", type=int, default=10, show_default=True, callback=_nonneg)
@click.option("--finetune-lr", type=float, default=0.05, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--augment/--no-augment", default=None, help="crop+flip in training (default: on, off for digits)")
@click.option("--latency-batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", "out_dir", default=None, help="write pruned.pt and result.parquet here")
@click.option("--json", "as_json", is_flag=True, help="print the result row as one JSON object on the last line")
@_friendly
def prune_cmd(model, dataset, data_dir, num_classes, speedup, method, global_pruning, iterative_steps,
              max_pruning_ratio, round_to, checkpoint, base_epochs, base_lr, sl_epochs, reg,
              finetune_epochs, finetune_lr, batch_size, augment, latency_batch_size, seed, device,
              out_dir, as_json):
    """Progressively prune one model to one target speedup, in this process."""
    import dataclasses

    import torch

    from progprune.config import ComboConfig, DatasetConfig, PruneConfig, SparseConfig, TrainConfig
    from progprune.data import check_dataset
    from progprune.models import list_models
    from progprune.pipeline import run_combination
    from progprune.pruning import get_method

    get_method(method)
    if not model.startswith("tv:") and model not in list_models():
        raise ProgpruneError(f"unknown model '{model}'; valid: {', '.join(list_models())} or tv:NAME")
    for flag, lr in (("--base-lr", base_lr), ("--finetune-lr", finetune_lr), ("--reg", reg)):
        if not lr >= 0 or (flag != "--reg" and lr == 0):
            raise ProgpruneError(f"{flag}: must be > 0, got {lr}")
    ds = DatasetConfig(name=dataset, data_dir=data_dir, num_classes=num_classes)
    check_dataset(ds)
    if checkpoint and not os.path.isfile(checkpoint):
        raise ProgpruneError(f"--checkpoint: file not found: {checkpoint}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProgpruneError("--device cuda: no CUDA device is available; use --device cpu")
    aug = (dataset != "digits") if augment is None else augment
    cfg = ComboConfig(
        model=model, dataset=ds, target_speedup=speedup, seed=seed,
        prune=PruneConfig(method=method, global_pruning=global_pruning, iterative_steps=iterative_steps,
                          max_pruning_ratio=max_pruning_ratio, round_to=round_to),
        base=TrainConfig(epochs=base_epochs, lr=base_lr, batch_size=batch_size, augment=aug),
        base_checkpoint=os.path.abspath(checkpoint) if checkpoint else None,
        sparse=SparseConfig(epochs=sl_epochs, reg=reg, batch_size=batch_size),
        finetune=TrainConfig(epochs=finetune_epochs, lr=finetune_lr, batch_size=batch_size, augment=aug),
        latency_batch_size=latency_batch_size, sweep="prune",
    )
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo

    # work in a private temp dir; move into --out only when the combination finished
    stage = tempfile.mkdtemp(prefix=".progprune-") if out_dir else None
    try:
        row = run_combination(cfg, stage, dev, log)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            for name in os.listdir(stage):
                os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
            row.artifact_uri = os.path.abspath(os.path.join(out_dir, "pruned.pt"))
            from progprune.results import write_rows

            write_rows([row], os.path.join(out_dir, "result.parquet"))
    finally:
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
    _summary(row, log)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(row), default=str))
    if row.status == "unreachable":
        sys.exit(3)


def _summary(row, log) -> None:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    log("")
    log(f"{row.model} / {row.dataset} / {row.method}: {row.status}")
    if row.achieved_speedup:
        log(f"  MACs    {row.base_macs / 1e6:.2f}M -> {row.pruned_macs / 1e6:.2f}M  "
            f"speedup {row.achieved_speedup:.4f}x (target {row.target_speedup}x, {row.overshoot_pct:+.3f}%)")
        log(f"  params  {row.base_params / 1e6:.3f}M -> {row.pruned_params / 1e6:.3f}M  "
            f"compression {row.compression_ratio:.2f}x")
        log(f"  latency {row.base_latency_ms:.2f} ms -> {row.pruned_latency_ms:.2f} ms  "
            f"({row.latency_speedup:.2f}x, batch {row.latency_batch_size}, {row.device})")
    log(f"  top-1   base {pct(row.base_top1)}  pruned {pct(row.pruned_top1)}  fine-tuned {pct(row.final_top1)}")
    if row.error:
        log(f"  {row.error}")
    if row.artifact_uri:
        log(f"  artifact {row.artifact_uri}")


@main.command("sweep")
@click.argument("spec_path", metavar="SPEC")
@click.option("--address", default=None, help="Ray cluster (HOST:PORT, ray://HOST:PORT, auto); default: "
              "RAY_ADDRESS, else an embedded Ray on 127.0.0.1")
@click.option("--output", default=None, help="override the spec's output (local path, file://, s3://, gs://)")
@click.option("--dry-run", is_flag=True, help="print the expanded plan and run nothing")
@click.option("--force", is_flag=True, help="rerun combinations that already have a row")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, help="combinations in flight")
@_friendly
def sweep_cmd(spec_path, address, output, dry_run, force, max_concurrent):
    """Run every model x speedup x method x seed of SPEC on Ray; write results.parquet."""
    from progprune.spec import load_spec
    from progprune.sweep import run

    spec = load_spec(spec_path, output_override=output)
    sys.exit(run(spec, address=address, force=force, dry_run=dry_run, max_concurrent=max_concurrent))


def _register_report():
    from progprune.report import report_command

    main.add_command(report_command)


_register_report()

if __name__ == "__main__":
    main()
