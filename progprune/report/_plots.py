"""The two figures. Drawn on Agg `Figure`s directly (no pyplot), so the report runs headless
and never switches the backend of a process that imported progprune."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from progprune.report._aggregate import PANEL

_PANEL_W, _PANEL_H, _DPI = 5.0, 3.8, 100  # inches, inches, px/inch: >= 500x380 px per panel
# Fixed margins in inches instead of constrained layout, and one legend per figure instead
# of one per panel: both cut drawing time about in half, which matters because the sweep
# runner builds this report at the end of every sweep.
_LEFT, _RIGHT, _BOTTOM, _WSPACE, _HSPACE, _TITLE, _LEGEND_ROW = 0.8, 0.25, 0.6, 0.8, 0.9, 0.45, 0.32
_LEGEND_COLS = 5


def _panels(agg: pd.DataFrame, title: str, legend_entries: int):
    from matplotlib.figure import Figure

    keys = list(agg.groupby(PANEL, sort=True).groups)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    top = _TITLE + _LEGEND_ROW * math.ceil(legend_entries / _LEGEND_COLS) + 0.45
    width = _LEFT + _RIGHT + ncols * _PANEL_W + (ncols - 1) * _WSPACE
    height = top + _BOTTOM + nrows * _PANEL_H + (nrows - 1) * _HSPACE
    fig = Figure(figsize=(width, height), dpi=_DPI)
    fig.subplots_adjust(left=_LEFT / width, right=1 - _RIGHT / width, bottom=_BOTTOM / height,
                        top=1 - top / height, wspace=_WSPACE / _PANEL_W,
                        hspace=_HSPACE / _PANEL_H)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    return fig, list(zip(keys, axes)), 1 - _TITLE / height


def _legend(fig, y: float) -> None:
    """One legend for the figure: colours are per method and the same in every panel."""
    seen = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, y),
               ncol=min(_LEGEND_COLS, len(seen)), fontsize=9, frameon=False)


def _colors(methods) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted(set(methods)))}


def _style(method: str) -> dict:
    # the baselines ShrinkBench asks for are drawn dashed so the eye separates them
    return {"linestyle": "--"} if method in ("random", "l1", "l2") else {"linestyle": "-"}


def _nan0(s: pd.Series) -> np.ndarray:
    return s.fillna(0.0).to_numpy()


def accuracy_plot(agg: pd.DataFrame, base: pd.DataFrame, path: str) -> str:
    """Final top-1 (%) against achieved MACs speedup; one line per method, bars = std."""
    colors = _colors(agg["method"])
    fig, panels, legend_y = _panels(
        agg, "Final top-1 vs achieved MACs speedup (mean ± std over seeds)", len(colors) + 1)
    for (dataset, model), ax in panels:
        sub = agg[(agg["dataset"] == dataset) & (agg["model"] == model)]
        ref = base[(base["dataset"] == dataset) & (base["model"] == model)]
        if len(ref):
            mean, std = ref["mean"].iloc[0] * 100, ref["std"].iloc[0] * 100
            ax.axhline(mean, color="black", linewidth=1, linestyle=":",
                       label="unpruned control (base model), ± std band")
            ax.annotate(f"unpruned {mean:.2f}%", (1.0, mean), xytext=(6, 4),
                        textcoords="offset points", fontsize=8)
            if std > 0:
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)
            ax.plot([1.0], [mean], marker="*", markersize=11, color="black", linestyle="none")
        for method, m in sub.groupby("method", sort=True):
            m = m.sort_values("achieved_speedup_mean")
            ax.errorbar(m["achieved_speedup_mean"], m["final_top1_mean"] * 100,
                        yerr=_nan0(m["final_top1_std"]) * 100,
                        xerr=_nan0(m["achieved_speedup_std"]),
                        marker="o", markersize=4, capsize=3, color=colors[method],
                        label=method, **_style(method))
        ax.set_title(f"{dataset} / {model}")
        ax.set_xlabel("MACs speedup (base MACs / pruned MACs)")
        ax.set_ylabel("final top-1 (%)")
        ax.grid(alpha=0.3)
    _legend(fig, legend_y)
    fig.savefig(path)
    return path


def latency_plot(agg: pd.DataFrame, path: str) -> str:
    """Measured latency speedup against MACs speedup, y = x for reference; points where
    MACs fell but latency rose get a red X and a label."""
    agg = agg[agg["latency_speedup_mean"].notna()]
    colors = _colors(agg["method"])
    fig, panels, legend_y = _panels(
        agg, "Measured latency speedup vs MACs speedup (mean ± std over seeds)", len(colors) + 3)
    for (dataset, model), ax in panels:
        sub = agg[(agg["dataset"] == dataset) & (agg["model"] == model)]
        hi = max(1.0, sub["achieved_speedup_mean"].max(), sub["latency_speedup_mean"].max())
        lo = min(1.0, sub["latency_speedup_mean"].min())
        ax.plot([lo, hi * 1.05], [lo, hi * 1.05], color="grey", linestyle="--", linewidth=1,
                label="y = x (latency follows MACs)")
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="no speedup")
        for method, m in sub.groupby("method", sort=True):
            m = m.sort_values("achieved_speedup_mean")
            ax.errorbar(m["achieved_speedup_mean"], m["latency_speedup_mean"],
                        yerr=_nan0(m["latency_speedup_std"]),
                        xerr=_nan0(m["achieved_speedup_std"]),
                        marker="o", markersize=4, capsize=3, color=colors[method],
                        label=method, **_style(method))
        rose = sub[sub["latency_rose"]]
        if len(rose):
            ax.scatter(rose["achieved_speedup_mean"], rose["latency_speedup_mean"], marker="X",
                       s=140, color="red", zorder=5, label="latency rose")
            for _, r in rose.iterrows():
                ax.annotate(f"latency rose: {r['method']}\n{r['latency_speedup_mean']:.2f}x "
                            f"at {r['achieved_speedup_mean']:.2f}x MACs",
                            (r["achieved_speedup_mean"], r["latency_speedup_mean"]),
                            xytext=(12, 0), textcoords="offset points", fontsize=7,
                            color="red", va="center",
                            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="red", lw=0.5))
        ax.set_title(f"{dataset} / {model}")
        ax.set_xlabel("MACs speedup (base MACs / pruned MACs)")
        ax.set_ylabel("latency speedup (base ms / pruned ms)")
        ax.grid(alpha=0.3)
    _legend(fig, legend_y)
    fig.savefig(path)
    return path
