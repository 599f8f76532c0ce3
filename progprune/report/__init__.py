"""`progprune report`: a results table -> terminal tables, PNG plots, a Markdown/HTML report.

    build_report("out/sweep1")            # -> out/sweep1/report/{report.md, *.png, summary.csv}
    build_report("s3://b/sweep1/results.parquet", "rep", fmt="html")

The report follows ShrinkBench's reporting practice: compression ratio next to MACs speedup,
curves over operating points, the unpruned control on every panel, mean ± std over seeds,
and measured latency next to MACs (with points where latency rose called out, and final
top-1 against the measured latency speedup with its Pareto front). Rows of different target
metrics (macs, latency, params) are separate operating points. The terminal tables (`show`)
are also what a sweep prints at its end.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
from pathlib import Path

import click
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from progprune._atomic import atomic_path
from progprune.errors import BadInput, one_line
from progprune.report import _plots, _tables as T
from progprune.report._tables import show
from progprune.results import COLUMNS, upgrade
from progprune.storage import LAYOUT, Store, redact

FORMATS = ("md", "html")
# without these, no report; the rest may be blank (target_metric: a table of before target metrics)
REQUIRED = [c for c in T.GROUP if c != "target_metric"] + ["seed", "status"]
# A report directory holds this marker, listing the files the report wrote. A rerun replaces
# those files only (a file it no longer writes is removed); anything else in the directory is
# the user's and stays. A non-empty directory without the marker is refused.
MARKER = ".progprune-report"
REPORT_FILES = ("report.md", "report.html", "summary.csv", _plots.ACCURACY[0], _plots.LATENCY[0],
                _plots.LATENCY_ACCURACY[0], _plots.C.PLOT[0], _plots.PERPLEXITY[0])
_ONE_LINE_MARKER_FILES = REPORT_FILES[:5]  # what a report could write when its marker was one line


def build_report(results: str, out_dir: str | None = None, fmt: str = "md", console=None) -> dict:
    """Write the report for `results` into `out_dir` (default: `<dir of results>/report`).

    Returns {"out_dir", "report" (the md, or the html with fmt="html"), "markdown", "html",
    "plots" (name -> path), "summary_csv", "table" (aggregated DataFrame; accuracies as
    fractions), "problems" (rows not ok, DataFrame), "empty"}. Prints the terminal tables to
    `console` (a rich Console) when one is given. Raises BadInput on bad input before
    anything is written; the directory appears complete or not at all.
    """
    if fmt not in FORMATS:
        raise BadInput(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
    frame, local_path = load(results)
    results = redact(os.fspath(results))  # the report names its source; never with credentials
    out_dir = os.path.abspath(out_dir or os.path.join(os.path.dirname(local_path or ""), *LAYOUT.report))
    table, probs = T.aggregate(frame), T.problems(frame)
    with _report_dir(out_dir, f"progprune report of {results}") as tmp:
        plots = _plots.draw(table, T.base_reference(frame), tmp, frame)
        markdown = T.markdown(frame, table, probs, plots, results)
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        if fmt == "html":
            (tmp / "report.html").write_text(T.to_html(markdown, tmp), encoding="utf-8")
        table.to_csv(tmp / "summary.csv", index=False)
    if console is not None:
        show(frame, console)
        if note := T.read_as_note(frame):
            console.print(note, markup=False)
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    return {"out_dir": out_dir, "report": path(f"report.{fmt}"), "markdown": path("report.md"),
            "html": path("report.html") if fmt == "html" else None, "summary_csv": path("summary.csv"),
            "plots": {k: path(f) for k, (f, _) in plots.items()}, "table": table, "problems": probs,
            "empty": frame.empty}


def frame_of(table: pa.Table) -> pd.DataFrame:
    """A results table as the report reads it: a column added to the schema after the table
    was written reads as blank; a blank target metric as macs (`_tables.prepared`)."""
    return T.prepared(table.to_pandas().reindex(columns=list(COLUMNS)))


def load(results: str) -> tuple[pd.DataFrame, str | None]:
    """Read `results` (a results.parquet, a sweep output directory, a file://, s3:// or gs://
    URI), through the Store as a sweep writes it -> (frame, its local path or None); or raise
    BadInput saying what is wrong."""
    store = Store(os.fspath(results), label="results")
    results = redact(os.fspath(results))  # as the messages name it
    parts: tuple = ()
    try:
        kind = store.kind()
        if kind == pafs.FileType.Directory:  # a sweep's output: its results.parquet is the table
            parts = LAYOUT.results
            if store.kind(*parts) != pafs.FileType.File:
                raise BadInput(f"no {LAYOUT.results[-1]} in directory {results}")
        elif kind == pafs.FileType.NotFound:
            raise BadInput(f"results not found: {results}")
        with store.open_input(*parts) as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise BadInput(f"not a Parquet file: {results} ({one_line(e, limit=300)})") from None
    except OSError as e:
        raise BadInput(f"cannot read {results}: {one_line(e, limit=300)}") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise BadInput(f"not a progprune results table: {results} lacks required columns "
                       f"{', '.join(missing)}")
    up = upgrade(table, results)  # an older version's table reads as this one's; newer: refused
    frame = frame_of(up.table)
    frame.attrs["read_as"] = {"version": up.version, "derived": up.derived, "missing": up.missing}
    return frame, store.path(*parts) if store.local else None


def _written_by_report(out_dir: str) -> set[str] | None:
    """The files an earlier report wrote into `out_dir` (by its marker); None: not a report's
    directory. Only names a report writes count, whatever the marker says."""
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BadInput(f"cannot read {os.path.join(out_dir, MARKER)}: {e.strerror or e}") from None
    listed = set(lines[1:])
    # a marker of before the list (one line): the files every report then could write
    return (listed if len(lines) > 1 else set(_ONE_LINE_MARKER_FILES)) & set(REPORT_FILES)


@contextlib.contextmanager
def _report_dir(out_dir: str, header: str):
    """Yield a new directory beside `out_dir` to write the report into. On success its files
    take their places in `out_dir`, replacing only what an earlier report wrote there (by its
    marker) and never a file of the user's; on failure nothing in `out_dir` changes."""
    if os.path.islink(out_dir) or os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise BadInput(f"report output {out_dir} exists and is not a directory")
    earlier = _written_by_report(out_dir) if os.path.isdir(out_dir) else set()
    if earlier is None:
        if os.listdir(out_dir):
            raise BadInput(f"refusing to write the report into {out_dir}: it is not an earlier "
                           f"progprune report (no {MARKER}); pass another --out")
        earlier = set()
    tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-{secrets.token_hex(6)}")
    try:
        os.makedirs(tmp)  # mode 0777 less the umask, as any directory: a report is for reading
    except OSError as e:
        raise BadInput(f"cannot write the report to {out_dir}: {e.strerror or e}; "
                       "pass a writable --out") from None
    try:
        yield Path(tmp)
        new = set(os.listdir(tmp))
        marker = lambda names: header + "\n" + "".join(f"{n}\n" for n in sorted(names))  # noqa: E731
        (Path(tmp) / MARKER).write_text(marker(new), encoding="utf-8")
        if not os.path.lexists(out_dir):
            os.rename(tmp, out_dir)  # a new directory: appears complete or not at all
            return
        theirs = sorted(n for n in new if n not in earlier and os.path.lexists(os.path.join(out_dir, n)))
        if theirs:
            raise BadInput(f"refusing to replace {os.path.join(out_dir, theirs[0])}: an earlier report "
                           "did not write it; move it away or pass another --out")
        # the marker first lists every file about to be the report's, so that an interrupted
        # replacement leaves none of them unlisted; then the files; then the stale ones go
        with atomic_path(os.path.join(out_dir, MARKER), ".tmp") as t:
            Path(t).write_text(marker(new | earlier), encoding="utf-8")
        for name in sorted(new):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        for name in sorted(earlier - new):  # written by the earlier report, not by this one
            path = os.path.join(out_dir, name)
            if os.path.isfile(path) or os.path.islink(path):
                os.remove(path)
        with atomic_path(os.path.join(out_dir, MARKER), ".tmp") as t:
            Path(t).write_text(marker(new), encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@click.command("report")
@click.argument("results")
@click.option("--output", "--out", "out_dir", metavar="DIR", default=None,
              help="Report directory (default: <dir of results.parquet>/report; ./report for "
                   "s3:// and gs:// results).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="md",
              show_default=True, help="html also writes a self-contained report.html.")
def report_command(results: str, out_dir: str | None, fmt: str) -> None:
    """Tables, plots and a Markdown/HTML report from RESULTS: a results.parquet file, a
    sweep output directory, or a file://, s3:// or gs:// URI."""
    from rich.console import Console

    # piped output (CI logs, files) gets wide tables rather than rich's 80-column default
    console = Console(width=None if sys.stdout.isatty() else 200)
    click.echo(f"report: {build_report(results, out_dir, fmt, console)['report']}")  # errors: cli._Cli


__all__ = ["build_report", "show", "report_command", "FORMATS"]
