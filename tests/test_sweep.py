"""Sweeps end to end on a real local Ray cluster (ray start --head on 127.0.0.1), through
the real `ray job submit` CLI and the real `progprune` CLI; results read back with
pyarrow and pandas. The cluster is the session's (conftest `cluster`); the 1-GPU one
is its test's own. Bad input through the CLI is test_cli.py's, faults test_sweep_faults.py's."""
from __future__ import annotations

import os
import subprocess

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from progprune.artifacts import load_artifact
from progprune.spec import load_spec
from progprune.storage import Store
from faults import inject
from helpers import ROOT, combo_ids, one_row_each, progprune, read_results, run_env, tiny_spec
from raycluster import BIN, LocalRay

SMOKE = ROOT / "ray_jobs" / "digits_smoke.yaml"


@pytest.mark.ray
def test_smoke_sweep_via_ray_job_submit(cluster, tmp_path):
    out = tmp_path / "smoke"
    # this cluster's Python has progprune and its dependencies: the shipped runtime env
    # without its pip: list (test_any_cluster.py runs the full one on a bare cluster)
    env = yaml.safe_load((ROOT / "ray_jobs" / "runtime_env.yaml").read_text())
    env.pop("pip")
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(env))
    # the shipped smoke spec for its first model at its first two speedups, with half its
    # base epochs: the whole grid is the demo's job; this keeps CI's time in bounds (six
    # combinations took 570 s here; vgg11 at 2x beside resnet20 231 s, vgg11's base most of
    # it). Two speedups of one model share one base, which the checks below hold it to.
    smoke = yaml.safe_load(SMOKE.read_text())
    smoke["models"] = smoke["models"][:1]
    smoke["speedups"] = smoke["speedups"][:2]
    smoke["base_training"]["epochs"] = 4
    smoke.pop("controls")  # the demo's random control is two more Train runs; controls: the test below
    spec_path = tmp_path / "digits_smoke.yaml"
    spec_path.write_text(yaml.safe_dump(smoke))
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
         "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--",
         "python", "-m", "progprune", "sweep", str(spec_path), "--output", str(out)],
        capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    spec = load_spec(spec_path)
    df = read_results(out)
    assert len(df) == len(spec.combinations()) == 2
    assert sorted(df.combo_id) == sorted(c.combo_id() for c in spec.combinations())
    assert (df.status == "ok").all(), df[["model", "target_speedup", "status", "error"]]
    assert (df.achieved_speedup >= df.target_speedup).all()
    # how close above the target depends on the last step's own selection (the subset rule,
    # checked against the reference loop in test_crossing.py); the row names the cut
    assert (df.achieved_speedup <= df.target_speedup * 1.03).all(), df[["model", "target_speedup", "achieved_speedup"]]
    assert df.crossing_cut.isin(["whole", "prefix", "subset"]).all() and (df.crossing == "fine").all()
    for col in ("base_top1", "pruned_top1", "final_top1", "base_top5", "final_top5"):
        assert df[col].between(0, 1).all(), col
    assert (df.final_top1 > 0.8).all()  # digits: fine-tuned models recover
    assert (df.finetune_workers == 1).all()  # fine-tuned through Ray Train
    assert (df.sweep == "digits-smoke").all()
    # base models: exactly one per (model, seed), shared by its speedups
    assert smoke["models"] == ["resnet20"] and smoke["speedups"] == [1.5, 2.0]
    assert len(list((out / "bases").glob("*.pt"))) == 1
    assert df.groupby("model").base_top1.nunique().eq(1).all()
    # every artifact named in the table reloads without unpickling code
    from progprune.artifacts import load_artifact
    m, info = load_artifact(df.artifact_uri.iloc[0])
    assert info["model"] == df.model.iloc[0]
    assert (out / "report" / "report.md").exists()
    assert "results" in r.stdout
    # issue 13: bounded storage, logs a person can follow, real timestamps, a schema version
    assert not list((out / "train").glob("ft-*"))  # Train checkpoints go once the row is written
    assert "[resnet20 group_norm 2x seed 0] " in r.stdout and "finetune epoch 3/3" in r.stdout
    # once each: Ray Train's workers echo print() twice (its print patch), tasks._logger does not use it
    assert r.stdout.count("[resnet20 group_norm 2x seed 0] finetune epoch 3/3") == 1, r.stdout[-3000:]
    # Ray Train's own chatter stays in Ray's log files: its lifecycle INFO lines
    # (LoggingConfig), the per-report line and the PreemptionWatcher notice (cluster._CHATTER)
    for chatter in ("Reporting training result", "Requesting resources", "Started training worker group",
                    "Checkpoint successfully created", "PreemptionWatcher"):
        assert chatter not in r.stdout + r.stderr, chatter
    schema = pq.read_schema(out / "results.parquet")
    assert str(schema.field("started_at").type).startswith("timestamp") and "UTC" in str(schema.field("finished_at").type)
    assert schema.metadata[b"progprune.schema_version"] == b"2"
    assert (df.latency_threads >= 1).all() and df.finetune_global_batch.eq(64).all()
    assert all(oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask()) for p in (out / "rows").glob("*.parquet"))

    # resume: the same command again does no work and leaves the same rows
    before = {p: p.stat().st_mtime_ns for p in (out / "bases").glob("*.pt")}
    before |= {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.parquet")}
    r2 = progprune("sweep", spec_path, "--output", out, "--address", cluster.address)
    assert r2.returncode == 0, r2.stderr
    assert "to run   0" in r2.stdout
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after
    df2 = read_results(out)
    pd.testing.assert_frame_equal(df.sort_values("combo_id").reset_index(drop=True),
                                  df2.sort_values("combo_id").reset_index(drop=True))


@pytest.mark.ray
def test_failed_combination_becomes_a_row_and_the_sweep_goes_on(cluster, tmp_path):
    # one model's two speedups (was two models'): the failed one and one that goes on beside it
    spec = tiny_spec(tmp_path, models=["vgg11"])
    r = progprune("sweep", spec, "--address", cluster.address,
                  env=run_env(**inject("raise:prune:vgg11:2.0", tmp_path / "faults")))
    assert r.returncode == 1, r.stdout + r.stderr
    df = read_results(tmp_path / "out")
    assert len(df) == 2
    bad = df[(df.model == "vgg11") & (df.target_speedup == 2.0)]
    assert bad.status.tolist() == ["failed"]
    assert "injected failure" in bad.error.iloc[0]
    assert "\n" not in bad.error.iloc[0]
    assert (df.drop(bad.index).status == "ok").all()
    # a rerun retries only the failed combination, and it now succeeds
    r2 = progprune("sweep", spec, "--address", cluster.address)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "to run   1" in r2.stdout
    df2 = read_results(tmp_path / "out")
    assert len(df2) == 2 and (df2.status == "ok").all()


@pytest.mark.ray
def test_unreachable_target_is_a_row_not_an_error(cluster, tmp_path):
    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1000.0], pruning={"iterative_steps": 30})
    r = progprune("sweep", spec, "--address", cluster.address)
    assert r.returncode == 0, r.stdout + r.stderr
    df = read_results(tmp_path / "out")
    assert df.status.tolist() == ["unreachable"]
    assert df.achieved_speedup.iloc[0] < 1000
    assert df.prune_steps.iloc[0] == 30
    assert df.final_top1.isna().all()


@pytest.mark.ray
def test_target_metrics_are_a_sweep_axis_with_one_row_each(cluster, tmp_path):
    """Issue 20: `pruning.target_metric: [macs, params, latency]` runs each target in its
    metric; the MACs combinations keep the combo_ids of the same spec without the axis."""
    plain = tiny_spec(tmp_path, name="plain", models=["resnet20"], speedups=[1.5])
    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1.5],
                     pruning={"iterative_steps": 60, "target_metric": ["macs", "params", "latency"]})
    r = progprune("sweep", spec, "--address", cluster.address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 target metrics" in r.stdout
    df = read_results(tmp_path / "out").set_index("target_metric")
    assert sorted(df.index) == ["latency", "macs", "params"] and (df.status == "ok").all()
    assert df.loc["macs", "achieved_speedup"] == pytest.approx(df.loc["macs", "macs_speedup"])
    assert df.loc["params", "achieved_speedup"] == pytest.approx(df.loc["params", "compression_ratio"])
    assert df.loc["latency", "achieved_ci_low"] >= 1.5 and df.loc["latency", "target_points"] >= 1
    assert df.loc["macs", "combo_id"] == combo_ids(plain)[0]
    assert len(set(df.combo_id)) == 3


@pytest.mark.ray
def test_controls_run_beside_the_methods_and_stand_apart_from_them(cluster, tmp_path):
    """Issue 24: `controls: [random, scratch]`: a random control per (target, seed) and each
    method's architecture trained from scratch; the report's paired differences recomputed
    here from the rows; adding a method leaves every control's row where it is."""
    from scipy.stats import t

    grid = dict(models=["resnet20"], speedups=[2.0], methods=["group_norm", "l1"], seeds=[0, 1])
    first = tiny_spec(tmp_path, name="first", **grid, controls=["random"])
    r = progprune("sweep", first, "--address", cluster.address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "controls: random" in r.stdout and "random (control)" in r.stdout
    # the scratch control added later trains the stored methods' architectures (their pruned.pt)
    spec = tiny_spec(tmp_path, name="first", **grid, controls=["random", "scratch"], scratch={"epochs": 1})
    r = progprune("sweep", spec, "--address", cluster.address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "to run   4; already done (kept) 6" in r.stdout and "group_norm (scratch)" in r.stdout
    df = one_row_each(tmp_path / "out", spec)
    assert (df.status == "ok").all(), df[["method", "control", "error"]]
    methods, rand, scratch = df[df.control.isna()], df[df.control == "random"], df[df.control == "scratch"]
    assert (len(methods), len(rand), len(scratch)) == (4, 2, 4)
    assert (rand.method == "random").all() and sorted(rand.seed) == [0, 1]
    # the same target by the same rule (the crossing step's own selection: within 3%, as the smoke test's)
    assert (rand.target_speedup == 2.0).all() and (rand.target_metric == "macs").all() and (rand.crossing == "fine").all()
    assert ((rand.achieved_speedup >= 2.0) & (rand.achieved_speedup <= 2.0 * 1.03)).all()
    by_id = df.set_index("combo_id")
    for _, s in scratch.iterrows():  # the method's architecture: same counts, trained from scratch
        m = by_id.loc[s.architecture_of]
        assert (s.method, s.seed, s.pruned_macs, s.pruned_params) == (m.method, m.seed, m.pruned_macs, m.pruned_params)
        assert s.scratch_epochs == 1 and s.final_top1 is not None and s.artifact_uri.endswith("final.pt")
    shapes = lambda p: {k: v.shape for k, v in load_artifact(p)[0].state_dict().items()}  # noqa: E731
    s = scratch.iloc[0]
    assert shapes(s.artifact_uri) == shapes(tmp_path / "out" / "combos" / s.architecture_of / "pruned.pt")

    rep = progprune("report", tmp_path / "out")
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Against the controls (paired by seed)" in md and "(accuracy_vs_controls.png)" in md
    for method in ("group_norm", "l1"):  # recomputed from the rows: mean and Student's t interval over seeds
        mine = methods[methods.method == method].set_index("seed").final_top1
        for control, theirs in (("random", rand.set_index("seed").final_top1),
                                ("scratch", scratch[scratch.method == method].set_index("seed").final_top1)):
            d = (mine - theirs) * 100
            half = t.ppf(0.975, 1) * d.std(ddof=1) / 2 ** 0.5
            cells = f"| {method} | {control} | 2 | {d.mean():+.2f} | [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] |"
            assert cells in md, (cells, md[md.index("## Against"):])

    more = tiny_spec(tmp_path, name="first", **{**grid, "methods": ["group_norm", "l1", "l2"]},
                     controls=["random", "scratch"], scratch={"epochs": 1})
    plan = progprune("sweep", more, "--address", cluster.address, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "to run   4; already done (kept) 10" in plan.stdout  # l2 and its scratch controls only


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    spec = tiny_spec(tmp_path)
    r = progprune("sweep", spec, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "4 combinations" in r.stdout and "base models: train 2" in r.stdout
    assert not (tmp_path / "out").exists()
    # what the run would refuse, the dry run refuses too, still writing nothing: an output
    # that is a file, or below one
    (tmp_path / "taken").write_text("a user's file\n")
    for output, what in ((tmp_path / "taken", "it"), (tmp_path / "taken" / "sub", tmp_path / "taken")):
        r = progprune("sweep", spec, "--dry-run", "--output", output)
        assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
        assert r.stderr == f"error: output: cannot write to {output}: {what} exists and is not a directory; " \
                           "choose a writable location with --output\n"
    assert (tmp_path / "taken").read_text() == "a user's file\n" and not (tmp_path / "out").exists()


@pytest.mark.ray(own_cluster=True)  # a cluster of its own: it may run beside the session's
def test_one_gpu_cluster_does_not_deadlock(tmp_path):
    """Every prune task asks for the only (logical) GPU and every fine-tune asks Ray Train
    for a GPU worker: with the prune task holding its GPU while waiting, this hangs. Two
    combinations at once: the second's prune task waits for the GPU beside the first's
    Train worker."""
    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1.5, 2.0],
                     finetune={"epochs": 1, "batch_size": 32, "augment": False,
                               "num_workers": 1, "use_gpu": True},
                     resources={"gpus_per_task": 1, "cpus_per_task": 1, "max_concurrent": 2})
    with LocalRay(num_cpus=2, num_gpus=1, env=run_env()) as c:
        r = progprune("sweep", spec, "--address", c.address, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = read_results(tmp_path / "out")
    assert len(df) == 2 and (df.status == "ok").all()
    assert (df.device == "cpu").all()  # the declared GPU is not real: torch used the CPU


@pytest.mark.ray
def test_resources_the_cluster_lacks_are_refused_after_connecting(cluster, tmp_path):
    """gpus_per_task 1 on a cluster without a GPU queued forever (item 11): the driver
    connects, sees no node (and no autoscaler group) with a GPU, and refuses before it
    writes anything."""
    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1.5], resources={"gpus_per_task": 1})
    r = progprune("sweep", spec, "--address", cluster.address, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stderr.count("error: ") == 1 and r.stderr.endswith("\n")
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: resources.gpus_per_task: a prune task asks for 1 CPU, 1 GPU on one node, but "
                           f"the Ray cluster at {cluster.address} has a node with 2 CPU, 0 GPU, so it would wait "
                           "forever; set resources.gpus_per_task: 0 and finetune.use_gpu: false"), line
    assert not (tmp_path / "out").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.ray
def test_image_folder_sweep_with_two_train_workers(cluster, tmp_path):
    """A folder of JPEGs (one unreadable) streamed through a sweep: DataLoader workers in
    the prune task and in each of two Ray Train workers (DDP over the rank shards), the
    skipped file reported in the job's log, one ok row."""
    from fixtures_data import write_imagefolder

    data = write_imagefolder(tmp_path / "jpegs", n_train=8, n_val=3, n_test=3, size=(40, 36))
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    spec = tiny_spec(tmp_path, name="folder", models=["resnet20"], speedups=[1.5],
                     dataset={"name": "imagefolder", "data_dir": str(data), "image_size": 32,
                              "loader_workers": 1},
                     finetune={"epochs": 2, "batch_size": 8, "num_workers": 2})
    r = progprune("sweep", spec, "--address", cluster.address)
    assert r.returncode == 0, r.stdout + r.stderr
    df = read_results(tmp_path / "out")
    assert len(df) == 1 and df.status.tolist() == ["ok"], df.error.tolist()
    row = df.iloc[0]
    assert row.dataset == "imagefolder" and row.num_classes == 3 and row.finetune_workers == 2
    assert row.final_top1 is not None and row.achieved_speedup >= 1.5
    log = r.stdout + r.stderr
    assert "imagefolder: skipped 1 unreadable image(s) of 25 in" in log and "cat/broken.jpg" in log
    assert "finetune epoch 2/2" in log


def test_a_run_with_nothing_left_expands_the_grid_once(tmp_path, monkeypatch):
    """`sweep.run` builds `spec.combinations()` once (it built it for the table and again
    for the plan). Every combination has its row here, so nothing runs and no Ray starts."""
    import io

    from rich.console import Console

    from progprune import sweep
    from progprune.config import SweepSpec
    from progprune.pipeline import build_row
    from progprune.results import write_rows
    from progprune.storage import row_parts

    from progprune.spec import dump_yaml
    from progprune.storage import LAYOUT

    spec = load_spec(tiny_spec(tmp_path))
    store = Store(spec.output)
    store.write_bytes(dump_yaml(spec).encode(), *LAYOUT.spec)  # as the sweep that wrote the rows did
    for cfg in spec.combinations():
        row = build_row(cfg, {"status": "unreachable", "error": "kept from an earlier run"})
        path = store.path(*row_parts(row.combo_id))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_rows([row], path)
    calls = []
    grid = SweepSpec.combinations
    monkeypatch.setattr(SweepSpec, "combinations", lambda self: calls.append(1) or grid(self))
    out = io.StringIO()
    assert sweep.run(spec, console=Console(file=out, highlight=False, markup=False, width=160)) == 0
    assert "to run   0; already done (kept) 4" in out.getvalue()
    assert len(calls) == 1


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


def test_a_read_only_monitor_is_not_an_autoscaler():
    """`ray start --head` runs a read-only monitor that writes the same status as Ray's v1
    autoscaler: taking it for one let a GPU spec on a GPU-less cluster wait forever with a
    warning; a real autoscaler (KubeRay) names node groups, and only then is the check a
    warning (it may add GPU nodes)."""
    import json

    from progprune.cluster import _v1_autoscaler

    def status(mapping):
        return json.dumps({"autoscaler_report": {"node_type_mapping": mapping, "legacy": True}}).encode()

    assert not _v1_autoscaler(None)
    assert not _v1_autoscaler(status({"5f5a38": "node_5f5a38"}))  # what `ray start --head` writes
    assert _v1_autoscaler(status({"5f5a38": "headgroup", "77aa01": "gpu"}))  # KubeRay's groups
