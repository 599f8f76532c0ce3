"""The two figures, drawn on Agg `Figure`s directly (no pyplot): the report runs headless and
never switches the backend of a process that imported progprune. Fixed margins and one
legend per figure (not constrained layout, not one legend per panel) halve the drawing
time, which a sweep pays at its end."""
from __future__ import annotations

import math
import os

import pandas as pd

from progprune.report._tables import PANEL

_W, _H, _DPI = 5.0, 3.8, 100  # inches per panel, px/inch: >= 500x380 px per panel
_LEFT, _RIGHT, _BOTTOM, _GAP_W, _GAP_H, _TITLE, _LEGEND_ROW, _LEGEND_COLS = 0.8, 0.25, 0.6, 0.8, 0.9, 0.45, 0.32, 5
ACCURACY = ("accuracy_vs_speedup.png", "Final top-1 vs achieved MACs speedup, per method, with the unpruned "
            "control")  # (file, caption)
LATENCY = ("latency_vs_speedup.png", "Measured latency speedup vs MACs speedup (y = x dashed; red X: MACs "
           "fell but latency rose)")


def draw(agg: pd.DataFrame, base: pd.DataFrame, directory: str) -> dict:
    """The figures `agg` has points for, written into `directory`: {name: (file, caption)}; each
    plot function draws one and returns its (file, caption)."""
    plots = {}
    if len(agg):
        plots["accuracy"] = accuracy_plot(agg, base, directory)
    if agg["latency_speedup_mean"].notna().any():
        plots["latency"] = latency_plot(agg, directory)
    return plots


def _draw(agg: pd.DataFrame, title: str, extra_legend: int, ylabel: str, y: str, scale: float, path: str, decorate):
    """One panel per (dataset, model), one line per method (colour the same in every panel,
    ShrinkBench's baselines dashed) with std error bars; `decorate(ax, sub)` adds the rest."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    methods = sorted(set(agg["method"]))
    panels = list(agg.groupby(PANEL, sort=True))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    top = _TITLE + _LEGEND_ROW * math.ceil((len(methods) + extra_legend) / _LEGEND_COLS) + 0.45
    width = _LEFT + _RIGHT + ncols * _W + (ncols - 1) * _GAP_W
    height = top + _BOTTOM + nrows * _H + (nrows - 1) * _GAP_H
    fig = Figure(figsize=(width, height), dpi=_DPI)
    fig.subplots_adjust(left=_LEFT / width, right=1 - _RIGHT / width, bottom=_BOTTOM / height,
                        top=1 - top / height, wspace=_GAP_W / _W, hspace=_GAP_H / _H)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    for ((dataset, model), sub), ax in zip(panels, axes):
        decorate(ax, sub)
        for method, m in sub.sort_values("achieved_speedup_mean", kind="stable").groupby("method"):
            ax.errorbar(m["achieved_speedup_mean"], m[f"{y}_mean"] * scale, yerr=m[f"{y}_std"].fillna(0) * scale,
                        xerr=m["achieved_speedup_std"].fillna(0), marker="o", markersize=4, capsize=3,
                        color=colormaps["tab10"](methods.index(method) % 10), label=method,
                        linestyle="--" if method in ("random", "l1", "l2") else "-")
        ax.set(title=f"{dataset} / {model}", xlabel="MACs speedup (base MACs / pruned MACs)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 1 - _TITLE / height),
               ncol=min(_LEGEND_COLS, len(handles)), fontsize=9, frameon=False)
    fig.savefig(path)


def accuracy_plot(agg: pd.DataFrame, base: pd.DataFrame, directory: str) -> tuple[str, str]:
    """Final top-1 (%) against achieved MACs speedup, with the unpruned control."""
    def control(ax, sub):
        ref = base.merge(sub[PANEL].drop_duplicates(), on=PANEL)
        if len(ref):
            mean, std = ref["mean"].iloc[0] * 100, ref["std"].iloc[0] * 100
            ax.axhline(mean, color="black", linewidth=1, linestyle=":", label="unpruned control (base model), ± std band")
            ax.annotate(f"unpruned {mean:.2f}%", (1.0, mean), xytext=(6, 4), textcoords="offset points", fontsize=8)
            if std > 0:
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)
            ax.plot([1.0], [mean], marker="*", markersize=11, color="black", linestyle="none")

    _draw(agg, "Final top-1 vs achieved MACs speedup (mean ± std over seeds)", 1, "final top-1 (%)",
          "final_top1", 100, os.path.join(directory, ACCURACY[0]), control)
    return ACCURACY


def latency_plot(agg: pd.DataFrame, directory: str) -> tuple[str, str]:
    """Measured latency speedup against MACs speedup with y = x; a red X and a label where
    MACs fell but latency rose."""
    def guides(ax, sub):
        hi = max(1.0, sub["achieved_speedup_mean"].max(), sub["latency_speedup_mean"].max()) * 1.05
        lo = min(1.0, sub["latency_speedup_mean"].min())
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="y = x (latency follows MACs)")
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="no speedup")
        rose = sub[sub["latency_rose"]]
        if len(rose):
            ax.scatter(rose["achieved_speedup_mean"], rose["latency_speedup_mean"], marker="X", s=140,
                       color="red", zorder=5, label="latency rose")
        for _, r in rose.iterrows():
            ax.annotate(f"latency rose: {r['method']}\n{r['latency_speedup_mean']:.2f}x at "
                        f"{r['achieved_speedup_mean']:.2f}x MACs", (r["achieved_speedup_mean"], r["latency_speedup_mean"]),
                        xytext=(12, 0), textcoords="offset points", fontsize=7, color="red", va="center",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="red", lw=0.5))

    _draw(agg[agg["latency_speedup_mean"].notna()], "Measured latency speedup vs MACs speedup (mean ± std over "
          "seeds)", 3, "latency speedup (base ms / pruned ms)", "latency_speedup", 1,
          os.path.join(directory, LATENCY[0]), guides)
    return LATENCY
