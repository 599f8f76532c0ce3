"""The `progprune` command. Thin: parse, build a spec, call the library, map errors.

Exit codes: 0 done, 1 a failed combination (`CombinationFailed`, e.g. a diverged training:
its row says why; a sweep with any failed row) or anything unexpected, 2 bad input
(`BadInput`: one line, no traceback, nothing written), 3 target unreachable.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

import click

from progprune._atomic import StagedDir
from progprune._prune_output import check_out_dir, controls_summary, local_out_dir, summary
from progprune.errors import BadInput, Problem, ProgpruneError, SpecError, Terminated, sigterm_seen, sigterm_unwinds


class _Cli(click.Group):
    """The one place where errors become a line on stderr and an exit code. Commands with
    heavy imports load when used (`prune` runs where pandas is absent)."""

    lazy = {"report": ("progprune.report", "report_command"), "export": ("progprune._export_cli", "export_command")}

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, **extra):
        try:
            self._main(args, prog_name, **extra)
        except SystemExit as e:
            store = sys.modules.get("progprune.storage.store")  # imported only where a store was opened
            # the program itself (args from sys.argv; not a CliRunner in a test process)
            if args is None and store is not None and store.probe_stuck():  # see probe_stuck: now, not in 100 s
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(e.code if isinstance(e.code, int) else 1)
            raise

    def _main(self, args, prog_name, **extra):
        extra.pop("standalone_mode", None)  # always: errors are mapped here
        try:
            rv = super().main(args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort as e:  # Ctrl-C / SIGINT, SIGTERM: nothing half-written stays
            sweep = (sys.argv[1:] if args is None else list(args))[:1] == ["sweep"]
            term = isinstance(e.__cause__, Terminated) or sigterm_seen()  # SIGTERM: 128 + 15, as a shell says
            click.echo(("terminated" if term else "interrupted")
                       + (": finished combinations keep their rows; the same command resumes the sweep"
                          if sweep else ""), err=True)
            sys.exit(143 if term else 130)
        except click.UsageError as e:  # one line, not click's multi-line usage block
            where = f"'{e.ctx.command_path} --help'" if e.ctx else "'progprune --help'"
            click.echo(f"error: {e.format_message()} (see {where})", err=True)
            sys.exit(2)
        except (click.ClickException, ProgpruneError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            click.echo(f"error: {msg}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="progprune")
def main():
    """FLOPs-targeted progressive structured pruning, run at scale on Ray."""


@main.command("models")
def models_cmd():
    """List the registered model names, and how to name torchvision, timm and your own."""
    from progprune.models import KINDS, list_models

    for name in list_models():
        click.echo(name)
    for _, form, what in KINDS:
        click.echo(f"{form} ({what})")
    from progprune.lm.models import FAMILIES

    families = ", ".join(f"{k} ({'/'.join(v)})" for k, v in sorted(FAMILIES.items()))
    click.echo(f"hf:PATH (task causal_lm: a Hugging Face causal LM saved with save_pretrained, loaded "
               f"offline; families and what they prune: {families})")


@main.command("methods")
def methods_cmd():
    """List the pruning methods."""
    from progprune.pruning import get_method, list_methods

    for m in map(get_method, list_methods()):
        tag = " [sparse learning]" if m.sparse else ""
        click.echo(f"{m.name:12s} {m.doc}{tag}")


@main.command("datasets")
def datasets_cmd():
    """List the data sets (`dataset.name`, --dataset)."""
    from progprune.data import DATASETS

    for name, entry in DATASETS.items():
        click.echo(f"{name:12s} {entry.doc}{' [data_dir]' if entry.data_dir else ''}")


def _registry_words() -> dict:
    """What help texts list from the registries (imported only when help is shown: torch)."""
    from progprune.data import DATASETS
    from progprune.models import KINDS
    from progprune.pruning import get_method, list_methods

    from progprune.tasks import TASKS

    methods = [get_method(n) for n in list_methods()]
    return {"datasets": ", ".join(DATASETS.names()), "tasks": ", ".join(TASKS.names()),
            "file_datasets": ", ".join(n for n, e in DATASETS.items() if e.data_dir),
            "model_forms": ", ".join(f for _, f, _ in KINDS[:-1]) + f" or {KINDS[-1][1]}",
            "sparse_methods": ", ".join(m.name for m in methods if m.sparse),
            "growing_methods": ", ".join(m.name for m in methods if "delta_reg" in m.sparse_defaults)}


class _Option(click.Option):
    """An option whose help names registry entries ({datasets}, ...): filled when help is
    shown, so that starting the command imports no torch."""

    def get_help_record(self, ctx):
        if self.help and "{" in self.help:
            self.help = self.help.format(**_registry_words())
        return super().get_help_record(ctx)


# ---- prune: a one-combination spec built from flags -------------------------------------
# flag -> the spec field(s) it sets. Types, bounds and defaults come from the schema
# (progprune.config), so `prune` and `sweep` validate and hash the same settings alike.
# The sparse-learning flags set the method's own settings (methods[0].reg, ...), so the spec
# refuses them where the method learns no sparsity, as it refuses them in a sweep spec.
from progprune._cli_flags import _FLAG_OF, _FLAGS, _REQUIRED, _SWEEP_FLAGS  # noqa: E402,F401


def _flag_of(path: str) -> str:
    """The flag that set a spec path (a list field's one entry is the flag's value)."""
    return _FLAG_OF.get(path) or _FLAG_OF.get(path.rpartition("[")[0]) or path  # export[1]: --export


def _schema_default(path: str):
    """The default the schema declares for a flag's first field (None: no default)."""
    from progprune.config import SweepSpec

    head, _, field = path.partition(".")
    if head == "methods[0]":  # the method's name: the grid's; its own setting: sparse_learning's
        head, field = ("methods[0]", "") if field == "name" else ("sparse_learning", field)
    info = SweepSpec.model_fields[head.removesuffix("[0]")]
    if field:
        info = info.annotation.model_fields[field] if hasattr(info.annotation, "model_fields") else None
    default = info.get_default() if info and not info.is_required() else None
    if isinstance(default, tuple) and not path.endswith("[0]") and "[0]." not in path and all(
            isinstance(v, str) for v in default):  # a list the flag sets whole: all of it
        return ",".join(default) or None
    if isinstance(default, tuple):  # a grid's first entry; an empty list shows no default
        default = default[0] if default else None
    return getattr(default, "name", default)  # a methods: entry shows as its name


def _flag_options(fn, only=None):
    for decl, paths, typ, help_ in reversed(_FLAGS):
        if only is not None and decl not in only:
            continue
        name = decl.split("/")[0].lstrip("-").replace("-", "_")
        default = _schema_default(paths[0]) if only is None else None  # sweep: the spec's
        help_ += f" (over the spec's {paths[0]})" if only is not None else ""
        if isinstance(default, bool):
            default = decl.split("/")[0 if default else 1] if "/" in decl else None
        shown = f"  [default: {default}]" if default is not None else ""
        kind = {"flag": {"is_flag": True, "default": None}, "ints": {"type": _INTS}, "strs": {"type": _STRS},
                bool: {"default": None}}.get(typ, {"type": typ})  # unset: the schema's default
        fn = click.option(decl, name, cls=_Option, required=decl in _REQUIRED, help=help_ + shown, **kind)(fn)
    return fn


class _IntList(click.ParamType):
    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


_INTS = _IntList()


class _StrList(click.ParamType):
    name = "A,B,..."

    def convert(self, value, param, ctx):
        return value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]


_STRS = _StrList()


def one_combination_spec(flags: dict, output: str | None = None) -> dict:
    """The spec `progprune prune` runs: its flags, set into a one-combination sweep."""
    spec = _set_flags({"name": "prune", "finetune": {"num_workers": 0}}, flags)  # in this process
    if spec.get("methods") and "name" not in spec["methods"][0]:  # --reg ... without --method
        spec["methods"][0]["name"] = _schema_default("methods[0].name")  # the grid's first
    if output:
        spec["output"] = output
    return spec


def _set_flags(spec: dict, flags: dict) -> dict:
    """`spec` with the fields the given `flags` set."""
    for decl, paths, _, _ in _FLAGS:
        value = flags.get(decl.split("/")[0].lstrip("-").replace("-", "_"))
        for path in paths if value is not None else ():
            head, _, field = path.partition(".")
            if head.endswith("[0]"):  # a one-item grid: models, speedups, methods, seeds
                if field:
                    spec.setdefault(head[:-3], [{}])[0][field] = value
                else:
                    spec[head[:-3]] = [value]
            elif field:
                spec[head] = {**(spec.get(head) or {}), field: value}
            else:
                spec[head] = value
    return spec


def _as_flags(e: SpecError) -> BadInput:
    """Spec paths -> the flags a `prune` user typed."""
    msgs = [f"{_flag_of(p.path)}: {p.message}" if p.path else p.message for p in e.issues]
    return BadInput("; ".join(dict.fromkeys(msgs)))


@main.command("prune")
@_flag_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="where this process runs every stage")
@click.option("--output", "--out", "output", default=None, metavar="DIR",
              help="write pruned.pt and result.parquet here (checked before any work)")
@click.option("--force", is_flag=True, help="replace the pruned.pt and result.parquet an earlier prune left in --output")
@click.option("--json", "as_json", is_flag=True, help="print the result row as one JSON object on the last line")
@click.option("--print-spec", is_flag=True, help="print the equivalent one-combination sweep spec and exit")
def prune_cmd(device, output, force, as_json, print_spec, **flags):
    """Progressively prune one model to one target speedup, in this process.

    The flags build a one-combination sweep spec (see --print-spec), validated and hashed
    exactly like `progprune sweep` would."""
    with sigterm_unwinds():
        return _prune(device, output, force, as_json, print_spec, flags)


def _prune(device, output, force, as_json, print_spec, flags):
    from progprune.spec import check_runtime, dump_yaml, load_spec_dict

    out_dir = None if output is None else local_out_dir(output)
    try:
        spec = load_spec_dict(one_combination_spec(flags, output), source="")
    except SpecError as e:
        raise _as_flags(e) from None
    if print_spec:
        click.echo(dump_yaml(spec), nl=False)
        return 0
    import dataclasses

    import torch

    from progprune.controls import run_with_controls
    from progprune.storage.layout import PRUNE_LAYOUT

    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("no CUDA device is available; use --device cpu", field="--device")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        check_runtime(spec, dev)  # --runtime/--precision on this device, before any work
    except SpecError as e:
        raise _as_flags(e) from None
    if out_dir is not None:
        check_out_dir(out_dir, force)
    cfgs = spec.combinations()  # the combination, then its controls (--control)
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo

    # work in a private folder on --output's filesystem (renamed into place, never copied);
    # publish only once the combination finished; the folder goes whatever happens
    staged = StagedDir(out_dir) if out_dir is not None else None
    with staged or contextlib.nullcontext() as stage:
        try:
            rows = run_with_controls(cfgs, stage, dev, log, shown_dir=os.path.abspath(out_dir) if stage else None)
        except SpecError as e:
            raise _as_flags(e) from None
        except BadInput as e:
            raise _as_flags(SpecError([Problem(e.field or "", e.message)])) from None
        if stage:
            from progprune.results import write_rows

            # once: run_stages named the artifacts' final places (none for a failed row)
            write_rows(rows, os.path.join(stage, PRUNE_LAYOUT.row))
            staged.publish(PRUNE_LAYOUT.files)  # the artifacts first: the rows name them
    row = rows[0]
    summary(row, log)
    controls_summary(rows, log)
    if as_json:  # the combination's row; its controls' rows under "controls" (--control)
        extra = {"controls": [dataclasses.asdict(r) for r in rows[1:]]} if rows[1:] else {}
        click.echo(json.dumps(dataclasses.asdict(row) | extra, default=str))
    # a failed control fails the run; an unreachable one does not change the exit code
    return 1 if any(r.status == "failed" for r in rows) else {"ok": 0, "unreachable": 3}.get(row.status, 1)


@main.command("sweep")
@click.argument("spec_path", metavar="SPEC")
@click.option("--address", envvar="RAY_ADDRESS", show_envvar=True, default=None,
              help="Ray cluster (HOST:PORT, ray://HOST:PORT, auto); default: an embedded Ray on 127.0.0.1")
@click.option("--output", "--out", "output", default=None,
              help="override the spec's output (local path, file://, s3://, gs://)")
@click.option("--dry-run", is_flag=True, help="print the expanded plan and run nothing")
@click.option("--force", is_flag=True, help="rerun combinations that already have a row")
@click.option("--max-concurrent", type=click.IntRange(min=1, max=100_000), default=None,
              help="combinations in flight (default: the spec's resources.max_concurrent)")
@click.option("--break-lock", is_flag=True,
              help="take over the output's lock even if its holder looks alive (only when you know it is gone)")
@click.option("--replace-sweep", is_flag=True,
              help="let this sweep take over an output that holds another sweep (by name)")
@functools.partial(_flag_options, only=_SWEEP_FLAGS)
def sweep_cmd(spec_path, address, output, dry_run, force, max_concurrent, break_lock, replace_sweep, **flags):
    """Run every model x speedup x method x seed of SPEC on Ray; write results.parquet."""
    from progprune.spec import load_spec
    from progprune.sweep import run

    spec = load_spec(spec_path, output_override=output, overrides=_set_flags({}, flags))
    return run(spec, address=address, force=force, dry_run=dry_run, max_concurrent=max_concurrent,
               break_lock=break_lock, replace_sweep=replace_sweep)


if __name__ == "__main__":
    main()
