"""Each method against its controls (README "Controls"): final top-1 differences paired by
seed, with the mean and a 95% confidence interval over seeds, and the figure that draws the
random control as a band.

The interval is Student's t on the paired differences: mean ± t(0.975, n-1) x s / sqrt(n),
with s their standard deviation (ddof=1) over the n seeds both rows finished ok. It assumes
the per-seed differences are independent draws from a roughly normal distribution; with 3
seeds t is 4.30, so only large differences are told apart. An interval containing 0 is "not
distinguishable at n seeds"; one seed gives no interval.
"""
from __future__ import annotations

import math
import os

import pandas as pd

CONFIDENCE = 0.95
KEY = ["dataset", "model", "target_metric", "target_speedup"]
HEADERS = ["Model", "Target", "Method", "Control", "Seeds paired", "Difference (points)", "95% CI (points)", "Verdict"]
LEGEND = (
    "Difference: the method's final top-1 minus the control's, in percentage points, per seed (rows paired by "
    "seed: same base model, same target), then the mean over the seeds both finished ok. 95% CI: Student's t "
    "interval of that mean, mean ± t(0.975, n−1)·s/√n over the n paired seeds. Random control: the same "
    "progressive loop with random importance to the same target; scratch: the method's own pruned architecture "
    "re-initialised and trained from scratch for the scratch epochs (setup)."
)
PLOT = ("accuracy_vs_controls.png", "Final top-1 vs MACs speedup per method (solid), each method's architecture "
        "trained from scratch (dashed), and the random control as a band (its seeds' range) around its mean (grey)")


def _t(n: int) -> float:
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency (not named: the image lock)

    return float(t.ppf(0.5 + CONFIDENCE / 2, n - 1))


def paired(diff: pd.Series) -> dict:
    """n, mean, interval and verdict of per-seed differences (fractions in, points out)."""
    d = diff.dropna() * 100
    n, mean = len(d), d.mean() if len(d) else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "low": math.nan, "high": math.nan,
                "verdict": "one seed: no interval can be given" if n else "no seed finished ok in both"}
    half = _t(n) * d.std(ddof=1) / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = (f"not distinguishable at {n} seeds" if low <= 0 <= high else
               "method higher" if low > 0 else "control higher")
    return {"n": n, "mean": mean, "low": low, "high": high, "verdict": verdict}


def differences(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (operating point, method, control present): the paired final top-1
    difference of the method minus the control (`paired`)."""
    cols = KEY + ["method", "control", "n", "mean", "low", "high", "verdict"]
    if "control" not in df or df["control"].isna().all():
        return pd.DataFrame(columns=cols)
    ok = df[(df["status"] == "ok") & df["final_top1"].notna()]

    def by_seed(rows):  # a seed's figure (one row per seed in a sweep's table)
        return rows.groupby("seed")["final_top1"].mean()

    out = []
    methods = ok[ok["control"].isna()]
    for key, sub in methods.groupby(KEY + ["method_name"], sort=True):
        at = ok[(ok[KEY] == pd.Series(key[:-1], index=KEY)).all(axis=1)]
        mine = by_seed(sub)
        for control, rows in (("random", at[at["control"] == "random"]),
                              ("scratch", at[(at["control"] == "scratch") & (at["method_name"] == key[-1])])):
            if len(rows) or ((df["control"] == control) & (df["method_name"] == (key[-1] if control == "scratch"
                                                                                 else "random"))).any():
                theirs = by_seed(rows)
                out.append({**dict(zip(KEY, key[:-1])), "method": key[-1], "control": control,
                            **paired((mine - theirs).reindex(mine.index.intersection(theirs.index)))})
    return pd.DataFrame(out, columns=cols)


def _num(v, signed=False) -> str:
    return "–" if pd.isna(v) else (f"{v:+.2f}" if signed else f"{v:.2f}")


def rows(diffs: pd.DataFrame, target_label) -> list[list[str]]:
    return [[f"{r['dataset']} / {r['model']}", target_label(r["target_speedup"], r["target_metric"]), r["method"],
             r["control"], str(r["n"]), _num(r["mean"], signed=True),
             "–" if pd.isna(r["low"]) else f"[{_num(r['low'], True)}, {_num(r['high'], True)}]", r["verdict"]]
            for _, r in diffs.iterrows()]


def plot(df: pd.DataFrame, agg: pd.DataFrame, draw, directory: str) -> tuple[str, str]:
    """`_plots._draw` of the methods and their scratch controls, with each panel's random
    control as a grey band from its lowest to its highest seed at each target."""
    ok = df[(df["status"] == "ok") & df["final_top1"].notna()]
    rand = ok[ok["control"] == "random"]

    def band(ax, sub):
        r = rand.merge(sub[["dataset", "model"]].drop_duplicates(), on=["dataset", "model"])
        for metric, m in r.groupby("target_metric"):
            g = m.groupby("target_speedup").agg(x=("macs_speedup", "mean"), lo=("final_top1", "min"),
                                                hi=("final_top1", "max"), mean=("final_top1", "mean")).sort_values("x")
            label = "random control" + ("" if metric == "macs" else f" ({metric} target)")
            ax.fill_between(g["x"], g["lo"] * 100, g["hi"] * 100, color="grey", alpha=0.25, linewidth=0,
                            label=f"{label}: seeds' range")
            ax.vlines(g["x"], g["lo"] * 100, g["hi"] * 100, color="grey", alpha=0.4, linewidth=5)  # one target too
            ax.plot(g["x"], g["mean"] * 100, color="grey", linestyle="-.", marker="x", label=f"{label}: mean")

    lines = agg[agg["control"].ne("random")]
    draw(lines, "Final top-1 vs MACs speedup, against the controls (mean ± std over seeds)",
         "final top-1 (%)", "final_top1", 100, os.path.join(directory, PLOT[0]), band)
    return PLOT
