"""`progprune report`: a results table -> terminal tables, PNG plots, a Markdown/HTML report.

    build_report("out/sweep1")            # -> out/sweep1/report/{report.md, *.png, summary.csv}
    build_report("s3://b/sweep1/results.parquet", "rep", fmt="html")

The report follows ShrinkBench's reporting practice: compression ratio next to MACs speedup,
curves over operating points, the unpruned control on every panel, mean ± std over seeds,
and measured latency next to MACs (with points where latency rose called out). The
terminal tables (`show`) are also what a sweep prints at its end.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import progprune
from progprune.errors import ProgpruneError
from progprune.report import _tables as T
from progprune.results import COLUMNS

FORMATS = ("md", "html")
RESULTS_NAME = "results.parquet"
REQUIRED = T.GROUP + ["seed", "status", "error", "achieved_speedup", "compression_ratio", "base_top1",
                      "pruned_top1", "final_top1", "latency_speedup"]  # without these, no report
MARKER = ".progprune-report"  # only a directory holding this is ever replaced
PLOTS = {"accuracy": ("accuracy_vs_speedup.png", "Final top-1 vs achieved MACs speedup, per method, "
                                                 "with the unpruned control"),
         "latency": ("latency_vs_speedup.png", "Measured latency speedup vs MACs speedup (y = x "
                                               "dashed; red X: MACs fell but latency rose)")}


def build_report(results: str, out_dir: str | None = None, fmt: str = "md", console=None) -> dict:
    """Write the report for `results` into `out_dir` (default: `<dir of results>/report`).

    Returns {"out_dir", "report" (the md, or the html with fmt="html"), "markdown", "html",
    "plots" (name -> path), "summary_csv", "table" (aggregated DataFrame; accuracies as
    fractions), "problems" (rows not ok, DataFrame), "empty"}. Prints the terminal tables to
    `console` (a rich Console) when one is given. Raises ProgpruneError on bad input before
    anything is written; the directory appears complete or not at all.
    """
    if fmt not in FORMATS:
        raise ProgpruneError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
    frame, local_path = load(results)
    out_dir = os.path.abspath(out_dir or os.path.join(os.path.dirname(local_path) if local_path
                                                      else os.getcwd(), "report"))
    _check_replaceable(out_dir)
    table, probs = T.aggregate(frame), T.problems(frame)
    sweeps = T.distinct(frame["sweep"])
    common, varying = T.common_settings(frame)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with _atomic_dir(out_dir) as tmp:
        plots = {}
        if len(table):
            from progprune.report import _plots

            _plots.accuracy_plot(table, T.base_reference(frame), os.path.join(tmp, PLOTS["accuracy"][0]))
            plots["accuracy"] = PLOTS["accuracy"]
            if table["latency_speedup_mean"].notna().any():
                _plots.latency_plot(table, os.path.join(tmp, PLOTS["latency"][0]))
                plots["latency"] = PLOTS["latency"]
        doc = T.blocks(title="progprune report" + (f": {', '.join(sweeps)}" if sweeps else ""),
                       intro=f"Results: `{results}`. Generated {now} by progprune {progprune.__version__}.",
                       setup=[("Results", results)] + T.setup(frame), agg=table, probs=probs, plots=plots,
                       notes=T.notes(table), common=common, varying=varying, empty=frame.empty)
        _write(os.path.join(tmp, "report.md"), T.to_markdown(doc))
        if fmt == "html":
            _write(os.path.join(tmp, "report.html"), T.to_html(doc, tmp))
        table.to_csv(os.path.join(tmp, "summary.csv"), index=False)
        _write(os.path.join(tmp, MARKER), f"report of {results}\n")
    if console is not None:
        show(frame, console, table, probs)
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    return {"out_dir": out_dir, "report": path(f"report.{fmt}"), "markdown": path("report.md"),
            "html": path("report.html") if fmt == "html" else None, "summary_csv": path("summary.csv"),
            "plots": {k: path(f) for k, (f, _) in plots.items()}, "table": table, "problems": probs,
            "empty": frame.empty}


def show(frame: pd.DataFrame, console, table=None, probs=None) -> None:
    """The results tables on a terminal: `progprune report`'s and a sweep's end."""
    table = T.aggregate(frame) if table is None else table
    for r in T.terminal(table, T.problems(frame) if probs is None else probs, frame.empty):
        console.print(r)


def frame_of(table: pa.Table) -> pd.DataFrame:
    """A results table as the report reads it: numbers as floats, labels as strings; a
    column added to the schema after the table was written reads as blank."""
    df = table.to_pandas().reindex(columns=list(COLUMNS))
    for c in T.METRICS + ("target_speedup",):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("dataset", "model", "method", "status"):
        df[c] = df[c].astype("string").fillna("?")
    return df


def load(results: str) -> tuple[pd.DataFrame, str | None]:
    """Read `results` (a results.parquet, a sweep output directory, a file://, s3:// or gs://
    URI) -> (frame, its local path or None); or raise ProgpruneError saying what is wrong."""
    results = os.fspath(results)
    try:
        fs, path = pafs.FileSystem.from_uri(results) if "://" in results else \
            (pafs.LocalFileSystem(), os.path.abspath(results))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise ProgpruneError(f"cannot open URI {results}: {_one_line(e)}") from None
    try:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:  # a sweep's output: its results.parquet is the table
            path = path.rstrip("/") + "/" + RESULTS_NAME
            if fs.get_file_info(path).type != pafs.FileType.File:
                raise ProgpruneError(f"no {RESULTS_NAME} in directory {results}")
        elif kind == pafs.FileType.NotFound:
            raise ProgpruneError(f"results not found: {results}")
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ProgpruneError(f"not a Parquet file: {results} ({_one_line(e)})") from None
    except OSError as e:
        raise ProgpruneError(f"cannot read {results}: {_one_line(e)}") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ProgpruneError(f"not a progprune results table: {results} lacks required columns "
                             f"{', '.join(missing)}")
    return frame_of(table), path if isinstance(fs, pafs.LocalFileSystem) else None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _check_replaceable(out_dir: str) -> None:
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise ProgpruneError(f"report output {out_dir} exists and is not a directory")
    if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MARKER)):
        raise ProgpruneError(f"refusing to replace {out_dir}: it is not an earlier progprune "
                             f"report (pass another --out)")


@contextlib.contextmanager
def _atomic_dir(out_dir: str):
    """Yield a temp dir beside `out_dir`; on success it takes `out_dir`'s place (the old
    report is moved aside first and deleted after), on failure it is removed."""
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as e:
        raise ProgpruneError(f"cannot write the report to {out_dir}: {e.strerror or e}; "
                             "pass a writable --out") from None
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a report is for reading
        yield tmp
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "report"))
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old:
                os.rename(os.path.join(old, "report"), out_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)


from progprune.report._command import report_command  # noqa: E402

__all__ = ["build_report", "show", "report_command", "FORMATS"]
