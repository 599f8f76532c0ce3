"""`progprune report`: aggregation checked against numbers computed here, the plots, the
Markdown/HTML, bad input, and the real CLI in a subprocess."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from progprune.errors import ProgpruneError
from progprune.cli import main
from progprune.report import build_report
from progprune.results import ResultRow, write_rows

MODELS = ("resnet20", "vgg11")
METHODS = ("group_norm", "l1")
TARGETS = (1.5, 2.0, 3.0)
SEEDS = (0, 1, 2)
SLOW = ("vgg11", "l1", 1.5)  # MACs fall, latency rises: must be flagged
VERSIONS = dict(torch_version="2.13.0", torch_pruning_version="1.6.1", ray_version="2.60.0",
                progprune_version="0.1.0")


def _ok_row(model, method, target, seed) -> ResultRow:
    # distinct, seed-dependent numbers so a wrong grouping or ddof shows up in the means/stds
    k = MODELS.index(model) * 0.01 + METHODS.index(method) * 0.003
    base_params = 270_000 + 1000 * MODELS.index(model)
    pruned_params = int(base_params / (target * (0.9 + 0.01 * seed)))
    base_ms = 4.0 + seed * 0.1
    pruned_ms = base_ms / (0.9 - 0.02 * seed) if (model, method, target) == SLOW \
        else base_ms / (target * (0.7 + 0.05 * seed))
    return ResultRow(
        combo_id=f"{model}-{method}-{target}-{seed}", sweep="unit-sweep", model=model,
        dataset="cifar10", method=method, seed=seed, target_speedup=target,
        achieved_speedup=target * (1.0 + 0.004 * (seed + 1)), status="ok",
        base_macs=41_000_000, base_params=base_params, pruned_macs=int(41e6 / target),
        pruned_params=pruned_params, compression_ratio=base_params / pruned_params,
        base_top1=0.91 + 0.003 * seed + k, pruned_top1=0.40 + 0.05 * seed - 0.02 * target,
        final_top1=0.90 - 0.01 * target + 0.004 * seed ** 2 + k,
        base_latency_ms=base_ms, pruned_latency_ms=pruned_ms,
        latency_speedup=base_ms / pruned_ms, device="cpu", finetune_epochs=3, **VERSIONS,
    )


UNREACHABLE = ResultRow(
    combo_id="unreach", sweep="unit-sweep", model="resnet20", dataset="cifar10", method="l1",
    seed=3, target_speedup=3.0, achieved_speedup=2.41, status="unreachable",
    final_top1=0.05, error="target 3x unreachable: stopped at 2.41x after 400 steps", **VERSIONS,
)
FAILED = ResultRow(
    combo_id="fail", sweep="unit-sweep", model="vgg11", dataset="cifar10", method="group_norm",
    seed=7, target_speedup=2.0, status="failed",
    error="RuntimeError: out of memory\n  while fine-tuning", **VERSIONS,
)


def _rows():
    ok = [_ok_row(m, meth, t, s) for m in MODELS for meth in METHODS for t in TARGETS
          for s in SEEDS]
    return ok + [UNREACHABLE, FAILED]


@pytest.fixture
def sweep_dir(tmp_path):
    d = tmp_path / "sweep"
    write_rows(_rows(), d / "results.parquet")
    return d


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One md+html report shared by the read-only checks (rendering is the slow part)."""
    d = tmp_path_factory.mktemp("shared") / "sweep"
    write_rows(_rows(), d / "results.parquet")
    return build_report(str(d), fmt="html")


def _read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- numbers ---------------------------------------------------------------------------------
def test_aggregates_match_independent_computation(report):
    table = report["table"]
    assert len(table) == len(MODELS) * len(METHODS) * len(TARGETS)
    for model in MODELS:
        for method in METHODS:
            for target in TARGETS:
                rows = [_ok_row(model, method, target, s) for s in SEEDS]
                got = table[(table.model == model) & (table.method == method)
                            & (table.target_speedup == target)]
                assert len(got) == 1, (model, method, target)
                got = got.iloc[0]
                assert got["n"] == 3
                expected = {
                    "final_top1": [r.final_top1 for r in rows],
                    "base_top1": [r.base_top1 for r in rows],
                    "pruned_top1": [r.pruned_top1 for r in rows],
                    "achieved_speedup": [r.achieved_speedup for r in rows],
                    "compression_ratio": [r.base_params / r.pruned_params for r in rows],
                    "latency_speedup": [r.base_latency_ms / r.pruned_latency_ms for r in rows],
                }
                for name, values in expected.items():
                    assert got[f"{name}_mean"] == pytest.approx(statistics.mean(values)), name
                    assert got[f"{name}_std"] == pytest.approx(statistics.stdev(values)), name


def test_not_ok_rows_are_listed_apart_and_kept_out_of_the_means(report):
    table, probs = report["table"], report["problems"]
    assert sorted(probs["status"]) == ["failed", "unreachable"]
    unreach = probs[probs.status == "unreachable"].iloc[0]
    assert unreach["error"] == UNREACHABLE.error and unreach["achieved_speedup"] == 2.41
    # the multi-line error is kept, on one line
    assert probs[probs.status == "failed"].iloc[0]["error"] == \
        "RuntimeError: out of memory while fine-tuning"
    # the unreachable row's final_top1 of 0.05 must not pull the group's mean down
    grp = table[(table.model == "resnet20") & (table.method == "l1")
                & (table.target_speedup == 3.0)].iloc[0]
    assert grp["n"] == 3 and grp["not_ok"] == 1
    assert grp["final_top1_mean"] == pytest.approx(
        statistics.mean(_ok_row("resnet20", "l1", 3.0, s).final_top1 for s in SEEDS))
    md = _read(report["markdown"])
    section = md.split("## Not ok")[1]
    assert UNREACHABLE.error in section
    assert "RuntimeError: out of memory while fine-tuning" in section
    assert "| unreachable |" in section and "| failed |" in section


def test_latency_rise_is_flagged(report):
    table = report["table"]
    rose = table[table["latency_rose"]]
    assert [tuple(r) for r in rose[["model", "method", "target_speedup"]].to_numpy()] == [SLOW]
    md = _read(report["markdown"])
    section = md.split("## Latency rose although MACs fell")[1].split("##")[0]
    assert "vgg11 / `l1` at target 1.5x" in section
    assert md.count("(latency rose)") == 1  # in the vgg11 table's latency cell


# ---- files -----------------------------------------------------------------------------------
def test_plots_are_real_pngs(report):
    assert set(report["plots"]) == {"accuracy", "latency", "latency_accuracy"}
    for path in report["plots"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(path)
        h, w = img.shape[:2]
        assert w >= 400 and h >= 300, (path, w, h)
        assert np.ptp(img[..., :3]) > 0.5, f"{path} is (nearly) one colour"


def test_markdown_embeds_plots_tables_and_setup(report):
    md = _read(report["markdown"])
    assert report["out_dir"].endswith(os.path.join("sweep", "report"))
    assert "](accuracy_vs_speedup.png)" in md and "](latency_vs_speedup.png)" in md
    assert "](accuracy_vs_latency.png)" in md
    for name in ("accuracy_vs_speedup.png", "latency_vs_speedup.png", "accuracy_vs_latency.png", "summary.csv"):
        assert os.path.exists(os.path.join(report["out_dir"], name))
    for version in VERSIONS.values():
        assert version in md
    assert "| Sweep | unit-sweep |" in md
    assert "| Fine-tune epochs | 3 |" in md
    assert "| Devices | cpu |" in md
    assert "### cifar10 / resnet20" in md and "### cifar10 / vgg11" in md
    # one computed cell, spelled out: final top-1 % of resnet20/group_norm at 2x
    vals = [100 * _ok_row("resnet20", "group_norm", 2.0, s).final_top1 for s in SEEDS]
    assert f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" in md


def test_html_is_self_contained(report):
    assert report["report"] == report["html"] and report["html"].endswith("report.html")
    page = _read(report["html"])
    assert page.count('src="data:image/png;base64,') == 3
    assert 'src="accuracy_vs_speedup.png"' not in page
    assert "<table>" in page and "2.60.0" in page and "<code>l1</code>" in page
    assert 'class="rose"' in page


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_prints_table_problems_and_report_path(sweep_dir, tmp_path):
    out = tmp_path / "rep"
    result = CliRunner().invoke(main, ["report", str(sweep_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"report: {out / 'report.md'}" in text
    assert "cifar10 / vgg11" in text and "group_norm" in text
    assert "unreachable" in text and "failed" in text and UNREACHABLE.error in text
    assert "latency rose" in text
    assert (out / "report.md").exists() and not (out / "report.html").exists()


def test_cli_in_a_real_subprocess(sweep_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "progprune", "report", str(sweep_dir / "results.parquet"),
         "--format", "html"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {sweep_dir / 'report' / 'report.html'}" in proc.stdout
    assert (sweep_dir / "report" / "latency_vs_speedup.png").exists()


def _not_parquet(tmp_path):
    p = tmp_path / "results.parquet"
    p.write_text("combo_id,model\nabc,resnet20\n")
    return p


def _missing_columns(tmp_path):
    p = tmp_path / "results.parquet"
    pq.write_table(pa.table({"model": ["resnet20"], "seed": [0]}), p)
    return p


def _dir_without_results(tmp_path):
    d = tmp_path / "emptydir"
    d.mkdir()
    return d


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nope" / "results.parquet", "results not found"),
    (_not_parquet, "not a Parquet file"),
    (_missing_columns, "lacks required columns"),
    (_dir_without_results, "no results.parquet in directory"),
    (lambda tmp: "file://" + str(tmp / "gone.parquet"), "results not found"),
], ids=["missing", "not-parquet", "missing-columns", "dir-without-results", "file-uri-missing"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, make, message):
    src = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["report", str(src), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.output and result.stdout == ""
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
    # default out dir too: nothing appears next to the bad file
    assert CliRunner().invoke(main, ["report", str(src)]).exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(ProgpruneError, match=message):
        build_report(str(src))


def test_bad_input_in_a_real_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "progprune", "report", str(_missing_columns(tmp_path))],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "report").exists()


def test_empty_table_reports_empty(tmp_path):
    write_rows([], tmp_path / "results.parquet")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "empty" in result.stdout
    md = _read(tmp_path / "report" / "report.md")
    assert "The results table is empty" in md
    assert not list((tmp_path / "report").glob("*.png"))


def test_all_failed_lists_failures_without_plots(tmp_path):
    write_rows([FAILED, UNREACHABLE], tmp_path / "results.parquet")
    out = build_report(str(tmp_path))
    assert out["table"].empty and out["plots"] == {} and len(out["problems"]) == 2
    md = _read(out["markdown"])
    assert "No combination finished ok" in md and UNREACHABLE.error in md


def test_single_seed_has_no_std(tmp_path):
    write_rows([_ok_row("resnet20", "l1", 2.0, 0)], tmp_path / "results.parquet")
    out = build_report(str(tmp_path))
    row = out["table"].iloc[0]
    assert row["n"] == 1 and np.isnan(row["final_top1_std"])
    assert "single ok seed" in _read(out["markdown"])


# ---- locations and atomic writes ---------------------------------------------------------------
def test_file_uri_and_default_out_dir(sweep_dir):
    out = build_report("file://" + str(sweep_dir / "results.parquet"))
    assert out["out_dir"] == str(sweep_dir / "report")
    assert os.path.exists(out["markdown"])


def test_reads_a_sweep_output_by_uri_through_the_store(sweep_dir):
    out = build_report("file://" + str(sweep_dir))  # a directory: its results.parquet, as a sweep wrote it
    assert out["out_dir"] == str(sweep_dir / "report") and not out["empty"]


def test_a_bad_uri_is_one_line_without_its_credentials(tmp_path):
    result = CliRunner().invoke(main, ["report", "s3://KEY:SECRET@bucket/sweep?no_such_option=1",
                                       "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2 and "SECRET" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: results: cannot open s3://***@bucket/sweep") and "no_such_option" in line


def test_rerun_replaces_the_report_and_failure_keeps_the_old_one(sweep_dir, monkeypatch):
    first = build_report(str(sweep_dir), fmt="html")
    (sweep_dir / "report" / "report.md").write_text("stale")
    build_report(str(sweep_dir))  # replaces what the report wrote
    assert _read(first["markdown"]).startswith("# progprune report")
    assert not os.path.exists(first["html"]), "report.html of the earlier report is not this one's"

    import progprune.report._plots as plots

    def boom(*a, **k):
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(plots, "latency_plot", boom)
    before = {n: (sweep_dir / "report" / n).read_bytes() for n in os.listdir(sweep_dir / "report")}
    with pytest.raises(RuntimeError, match="plotting broke"):
        build_report(str(sweep_dir))
    after = {n: (sweep_dir / "report" / n).read_bytes() for n in os.listdir(sweep_dir / "report")}
    assert after == before, "a failed run must leave the previous report as it was"
    leftovers = [n for n in os.listdir(sweep_dir) if n.startswith(".report")]
    assert leftovers == []
    assert sorted(os.listdir(sweep_dir)) == ["report", "results.parquet"]


def test_a_users_files_in_the_report_directory_survive_a_rerun(sweep_dir):
    """Issue 23 item 3: a rerun (and the end of every sweep) replaced the whole directory,
    deleting files the report never wrote. Now only the report's own files are replaced."""
    out = sweep_dir / "report"
    build_report(str(sweep_dir))
    (out / "notes.txt").write_text("my notes")
    (out / "extra").mkdir()
    (out / "extra" / "fig.png").write_bytes(b"mine")
    result = CliRunner().invoke(main, ["report", str(sweep_dir), "--format", "html"])
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "my notes" and (out / "extra" / "fig.png").read_bytes() == b"mine"
    assert (out / "report.html").exists()
    listed = (out / ".progprune-report").read_text().splitlines()[1:]
    assert listed == sorted(n for n in os.listdir(out) if n not in ("notes.txt", "extra", ".progprune-report"))


def test_a_report_file_name_the_report_did_not_write_is_refused(sweep_dir):
    out = sweep_dir / "report"
    build_report(str(sweep_dir))  # md: no report.html
    (out / "report.html").write_text("the user's own page")
    result = CliRunner().invoke(main, ["report", str(sweep_dir), "--format", "html"])
    assert result.exit_code == 2 and "refusing to replace" in result.stderr and "report.html" in result.stderr
    assert (out / "report.html").read_text() == "the user's own page"
    assert [n for n in os.listdir(sweep_dir) if n.startswith(".report")] == []


def test_a_report_of_the_earlier_marker_keeps_the_users_files(sweep_dir):
    """A report directory written before the marker listed its files (one line)."""
    out = sweep_dir / "report"
    build_report(str(sweep_dir), fmt="html")
    (out / ".progprune-report").write_text(f"report of {sweep_dir}\n")
    (out / "accuracy_vs_latency.png").unlink()  # a report of those days did not draw it
    (out / "notes.txt").write_text("mine")
    build_report(str(sweep_dir))
    assert (out / "notes.txt").read_text() == "mine" and not (out / "report.html").exists()
    assert (out / "report.md").exists()


def test_a_marker_cannot_make_the_report_delete_other_files(sweep_dir):
    out = sweep_dir / "report"
    build_report(str(sweep_dir))
    (out / "notes.txt").write_text("mine")
    marker = out / ".progprune-report"
    marker.write_text(marker.read_text() + "notes.txt\n../results.parquet\n")
    build_report(str(sweep_dir))
    assert (out / "notes.txt").read_text() == "mine" and (sweep_dir / "results.parquet").exists()


def test_an_empty_directory_takes_the_report(tmp_path, sweep_dir):
    out = tmp_path / "empty"
    out.mkdir()
    assert build_report(str(sweep_dir), str(out))["out_dir"] == str(out)
    assert (out / "report.md").exists() and (out / ".progprune-report").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_report(sweep_dir):
    result = CliRunner().invoke(main, ["report", str(sweep_dir), "--out", str(sweep_dir)])
    assert result.exit_code == 2 and "it is not an earlier progprune report" in result.stderr
    assert sorted(os.listdir(sweep_dir)) == ["results.parquet"]


# ---- tables of other schema versions (issue 23 item 31) ------------------------------------------
def _write_old(path, rows, drop, version):
    """A real Parquet file as an earlier (or later) progprune wrote it."""
    from progprune.results import rows_to_table

    t = rows_to_table(rows).drop_columns(list(drop))
    pq.write_table(t.replace_schema_metadata({b"progprune.schema_version": version} if version else None), path)


def test_reports_a_table_of_an_earlier_version(tmp_path):
    """Results tables are kept for years: one written before compression_ratio (and
    pruned_top1_bn) existed, with version 1's metadata (none), still makes a report; the
    compression comes from the params columns, what nothing states is blank and said so."""
    rows = [_ok_row("resnet20", "l1", 2.0, s) for s in SEEDS]
    _write_old(tmp_path / "results.parquet", rows, ("compression_ratio", "pruned_top1_bn"), None)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = build_report(str(tmp_path))
    (row,) = out["table"].to_dict("records")
    assert row["compression_ratio_mean"] == pytest.approx(
        statistics.mean(r.base_params / r.pruned_params for r in rows))
    assert np.isnan(row["pruned_top1_bn_mean"])
    md = _read(out["markdown"])
    assert ("Read from a results table of schema version 1 (this progprune writes version 2). "
            "Derived from its other columns: compression_ratio. Not recorded by it, so blank here: "
            "pruned_top1_bn.") in md
    assert "schema version 1" in " ".join(result.stdout.split())


def test_refuses_a_table_of_a_newer_version_in_one_line(tmp_path):
    _write_old(tmp_path / "results.parquet", [_ok_row("resnet20", "l1", 2.0, 0)], (), b"3")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f"error: {tmp_path} is a results table of schema version 3; this "
                             "progprune reads versions 1 to 2: use a newer progprune\n")
    assert sorted(os.listdir(tmp_path)) == ["results.parquet"]


# ---- a MACs-only table reads as it did before target metrics (issue 20) -------------------------
def _macs_only(blank: bool) -> list[ResultRow]:
    """vgg11/l1 at two targets, two seeds, and one unreachable row: as the pipeline writes a
    MACs row now (target_metric macs, macs_speedup = achieved_speedup), or blank in both as
    a table of before target metrics has them."""
    import dataclasses

    ok = [_ok_row("vgg11", "l1", t, s) for t in (1.5, 2.0) for s in (0, 1)]
    new = {} if blank else dict(target_metric="macs")
    return ([dataclasses.replace(r, **new, macs_speedup=None if blank else r.achieved_speedup) for r in ok]
            + [dataclasses.replace(UNREACHABLE, **new)])


def _cell(values, scale=1, suffix="x") -> str:
    return f"{statistics.mean(values) * scale:.2f}{suffix} ± {statistics.stdev(values) * scale:.2f}"


def _markdown_before_target_metrics(rows, src) -> str:
    """The report of a MACs-only table as the code of before target metrics (branch `lat`)
    wrote it, its figures computed here from the rows."""
    ok = [r for r in rows if r.status == "ok"]
    bad = [r for r in rows if r.status != "ok"]
    targets = sorted({r.target_speedup for r in rows})
    table = []
    for t in sorted({r.target_speedup for r in ok}):
        g = [r for r in ok if r.target_speedup == t]
        macs, lat = [r.achieved_speedup for r in g], [r.base_latency_ms / r.pruned_latency_ms for r in g]
        rose = " (latency rose)" if statistics.mean(macs) > 1 and statistics.mean(lat) < 1 else ""
        table.append(f"| l1 | {t:g}x | {_cell(macs)} | {_cell([r.base_params / r.pruned_params for r in g])} | "
                     f"{_cell([r.base_top1 for r in g], 100, '')} | {_cell([r.pruned_top1 for r in g], 100, '')} | – | "
                     f"{_cell([r.final_top1 for r in g], 100, '')} | {_cell(lat)}{rose} | {len(g)} |")
    rose = [t for t in sorted({r.target_speedup for r in ok}) if "(latency rose)" in table[sorted(
        {r.target_speedup for r in ok}).index(t)]]
    rose_lines = []
    for t in rose:
        g = [r for r in ok if r.target_speedup == t]
        rose_lines.append(f"- cifar10 / vgg11 / `l1` at target {t:g}x: MACs speedup "
                          f"{statistics.mean(r.achieved_speedup for r in g):.2f}x but latency speedup "
                          f"{statistics.mean(r.base_latency_ms / r.pruned_latency_ms for r in g):.2f}x "
                          "(slower than the unpruned model)")
    setup = [("Results", src), ("Rows", f"{len(rows)} ({len(ok)} ok, {len(bad)} unreachable)"),
             ("Sweep", "unit-sweep"), ("Datasets", "cifar10"), ("Models", "resnet20, vgg11"), ("Methods", "l1"),
             ("Target speedups", ", ".join(f"{t:g}" for t in targets)),
             ("Seeds", ", ".join(str(s) for s in sorted({r.seed for r in rows})))]
    setup += [(k, "not recorded") for k in ("Base-training epochs", "Sparse-learning epochs")]
    setup += [("Fine-tune epochs", "3")]
    setup += [(k, "not recorded") for k in ("Fine-tune workers", "Global pruning", "Iterative steps", "round_to",
                                             "Latency batch size")]
    setup += [("Devices", "cpu"), ("torch", VERSIONS["torch_version"]),
              ("torch-pruning", VERSIONS["torch_pruning_version"]), ("ray", VERSIONS["ray_version"]),
              ("progprune", VERSIONS["progprune_version"])]
    problems = [f"| {r.dataset} | {r.model} | {r.method} | {r.target_speedup:g}x | {r.seed} | {r.status} | "
                f"{r.achieved_speedup:.2f}x | {r.error} |" for r in bad]
    return "\n\n".join([
        "# progprune report: unit-sweep",
        f"Results: `{src}`. Generated (time) by progprune (version).",
        "## Setup",
        "| Setting | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in setup),
        "## Results by operating point",
        "Mean ± std over seeds (std with ddof=1; none for a single seed); n = seeds that finished ok (+ those "
        "that did not). Top-1 in %. MACs speedup = base MACs / pruned MACs; compression = base params / pruned "
        "params; latency speedup = base ms / pruned ms, measured. \"Pruned\" is top-1 right after pruning, "
        "before fine-tuning; \"Pruned + BN re-est.\" is the same model after its BatchNorm statistics were "
        "re-estimated on a few training batches (a better predictor of the fine-tuned result).",
        "### cifar10 / vgg11",
        "| Method | Target | MACs speedup | Compression (params) | Base top-1 % | Pruned top-1 % (before FT) | "
        "Pruned + BN re-est. % | Final top-1 % | Latency speedup | n |\n" + "|---" * 10 + "|\n" + "\n".join(table),
        "## Plots",
        "![Final top-1 vs achieved MACs speedup, per method, with the unpruned control](accuracy_vs_speedup.png)",
        "![Measured latency speedup vs MACs speedup (y = x dashed; red X: MACs fell but latency rose)]"
        "(latency_vs_speedup.png)",
        *(["## Latency rose although MACs fell", "\n".join(rose_lines)] if rose_lines else []),
        "## Not ok: unreachable and failed combinations",
        "| Dataset | Model | Method | Target | Seed | Status | MACs speedup reached | Error |\n"
        + "|---" * 8 + "|\n" + "\n".join(problems),
        "## Reporting notes (ShrinkBench practice)",
        f"- Curves with fewer than 5 operating points (targets): cifar10/vgg11/l1 ({len(table)}).\n"
        "- No `random` baseline in this sweep.",
    ]) + "\n"


@pytest.mark.parametrize("blank", [False, True], ids=["macs-rows", "table-before-target-metrics"])
def test_a_macs_only_report_reads_as_before(tmp_path, blank):
    """Issue 20: a MACs-only sweep's report keeps its tables, text and setup; the new plot of
    final top-1 against measured latency speedup is the one line it gains."""
    import re

    rows = _macs_only(blank)
    write_rows(rows, tmp_path / "results.parquet")
    md = _read(build_report(str(tmp_path))["markdown"])
    md = re.sub(r"Generated .* by progprune [^ ]+\.", "Generated (time) by progprune (version).", md)
    assert "(latency rose)" in md  # the fixture exercises the flag
    before = _markdown_before_target_metrics(rows, str(tmp_path))
    latency_plot = "(latency_vs_speedup.png)\n\n"
    assert md == before.replace(latency_plot, latency_plot + "![Final top-1 vs measured latency speedup, per method, "
                                "with the Pareto front on latency (black steps: the points no other beats in both) "
                                "and the unpruned control](accuracy_vs_latency.png)\n\n")


# ---- target metrics: macs, latency and params rows of one model and target (issue 20) -----------
def _mixed_rows() -> list[ResultRow]:
    """resnet20/group_norm at 2x in each target metric, two seeds each, as the pipeline writes
    them (achieved_speedup in the target's metric, macs_speedup beside it; a latency target
    with the stop rule's interval), and a latency target that was unreachable."""
    import dataclasses

    rows = []
    for s in SEEDS[:2]:
        r = _ok_row("resnet20", "group_norm", 2.0, s)
        rows.append(dataclasses.replace(r, combo_id=f"macs-{s}", target_metric="macs", macs_speedup=r.achieved_speedup))
        got = 2.0 * (1.01 + 0.01 * s)  # the latency target took far more MACs off
        rows.append(dataclasses.replace(
            r, combo_id=f"latency-{s}", target_metric="latency", achieved_speedup=got, macs_speedup=3.2 + 0.1 * s,
            achieved_ci_low=got - 0.03, achieved_ci_high=got + 0.05 + 0.01 * s, target_points=6,
            pruned_latency_ms=r.base_latency_ms / (got * 0.98), latency_speedup=got * 0.98,
            final_top1=r.final_top1 - 0.02 - 0.001 * s))
        params = r.base_params / (2.0 * (1.002 + 0.001 * s))
        rows.append(dataclasses.replace(  # few MACs off, and slower than the base: latency rose
            r, combo_id=f"params-{s}", target_metric="params", pruned_params=int(params),
            achieved_speedup=r.base_params / int(params), compression_ratio=r.base_params / int(params),
            macs_speedup=1.3 + 0.02 * s, pruned_latency_ms=r.base_latency_ms / (0.95 - 0.01 * s),
            latency_speedup=0.95 - 0.01 * s, final_top1=r.final_top1 + 0.005))
    rows.append(dataclasses.replace(
        UNREACHABLE, combo_id="latency-unreach", target_metric="latency", achieved_speedup=1.8, macs_speedup=3.4,
        error="target 3x latency unreachable: reached 1.800x latency at 3.400x MACs after 400 steps"))
    return rows


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed") / "sweep"
    write_rows(_mixed_rows(), d / "results.parquet")
    return build_report(str(d), fmt="html")


def _of(metric, status="ok"):
    return [r for r in _mixed_rows() if r.target_metric == metric and r.status == status]


def test_rows_of_different_target_metrics_are_never_aggregated_together(mixed):
    table = mixed["table"]
    got = table[(table.model == "resnet20") & (table.method == "group_norm") & (table.target_speedup == 2.0)]
    assert sorted(got["target_metric"]) == ["latency", "macs", "params"] and list(got["n"]) == [2, 2, 2]
    for metric in ("macs", "latency", "params"):
        rows, r = _of(metric), got[got.target_metric == metric].iloc[0]
        for name in ("achieved_speedup", "macs_speedup", "final_top1", "latency_speedup", "compression_ratio"):
            assert r[f"{name}_mean"] == pytest.approx(statistics.mean(getattr(x, name) for x in rows)), (metric, name)
    lat = got[got.target_metric == "latency"].iloc[0]
    assert lat["achieved_ci_low_min"] == min(r.achieved_ci_low for r in _of("latency"))
    assert lat["achieved_ci_high_max"] == max(r.achieved_ci_high for r in _of("latency"))
    # the unreachable latency target counts against the latency point of its own target only
    assert table[(table.method == "l1")].empty and mixed["problems"].iloc[0]["target_metric"] == "latency"


def test_a_mixed_table_names_each_target_metric(mixed):
    md = _read(mixed["markdown"])
    assert "| Target metrics | latency, macs, params |" in md
    panel = md.split("### cifar10 / resnet20")[1].split("##")[0]
    header = panel.strip().splitlines()[0]
    assert "| Latency speedup | Stop rule (95%) | n |" in header
    cells = {line.split(" | ")[1]: line.split(" | ") for line in panel.strip().splitlines()[2:]}
    assert set(cells) == {"2x", "2x latency", "2x params"}  # a MACs target reads as before: "2x"
    lat = _of("latency")
    achieved = [r.achieved_speedup for r in lat]
    assert cells["2x latency"][-2] == (f"{statistics.mean(achieved):.2f}x ({min(r.achieved_ci_low for r in lat):.2f}"
                                       f"–{max(r.achieved_ci_high for r in lat):.2f}x)")
    assert cells["2x"][-2] == cells["2x params"][-2] == "–"
    # the MACs speedup column is the MACs speedup whatever the target: 3.2x-ish for the latency target
    assert cells["2x latency"][2] == _cell([r.macs_speedup for r in lat])
    assert cells["2x params"][3] == _cell([r.compression_ratio for r in _of("params")])
    assert '"2x latency"' in md and "Stop rule (95%): the latency speedup the stop rule accepted" in md


def test_latency_rose_reads_the_macs_speedup_of_any_target(mixed):
    table = mixed["table"]
    assert list(table[table["latency_rose"]]["target_metric"]) == ["params"]
    md = _read(mixed["markdown"])
    section = md.split("## Latency rose although MACs fell")[1].split("##")[0]
    params = _of("params")
    assert (f"at target 2x params: MACs speedup {statistics.mean(r.macs_speedup for r in params):.2f}x but latency "
            f"speedup {statistics.mean(r.latency_speedup for r in params):.2f}x") in section


def test_the_problems_table_names_the_metric_reached(mixed):
    md = _read(mixed["markdown"])
    section = md.split("## Not ok")[1].split("##")[0]
    assert "| Dataset | Model | Method | Target | Seed | Status | Speedup reached | Error |" in section
    (row,) = _of("latency", "unreachable")
    assert (f"| 3x latency | {row.seed} | unreachable | {row.achieved_speedup:.2f}x latency at "
            f"{row.macs_speedup:.2f}x MACs | {row.error} |") in section


def test_the_terminal_tables_show_the_target_metric(mixed):
    result = CliRunner().invoke(main, ["report", os.path.dirname(mixed["out_dir"]), "--out",
                                       mixed["out_dir"]])
    assert result.exit_code == 0, result.output
    assert "2x latency" in result.stdout and "2x params" in result.stdout and "Stop rule" in result.stdout
    assert "latency at 3.40x MACs" in " ".join(result.stdout.split())


def _front_by_sweep(points) -> set:
    """The Pareto front (both high) by a sweep from the highest x down: a point is on it when
    its y is the highest at its x and above every y at a strictly higher x."""
    pts = [(x, y) for x, y in points if not (np.isnan(x) or np.isnan(y))]
    front, best = set(), -np.inf
    for x in sorted({x for x, _ in pts}, reverse=True):
        top = max(y for px, y in pts if px == x)
        if top > best:
            front.add((x, top))
        best = max(best, top)
    return front


def test_the_pareto_front_matches_an_independent_sweep():
    from progprune.report._tables import pareto_front

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 12))
        xs = rng.integers(0, 5, n).astype(float)  # a coarse grid: ties in x, in y and whole points
        ys = rng.integers(0, 5, n).astype(float)
        xs[rng.random(n) < 0.1] = np.nan
        on = pareto_front(xs, ys)
        assert {(x, y) for x, y, o in zip(xs, ys, on) if o} == _front_by_sweep(zip(xs, ys)), trial
        assert not any(o for x, y, o in zip(xs, ys, on) if np.isnan(x) or np.isnan(y))


def test_the_latency_accuracy_plot_draws_the_front(mixed):
    from PIL import Image

    from progprune.report._plots import FRONT_KEY, LATENCY_ACCURACY

    path = mixed["plots"]["latency_accuracy"]
    assert os.path.basename(path) == LATENCY_ACCURACY[0] and set(mixed["plots"]) == {"accuracy", "latency",
                                                                                      "latency_accuracy"}
    with Image.open(path) as img:
        listed, (w, h) = json.loads(img.text[FRONT_KEY]), img.size
    assert w >= 400 and h >= 300
    table = mixed["table"]
    expected = _front_by_sweep(zip(table["latency_speedup_mean"], table["final_top1_mean"]))
    assert expected and {(p["latency_speedup_mean"], p["final_top1_mean"]) for p in listed} == expected
    assert set(table[table["latency_front"]]["target_metric"]) == {p["target_metric"] for p in listed}
    md = _read(mixed["markdown"])
    assert f"![{LATENCY_ACCURACY[1]}]({LATENCY_ACCURACY[0]})" in md
    assert "Pareto front on latency" in LATENCY_ACCURACY[1]


def test_series_per_method_and_target_metric(mixed):
    from progprune.report._plots import _series

    assert [label for *_, label in _series(mixed["table"])] == [
        "group_norm (latency target)", "group_norm (MACs target)", "group_norm (params target)"]
    macs_only = mixed["table"][mixed["table"].target_metric == "macs"]
    assert [label for *_, label in _series(macs_only)] == ["group_norm"]


def test_a_table_of_before_target_metrics_groups_as_macs(tmp_path):
    """A table written before target_metric and macs_speedup existed: every row is a MACs
    target, and its MACs speedup is derived from the MACs columns (the note says so)."""
    rows = [_ok_row("resnet20", "l1", t, s) for t in (2.0, 3.0) for s in SEEDS[:2]]
    new = ("target_metric", "macs_speedup", "achieved_ci_low", "achieved_ci_high", "target_points")
    _write_old(tmp_path / "results.parquet", rows, new, b"2")
    out = build_report(str(tmp_path))
    table = out["table"]
    assert list(table["target_metric"]) == ["macs", "macs"] and list(table["n"]) == [2, 2]
    for t in (2.0, 3.0):
        got = table[table.target_speedup == t].iloc[0]
        assert got["macs_speedup_mean"] == pytest.approx(
            statistics.mean(r.base_macs / r.pruned_macs for r in rows if r.target_speedup == t))
    md = _read(out["markdown"])
    assert "Derived from its other columns: macs_speedup." in md
    assert "Target metrics" not in md and "Stop rule" not in md and "| 2x |" in md and "latency target" not in md


def test_latency_rose_needs_the_macs_to_have_fallen():
    """A params target met without MACs falling (macs_speedup 1) and slower than the base is
    not "latency rose although MACs fell"; the same row at 1.2x MACs is."""
    import dataclasses

    from progprune.report import frame_of
    from progprune.report._tables import aggregate
    from progprune.results import rows_to_table

    r = _ok_row("resnet20", "group_norm", 2.0, 0)
    slow = dict(target_metric="params", latency_speedup=0.97, pruned_latency_ms=r.base_latency_ms / 0.97)
    rows = [dataclasses.replace(r, combo_id="flat", model="flat", macs_speedup=1.0, **slow),
            dataclasses.replace(r, combo_id="fell", model="fell", macs_speedup=1.2, **slow)]
    table = aggregate(frame_of(rows_to_table(rows)))
    assert dict(zip(table["model"], table["latency_rose"])) == {"flat": False, "fell": True}
