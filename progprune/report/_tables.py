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
from progprune.report import _controls as C

# an operating point: rows of different target metrics are never aggregated together
GROUP = ["dataset", "model", "method", "target_metric", "target_speedup"]
PANEL = ["dataset", "model"]
# aggregated as <name>_mean / <name>_std over ok seeds; achieved_speedup is in the target's metric
# (the MACs speedup for a MACs target), the others are what the summary's columns show, in order
METRICS = ("achieved_speedup", "macs_speedup", "compression_ratio", "base_top1", "pruned_top1",
           "pruned_top1_bn", "final_top1", "latency_speedup", "base_perplexity", "pruned_perplexity",
           "final_perplexity")
SHOWN = METRICS[1:8]  # SUMMARY_HEADERS' columns from "MACs speedup" on
PERPLEXITY = METRICS[8:]  # causal LMs (lower is better): columns only where some row has them
PERPLEXITY_HEADERS = ["Base perplexity", "Pruned perplexity (before FT)", "Final perplexity"]
PERPLEXITY_LEGEND = (" Causal LMs: perplexity = exp(mean next-token loss) on the test split, lower is better; "
                     "their top-1 columns are next-token top-1.")
METRIC_NAMES = {"macs": "MACs", "latency": "latency", "params": "params"}
MIN_POINTS = 5  # ShrinkBench: curves over >= 5 operating points, not single points
SUMMARY_HEADERS = ["Method", "Target", "MACs speedup", "Compression (params)", "Base top-1 %",
                   "Pruned top-1 % (before FT)", "Pruned + BN re-est. %", "Final top-1 %",
                   "Latency speedup", "n"]
STOP_RULE = "Stop rule (95%)"  # a column only where some operating point has a latency target
PROBLEM_HEADERS = ["Dataset", "Model", "Method", "Target", "Seed", "Status", "MACs speedup reached", "Error"]
REACHED = "Speedup reached"  # PROBLEM_HEADERS[6] where some problem's target is not in MACs
PROBLEMS_TITLE = "Not ok: unreachable and failed combinations"
LEGEND = (
    "Mean ± std over seeds (std with ddof=1; none for a single seed); n = seeds that "
    "finished ok (+ those that did not). Top-1 in %. MACs speedup = base MACs / pruned "
    "MACs; compression = base params / pruned params; latency speedup = base ms / pruned "
    "ms, measured. \"Pruned\" is top-1 right after pruning, before fine-tuning; \"Pruned + BN "
    "re-est.\" is the same model after its BatchNorm statistics were re-estimated on a few "
    "training batches (a better predictor of the fine-tuned result)."
)
METRIC_LEGEND = (  # added where some target is not in MACs
    " Target: base / pruned in the target's metric: a bare \"2x\" is MACs, \"2x latency\" the latency "
    "the stop rule measured while pruning (paired timing on the task's device, under the spec's runtime), "
    "\"2x params\" the parameter count; every row shows its MACs, params and latency speedups beside it."
)
STOP_LEGEND = (  # added where some target is in latency
    f" {STOP_RULE}: the latency speedup the stop rule accepted (the median of its paired timing rounds; "
    "mean over seeds) and its 95% interval (over seeds: the lowest low end to the highest high end); the "
    "latency speedup column is timed again once pruning is done."
)
SETUP = (  # (label, column): read from the rows so a reader can rerun the sweep
    ("Sweep", "sweep"), ("Datasets", "dataset"), ("Models", "model"), ("Methods", "method"),
    ("Target speedups", "target_speedup"), ("Target metrics", "target_metric"), ("Seeds", "seed"),
    ("Base-training epochs", "base_epochs"),
    ("Sparse-learning epochs", "sparse_epochs"), ("Fine-tune epochs", "finetune_epochs"),
    ("Scratch-control epochs", "scratch_epochs"),
    ("Fine-tune workers", "finetune_workers"), ("Global pruning", "global_pruning"),
    ("Iterative steps", "iterative_steps"), ("round_to", "round_to"),
    ("Latency batch size", "latency_batch_size"), ("Devices", "device"), ("torch", "torch_version"),
    ("torch-pruning", "torch_pruning_version"), ("ray", "ray_version"), ("progprune", "progprune_version"),
)


# ---- numbers ---------------------------------------------------------------------------------
SCRATCH, RANDOM_CONTROL = " (scratch)", "random (control)"  # how a control's rows are labelled


def prepared(df: pd.DataFrame) -> pd.DataFrame:
    """The frame as the report reads it: a blank target_metric (a table of before target
    metrics) is "macs"; a blank macs_speedup is the achieved speedup of a MACs target, else
    base MACs / pruned MACs. A control's rows are their own lines: `method` reads "random
    (control)" or "<method> (scratch)"; `method_name` keeps the method."""
    metric = df["target_metric"].mask(df["target_metric"].isna() | (df["target_metric"] == ""), "macs")
    macs = pd.to_numeric(df["macs_speedup"], errors="coerce")
    macs = macs.fillna(pd.to_numeric(df["achieved_speedup"], errors="coerce").where(metric == "macs"))
    pruned = pd.to_numeric(df["pruned_macs"], errors="coerce")
    macs = macs.fillna(pd.to_numeric(df["base_macs"], errors="coerce") / pruned.where(pruned > 0))
    control = df["control"].where(df["control"].isin(["random", "scratch"]))
    label = df["method"].where(control.isna(), df["method"].astype(str) + SCRATCH)
    label = label.mask(control == "random", RANDOM_CONTROL)
    return df.assign(target_metric=metric.astype(object), macs_speedup=macs.astype(float),
                     control=control.astype(object), method_name=df["method"], method=label)


def pareto_front(x, y) -> list[bool]:
    """Which points (x[i], y[i]) are on the Pareto front when both are to be high: no other
    point is at least as high in both and higher in one. A point with a NaN is not on it."""
    pts = list(zip(x, y))
    ok = [not (pd.isna(a) or pd.isna(b)) for a, b in pts]
    return [ok[i] and not any(ok[j] and c >= a and d >= b and (c > a or d > b) for j, (c, d) in enumerate(pts))
            for i, (a, b) in enumerate(pts)]


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, method, target metric, target) with >= 1 ok seed; std is
    over seeds (ddof=1, so NaN for a single seed); n counts ok seeds, not_ok the others.
    latency_front: on its panel's Pareto front in (latency speedup, final top-1)."""
    g = df[df["status"] == "ok"].groupby(GROUP, sort=True, dropna=False)
    out = g.size().rename("n").to_frame()
    out["not_ok"] = df[df["status"] != "ok"].groupby(GROUP).size().reindex(out.index, fill_value=0)
    for m in METRICS:
        out[f"{m}_mean"], out[f"{m}_std"] = g[m].mean(), g[m].std(ddof=1)
    out["achieved_ci_low_min"], out["achieved_ci_high_max"] = g["achieved_ci_low"].min(), g["achieved_ci_high"].max()
    out["control"] = g["control"].first()
    # MACs fell but the measured latency rose: the point a MACs-only table hides
    out["latency_rose"] = (out["macs_speedup_mean"] > 1) & (out["latency_speedup_mean"] < 1)
    order = {m: i for i, m in enumerate(METRIC_NAMES)}  # macs, latency, params; another after them
    out = out.reset_index().sort_values(GROUP, kind="stable", key=lambda c: c.map(lambda m: (order.get(m, 9), m))
                                        if c.name == "target_metric" else c, ignore_index=True)
    out["latency_front"] = False
    for _, sub in out.groupby(PANEL, sort=False):
        front = pareto_front(sub["latency_speedup_mean"], sub["final_top1_mean"])
        out.loc[sub.index, "latency_front"] = front
    return out


def target_label(speedup: float, metric: str) -> str:
    """"2x" for a MACs target (as before target metrics), "2x latency" otherwise."""
    return f"{speedup:g}x" + ("" if metric == "macs" else f" {metric}")


def in_macs_only(frame: pd.DataFrame) -> bool:
    return set(frame["target_metric"]) <= {"macs"}


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
    cols = GROUP + ["seed", "status", "achieved_speedup", "macs_speedup", "error", "combo_id"]
    return bad.assign(error=error)[cols].reset_index(drop=True)


def distinct(s: pd.Series) -> list[str]:
    return [f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(s.dropna().unique()) if v != ""]


def setup(df: pd.DataFrame) -> list[list[str]]:
    status = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
    items = [["Rows", f"{len(df)} ({status})" if len(df) else "0"]]
    for label, col in SETUP:
        values = distinct(df[col])
        if col == "target_metric" and set(values) <= {"macs"} or col == "scratch_epochs" and not values:
            continue  # a MACs-only table's setup reads as before target metrics; no scratch control
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
    points = agg.groupby(PANEL + ["method", "target_metric"]).size()
    short = [f"{d}/{m}/{meth}{'' if metric == 'macs' else '/' + metric} ({n})"
             for (d, m, meth, metric), n in points.items() if n < MIN_POINTS]
    single, methods = (agg["n"] < 2).sum(), set(agg["method"])
    return [text for cond, text in [
        (short, f"Curves with fewer than {MIN_POINTS} operating points (targets): " + ", ".join(short) + "."),
        (single, f"{single} operating point(s) have a single ok seed: no std shown."),
        (not methods & {"random", RANDOM_CONTROL}, "No `random` baseline in this sweep."),
        (not methods & {"l1", "l2"}, "No magnitude (`l1`/`l2`) baseline in this sweep."),
        (agg["latency_speedup_mean"].isna().all(), "No latency was measured: only MACs speedups are reported."),
    ] if cond]


# ---- cells -----------------------------------------------------------------------------------
def _ms(metric: str, mean, std=None) -> str:
    """A cell: mean ± std (no std for one seed), top-1 in %, the ratios with an x."""
    if pd.isna(mean):
        return "–"
    scale, suffix = (100, "") if "top1" in metric else (1, "") if "perplexity" in metric else (1, "x")
    text = f"{mean * scale:.2f}{suffix}"
    return text if pd.isna(std) else f"{text} ± {std * scale:.2f}"


def has_perplexity(agg: pd.DataFrame) -> bool:
    return bool(len(agg)) and bool(agg["final_perplexity_mean"].notna().any() or agg["base_perplexity_mean"].notna().any())


def summary_headers(agg: pd.DataFrame) -> list[str]:
    """SUMMARY_HEADERS, with the stop rule's column where some target is in latency and the
    perplexity columns where some row is a causal LM's."""
    heads = SUMMARY_HEADERS
    if (agg["target_metric"] == "latency").any():
        at = heads.index("Latency speedup") + 1
        heads = heads[:at] + [STOP_RULE] + heads[at:]
    return heads[:-1] + PERPLEXITY_HEADERS + heads[-1:] if has_perplexity(agg) else heads


def _stop_rule(r: pd.Series) -> str:
    if r["target_metric"] != "latency":
        return "–"
    low, high = r["achieved_ci_low_min"], r["achieved_ci_high_max"]
    interval = "" if pd.isna(low) or pd.isna(high) else f" ({low:.2f}–{high:.2f}x)"
    return _ms("achieved_speedup", r["achieved_speedup_mean"]) + interval


def _summary_row(r: pd.Series, stop_rule: bool, perplexity: bool = False) -> list[str]:
    cells = [_ms(m, r[f"{m}_mean"], r[f"{m}_std"]) for m in SHOWN]  # SUMMARY_HEADERS' order
    cells[-1] += " (latency rose)" if r["latency_rose"] else ""
    n = f"{r['n']}" + (f" (+{r['not_ok']} not ok)" if r["not_ok"] else "")
    ppl = [_ms(m, r[f"{m}_mean"], r[f"{m}_std"]) for m in PERPLEXITY] if perplexity else []
    return [r["method"], target_label(r["target_speedup"], r["target_metric"]), *cells,
            *([_stop_rule(r)] if stop_rule else []), *ppl, n]


def panels(agg: pd.DataFrame):
    """(dataset / model title, [row cells]) per panel of the summary (summary_headers' columns)."""
    stop_rule, ppl = STOP_RULE in summary_headers(agg), has_perplexity(agg)
    for (dataset, model), sub in agg.groupby(PANEL, sort=True):
        yield f"{dataset} / {model}", [_summary_row(r, stop_rule, ppl) for _, r in sub.iterrows()]


def problem_headers(probs: pd.DataFrame) -> list[str]:
    """PROBLEM_HEADERS; "Speedup reached" (each in its metric) where some target is not in MACs."""
    return PROBLEM_HEADERS if in_macs_only(probs) else PROBLEM_HEADERS[:6] + [REACHED] + PROBLEM_HEADERS[7:]


def _reached(r: pd.Series, named: bool) -> str:
    """The speedup reached in the target's metric (named unless every problem is in MACs), and
    the MACs speedup it took where the target is in another metric."""
    got, metric = r["achieved_speedup"], r["target_metric"]
    if pd.isna(got) or not named:
        return _ms("achieved_speedup", got)
    macs = "" if metric == "macs" or pd.isna(r["macs_speedup"]) else f" at {r['macs_speedup']:.2f}x MACs"
    return f"{got:.2f}x {METRIC_NAMES.get(metric, metric)}{macs}"


def problem_rows(probs: pd.DataFrame) -> list[list[str]]:
    named = not in_macs_only(probs)
    return [[r["dataset"], r["model"], r["method"], target_label(r["target_speedup"], r["target_metric"]),
             str(r["seed"]), r["status"], _reached(r, named), r["error"]] for _, r in probs.iterrows()]


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
            legend(agg) if len(agg) else "No combination finished ok: see the list below."]
    for title, rows in panels(agg):
        out += [f"### {title}", _table(summary_headers(agg), rows)]
    diffs = C.differences(df)
    if len(diffs):
        out += ["## Against the controls (paired by seed)", C.LEGEND,
                _table(C.HEADERS, C.rows(diffs, target_label))]
    if plots:
        out += ["## Plots"] + [f"![{alt}]({file})" for file, alt in plots.values()]
    rose = agg[agg["latency_rose"]]
    if len(rose):
        out += ["## Latency rose although MACs fell", "\n".join(
            f"- {r['dataset']} / {r['model']} / `{r['method']}` at target "
            f"{target_label(r['target_speedup'], r['target_metric'])}: "
            f"MACs speedup {r['macs_speedup_mean']:.2f}x but latency speedup "
            f"{r['latency_speedup_mean']:.2f}x (slower than the unpruned model)" for _, r in rose.iterrows())]
    out += [f"## {PROBLEMS_TITLE}", _table(problem_headers(probs), problem_rows(probs)) if len(probs)
            else "None: every combination finished ok."]
    if len(agg) and (shortfalls := notes(agg)):
        out += ["## Reporting notes (ShrinkBench practice)", "\n".join(f"- {n}" for n in shortfalls)]
    common, varying = common_settings(df)
    if common:
        axes = "; the keys that vary are the sweep's axes: " + ", ".join(f"`{k}`" for k in varying)
        out += ["## Recipe: settings shared by every row", f"From each row's resolved `config_json`"
                f"{axes if varying else ''}.", _table(["Setting", "Value"], [[k, f"`{v}`"] for k, v in common])]
    return "\n\n".join(out) + "\n"


def legend(agg: pd.DataFrame) -> str:
    """LEGEND; what a target in another metric and the stop rule's column mean, where present."""
    return (LEGEND + ("" if in_macs_only(agg) else METRIC_LEGEND)
            + (STOP_LEGEND if STOP_RULE in summary_headers(agg) else "")
            + (PERPLEXITY_LEGEND if has_perplexity(agg) else ""))


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
    headers = summary_headers(agg)
    at = headers.index("Latency speedup")
    for title, rows in panels(agg):
        t = Table(headers[0], *(Column(h, justify="right") for h in headers[1:]), title=title, title_justify="left")
        for cells in rows:
            rose = "bold red" if "(latency rose)" in cells[at] else ""
            t.add_row(*cells[:at], Text(cells[at], style=rose), *cells[at + 1:])
        console.print(t)
    if len(agg):
        console.print(Text(legend(agg), style="dim"))
    diffs = C.differences(df)
    if len(diffs):
        t = Table(*C.HEADERS, title="Against the controls (paired by seed)", title_justify="left")
        for cells in C.rows(diffs, target_label):
            t.add_row(*cells)
        console.print(t)
        console.print(Text(C.LEGEND, style="dim"))
    if len(probs):
        t = Table(*(Column(h, overflow="fold") for h in problem_headers(probs)), title=PROBLEMS_TITLE,
                  title_justify="left")
        for r in problem_rows(probs):
            t.add_row(*r[:5], Text(r[5], style="yellow" if r[5] == "unreachable" else "red"), *r[6:])
        console.print(t)
