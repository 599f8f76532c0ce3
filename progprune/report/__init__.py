"""`progprune report`: a results table -> terminal tables, PNG plots, a Markdown/HTML report.

    build_report("out/sweep1")            # -> out/sweep1/report/{report.md, *.png, summary.csv}
    build_report("s3://b/sweep1/results.parquet", "rep", fmt="html")

The report follows ShrinkBench's reporting practice: compression ratio next to MACs speedup,
curves over operating points, the unpruned control on every panel, mean ± std over seeds,
and measured latency next to MACs (with points where latency rose called out).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile

import progprune
from progprune.errors import ProgpruneError
from progprune.report import _aggregate as agg_
from progprune.report._document import blocks, rich_renderables, to_html, to_markdown
from progprune.report._load import load

FORMATS = ("md", "html")
MARKER = ".progprune-report"  # only a directory holding this is ever replaced
ACCURACY_PNG = "accuracy_vs_speedup.png"
LATENCY_PNG = "latency_vs_speedup.png"


def build_report(results: str, out_dir: str | None = None, fmt: str = "md",
                 console=None) -> dict:
    """Write the report for `results` into `out_dir` (default: `<dir of results>/report`).

    Returns {"out_dir", "report" (the md, or the html with fmt="html"), "markdown", "html",
    "plots" (name -> path), "summary_csv", "table" (aggregated DataFrame; accuracies as
    fractions), "problems" (rows not ok, DataFrame), "empty"}. Prints the terminal tables to
    `console` (a rich Console) when one is given. Raises ProgpruneError on bad input before
    anything is written; the directory appears complete or not at all.
    """
    if fmt not in FORMATS:
        raise ProgpruneError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
    source = load(results)
    if out_dir is None:
        base = os.path.dirname(source.local_path) if source.local_path else os.getcwd()
        out_dir = os.path.join(base, "report")
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_replaceable(out_dir)

    frame = agg_.derive(source.frame)
    empty = frame.empty
    table = agg_.aggregate(frame)
    probs = agg_.problems(frame)
    sweeps = agg_.distinct(frame["sweep"])
    title = "progprune report" + (f": {', '.join(sweeps)}" if sweeps else "")
    common, varying = agg_.common_settings(frame)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    with _atomic_dir(out_dir) as tmp:
        plots = _draw_plots(frame, table, tmp)
        doc = blocks(
            title=title, source=source.display,
            generated=f"Generated {now} by progprune {progprune.__version__}.",
            setup=[("Results", source.display)] + agg_.setup(frame), agg=table, probs=probs,
            plots=plots, notes=agg_.notes(frame, table), common=common, varying=varying,
            empty=empty,
        )
        _write(os.path.join(tmp, "report.md"), to_markdown(doc))
        if fmt == "html":
            _write(os.path.join(tmp, "report.html"), to_html(doc, tmp))
        table.to_csv(os.path.join(tmp, "summary.csv"), index=False)
        _write(os.path.join(tmp, MARKER), f"report of {source.display}\n")

    md = os.path.join(out_dir, "report.md")
    html_path = os.path.join(out_dir, "report.html") if fmt == "html" else None
    if console is not None:
        for r in rich_renderables(table, probs, empty):
            console.print(r)
    return {
        "out_dir": out_dir,
        "report": html_path or md,
        "markdown": md,
        "html": html_path,
        "plots": {k: os.path.join(out_dir, f) for k, (f, _) in plots.items()},
        "summary_csv": os.path.join(out_dir, "summary.csv"),
        "table": table,
        "problems": probs,
        "empty": empty,
    }


def _draw_plots(frame, table, directory) -> dict:
    """name -> (file name, caption); a figure with nothing to show is left out."""
    if table.empty:
        return {}
    from progprune.report._plots import accuracy_plot, latency_plot

    out = {}
    accuracy_plot(table, agg_.base_reference(frame), os.path.join(directory, ACCURACY_PNG))
    out["accuracy"] = (ACCURACY_PNG, "Final top-1 vs achieved MACs speedup, per method, "
                                     "with the unpruned control")
    if table["latency_speedup_mean"].notna().any():
        latency_plot(table, os.path.join(directory, LATENCY_PNG))
        out["latency"] = (LATENCY_PNG, "Measured latency speedup vs MACs speedup (y = x "
                                       "dashed; red X: MACs fell but latency rose)")
    return out


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
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a report is for reading
        yield tmp
        old = None
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "report"))
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old:
                os.rename(os.path.join(old, "report"), out_dir)
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


from progprune.report._command import report_command  # noqa: E402

__all__ = ["build_report", "report_command", "FORMATS"]
