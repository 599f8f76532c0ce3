"""The `progprune` command end to end: bad input exits 2 with one line on stderr, no
traceback, nothing written (issue 6); usage errors, `python -m progprune`, and outputs
checked before any work (issue 9). `progprune prune` has test_cli_prune.py; the schema
the CLI shares with sweeps has test_config.py.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from progprune.storage import Store
from helpers import progprune, progprune_in_process, tiny_spec
from helpers import progprune as cli


def test_no_cluster_at_address_fails_fast(tmp_path):
    from raycluster import free_ports

    spec = tiny_spec(tmp_path)
    t0 = time.monotonic()
    r = progprune("sweep", spec, "--address", f"127.0.0.1:{free_ports(1)[0]}", timeout=60)
    assert r.returncode == 2
    assert time.monotonic() - t0 < 30
    assert r.stderr.count("\n") == 1 and "no Ray cluster answers" in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_output_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spec = tiny_spec(tmp_path)
    r = progprune("sweep", spec, "--output", blocker / "sub")
    assert r.returncode == 2
    assert r.stderr.startswith("error: output: cannot write") and "Traceback" not in r.stderr


def test_second_sweep_on_the_same_output_is_refused(tmp_path):
    spec = tiny_spec(tmp_path)
    store = Store(str(tmp_path / "out"))
    with store.lock():
        r = progprune("sweep", spec)
    assert r.returncode == 2
    assert "in use by another sweep" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "results.parquet").exists()


@pytest.mark.parametrize("bad, message, run", [
    ({"finetune": {"epochs": -1}}, "finetune.epochs", progprune),  # one in a real process
    ({"speedups": "fast"}, "speedups", progprune_in_process),
    ({"models": ["resnet21"]}, "models[0]", progprune_in_process),
    ({"output": "ftp://host/x"}, "output: unsupported scheme", progprune_in_process),
], ids=["epochs", "speedups", "models", "output"])
def test_bad_spec_exits_2_with_one_line(tmp_path, bad, message, run):
    spec = tiny_spec(tmp_path, **bad)
    r = run("sweep", spec)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


# ---- bad input through the real CLI: exit 2, one line, nothing written ----------------
class Evil:
    """A pickle that runs a shell command when loaded (what weights-only loading refuses)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_bad_cases(root: Path) -> dict:
    """id -> (spec path, output dir, text the one error line must contain)."""
    import torch

    from progprune.artifacts import save_artifact
    from progprune.models import build_model

    files = root / "files"
    files.mkdir()
    # fixed bytes: seed 2 makes torch's weights-only unpickler raise IndexError, not
    # UnpicklingError; protocol 17 makes it print a multi-line UserWarning first
    (files / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (files / "random-indexerror.pt").write_bytes(random.Random(2).randbytes(4096))
    (files / "odd-protocol.pt").write_bytes(b"\x80\x11N.")
    save_artifact(files / "vgg11.pt", build_model("vgg11", 4), model_name="vgg11", num_classes=4)
    save_artifact(files / "resnet20-10.pt", build_model("resnet20", 10), model_name="resnet20", num_classes=10)
    torch.save({"state_dict": Evil(root / "pwned")}, files / "evil.pt")
    (files / "cifar-empty").mkdir()

    ck = lambda f: {"models": [{"name": "resnet20", "checkpoint": str(files / f)}]}  # noqa: E731
    cases = {
        "unknown-field": ({"finetun": {"epochs": 1}}, "finetun: unknown field; did you mean 'finetune'"),
        "unknown-nested-field": ({"pruning": {"iterative_step": 5}}, "pruning.iterative_step: unknown field; did you mean 'iterative_steps'"),
        "wrong-type-seeds": ({"seeds": ["zero"]}, "seeds[0]: must be an integer"),
        "speedup-1": ({"speedups": [1.0, 2.0]}, "speedups[0]: must be a number in (1, 10000]"),
        "empty-speedups": ({"speedups": []}, "speedups: must not be empty"),
        "duplicate-speedups": ({"speedups": [2.0, 2.0]}, "speedups: duplicate entry"),
        "negative-epochs": ({"base_training": {"epochs": -2}}, "base_training.epochs: must be an integer in [0, 10000], got -2"),
        "negative-lr": ({"finetune": {"lr": -0.01}}, "finetune.lr: must be a number in (0, 10], got -0.01"),
        "unknown-method": ({"methods": ["group_nrom"]}, "methods[0]: unknown method 'group_nrom'; did you mean 'group_norm'"),
        "unknown-dataset": ({"dataset": {"name": "imagenet"}}, "dataset.name: unknown dataset 'imagenet'"),
        "unknown-model": ({"models": [{"name": "resnet_20"}]}, "models[0].name: unknown model 'resnet_20'"),
        "checkpoint-missing": (ck("nope.pt"), "models[0].checkpoint: file not found"),
        "checkpoint-corrupt": (ck("random.pt"), "models[0].checkpoint: checkpoint"),
        "checkpoint-corrupt-indexerror": (ck("random-indexerror.pt"), "models[0].checkpoint: checkpoint"),
        "checkpoint-odd-protocol": (ck("odd-protocol.pt"), "models[0].checkpoint: checkpoint"),
        "checkpoint-other-arch": (ck("vgg11.pt"), "holds a vgg11, not a resnet20"),
        "checkpoint-other-classes": (ck("resnet20-10.pt"), "has 10 classes, the dataset has 4"),
        "checkpoint-malicious-pickle": (ck("evil.pt"), "refused: it would import"),
        "cifar-missing-files": ({"dataset": {"name": "cifar10", "data_dir": str(files / "cifar-empty")}}, "dataset.data_dir"),
        "num-classes-mismatch": ({"dataset": {"name": "digits", "num_classes": 7}}, "dataset.num_classes: digits has 10 classes, got 7"),
        "output-scheme": ({"output": "http://example.com/runs"}, "output: unsupported scheme 'http'"),
    }
    out = {}
    for name, (over, message) in cases.items():
        d = root / name
        d.mkdir()
        out[name] = (tiny_spec(d, **over), d / "out", message)
    d = root / "yaml-syntax"
    d.mkdir()
    bad = d / "bad.yaml"
    bad.write_text(f"name: y\noutput: {d / 'out'}\nmodels: [resnet20\nspeedups: [2]\n")
    out["yaml-syntax"] = (bad, d / "out", "YAML syntax error at line 4, column 9")
    return out


BAD_IDS = ["yaml-syntax", "unknown-field", "unknown-nested-field", "wrong-type-seeds",
           "speedup-1", "empty-speedups", "duplicate-speedups",
           "negative-epochs", "negative-lr", "unknown-method", "unknown-dataset",
           "unknown-model", "checkpoint-missing", "checkpoint-corrupt",
           "checkpoint-corrupt-indexerror", "checkpoint-odd-protocol", "checkpoint-other-arch",
           "checkpoint-other-classes", "checkpoint-malicious-pickle", "cifar-missing-files",
           "num-classes-mismatch", "output-scheme"]


# Cases run as real processes: every checkpoint case (torch's unpickler may print warnings
# to the process's stderr, which only a real process shows), the YAML syntax error and one
# spec-validation case; the other spec-validation cases fail before any work and run the
# same click group in this process (helpers.progprune_in_process), ~4 s of imports saved each.
REAL_PROCESS = {"yaml-syntax", "unknown-field", *(i for i in BAD_IDS if i.startswith("checkpoint-"))}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad case through `progprune sweep`: the real-process ones a few at a time (each
    is mostly import time), the others in this process, one after another (CliRunner swaps
    sys.stdout/stderr, so not in threads)."""
    root = tmp_path_factory.mktemp("bad")
    cases = _write_bad_cases(root)
    assert sorted(cases) == sorted(BAD_IDS)
    real = [k for k in cases if k in REAL_PROCESS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = dict(zip(real, pool.map(lambda k: progprune("sweep", cases[k][0], timeout=120), real)))
    runs |= {k: progprune_in_process("sweep", cases[k][0]) for k in cases if k not in REAL_PROCESS}
    return {k: (runs[k], *cases[k][1:], root) for k in cases}


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_exits_2_with_one_line(bad_runs, case):
    r, out, message, _ = bad_runs[case]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()


def test_malicious_checkpoint_never_runs(bad_runs):
    *_, root = bad_runs["checkpoint-malicious-pickle"]
    assert not (root / "pwned").exists()
    # and the same file does run its command under a plain pickle load: the test has teeth
    import torch

    probe = root / "files" / "evil-probe.pt"
    torch.save(Evil(root / "pwned-probe"), probe)
    torch.load(probe, weights_only=False)
    assert (root / "pwned-probe").exists()


# ---- usage errors, python -m, outputs checked before any work (issue 9) ------------------
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


# ---- sparse-learning flags where the method learns no sparsity (issue 23 item 25) ----------
_SPARSE_FLAGS = [("--reg", "1e-4", "reg", 1e-4), ("--delta-reg", "1e-5", "delta_reg", 1e-5),
                 ("--sl-epochs", "3", "epochs", 3), ("--sl-lr", "0.1", "lr", 0.1),
                 ("--sl-milestones", "2,3", "milestones", [2, 3]),
                 ("--allow-zero-sl-epochs", None, "allow_zero_epochs", True)]


@pytest.mark.parametrize("method", [None, "l1"], ids=["default-method", "l1"])
@pytest.mark.parametrize("flag, value, field, spec_value", _SPARSE_FLAGS, ids=[f[0] for f in _SPARSE_FLAGS])
def test_sparse_flags_with_a_method_without_sparse_learning_are_refused(method, flag, value, field, spec_value):
    """Refused as the spec refuses the same per-method setting: one decision (spec.py), the
    same words, the flag named in place of the field path."""
    from progprune.errors import SpecError
    from progprune.spec import load_spec_dict

    name = method or "group_norm"
    with pytest.raises(SpecError) as e:
        load_spec_dict({"name": "t", "models": "resnet20", "speedups": 2,
                        "methods": [{"name": name, field: spec_value}]})
    (spec_line,) = e.value.problems
    assert spec_line.startswith(f"methods[0].{field}: {name} has no sparse learning"), spec_line
    args = [*(["--method", method] if method else []), flag, *([value] if value else [])]
    r = progprune_in_process("prune", "--model", "resnet20", "--speedup", "2", *args, "--print-spec")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == f"error: {flag}: {spec_line.split(': ', 1)[1]}\n"


def test_delta_reg_with_a_method_that_does_not_grow_its_reg_is_refused():
    r = progprune_in_process("prune", "--model", "resnet20", "--speedup", "2", "--method", "slim",
                             "--delta-reg", "1e-5", "--print-spec")
    assert r.returncode == 2 and r.stderr == (
        "error: --delta-reg: slim does not grow its regularization, so its delta_reg would change "
        "nothing; remove it\n")


def test_sparse_flags_refused_in_a_real_process():
    r = cli("prune", "--model", "resnet20", "--speedup", "2", "--reg", "1e-4", "--print-spec")
    assert r.returncode == 2 and r.stderr == (
        "error: --reg: group_norm has no sparse learning, so its reg would change nothing; remove it\n")


def test_sparse_flags_still_set_a_sparse_methods_recipe_and_keep_its_combo_id():
    """--reg etc. now set the method's own settings: for a method that learns sparsity the
    combination (and its combo_id, so earlier rows are reused) is the one they set before."""
    from progprune.cli import one_combination_spec
    from progprune.spec import load_spec_dict

    flags = {"model": "resnet20", "speedup": 2.0, "method": "growing_reg", "reg": 3e-5,
             "delta_reg": 2e-6, "sl_epochs": 4, "sl_lr": 0.02, "sl_milestones": [2, 3]}
    (one,) = load_spec_dict(one_combination_spec(flags)).combinations()
    (before,) = load_spec_dict({"name": "prune", "models": [{"name": "resnet20"}], "speedups": [2.0],
                                "methods": ["growing_reg"], "finetune": {"num_workers": 0},
                                "sparse_learning": {"reg": 3e-5, "delta_reg": 2e-6, "epochs": 4,
                                                    "lr": 0.02, "milestones": [2, 3]}}).combinations()
    assert one.sparse == before.sparse and one.combo_id() == before.combo_id()
    assert (one.sparse.reg, one.sparse.delta_reg, one.sparse.epochs) == (3e-5, 2e-6, 4)
