"""`progprune prune/models/methods` run as real subprocesses, like a user would. Bad input
that fails before any work runs the same click group in-process (`_in`) except for one
real-process case per family (registry names, flag ranges, checkpoints, data)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from fixtures_data import write_cifar10
from progprune.artifacts import load_artifact, save_artifact
from progprune.models import build_model, list_models
from progprune.pruning import list_methods
from progprune.results import COLUMNS
from helpers import progprune as cli
from helpers import progprune_in_process as _in

PROGPRUNE = Path(sys.executable).with_name("progprune")
FAST = ["--dataset", "synthetic", "--base-epochs", "0", "--finetune-epochs", "1"]  # no --sl-epochs: group_norm learns no sparsity (refused)


def _run(*args, timeout=300):
    cmd = [str(PROGPRUNE)] if PROGPRUNE.exists() else [sys.executable, "-m", "progprune.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _json_row(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_models_lists_the_registry():
    proc = _run("models")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[: len(list_models())] == list_models()
    assert [ln.split(" ")[0] for ln in lines[len(list_models()):]] == ["tv:NAME", "timm:NAME",
                                                                       "py:package.module:factory"]


def test_methods_lists_the_registry():
    proc = _run("methods")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == list_methods()
    assert "[sparse learning]" in next(line for line in proc.stdout.splitlines() if line.startswith("group_sl "))


def test_prune_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = _run("prune", "--model", "resnet20", *FAST, "--speedup", "2", "--iterative-steps", "100",
                "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    row = _json_row(proc)
    assert set(COLUMNS) <= set(row)
    assert row["status"] == "ok" and row["error"] is None
    assert row["achieved_speedup"] >= 2.0
    assert row["pruned_macs"] < row["base_macs"] and row["model"] == "resnet20"
    assert row["finetune_epochs"] == 1 and row["final_top1"] is not None
    assert sorted(os.listdir(out)) == ["pruned.pt", "result.parquet"]
    assert row["artifact_uri"] == str((out / "pruned.pt").resolve())

    table = pq.read_table(out / "result.parquet")
    assert table.num_rows == 1 and set(COLUMNS) <= set(table.column_names)
    df = pd.read_parquet(out / "result.parquet")
    assert len(df) == 1
    assert df.loc[0, "achieved_speedup"] == pytest.approx(row["achieved_speedup"])
    assert df.loc[0, "combo_id"] == row["combo_id"] and df.loc[0, "status"] == "ok"
    assert df.loc[0, "artifact_uri"] == row["artifact_uri"]

    model, info = load_artifact(out / "pruned.pt", model_name="resnet20", num_classes=10)
    assert info["model"] == "resnet20"
    import torch_pruning as tp
    macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, 32, 32))
    assert (int(macs), int(params)) == (row["pruned_macs"], row["pruned_params"])


def test_unreachable_target_exits_3_with_its_row(tmp_path):
    out = tmp_path / "run"
    proc = _run("prune", "--model", "resnet20", *FAST, "--speedup", "1000", "--iterative-steps", "30",
                "--out", out, "--json")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    row = _json_row(proc)
    assert row["status"] == "unreachable" and row["achieved_speedup"] < 1000
    assert row["prune_steps"] == 30 and "unreachable" in row["error"]
    assert row["final_top1"] is None  # no fine-tuning of a model that missed its target
    assert pd.read_parquet(out / "result.parquet").loc[0, "status"] == "unreachable"


# ---- bad input: exit 2, one clean line, nothing written -----------------------------------

def _bad(tmp_path, *args, exists=False, run=_run):
    out = tmp_path / "out"
    if exists:
        out.mkdir()
    proc = run("prune", *args, "--out", out)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    if exists:
        assert os.listdir(out) == []
    else:
        assert not out.exists()
    return lines[0]


def test_unknown_model(tmp_path):
    line = _bad(tmp_path, "--model", "resnet57", "--speedup", "2", *FAST)
    assert "unknown model 'resnet57'" in line and all(m in line for m in list_models())


def test_unknown_dataset(tmp_path):
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", "--dataset", "mnist", run=_in)
    assert "unknown dataset 'mnist'" in line
    assert all(d in line for d in ("cifar10", "cifar100", "digits", "imagefolder", "synthetic"))


def test_unknown_method(tmp_path):
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", "--method", "l3", *FAST, run=_in)
    assert "unknown method 'l3'" in line and all(m in line for m in list_methods())


@pytest.mark.parametrize("speedup, run", [("1", _run), *((v, _in) for v in ("0.5", "fast", "-2", "nan", "inf"))],
                         ids=["1", "0.5", "fast", "-2", "nan", "inf"])
def test_bad_speedup(tmp_path, speedup, run):
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", speedup, *FAST, run=run)
    assert "--speedup" in line and ("must be a number in (1, 10000]" in line or "is not a valid float" in line)


@pytest.mark.parametrize("flag, run", [("--base-epochs", _run), ("--finetune-epochs", _in), ("--sl-epochs", _in)],
                         ids=["--base-epochs", "--finetune-epochs", "--sl-epochs"])
def test_negative_epochs(tmp_path, flag, run):
    args = dict(zip(FAST[::2], FAST[1::2]))
    args[flag] = "-1"
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", *[v for kv in args.items() for v in kv], run=run)
    assert flag in line and "must be an integer in [0, 10000], got -1" in line


def test_missing_checkpoint(tmp_path):
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", *FAST, "--checkpoint", tmp_path / "none.pt", run=_in)
    assert "--checkpoint: file not found" in line


def test_corrupt_checkpoint(tmp_path):
    good = save_artifact(tmp_path / "good.pt", build_model("resnet20", 10), model_name="resnet20", num_classes=10)
    ck = tmp_path / "bad.pt"
    ck.write_bytes(Path(good).read_bytes()[:5000])  # a truncated download
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", *FAST, "--checkpoint", ck, exists=True)
    assert "corrupt or not a torch file" in line


def test_random_bytes_checkpoint(tmp_path):
    ck = tmp_path / "bad.pt"
    ck.write_bytes(os.urandom(2048))
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", *FAST, "--checkpoint", ck)
    assert str(ck) in line


def test_empty_checkpoint(tmp_path):
    ck = tmp_path / "empty.pt"
    ck.write_bytes(b"")
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", *FAST, "--checkpoint", ck)
    assert "corrupt or not a torch file" in line


def test_checkpoint_of_another_architecture(tmp_path):
    ck = save_artifact(tmp_path / "vgg.pt", build_model("vgg11", 10), model_name="vgg11", num_classes=10)
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", *FAST, "--checkpoint", ck)
    assert "holds a vgg11, not a resnet20" in line


def test_checkpoint_of_another_class_count(tmp_path):
    ck = save_artifact(tmp_path / "r100.pt", build_model("resnet20", 100), model_name="resnet20", num_classes=100)
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", *FAST, "--checkpoint", ck)
    assert "has 100 classes, the dataset has 10" in line


def test_plain_state_dict_of_another_architecture(tmp_path):
    ck = tmp_path / "sd.pt"
    torch.save(build_model("resnet32", 10).state_dict(), ck)
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", *FAST, "--checkpoint", ck)
    assert "does not fit resnet20" in line


def test_cifar10_data_dir_missing_files(tmp_path):
    data = write_cifar10(tmp_path / "cifar")
    (data / "data_batch_3").unlink()
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", "--dataset", "cifar10",
                "--data-dir", data, "--base-epochs", "0", run=_in)
    assert "lacks data_batch_3" in line


def test_cifar10_without_data_dir(tmp_path):
    line = _bad(tmp_path, "--model", "resnet20", "--speedup", "2", "--dataset", "cifar10")
    assert line.startswith("error: --data-dir: cifar10 reads")  # the flag, not the spec path


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(tmp_path):
    """SIGINT (Ctrl-C) mid-training: exit 130, one line, no traceback, no half-written output."""
    import signal

    out = tmp_path / "out"
    p = subprocess.Popen([str(PROGPRUNE), "prune", "--model", "resnet20", "--speedup", "2",
                          "--dataset", "synthetic", "--num-classes", "4", "--base-epochs", "10000",
                          "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # as from a terminal: a test run started in the background (CI, `cmd &`)
                         # hands its children SIGINT ignored, and Python then installs no handler
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:  # interrupt once training has begun
            if "base epoch 1/" in line:
                break
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stderr
    assert stderr.strip() == "interrupted", stderr  # Click ends the terminal's ^C line first
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_prune_writes_its_row_once_naming_where_its_artifact_ends(tmp_path, monkeypatch):
    """The row is written once, after the artifact's final place is known (it used to be
    written in the staging folder, moved, and written again over it)."""
    from click.testing import CliRunner

    from progprune.cli import main

    written, write_table = [], pq.write_table

    def counting(table, where, *args, **kwargs):  # the real writer, counted
        written.append(table.column("combo_id").to_pylist())
        return write_table(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", counting)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["prune", "--model", "resnet20", "--dataset", "synthetic", "--base-epochs", "0",
                                       "--finetune-epochs", "0", "--speedup", "1.5",
                                       "--iterative-steps", "20", "--latency-repeats", "1", "--device", "cpu",
                                       "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert written == [[row["combo_id"]]]
    assert sorted(os.listdir(out)) == ["pruned.pt", "result.parquet"]
    (stored,) = pd.read_parquet(out / "result.parquet").to_dict("records")
    assert stored["artifact_uri"] == row["artifact_uri"] == str((out / "pruned.pt").resolve())
    assert stored["combo_id"] == row["combo_id"] and stored["status"] == row["status"] == "ok"
    assert stored["pruned_macs"] == row["pruned_macs"]


# ---- rows of prune runs (issues 9, 12, 14) --------------------------------------------
# 4 classes, no training, a short schedule: the row's fields are what is checked
FAST_4 = ["--dataset", "synthetic", "--num-classes", "4", "--base-epochs", "0", "--finetune-epochs", "0",
          "--iterative-steps", "40", "--latency-repeats", "1"]


def test_pruning_in_rounds_reloads(tmp_path):
    """Issue 14 #1: a pruned artifact is a valid base; the second round's artifact reloads
    (histories compose) and its row carries the latency spread and the thread count."""
    import progprune

    a, b = tmp_path / "A", tmp_path / "B"
    r = cli("prune", "--model", "resnet20", "--speedup", "1.2", *FAST_4, "--output", a)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("prune", "--model", "resnet20", "--speedup", "1.3", *FAST_4, "--checkpoint", a / "pruned.pt",
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


@pytest.mark.parametrize("crossing, cuts", [("reference", {"whole"}), ("fine", {"whole", "prefix", "subset"})])
def test_crossing_reaches_the_row(crossing, cuts):
    r = cli("prune", "--model", "resnet20", "--speedup", "2", *FAST_4, "--crossing", crossing, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["crossing"] == crossing and row["crossing_cut"] in cuts and row["achieved_speedup"] >= 2


def test_sparse_method_rows_report_the_model_they_pruned():
    """Issue 12: base_top1 of a sparse method is the model after sparse learning (the one
    pruned); the pre-sparse figure has its own column; the row records the recipe's reg."""
    r = cli("prune", "--model", "resnet20", "--speedup", "1.5", "--method", "slim", *FAST_4,
            "--sl-epochs", "1", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["method"] == "slim" and row["sparse_reg"] == 1e-5 and row["sparse_epochs"] == 1
    assert 0 <= row["base_top1_pre_sparse"] <= 1 and 0 <= row["base_top1"] <= 1


def test_one_step_schedule_explains_itself():
    """Issue 14 #8: --iterative-steps 1 asks for every channel at once, which Torch-Pruning
    refuses; the row says what the schedule allows instead of only 'unreachable'."""
    r = cli("prune", "--model", "resnet20", "--speedup", "2", *FAST_4, "--iterative-steps", "1", "--json")
    assert r.returncode == 3
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert "the schedule is 1 steps" in row["error"] and "use more iterative_steps" in row["error"]
    assert "prunes none of them" in row["error"]


def test_max_pruning_ratio_is_a_cap_and_the_row_says_so():
    """Issue 14 #7: a target the cap forbids ends unreachable, naming the cap."""
    r = cli("prune", "--model", "resnet20", "--speedup", "2", *FAST_4, "--max-pruning-ratio", "0.3", "--json")
    assert r.returncode == 3, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert "at its max_pruning_ratio 0.3 floor" in row["error"] and row["achieved_speedup"] < 2
