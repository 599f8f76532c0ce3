"""The three figures, drawn on Agg `Figure`s directly (no pyplot): the report runs headless and
never switches the backend of a process that imported progprune. Fixed margins and one
legend per figure (not constrained layout, not one legend per panel) halve the drawing
time, which a sweep pays at its end."""
from __future__ import annotations

import json
import math
import os

import pandas as pd

from progprune.report import _controls as C
from progprune.report._tables import METRIC_NAMES, PANEL, SCRATCH

_W, _H, _DPI = 5.0, 3.8, 100  # inches per panel, px/inch: >= 500x380 px per panel
_LEFT, _RIGHT, _BOTTOM, _GAP_W, _GAP_H, _TITLE, _LEGEND_ROW, _LEGEND_COLS = 0.8, 0.25, 0.6, 0.8, 0.9, 0.45, 0.32, 5
_LEGEND_HANDLE, _LEGEND_CHAR = 0.75, 0.068  # inches a legend entry takes: its handle and gaps, per character
ACCURACY = ("accuracy_vs_speedup.png", "Final top-1 vs achieved MACs speedup, per method, with the unpruned "
            "control")  # (file, caption)
LATENCY = ("latency_vs_speedup.png", "Measured latency speedup vs MACs speedup (y = x dashed; red X: MACs "
           "fell but latency rose)")
PERPLEXITY = ("perplexity_vs_speedup.png", "Causal LMs: final perplexity vs speedup reached, per method "
              "(log scale, lower is better; the unpruned model dotted)")
LATENCY_ACCURACY = ("accuracy_vs_latency.png", "Final top-1 vs measured latency speedup, per method, with the "
                    "Pareto front on latency (black steps: the points no other beats in both) and the unpruned "
                    "control")
FRONT_KEY = "progprune:latency_front"  # the PNG's text chunk listing the front's points (JSON)
_MARKERS = {"macs": "o", "latency": "s", "params": "^"}
_BASELINES = ("random", "random (control)", "l1", "l2")  # dashed (ShrinkBench's baselines); scratch dotted


def draw(agg: pd.DataFrame, base: pd.DataFrame, directory: str, frame: pd.DataFrame | None = None) -> dict:
    """The figures `agg` has points for, written into `directory`: {name: (file, caption)}; each
    plot function draws one and returns its (file, caption). `frame` (the rows): the controls'
    figure, where the table has controls."""
    plots = {}
    if len(agg):
        plots["accuracy"] = accuracy_plot(agg, base, directory)
    if agg["latency_speedup_mean"].notna().any():
        plots["latency"] = latency_plot(agg, directory)
    if (agg["latency_speedup_mean"].notna() & agg["final_top1_mean"].notna()).any():
        plots["latency_accuracy"] = latency_accuracy_plot(agg, base, directory)
    if agg["final_perplexity_mean"].notna().any():
        plots["perplexity"] = perplexity_plot(agg, directory)
    if frame is not None and (agg["control"].notna() & agg["final_top1_mean"].notna()).any():
        plots["controls"] = C.plot(frame, agg, _draw, directory)
    return plots


def _series(agg: pd.DataFrame):
    """(method, target metric, label) per line: one per method, and per target metric where the
    table has several (labelled "method (latency target)")."""
    several = agg["target_metric"].nunique() > 1
    for method, metric in sorted(set(zip(agg["method"], agg["target_metric"]))):
        yield method, metric, f"{method} ({METRIC_NAMES.get(metric, metric)} target)" if several else method


def _draw(agg: pd.DataFrame, title: str, ylabel: str, y: str, scale: float, path: str, decorate,
          x: str = "macs_speedup", xlabel: str = "MACs speedup (base MACs / pruned MACs)", metadata=None):
    """One panel per (dataset, model), one line per method and target metric (colour per method,
    the same in every panel, ShrinkBench's baselines dashed; marker per target metric) with std
    error bars; `decorate(ax, sub)` adds the rest. The legend's columns fit the figure's width."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    methods = sorted({m.removesuffix(SCRATCH) for m in agg["method"]})  # a scratch control: its method's colour
    series = list(_series(agg))
    panels = list(agg.groupby(PANEL, sort=True))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width = _LEFT + _RIGHT + ncols * _W + (ncols - 1) * _GAP_W
    fig = Figure(figsize=(width, _H), dpi=_DPI)  # the height once the legend's rows are known
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ((dataset, model), sub), ax in zip(panels, axes):
        decorate(ax, sub)
        for method, metric, label in series:
            m = sub[(sub["method"] == method) & (sub["target_metric"] == metric)]
            m = m.sort_values(f"{x}_mean", kind="stable")
            if m.empty:
                continue
            ax.errorbar(m[f"{x}_mean"], m[f"{y}_mean"] * scale, yerr=m[f"{y}_std"].fillna(0) * scale,
                        xerr=m[f"{x}_std"].fillna(0), marker=_MARKERS.get(metric, "o"), markersize=4, capsize=3,
                        color=colormaps["tab10"](methods.index(method.removesuffix(SCRATCH)) % 10), label=label,
                        linestyle=":" if method.endswith(SCRATCH) else "--" if method in _BASELINES else "-")
        ax.set(title=f"{dataset} / {model}", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    entry = _LEGEND_HANDLE + _LEGEND_CHAR * max(map(len, handles), default=0)  # inches, at fontsize 9
    legend_cols = max(1, min(_LEGEND_COLS, len(handles), int(width // entry)))
    top = _TITLE + _LEGEND_ROW * math.ceil(len(handles) / legend_cols) + 0.45
    height = top + _BOTTOM + nrows * _H + (nrows - 1) * _GAP_H
    fig.set_size_inches(width, height)
    fig.subplots_adjust(left=_LEFT / width, right=1 - _RIGHT / width, bottom=_BOTTOM / height,
                        top=1 - top / height, wspace=_GAP_W / _W, hspace=_GAP_H / _H)
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 1 - _TITLE / height),
               ncol=legend_cols, fontsize=9, frameon=False)
    fig.savefig(path, metadata=metadata)


def _control(base: pd.DataFrame):
    """decorate: the unpruned control (base top-1, at speedup 1) of the panel, ± std band."""
    def control(ax, sub):
        ref = base.merge(sub[PANEL].drop_duplicates(), on=PANEL)
        if len(ref):
            mean, std = ref["mean"].iloc[0] * 100, ref["std"].iloc[0] * 100
            ax.axhline(mean, color="black", linewidth=1, linestyle=":", label="unpruned control (base model), ± std band")
            ax.annotate(f"unpruned {mean:.2f}%", (1.0, mean), xytext=(6, 4), textcoords="offset points", fontsize=8)
            if std > 0:
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)
            ax.plot([1.0], [mean], marker="*", markersize=11, color="black", linestyle="none")
    return control


def perplexity_plot(agg: pd.DataFrame, directory: str) -> tuple[str, str]:
    """Causal LMs: final perplexity (lower is better, log scale) against the speedup reached in
    the target's metric, with each model's base perplexity dotted."""
    def base(ax, sub):
        ax.set_yscale("log")
        for v in sub["base_perplexity_mean"].dropna().unique()[:1]:
            ax.axhline(v, color="grey", linestyle=":", linewidth=1, label="unpruned")

    ppl = agg[agg["final_perplexity_mean"].notna()]
    _draw(ppl, "Final perplexity vs speedup reached (mean ± std over seeds; lower is better)", "final perplexity",
          "final_perplexity", 1, os.path.join(directory, PERPLEXITY[0]), base, x="achieved_speedup",
          xlabel="speedup reached (base / pruned, in the target's metric)")
    return PERPLEXITY


def accuracy_plot(agg: pd.DataFrame, base: pd.DataFrame, directory: str) -> tuple[str, str]:
    """Final top-1 (%) against achieved MACs speedup, with the unpruned control."""
    _draw(agg, "Final top-1 vs achieved MACs speedup (mean ± std over seeds)", "final top-1 (%)",
          "final_top1", 100, os.path.join(directory, ACCURACY[0]), _control(base))
    return ACCURACY


def front_points(agg: pd.DataFrame) -> list[dict]:
    """The operating points on their panel's Pareto front on latency (aggregate's latency_front),
    as the latency-accuracy plot draws them and lists them in its PNG (FRONT_KEY)."""
    cols = ["dataset", "model", "method", "target_metric", "target_speedup", "latency_speedup_mean", "final_top1_mean"]
    front = agg[agg["latency_front"]].sort_values(PANEL + ["latency_speedup_mean"])
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in front[cols].to_dict("records")]


def latency_accuracy_plot(agg: pd.DataFrame, base: pd.DataFrame, directory: str) -> tuple[str, str]:
    """Final top-1 (%) against the measured latency speedup, with the Pareto front on latency
    (over every method and target metric of the panel) drawn as the steps that bound what the
    points reach, and the unpruned control."""
    control = _control(base)

    def front(ax, sub):
        control(ax, sub)
        f = sub[sub["latency_front"]].sort_values("latency_speedup_mean")
        ax.plot(f["latency_speedup_mean"], f["final_top1_mean"] * 100, drawstyle="steps-pre", color="black",
                linewidth=1.2, zorder=4, label="Pareto front on latency")
        ax.scatter(f["latency_speedup_mean"], f["final_top1_mean"] * 100, s=90, facecolors="none",
                   edgecolors="black", linewidths=1.2, zorder=5)
        ax.axvline(1.0, color="black", linestyle=":", linewidth=1, label="no speedup")

    points = agg[agg["latency_speedup_mean"].notna() & agg["final_top1_mean"].notna()]
    _draw(points, "Final top-1 vs measured latency speedup (mean ± std over seeds)", "final top-1 (%)",
          "final_top1", 100, os.path.join(directory, LATENCY_ACCURACY[0]), front, x="latency_speedup",
          xlabel="latency speedup (base ms / pruned ms, measured)",
          metadata={FRONT_KEY: json.dumps(front_points(points))})
    return LATENCY_ACCURACY


def latency_plot(agg: pd.DataFrame, directory: str) -> tuple[str, str]:
    """Measured latency speedup against MACs speedup with y = x, one panel per (dataset, model);
    a red X and a label where MACs fell but latency rose."""
    def guides(ax, sub):
        hi = max(1.0, sub["macs_speedup_mean"].max(), sub["latency_speedup_mean"].max()) * 1.05
        lo = min(1.0, sub["latency_speedup_mean"].min())
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="y = x (latency follows MACs)")
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="no speedup")
        rose = sub[sub["latency_rose"]]
        if len(rose):
            ax.scatter(rose["macs_speedup_mean"], rose["latency_speedup_mean"], marker="X", s=140,
                       color="red", zorder=5, label="latency rose")
        for _, r in rose.iterrows():
            ax.annotate(f"latency rose: {r['method']}\n{r['latency_speedup_mean']:.2f}x at "
                        f"{r['macs_speedup_mean']:.2f}x MACs", (r["macs_speedup_mean"], r["latency_speedup_mean"]),
                        xytext=(12, 0), textcoords="offset points", fontsize=7, color="red", va="center",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="red", lw=0.5))

    _draw(agg[agg["latency_speedup_mean"].notna()], "Measured latency speedup vs MACs speedup (mean ± std over "
          "seeds)", "latency speedup (base ms / pruned ms)", "latency_speedup", 1,
          os.path.join(directory, LATENCY[0]), guides)
    return LATENCY
