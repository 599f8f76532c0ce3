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
        "dataset-name-case": ({"dataset": {"name": "CIFAR10"}}, "dataset.name: unknown dataset 'CIFAR10'; did you mean 'cifar10'?"),
        "data-dir-unread": ({"dataset": {"name": "digits", "data_dir": str(files)}},
                            f"dataset.data_dir: digits reads no files, so {files} would be ignored"),
        "unknown-target-metric": ({"pruning": {"target_metric": "speed"}},
                                  "pruning.target_metric[0]: must be one of macs, latency, params"),
        "duplicate-target-metric": ({"pruning": {"target_metric": ["latency", "latency"]}},
                                    "pruning.target_metric: duplicate entry"),
        "latency-tolerance-0": ({"pruning": {"latency_tolerance": 0}}, "pruning.latency_tolerance: must be a number in (0, 1]"),
        # TBs of prototypes alone: refused on any machine
        "image-size-beyond-memory": ({"dataset": {"name": "synthetic", "image_size": 4096, "num_classes": 100_000}},
                                     "dataset.image_size: synthetic at 4096 px is held in memory: about "),
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
           "num-classes-mismatch", "output-scheme", "dataset-name-case", "data-dir-unread",
           "image-size-beyond-memory", "unknown-target-metric", "duplicate-target-metric",
           "latency-tolerance-0"]


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


def test_dry_run_refuses_what_cannot_fit(bad_runs):
    """Issue 23 #8: the dry run checks memory as the run does (the spec's validation)."""
    spec, out, message = _dry_case(bad_runs, "image-size-beyond-memory")
    r = progprune_in_process("sweep", spec, "--dry-run")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def _dry_case(bad_runs, case):
    r, out, message, root = bad_runs[case]
    return root / case / "tiny.yaml", out, message


_PEAK_RSS = ("import atexit, resource, sys; atexit.register(lambda: print('peak-rss-kib', "
             "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
             "from progprune.cli import main; main(sys.argv[1:])")


def _dry_run_peak(tmp_path, name, dataset) -> int:
    """Peak resident memory (bytes) of a real `progprune sweep --dry-run` process."""
    from helpers import run_env

    spec = tiny_spec(tmp_path, name=name, dataset=dataset)
    r = subprocess.run([sys.executable, "-c", _PEAK_RSS, "sweep", str(spec), "--dry-run"],
                       capture_output=True, text=True, env=run_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stderr.split("peak-rss-kib")[1].split()[0]) * 1024


def test_dry_run_never_materialises_the_data(tmp_path):
    """Issue 23 #7: a dry run built the data set in the driver (1,000,000 synthetic samples
    grew to ~24 GB and were killed). Now it reads only the shape: the largest set the
    schema allows at 32 px (461 MB: 150,000 images, one byte a pixel) leaves the dry run's
    peak memory where a 96-image set leaves it."""
    small = _dry_run_peak(tmp_path, "small", {"name": "synthetic", "num_classes": 4, "synthetic_samples": 96})
    large = _dry_run_peak(tmp_path, "large", {"name": "synthetic", "num_classes": 4, "synthetic_samples": 100_000})
    held = (100_000 + 2 * 25_000) * 3 * 32 * 32
    assert large - small < held / 4, (small, large, held)


def test_sweep_refuses_a_model_of_another_class_count(tmp_path, monkeypatch):
    """A py: factory that ignores its num_classes: `prune` refused it, `sweep` ran it to rows
    of top-1 0.00% (its preflight checked the input size only). Refused before any work."""
    (tmp_path / "sweep_seven.py").write_text(
        "from torch import nn\n\n"
        "def seven(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 7))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tiny_spec(tmp_path, models=["resnet20", "py:sweep_seven:seven"])
    for extra in ([], ["--dry-run"]):
        r = progprune_in_process("sweep", spec, *extra)
        assert r.returncode == 2, r.stderr[-2000:]
        line = r.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, line
        assert ("model 'py:sweep_seven:seven' outputs 7 values per image, the data has 4 classes; "
                "build it with num_classes=4") in line, line
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, value, words", [
    ("PROGPRUNE_LOCK_LEASE_S", "99999999", "expected a number of seconds > 0 and <= 600, got '99999999'"),
    ("PROGPRUNE_LOCK_SETTLE_S", "soon", "got 'soon'"),
    ("PROGPRUNE_RESULTS_INTERVAL_S", "-1", "got '-1'"),
])
def test_dry_run_refuses_the_environment_the_run_refuses(tmp_path, monkeypatch, name, value, words):
    """A lease of 10^8 s in the environment: the run refused it, the dry run said OK (the
    same class as a dry run passing an output the run refuses). One rule, before any work."""
    monkeypatch.setenv(name, value)
    spec = tiny_spec(tmp_path)
    for extra in (["--dry-run"], []):
        r = progprune_in_process("sweep", spec, *extra)
        assert r.returncode == 2, r.stderr[-2000:]
        line = r.stderr.strip()
        assert "\n" not in line and line.startswith(f"error: {name}: ") and words in line, line
        assert not (tmp_path / "out").exists()


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
    r = progprune_in_process("prune", "--model", "resnet20", "--speedup", "2", "--output", tmp_path / "o")
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
    assert progprune_in_process("sweep", spec, "--dry-run", "--replace-sweep").returncode == 0
    (out / "spec.resolved.yaml").write_text("name: sweep-b\n")  # the same sweep, edited grid: fine
    assert progprune_in_process("sweep", spec, "--dry-run").returncode == 0


def test_report_to_an_unwritable_place_is_one_line(tmp_path):
    from progprune.results import ResultRow, write_rows

    write_rows([ResultRow(combo_id="x", sweep="s", model="resnet20", dataset="digits", method="l1",
                          seed=0, target_speedup=2.0)], tmp_path / "results.parquet")
    r = cli("report", tmp_path / "results.parquet", "--format", "html", "--output", "/proc/nope/x")
    assert r.returncode == 2 and r.stderr.startswith("error: cannot write the report to /proc/nope/x")
    assert len(r.stderr.strip().splitlines()) == 1


# ---- issue 23: what a sweep refuses before any work ----------------------------------------
def _tree(root: Path) -> dict:
    """Every path under `root` (links not followed) -> its bytes (None for a directory)."""
    return {p.relative_to(root): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))} if root.exists() else {}


@pytest.mark.parametrize("left", ["results.parquet", "rows"])
def test_an_output_with_sweep_files_but_no_spec_is_refused(tmp_path, left):
    """A results.parquet (or rows/) with no spec.resolved.yaml beside it is not this sweep's
    (another sweep's table, a hand-made one): the sweep replaced it silently (item 2)."""
    from progprune.results import ResultRow, write_rows

    out = tmp_path / "out"
    row = ResultRow(combo_id="x", sweep="hand", model="resnet20", dataset="digits", method="l1", seed=0,
                    target_speedup=2.0)
    write_rows([row], out / "results.parquet" if left == "results.parquet" else out / "rows" / "x.parquet")
    before = _tree(out)
    spec = tiny_spec(tmp_path)
    for run, args in ((progprune_in_process, ["--dry-run"]), (progprune_in_process, []),
                      (progprune, [])):  # the real run in a real process: no traceback
        r = run("sweep", spec, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr == (f"error: output: {out} holds {left} but no spec.resolved.yaml, so it is not this "
                            "sweep's output (another sweep's table, or one made by hand); choose another "
                            "--output, or pass --replace-sweep to let this sweep replace it\n")
        assert _tree(out) == before
    assert progprune_in_process("sweep", spec, "--dry-run", "--replace-sweep").returncode == 0


@pytest.mark.parametrize("part, kind", [(".lock", "dir"), ("results.parquet", "dir"), ("spec.resolved.yaml", "dir"),
                                        ("rows", "file"), ("report", "file")])
def test_an_output_part_of_the_wrong_kind_is_one_line(tmp_path, part, kind):
    """`<output>/.lock` a directory was an IsADirectoryError traceback (item 16); a
    results.parquet that is a directory failed only after all the work, when written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.resolved.yaml").write_text("name: tiny\n")  # this sweep's output
    if part == "spec.resolved.yaml":
        (out / part).unlink()
    (out / part).mkdir() if kind == "dir" else (out / part).write_text("x")
    before = _tree(out)
    spec = tiny_spec(tmp_path)
    what = "a directory" if kind == "dir" else "not a directory"
    should = "file" if kind == "dir" else "directory"
    for args in (["--dry-run"], []):
        r = progprune_in_process("sweep", spec, *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr == (f"error: output: {out / part} is {what}, where this output keeps its {should} "
                            f"{part}; move it away or choose another --output\n")
        assert _tree(out) == before


def test_lock_that_is_a_directory_in_a_real_process(tmp_path):
    out = tmp_path / "out"
    (out / ".lock").mkdir(parents=True)
    (out / "spec.resolved.yaml").write_text("name: tiny\n")
    r = progprune("sweep", tiny_spec(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{out / '.lock'} is a directory" in r.stderr


def test_output_at_a_dangling_symlink_same_answer_in_dry_run_and_run(tmp_path):
    """The dry run said OK where the real sweep refused (item 15): one rule, before any work,
    at the link itself and below it."""
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    spec = tiny_spec(tmp_path)
    for output, it in ((tmp_path / "link", "it"), (tmp_path / "link" / "sub", tmp_path / "link")):
        expected = (f"error: output: cannot write to {output}: {it} is a symbolic link to {tmp_path / 'nowhere'}, "
                    "which does not exist; choose a writable location with --output\n")
        for args in (["--dry-run"], []):
            r = progprune_in_process("sweep", spec, "--output", output, *args)
            assert (r.returncode, r.stdout, r.stderr) == (2, "", expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "tiny.yaml"]


def _no_gpu_env(**extra) -> dict:
    from helpers import run_env

    return run_env(CUDA_VISIBLE_DEVICES="", **extra)  # as a machine without a GPU, wherever this runs


@pytest.mark.parametrize("over, field, who, real", [
    ({"resources": {"gpus_per_task": 1}}, "resources.gpus_per_task", "a prune task asks for 1 CPU, 1 GPU", True),
    ({"finetune": {"epochs": 1, "num_workers": 1, "use_gpu": True}}, "finetune.use_gpu",
     "each Ray Train worker asks for 1 CPU, 1 GPU", True),
    ({"resources": {"cpus_per_task": 1024}}, "resources.cpus_per_task", "a prune task asks for 1024 CPU, 0 GPU",
     False),
], ids=["gpus_per_task", "use_gpu", "cpus_per_task"])
def test_resources_the_embedded_ray_lacks_are_refused_before_any_work(tmp_path, over, field, who, real):
    """gpus_per_task 1 on a machine without a GPU: the dry run said OK and the run queued
    forever (item 11). Both refuse now, naming the field and what to change. The GPU cases
    run in a real process (CUDA_VISIBLE_DEVICES="" hides a GPU only from a fresh process);
    1024 CPUs are more than any machine here, so that one runs in-process."""
    spec = tiny_spec(tmp_path, **over)
    for args in (["--dry-run"], []):
        r = (progprune("sweep", spec, *args, env=_no_gpu_env(), timeout=300) if real
             else progprune_in_process("sweep", spec, *args))
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stdout + r.stderr
        assert r.stderr.startswith(f"error: {field}: {who} on one node, but the embedded Ray of this machine "
                                   "(no --address) has "), r.stderr
        assert "wait forever" in r.stderr
        assert ("resources.gpus_per_task: 0 and finetune.use_gpu: false" if "GPU" in field or "gpu" in field
                else "lower resources.cpus_per_task") in r.stderr
        assert not (tmp_path / "out").exists()


def _unshare_pid() -> list[str]:
    """A new pid namespace with its own /proc: Ray's `auto` finds no cluster there (it looks
    for GCS processes, and in RAY_TMPDIR for the last `ray start`), whatever else this
    machine runs."""
    for prefix in (["unshare", "--pid", "--fork", "--mount-proc"],
                   ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]):
        r = subprocess.run([*prefix, "true"], capture_output=True, text=True)
        if r.returncode == 0:
            return prefix
    pytest.fail("this test needs `unshare --pid --mount-proc` (root, or unprivileged user namespaces)")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_address_auto_without_a_cluster_is_one_line_and_writes_nothing(tmp_path, how):
    """`--address auto` / RAY_ADDRESS=auto with no cluster: a ConnectionError traceback after
    spec.resolved.yaml was written (item 13). It connects before writing anything now."""
    from helpers import run_env
    from raycluster import BIN

    spec = tiny_spec(tmp_path)
    (tmp_path / "raytmp").mkdir()
    env = run_env(RAY_TMPDIR=str(tmp_path / "raytmp"))
    if how == "env":
        env["RAY_ADDRESS"] = "auto"  # run_env drops it
    args = ["--address", "auto"] if how == "flag" else []
    r = subprocess.run([*_unshare_pid(), str(BIN / "progprune"), "sweep", str(spec), *args], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error: ") == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --address: cannot connect to the Ray cluster at auto (--address or "
                           "RAY_ADDRESS): Could not find any running Ray instance"), line
    assert "ray start --head" in line
    assert not (tmp_path / "out").exists()


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


# ---- runtime flags on a sweep (issue 20) ---------------------------------------------------
def test_sweep_runtime_flags_override_the_spec_and_are_checked_up_front(tmp_path):
    spec = tiny_spec(tmp_path)
    r = progprune_in_process("sweep", spec, "--precision", "fp16", "--dry-run")  # resources: no GPU
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "evaluation.precision: precision fp16 is timed on a GPU" in r.stderr
    r = progprune_in_process("sweep", spec, "--runtime", "tensorrt", "--dry-run")
    assert r.returncode == 2 and "evaluation.runtime: runtime tensorrt needs" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    from progprune.spec import load_spec

    over = load_spec(spec, overrides={"evaluation": {"runtime": "onnxruntime", "threads": 2}}).evaluation
    assert (over.runtime, over.threads, over.latency_repeats) == ("onnxruntime", 2, 2)  # the file's own kept
