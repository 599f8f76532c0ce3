"""Rows -> per-operating-point means/stds over seeds, the problems, the setup; the report as
Markdown (the HTML report is that Markdown rendered) and the terminal's rich tables, made from
the same cells, so the three never disagree."""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import re
from pathlib import Path

import pandas as pd

import progprune

GROUP = ["dataset", "model", "method", "target_speedup"]
PANEL = ["dataset", "model"]
METRICS = ("achieved_speedup", "compression_ratio", "base_top1", "pruned_top1", "pruned_top1_bn",
           "final_top1", "latency_speedup")  # aggregated as <name>_mean / <name>_std over ok seeds
MIN_POINTS = 5  # ShrinkBench: curves over >= 5 operating points, not single points
SUMMARY_HEADERS = ["Method", "Target", "MACs speedup", "Compression (params)", "Base top-1 %",
                   "Pruned top-1 % (before FT)", "Pruned + BN re-est. %", "Final top-1 %",
                   "Latency speedup", "n"]
PROBLEM_HEADERS = ["Dataset", "Model", "Method", "Target", "Seed", "Status", "MACs speedup reached", "Error"]
PROBLEMS_TITLE = "Not ok: unreachable and failed combinations"
LEGEND = (
    "Mean ± std over seeds (std with ddof=1; none for a single seed); n = seeds that "
    "finished ok (+ those that did not). Top-1 in %. MACs speedup = base MACs / pruned "
    "MACs; compression = base params / pruned params; latency speedup = base ms / pruned "
    "ms, measured. \"Pruned\" is top-1 right after pruning, before fine-tuning; \"Pruned + BN "
    "re-est.\" is the same model after its BatchNorm statistics were re-estimated on a few "
    "training batches (a better predictor of the fine-tuned result)."
)
SETUP = (  # (label, column): read from the rows so a reader can rerun the sweep
    ("Sweep", "sweep"), ("Datasets", "dataset"), ("Models", "model"), ("Methods", "method"),
    ("Target speedups", "target_speedup"), ("Seeds", "seed"), ("Base-training epochs", "base_epochs"),
    ("Sparse-learning epochs", "sparse_epochs"), ("Fine-tune epochs", "finetune_epochs"),
    ("Fine-tune workers", "finetune_workers"), ("Global pruning", "global_pruning"),
    ("Iterative steps", "iterative_steps"), ("round_to", "round_to"),
    ("Latency batch size", "latency_batch_size"), ("Devices", "device"), ("torch", "torch_version"),
    ("torch-pruning", "torch_pruning_version"), ("ray", "ray_version"), ("progprune", "progprune_version"),
)


# ---- numbers ---------------------------------------------------------------------------------
def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, method, target) with >= 1 ok seed; std is over seeds
    (ddof=1, so NaN for a single seed); n counts ok seeds, not_ok the others."""
    g = df[df["status"] == "ok"].groupby(GROUP, sort=True, dropna=False)
    out = g.size().rename("n").to_frame()
    out["not_ok"] = df[df["status"] != "ok"].groupby(GROUP).size().reindex(out.index, fill_value=0)
    for m in METRICS:
        out[f"{m}_mean"], out[f"{m}_std"] = g[m].mean(), g[m].std(ddof=1)
    # MACs fell but the measured latency rose: the point a MACs-only table hides
    out["latency_rose"] = (out["achieved_speedup_mean"] > 1) & (out["latency_speedup_mean"] < 1)
    return out.reset_index()


def base_reference(df: pd.DataFrame) -> pd.DataFrame:
    """The unpruned control per (dataset, model): base top-1 mean/std over seeds."""
    ok = df[(df["status"] == "ok") & df["base_top1"].notna()]
    per_seed = ok.groupby(PANEL + ["seed"])["base_top1"].mean()
    return per_seed.groupby(level=PANEL).agg(["mean", "std"]).reset_index()


def problems(df: pd.DataFrame) -> pd.DataFrame:
    """Combinations that did not finish ok, each with its error on one line."""
    bad = df[df["status"] != "ok"].sort_values(GROUP + ["seed"])
    error = bad["error"].map(lambda e: " ".join(e.split())[:500] if isinstance(e, str)
                             else "(no error recorded)")
    cols = GROUP + ["seed", "status", "achieved_speedup", "error", "combo_id"]
    return bad.assign(error=error)[cols].reset_index(drop=True)


def distinct(s: pd.Series) -> list[str]:
    return [f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(s.dropna().unique()) if v != ""]


def setup(df: pd.DataFrame) -> list[list[str]]:
    status = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
    items = [["Rows", f"{len(df)} ({status})" if len(df) else "0"]]
    for label, col in SETUP:
        values = distinct(df[col])
        mixed = col.endswith("_version") and len(values) > 1
        items.append([label, (", ".join(values) or "not recorded")
                      + (" (mixed: rows come from different installs)" if mixed else "")])
    started, finished = distinct(df["started_at"]), distinct(df["finished_at"])
    if started or finished:
        items.append(["Ran", f"{started[0] if started else '?'} .. {finished[-1] if finished else '?'}"])
    return items


def common_settings(df: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str]]:
    """From each row's resolved config_json: settings shared by every row (the recipe),
    and the keys that vary (the sweep's axes)."""
    flat = pd.json_normalize([json.loads(b) for b in df["config_json"].dropna()]).astype(object)
    flat = flat.where(flat.notna(), None)  # a key a row lacks reads as null, as JSON's own null does
    seen = {k: {json.dumps(v, sort_keys=True) for v in flat[k]} for k in sorted(flat)}
    return [(k, v.pop()) for k, v in seen.items() if len(v) == 1], [k for k, v in seen.items() if len(v) > 1]


def notes(agg: pd.DataFrame) -> list[str]:
    """Where the sweep falls short of ShrinkBench's reporting practice, said plainly."""
    points = agg.groupby(PANEL + ["method"]).size()
    short = [f"{d}/{m}/{meth} ({n})" for (d, m, meth), n in points.items() if n < MIN_POINTS]
    single, methods = (agg["n"] < 2).sum(), set(agg["method"])
    return [text for cond, text in [
        (short, f"Curves with fewer than {MIN_POINTS} operating points (targets): " + ", ".join(short) + "."),
        (single, f"{single} operating point(s) have a single ok seed: no std shown."),
        ("random" not in methods, "No `random` baseline in this sweep."),
        (not methods & {"l1", "l2"}, "No magnitude (`l1`/`l2`) baseline in this sweep."),
        (agg["latency_speedup_mean"].isna().all(), "No latency was measured: only MACs speedups are reported."),
    ] if cond]


# ---- cells -----------------------------------------------------------------------------------
def _ms(metric: str, mean, std=None) -> str:
    """A cell: mean ± std (no std for one seed), top-1 in %, the ratios with an x."""
    if pd.isna(mean):
        return "–"
    scale, suffix = (100, "") if "top1" in metric else (1, "x")
    text = f"{mean * scale:.2f}{suffix}"
    return text if pd.isna(std) else f"{text} ± {std * scale:.2f}"


def _summary_row(r: pd.Series) -> list[str]:
    cells = [_ms(m, r[f"{m}_mean"], r[f"{m}_std"]) for m in METRICS]  # SUMMARY_HEADERS' order
    cells[-1] += " (latency rose)" if r["latency_rose"] else ""
    n = f"{r['n']}" + (f" (+{r['not_ok']} not ok)" if r["not_ok"] else "")
    return [r["method"], f"{r['target_speedup']:g}x", *cells, n]


def panels(agg: pd.DataFrame):
    """(dataset / model title, [row cells]) per panel of the summary."""
    for (dataset, model), sub in agg.groupby(PANEL, sort=True):
        yield f"{dataset} / {model}", [_summary_row(r) for _, r in sub.iterrows()]


def problem_rows(probs: pd.DataFrame) -> list[list[str]]:
    return [[r["dataset"], r["model"], r["method"], f"{r['target_speedup']:g}x", str(r["seed"]), r["status"],
             _ms("achieved_speedup", r["achieved_speedup"]), r["error"]] for _, r in probs.iterrows()]


# ---- the document ----------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
             for cells in [headers, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(headers), *lines[1:]])


def markdown(df: pd.DataFrame, agg: pd.DataFrame, probs: pd.DataFrame, plots: dict, results: str) -> str:
    """The report as Markdown; the HTML report is this, rendered."""
    sweeps, now = distinct(df["sweep"]), _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# progprune report" + (f": {', '.join(sweeps)}" if sweeps else ""),
           f"Results: `{results}`. Generated {now} by progprune {progprune.__version__}."]
    if note := read_as_note(df):
        out.append(note)
    if df.empty:
        out.append("The results table is empty: it has no rows, so there is nothing to aggregate or plot.")
    out += ["## Setup", _table(["Setting", "Value"], [["Results", results]] + setup(df))]
    if df.empty:
        return "\n\n".join(out) + "\n"
    out += ["## Results by operating point",
            LEGEND if len(agg) else "No combination finished ok: see the list below."]
    for title, rows in panels(agg):
        out += [f"### {title}", _table(SUMMARY_HEADERS, rows)]
    if plots:
        out += ["## Plots"] + [f"![{alt}]({file})" for file, alt in plots.values()]
    rose = agg[agg["latency_rose"]]
    if len(rose):
        out += ["## Latency rose although MACs fell", "\n".join(
            f"- {r['dataset']} / {r['model']} / `{r['method']}` at target {r['target_speedup']:g}x: "
            f"MACs speedup {r['achieved_speedup_mean']:.2f}x but latency speedup "
            f"{r['latency_speedup_mean']:.2f}x (slower than the unpruned model)" for _, r in rose.iterrows())]
    out += [f"## {PROBLEMS_TITLE}", _table(PROBLEM_HEADERS, problem_rows(probs)) if len(probs)
            else "None: every combination finished ok."]
    if len(agg) and (shortfalls := notes(agg)):
        out += ["## Reporting notes (ShrinkBench practice)", "\n".join(f"- {n}" for n in shortfalls)]
    common, varying = common_settings(df)
    if common:
        axes = "; the keys that vary are the sweep's axes: " + ", ".join(f"`{k}`" for k in varying)
        out += ["## Recipe: settings shared by every row", f"From each row's resolved `config_json`"
                f"{axes if varying else ''}.", _table(["Setting", "Value"], [[k, f"`{v}`"] for k, v in common])]
    return "\n\n".join(out) + "\n"


def read_as_note(df: pd.DataFrame) -> str | None:
    """What an older results table lacked: which columns were derived, which are blank."""
    from progprune.results import SCHEMA_VERSION

    r = df.attrs.get("read_as")
    if not r or not (r["derived"] or r["missing"] or r["version"] != SCHEMA_VERSION):
        return None
    parts = [f"Read from a results table of schema version {r['version']} (this progprune writes "
             f"version {SCHEMA_VERSION})."]
    if r["derived"]:
        parts.append(f"Derived from its other columns: {', '.join(r['derived'])}.")
    if r["missing"]:
        parts.append(f"Not recorded by it, so blank here: {', '.join(r['missing'])}.")
    return " ".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
img{max-width:100%}.rose{color:#b00;font-weight:bold}"""


def to_html(markdown_text: str, image_dir) -> str:
    """The Markdown rendered as one self-contained page: the plots inlined as base64 figures with
    their captions, the latency cells where latency rose in red."""
    from markdown_it import MarkdownIt  # rich's own Markdown parser

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    data = lambda file: base64.b64encode(Path(image_dir, file).read_bytes()).decode("ascii")  # noqa: E731
    body = re.sub(r'<p><img src="([^"]+)" alt="([^"]*)" /></p>', lambda m: f'<figure><img alt="{m[2]}" src='
                  f'"data:image/png;base64,{data(m[1])}"><figcaption>{m[2]}</figcaption></figure>', body)
    body = re.sub(r"<td>([^<]*\(latency rose\))</td>", r'<td class="rose">\1</td>', body)
    title = html.escape(markdown_text.split("\n", 1)[0].removeprefix("# "))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}</body></html>\n")


def show(df: pd.DataFrame, console) -> None:
    """The results tables on a terminal (a rich Console): what `progprune report` and a sweep's
    end print."""
    from rich.table import Column, Table
    from rich.text import Text

    if df.empty:
        return console.print(Text("The results table is empty: no rows to report.", style="yellow"))
    agg, probs = aggregate(df), problems(df)
    if agg.empty:
        console.print(Text("No combination finished ok.", style="yellow"))
    for title, rows in panels(agg):
        t = Table(SUMMARY_HEADERS[0], *(Column(h, justify="right") for h in SUMMARY_HEADERS[1:]),
                  title=title, title_justify="left")
        for cells in rows:
            rose = "bold red" if "(latency rose)" in cells[-2] else ""
            t.add_row(*cells[:-2], Text(cells[-2], style=rose), cells[-1])
        console.print(t)
    if len(agg):
        console.print(Text(LEGEND, style="dim"))
    if len(probs):
        t = Table(*(Column(h, overflow="fold") for h in PROBLEM_HEADERS), title=PROBLEMS_TITLE,
                  title_justify="left")
        for r in problem_rows(probs):
            t.add_row(*r[:5], Text(r[5], style="yellow" if r[5] == "unreachable" else "red"), *r[6:])
        console.print(t)
