"""Faults on a real local Ray cluster (issue 6): killed prune workers, drivers and Ray Train
workers, two sweeps on one output, `--force` over a broken base and a failing rerun. The
tests share the session's 2-CPU cluster (conftest `cluster`). Faults come from
tests/faults.py, a Ray worker setup hook that progprune's code does not know about.

Bad input through the real CLI is test_cli.py's; the secure defaults of the cluster
(token auth, the embedded Ray kept closed, no credentials leaked) are test_cluster.py's.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from progprune.spec import load_spec
from faults import inject
from helpers import (combo_ids, kill_session, one_row_each, popen_sweep, progprune, run_env, tiny_spec,
                     wait_for)

pytestmark = pytest.mark.ray


def test_killed_prune_worker_is_retried_and_the_sweep_finishes(cluster, tmp_path):
    # one model, both speedups: the killed combination and one that runs beside it
    spec = tiny_spec(tmp_path, models=["vgg11"])
    markers = tmp_path / "faults"
    r = progprune("sweep", spec, "--address", cluster.address,
                  env=run_env(**inject("kill:prune:vgg11:2.0", markers)), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    df = one_row_each(out, spec)
    assert (df.status == "ok").all(), df[["combo_id", "status", "error"]]
    (killed,) = [c for c in load_spec(spec).combinations() if c.model == "vgg11" and c.target_speedup == 2.0]
    assert [p.name for p in markers.iterdir()] == [f"{killed.combo_id()}-prune"]  # the SIGKILL really happened


def test_killed_driver_then_rerun_runs_only_what_is_missing(cluster, tmp_path):
    # one model, two speedups, one at a time: killed after the first row, the second is missing
    spec = tiny_spec(tmp_path, models=["resnet20"], resources={"max_concurrent": 1})
    out = tmp_path / "out"
    total = len(combo_ids(spec))
    proc = popen_sweep(spec, "--address", cluster.address)
    wait_for(lambda: any((out / "rows").glob("*.parquet")), proc, 600, "the first row fragment")
    kill_session(proc)
    assert (out / ".lock").exists()  # left behind by the killed driver
    time.sleep(2)  # let anything the dead driver's tasks were writing land before we look
    kept = {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.parquet")}
    kept |= {p: p.stat().st_mtime_ns for p in (out / "bases").glob("*.pt")}
    assert 1 <= len(list((out / "rows").glob("*.parquet"))) < total

    r = progprune("sweep", spec, "--address", cluster.address, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if "to run" in ln)
    assert int(line.split("to run")[1].split(";")[0]) < total, line
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished work and bases reused
    df = one_row_each(out, spec)
    assert (df.status == "ok").all()
    assert not (out / ".lock").exists()


def test_killed_train_worker_resumes_from_its_checkpoint(cluster, tmp_path):
    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1.5],
                     finetune={"epochs": 3, "batch_size": 32, "augment": False,
                               "num_workers": 1, "max_failures": 1})
    markers = tmp_path / "faults"
    r = progprune("sweep", spec, "--address", cluster.address,
                  env=run_env(**inject("kill:finetune:resnet20:1.5", markers)), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    df = one_row_each(out, spec)
    assert df.status.tolist() == ["ok"]
    assert df.finetune_workers.tolist() == [1]
    # killed after its epoch-1 report: restarted from a registered checkpoint, not from scratch
    assert df.finetune_resumed_from_epoch.iloc[0] in (0, 1), df.finetune_resumed_from_epoch
    assert len(list(markers.iterdir())) == 1  # the SIGKILL really happened
    assert "finetune epoch 3/3" in r.stdout and list((out / "combos").glob("*/final.pt"))


def test_two_sweeps_on_one_output_second_refuses(cluster, tmp_path):
    spec = tiny_spec(tmp_path, models=["resnet20"])
    out = tmp_path / "out"
    first = popen_sweep(spec, "--address", cluster.address)
    wait_for(lambda: (out / ".lock").exists(), first, 300, "the first sweep's lock")
    second = progprune("sweep", spec, "--address", cluster.address, timeout=120)
    stdout, stderr = first.communicate(timeout=600)
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.startswith("error: output") and "in use by another sweep" in second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert first.returncode == 0, stdout[-3000:] + stderr[-3000:]
    df = one_row_each(out, spec)
    assert (df.status == "ok").all()
    assert sorted(p.stem for p in (out / "rows").glob("*.parquet")) == combo_ids(spec)


def test_force_never_replaces_ok_rows_with_failures(cluster, tmp_path):
    """Issue 14 #2: `--force` retrains what it reruns (a broken stored base is replaced,
    not loaded), and a rerun that fails keeps the finished row and says so."""
    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1.5])
    out = tmp_path / "out"
    assert progprune("sweep", spec, "--address", cluster.address).returncode == 0
    (base,) = (out / "bases").glob("*.pt")
    base.write_bytes(b"garbage")  # a broken stored base
    r = progprune("sweep", spec, "--address", cluster.address, "--force")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (one_row_each(out, spec).status == "ok").all()
    before = (out / "rows").glob("*.parquet").__next__().read_bytes()
    r = progprune("sweep", spec, "--address", cluster.address, "--force",
                  env=run_env(**inject("raise:prune:resnet20:1.5", tmp_path / "faults")))
    assert r.returncode == 1 and "kept the earlier ok row" in r.stdout, r.stdout[-3000:]
    assert (one_row_each(out, spec).status == "ok").all()
    assert (out / "rows").glob("*.parquet").__next__().read_bytes() == before


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_sweep_keeps_every_finished_row(cluster, tmp_path, sig):
    """Ctrl-C or SIGTERM (what Kubernetes sends) with two rows finished and one combination
    still pruning: results.parquet showed 1 row until the next resume (it is rewritten at a
    bounded rate), and SIGTERM ended in Ray's crash dump, exit 1 (items 27, 28). Both end
    as Ctrl-C did: one line (exit 130, SIGTERM 143), every finished row merged, no lock or temp file left."""
    import signal
    import subprocess

    from helpers import read_results
    from raycluster import BIN

    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1.5, 2.0, 3.0], resources={"max_concurrent": 3})
    out, markers = tmp_path / "out", tmp_path / "faults"
    # the table is written once at the start and then not for 10 minutes: only the merge on
    # the signal can put the finished rows in it
    env = run_env(PROGPRUNE_RESULTS_INTERVAL_S="600", **inject("hold:prune:resnet20:3.0", markers))
    proc = subprocess.Popen([str(BIN / "progprune"), "sweep", str(spec), "--address", cluster.address],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # as from a terminal: SIGINT not ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: (markers / "held").exists() and len(list((out / "rows").glob("*.parquet"))) >= 2,
                 proc, 600, "two rows, with the third combination held")
        proc.send_signal(getattr(signal, sig))  # the driver alone, as `kill` or the kubelet does
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        (markers / "release").touch()  # the held prune task ends, whatever happened
        if proc.poll() is None:
            kill_session(proc)
    word, code = ("terminated", 143) if sig == "SIGTERM" else ("interrupted", 130)  # 128 + the signal
    assert proc.returncode == code, stdout[-3000:] + stderr[-3000:]
    assert stderr.count(f"{word}: finished combinations keep their rows; the same command resumes "
                        "the sweep\n") == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr and "PC: @" not in stderr, stderr[-3000:]
    rows = sorted(p.stem for p in (out / "rows").glob("*.parquet"))
    assert len(rows) == 2
    df = read_results(out)
    assert sorted(df.combo_id) == rows and (df.status == "ok").all(), df[["combo_id", "status"]]
    assert not (out / ".lock").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".probe-", ".lock-"))]
