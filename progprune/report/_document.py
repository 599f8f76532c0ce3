"""The report as a list of blocks, rendered three ways: Markdown, self-contained HTML and
rich tables for the terminal. One structure, so the three never disagree."""
from __future__ import annotations

import base64
import html
import math
import os
import re

import pandas as pd

from progprune.report._aggregate import PANEL

# blocks: ("h1"|"h2"|"h3"|"p", text) ("ul", [text]) ("table", headers, rows) ("img", file, alt)
# text may hold `code` spans, the only inline markup

SUMMARY_HEADERS = [
    "Method", "Target", "MACs speedup", "Compression (params)", "Base top-1 %",
    "Pruned top-1 % (before FT)", "Pruned + BN re-est. %", "Final top-1 %", "Latency speedup", "n",
]
PROBLEM_HEADERS = [
    "Dataset", "Model", "Method", "Target", "Seed", "Status", "MACs speedup reached", "Error",
]
LEGEND = (
    "Mean ± std over seeds (std with ddof=1; none for a single seed); n = seeds that "
    "finished ok (+ those that did not). Top-1 in %. MACs speedup = base MACs / pruned "
    "MACs; compression = base params / pruned params; latency speedup = base ms / pruned "
    "ms, measured. \"Pruned\" is top-1 right after pruning, before fine-tuning; \"Pruned + BN "
    "re-est.\" is the same model after its BatchNorm statistics were re-estimated on a few "
    "training batches (a better predictor of the fine-tuned result)."
)


def _ms(mean, std, scale=1.0, digits=2, suffix="") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean * scale:.{digits}f}{suffix}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std * scale:.{digits}f}"
    return text


def summary_rows(agg: pd.DataFrame) -> list[tuple[list[str], bool]]:
    """Cells of the per-operating-point table, and whether latency rose there."""
    rows = []
    for _, r in agg.iterrows():
        latency = _ms(r["latency_speedup_mean"], r["latency_speedup_std"], suffix="x")
        if r["latency_rose"]:
            latency += " (latency rose)"
        n = f"{r['n']}" + (f" (+{r['not_ok']} not ok)" if r["not_ok"] else "")
        rows.append(([
            r["method"], f"{r['target_speedup']:g}x",
            _ms(r["achieved_speedup_mean"], r["achieved_speedup_std"], suffix="x"),
            _ms(r["compression_ratio_mean"], r["compression_ratio_std"], suffix="x"),
            _ms(r["base_top1_mean"], r["base_top1_std"], 100),
            _ms(r["pruned_top1_mean"], r["pruned_top1_std"], 100),
            _ms(r["pruned_top1_bn_mean"], r["pruned_top1_bn_std"], 100),
            _ms(r["final_top1_mean"], r["final_top1_std"], 100),
            latency, n,
        ], bool(r["latency_rose"])))
    return rows


def problem_rows(probs: pd.DataFrame) -> list[list[str]]:
    return [[
        r["dataset"], r["model"], r["method"], f"{r['target_speedup']:g}x", str(r["seed"]),
        r["status"], _ms(r["achieved_speedup"], None, suffix="x"), r["error"],
    ] for _, r in probs.iterrows()]


def blocks(*, title, source, generated, setup, agg, probs, plots, notes, common, varying,
           empty) -> list[tuple]:
    out = [("h1", title), ("p", f"Results: `{source}`. {generated}")]
    if empty:
        out.append(("p", "The results table is empty: it has no rows, so there is nothing "
                         "to aggregate or plot."))
    out += [("h2", "Setup"), ("table", ["Setting", "Value"], [list(s) for s in setup])]
    if empty:
        return out
    out.append(("h2", "Results by operating point"))
    if agg.empty:
        out.append(("p", "No combination finished ok: see the list below."))
    else:
        out.append(("p", LEGEND))
        cells = summary_rows(agg)
        for (dataset, model), idx in agg.groupby(PANEL, sort=True).groups.items():
            out.append(("h3", f"{dataset} / {model}"))
            out.append(("table", SUMMARY_HEADERS, [cells[agg.index.get_loc(i)][0] for i in idx]))
    if plots:
        out.append(("h2", "Plots"))
        for _, (file, alt) in plots.items():
            out.append(("img", file, alt))
    rose = agg[agg["latency_rose"]] if not agg.empty else agg
    if len(rose):
        out.append(("h2", "Latency rose although MACs fell"))
        out.append(("ul", [
            f"{r['dataset']} / {r['model']} / `{r['method']}` at target {r['target_speedup']:g}x: "
            f"MACs speedup {r['achieved_speedup_mean']:.2f}x but latency speedup "
            f"{r['latency_speedup_mean']:.2f}x (slower than the unpruned model)"
            for _, r in rose.iterrows()
        ]))
    out.append(("h2", "Not ok: unreachable and failed combinations"))
    if len(probs):
        out.append(("table", PROBLEM_HEADERS, problem_rows(probs)))
    else:
        out.append(("p", "None: every combination finished ok."))
    if notes:
        out += [("h2", "Reporting notes (ShrinkBench practice)"), ("ul", notes)]
    if common:
        out.append(("h2", "Recipe: settings shared by every row"))
        out.append(("p", "From each row's resolved `config_json`; the keys that vary are the "
                         "sweep's axes: " + ", ".join(f"`{k}`" for k in varying) + "."
                    if varying else "From each row's resolved `config_json`."))
        out.append(("table", ["Setting", "Value"], [[k, f"`{v}`"] for k, v in common]))
    return out


# ---- Markdown ------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: list[tuple]) -> str:
    lines = []
    for b in doc:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            headers, rows = b[1], b[2]
            lines.append("| " + " | ".join(map(_md_cell, headers)) + " |")
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(lines)


# ---- HTML (self-contained: images inlined as base64) ----------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
img{max-width:100%}.rose{color:#b00;font-weight:bold}"""


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(str(text), quote=False))


def to_html(doc: list[tuple], image_dir: str) -> str:
    body = []
    for b in doc:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
            rows = "".join(
                "<tr>" + "".join(
                    f"<td class=\"rose\">{_inline(c)}</td>" if "latency rose" in str(c)
                    else f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            with open(os.path.join(image_dir, b[1]), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            body.append(f"<figure><img alt=\"{html.escape(b[2])}\" "
                        f"src=\"data:image/png;base64,{data}\"><figcaption>"
                        f"{html.escape(b[2])}</figcaption></figure>")
    title = html.escape(next((b[1] for b in doc if b[0] == "h1"), "progprune report"))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---- terminal ------------------------------------------------------------------------------
def rich_renderables(agg: pd.DataFrame, probs: pd.DataFrame, empty: bool) -> list:
    from rich.table import Table
    from rich.text import Text

    if empty:
        return [Text("The results table is empty: no rows to report.", style="yellow")]
    out = []
    if agg.empty:
        out.append(Text("No combination finished ok.", style="yellow"))
    else:
        cells = summary_rows(agg)
        for (dataset, model), idx in agg.groupby(PANEL, sort=True).groups.items():
            t = Table(title=f"{dataset} / {model}", title_justify="left")
            for h in SUMMARY_HEADERS:
                t.add_column(h, justify="left" if h == "Method" else "right")
            for i in idx:
                row, rose = cells[agg.index.get_loc(i)]
                if rose:
                    row = row[:-2] + [Text(row[-2], style="bold red"), row[-1]]
                t.add_row(*row)
            out.append(t)
        out.append(Text(LEGEND, style="dim"))
    if len(probs):
        t = Table(title="Not ok: unreachable and failed combinations", title_justify="left")
        for h in PROBLEM_HEADERS:
            t.add_column(h, overflow="fold")
        for r in problem_rows(probs):
            style = "yellow" if r[5] == "unreachable" else "red"
            t.add_row(*r[:5], Text(r[5], style=style), *r[6:])
        out.append(t)
    return out
