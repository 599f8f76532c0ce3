"""One schema, one path (issue 9): `prune` is a one-combination sweep spec built from its
flags, so both commands share defaults, validation and combo_id; the CLI maps every error
to one line in one place; `python -m progprune` works; nothing is written before the
cluster answers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from progprune.cli import one_combination_spec
from progprune.config import SweepSpec
from progprune.spec import load_spec, load_spec_dict

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FAST = ["--dataset", "synthetic", "--num-classes", "4", "--base-epochs", "0", "--finetune-epochs", "0",
        "--iterative-steps", "40", "--latency-repeats", "1"]


def cli(*args, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "progprune"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_prune_and_sweep_share_defaults_and_combo_id(tmp_path):
    flags = {"model": "resnet20", "speedup": 2.0, "seed": 3, "finetune_lr": 0.02}
    one = load_spec_dict(one_combination_spec(flags)).combinations()[0]
    # the same settings written as a user's sweep spec
    p = tmp_path / "s.yaml"
    p.write_text("name: other-name\nmodels: [resnet20]\nspeedups: [2]\nseeds: [3]\n"
                 "finetune: {lr: 0.02, num_workers: 0}\n")
    (grid,) = load_spec(p).combinations()
    assert one.combo_id() == grid.combo_id()
    assert one.base == grid.base and one.finetune == grid.finetune
    # the same through the command line a user types (Click's own parsing of every flag,
    # boolean pairs such as --global/--local included, left unset)
    r = cli("prune", "--model", "resnet20", "--speedup", "2", "--seed", "3", "--finetune-lr", "0.02",
            "--print-spec")
    assert r.returncode == 0, r.stderr
    (typed,) = load_spec_dict(yaml.safe_load(r.stdout)).combinations()
    assert typed.combo_id() == grid.combo_id()
    assert typed.prune.global_pruning and typed.base.augment is False  # digits: no augmentation
    # a setting the user changes changes the id
    other = load_spec_dict(one_combination_spec({**flags, "finetune_lr": 0.03})).combinations()[0]
    assert other.combo_id() != one.combo_id()


def test_defaults_live_in_the_schema_alone():
    s = load_spec_dict(one_combination_spec({"model": "resnet20", "speedup": 2.0}))
    d = SweepSpec.model_fields
    assert s.base_training.epochs == d["base_training"].default.epochs
    assert s.base_training.lr == d["base_training"].default.lr
    assert s.finetune.batch_size == d["finetune"].default.batch_size
    help_text = cli("prune", "--help").stdout
    assert f"[default: {d['base_training'].default.lr}]" in help_text
    # a grid's default shows as a user writes it (the method's name, not its settings)
    method_help = " ".join(help_text.split("--method", 1)[1].split("--dataset", 1)[0].split())
    assert method_help.endswith(f"[default: {d['methods'].default[0].name}]"), method_help
    # lists of names come from the registries (issue 22), not from words written beside them
    from progprune.data import list_datasets
    from progprune.pruning import get_method, list_methods

    flat = " ".join(help_text.split())
    assert f"--dataset TEXT {', '.join(list_datasets())} (see `progprune datasets`)" in flat
    sparse = ", ".join(m for m in list_methods() if get_method(m).sparse)
    assert f"sparse learning epochs ({sparse})" in flat


def _schema_defaults(model=SweepSpec, out=None) -> dict:
    """Every setting's name -> the defaults the schema declares for it (in any section)."""
    from pydantic import BaseModel

    from progprune.config import PruneConfig

    out = {} if out is None else out
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            _schema_defaults(f.annotation, out)
        elif not f.is_required():
            out.setdefault(name, []).append(f.get_default())
    return out if model is not SweepSpec else _schema_defaults(PruneConfig, out)


def _library_functions():
    """(where, function) for every function and method the modules of progprune define
    (the Ray layer included)."""
    import importlib
    import inspect
    import pkgutil

    import progprune

    for info in pkgutil.walk_packages(progprune.__path__, "progprune."):
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{mod.__name__}.{name}", obj
            elif inspect.isclass(obj):
                for attr, fn in vars(obj).items():
                    if inspect.isfunction(fn):
                        yield f"{mod.__name__}.{name}.{attr}", fn


def test_library_functions_do_not_restate_schema_defaults():
    """Issue 22: a library parameter named like a setting takes the setting's value from
    the caller; a default equal to the schema's is a second declaration that silently stays
    when the schema's changes (None, "unset", is no restatement)."""
    import inspect

    defaults = _schema_defaults()
    restated = [f"{where}({p.name}={p.default!r})" for where, fn in _library_functions()
                for p in inspect.signature(fn).parameters.values()
                if p.name in defaults and p.default is not inspect.Parameter.empty
                and p.default is not None and any(p.default == d and type(p.default) is type(d)
                                                  for d in defaults[p.name])]
    assert not restated, restated


def test_print_spec_is_a_sweep_spec_and_matches_the_run(tmp_path):
    r = cli("prune", "--model", "resnet20", "--speedup", "1.5", *FAST, "--print-spec")
    assert r.returncode == 0, r.stderr
    p = tmp_path / "grown.yaml"
    p.write_text(r.stdout)
    spec = load_spec(p)
    assert [c.model for c in spec.combinations()] == ["resnet20"]
    run = cli("prune", "--model", "resnet20", "--speedup", "1.5", *FAST, "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["combo_id"] == spec.combinations()[0].combo_id()


def test_print_spec_can_be_grown_into_a_sweep(tmp_path):
    r = cli("prune", "--model", "vgg11", "--speedup", "2", "--print-spec")
    d = yaml.safe_load(r.stdout)
    d["speedups"] = [1.5, 2, 3]
    d["models"].append({"name": "resnet20"})
    assert len(load_spec_dict(d).combinations()) == 6


@pytest.mark.parametrize("args, expected", [
    (["--bogus"], "error: No such option '--bogus'"),
    (["prune", "--model"], "error: Option '--model' requires an argument"),
    (["prune", "--speedup", "2"], "error: Missing option '--model'"),
    (["sweep"], "error: Missing argument 'SPEC'"),
    (["nosuch"], "error: No such command 'nosuch'"),
    (["prune", "--model", "resnet20", "--speedup", "2", "--seed", "99999999999999999999"],
     "error: --seed: must be an integer in [0, 4294967295]"),
    (["prune", "--model", "resnet20", "--speedup", "2", "--iterative-steps", "99999999999999999999"],
     "error: --iterative-steps: must be an integer in [1, 100000]"),
    (["prune", "--model", "resnet20", "--speedup", "2", "--finetune-lr", "inf"],
     "error: --finetune-lr: must be a number in (0, 10], got inf"),
    (["prune", "--model", "resnet20", "--speedup", "2", "--reg", "inf"],
     "error: --reg: must be a number in [0, 1] (or null), got inf"),
])
def test_usage_errors_are_one_line(args, expected):
    r = cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr


def test_python_dash_m_and_envvar_help():
    r = subprocess.run([sys.executable, "-m", "progprune", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "progprune" in r.stdout
    assert "RAY_ADDRESS" in cli("sweep", "--help").stdout


def test_prune_output_is_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = cli("prune", "--model", "resnet20", "--speedup", "2", "--base-epochs", "15", "--output", tmp_path / "afile")
    assert r.returncode == 2 and "--output" in r.stderr and "training" not in r.stdout
    (tmp_path / "o" / "result.parquet").mkdir(parents=True)
    r = cli("prune", "--model", "resnet20", "--speedup", "2", "--output", tmp_path / "o")
    assert r.returncode == 2 and "result.parquet is a directory" in r.stderr
    assert not (tmp_path / "o" / "pruned.pt").exists()


def test_bad_address_writes_nothing(tmp_path):
    out = tmp_path / "never"
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: t\nmodels: [resnet20]\nspeedups: [2]\noutput: {out}\n")
    r = cli("sweep", spec, "--address", "127.0.0.1:9")
    assert r.returncode == 2 and "no Ray cluster answers" in r.stderr
    assert not out.exists()


def test_an_output_belongs_to_one_sweep(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.resolved.yaml").write_text("name: sweep-a\n")
    spec = tmp_path / "b.yaml"
    spec.write_text(f"name: sweep-b\nmodels: [resnet20]\nspeedups: [2]\noutput: {out}\n")
    r = cli("sweep", spec, "--dry-run")
    assert r.returncode == 2 and "holds sweep 'sweep-a', not 'sweep-b'" in r.stderr
    assert "--replace-sweep" in r.stderr and sorted(p.name for p in out.iterdir()) == ["spec.resolved.yaml"]
    assert cli("sweep", spec, "--dry-run", "--replace-sweep").returncode == 0
    (out / "spec.resolved.yaml").write_text("name: sweep-b\n")  # the same sweep, edited grid: fine
    assert cli("sweep", spec, "--dry-run").returncode == 0


def test_report_to_an_unwritable_place_is_one_line(tmp_path):
    from progprune.results import ResultRow, write_rows

    write_rows([ResultRow(combo_id="x", sweep="s", model="resnet20", dataset="digits", method="l1",
                          seed=0, target_speedup=2.0)], tmp_path / "results.parquet")
    r = cli("report", tmp_path / "results.parquet", "--format", "html", "--output", "/proc/nope/x")
    assert r.returncode == 2 and r.stderr.startswith("error: cannot write the report to /proc/nope/x")
    assert len(r.stderr.strip().splitlines()) == 1


def test_checkpoints_are_keyed_by_content(tmp_path):
    import torch

    from progprune.models import build_model

    ck = tmp_path / "base.pt"
    d = {"name": "t", "models": [{"name": "resnet20", "checkpoint": str(ck)}], "speedups": [2]}
    torch.manual_seed(0)
    torch.save(build_model("resnet20", 10).state_dict(), ck)
    first = load_spec_dict(d)
    torch.manual_seed(1)
    torch.save(build_model("resnet20", 10).state_dict(), ck)  # new weights, same file name
    second = load_spec_dict(d)
    (a,), (b,) = first.combinations(), second.combinations()
    assert a.base_checkpoint == b.base_checkpoint and a.combo_id() != b.combo_id()
    assert len(b.base_checkpoint_sha256) == 64 and b.base_key() != a.base_key()
    # the resolved spec pins the content: a later change of the file is refused
    pinned = first.to_dict()
    from progprune.errors import SpecError

    with pytest.raises(SpecError, match=r"models\[0\]\.sha256: .* the file changed"):
        load_spec_dict(pinned)


def test_pruning_in_rounds_reloads(tmp_path):
    """Issue 14 #1: a pruned artifact is a valid base; the second round's artifact reloads
    (histories compose) and its row carries the latency spread and the thread count."""
    import progprune

    a, b = tmp_path / "A", tmp_path / "B"
    r = cli("prune", "--model", "resnet20", "--speedup", "1.2", *FAST, "--output", a)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("prune", "--model", "resnet20", "--speedup", "1.3", *FAST, "--checkpoint", a / "pruned.pt",
            "--output", b, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["achieved_speedup"] >= 1.3 and row["latency_threads"] >= 1
    assert row["base_latency_iqr_ms"] >= 0 and isinstance(row["latency_noisy"], bool)
    assert row["base_checkpoint_sha256"] and 0 <= row["pruned_top1_bn"] <= 1
    first, second = progprune.load_pruned(a / "pruned.pt"), progprune.load_pruned(b / "pruned.pt")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(second) < n(first)
    import torch

    assert second(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_user_text_keeps_its_brackets():
    """Issue 14 #11: rich must not eat '[torchvision]' out of an error."""
    from rich.console import Console

    from progprune.results import ResultRow
    from progprune.sweep import _Progress

    console = Console(record=True, markup=False, width=200, force_terminal=False)
    row = ResultRow(combo_id="x", sweep="s", model="tv:resnet18", dataset="digits", method="l1", seed=0,
                    target_speedup=2.0, error="run pip install 'progprune[torchvision]'")
    _Progress(console, 1).row(row)
    assert "'progprune[torchvision]'" in console.export_text()


@pytest.mark.parametrize("crossing, cuts", [("reference", {"whole"}), ("fine", {"whole", "prefix", "subset"})])
def test_crossing_reaches_the_row(crossing, cuts):
    r = cli("prune", "--model", "resnet20", "--speedup", "2", *FAST, "--crossing", crossing, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["crossing"] == crossing and row["crossing_cut"] in cuts and row["achieved_speedup"] >= 2


def test_sparse_method_rows_report_the_model_they_pruned():
    """Issue 12: base_top1 of a sparse method is the model after sparse learning (the one
    pruned); the pre-sparse figure has its own column; the row records the recipe's reg."""
    r = cli("prune", "--model", "resnet20", "--speedup", "1.5", "--method", "slim", *FAST,
            "--sl-epochs", "1", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["method"] == "slim" and row["sparse_reg"] == 1e-5 and row["sparse_epochs"] == 1
    assert 0 <= row["base_top1_pre_sparse"] <= 1 and 0 <= row["base_top1"] <= 1


def test_one_step_schedule_explains_itself():
    """Issue 14 #8: --iterative-steps 1 asks for every channel at once, which Torch-Pruning
    refuses; the row says what the schedule allows instead of only 'unreachable'."""
    r = cli("prune", "--model", "resnet20", "--speedup", "2", *FAST, "--iterative-steps", "1", "--json")
    assert r.returncode == 3
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert "the schedule is 1 steps" in row["error"] and "use more iterative_steps" in row["error"]
    assert "prunes none of them" in row["error"]


def test_max_pruning_ratio_is_a_cap_and_the_row_says_so():
    """Issue 14 #7: a target the cap forbids ends unreachable, naming the cap."""
    r = cli("prune", "--model", "resnet20", "--speedup", "2", *FAST, "--max-pruning-ratio", "0.3", "--json")
    assert r.returncode == 3, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert "at its max_pruning_ratio 0.3 floor" in row["error"] and row["achieved_speedup"] < 2
