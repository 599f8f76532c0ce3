"""Rows -> derived columns, per-operating-point means/stds over seeds, problems, setup."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

GROUP = ["dataset", "model", "method", "target_speedup"]
PANEL = ["dataset", "model"]
METRICS = (  # aggregated as <name>_mean / <name>_std over the ok seeds of a group
    "achieved_speedup", "compression_ratio", "base_top1", "pruned_top1", "pruned_top1_bn",
    "final_top1", "latency_speedup",
)
_NUMERIC = METRICS + (
    "target_speedup", "base_macs", "pruned_macs", "base_params", "pruned_params",
    "base_latency_ms", "pruned_latency_ms",
)
MIN_POINTS = 5  # ShrinkBench: curves over >= 5 operating points, not single points


def derive(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns as floats; ratios filled in from their parts where a row lacks them."""
    df = frame.copy()
    for c in _NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("dataset", "model", "method", "status"):
        df[c] = df[c].astype("string").fillna("?")
    # compression ratio is defined as base params / pruned params: params win when present
    df["compression_ratio"] = _ratio(df["base_params"], df["pruned_params"]).fillna(
        df["compression_ratio"]
    )
    df["achieved_speedup"] = df["achieved_speedup"].fillna(
        _ratio(df["base_macs"], df["pruned_macs"])
    )
    df["latency_speedup"] = df["latency_speedup"].fillna(
        _ratio(df["base_latency_ms"], df["pruned_latency_ms"])
    )
    return df


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    return num / den.where(den > 0)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, method, target) with >= 1 ok seed; std is over seeds
    (ddof=1, so NaN for a single seed); n counts ok seeds, not_ok the others."""
    ok = df[df["status"] == "ok"]
    cols = GROUP + ["n", "not_ok"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    if ok.empty:
        return pd.DataFrame(columns=cols + ["latency_rose"])
    g = ok.groupby(GROUP, sort=True, dropna=False)
    out = g.size().rename("n").to_frame()
    not_ok = df[df["status"] != "ok"].groupby(GROUP, dropna=False).size()
    out["not_ok"] = not_ok.reindex(out.index).fillna(0).astype(int)
    for m in METRICS:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1)
    # MACs fell but the measured latency rose: the point a MACs-only table hides
    out["latency_rose"] = (out["achieved_speedup_mean"] > 1) & (out["latency_speedup_mean"] < 1)
    return out.reset_index()[cols + ["latency_rose"]]


def base_reference(df: pd.DataFrame) -> pd.DataFrame:
    """The unpruned control per (dataset, model): base top-1 mean/std over seeds."""
    ok = df[(df["status"] == "ok") & df["base_top1"].notna()]
    per_seed = ok.groupby(PANEL + ["seed"])["base_top1"].mean()
    ref = per_seed.groupby(level=PANEL).agg(["mean", "std", "size"])
    return ref.rename(columns={"size": "n"}).reset_index()


def problems(df: pd.DataFrame) -> pd.DataFrame:
    """Combinations that did not finish ok, each with its error, listed apart."""
    bad = df[df["status"] != "ok"].copy()
    bad["error"] = bad["error"].map(_clean_error)
    cols = GROUP + ["seed", "status", "achieved_speedup", "error", "combo_id"]
    return bad.sort_values(GROUP + ["seed"])[cols].reset_index(drop=True)


def _clean_error(e) -> str:
    if e is None or (isinstance(e, float) and np.isnan(e)):
        return "(no error recorded)"
    text = " ".join(str(e).split())
    return text[:500] + ("..." if len(text) > 500 else "")


_SETUP = (  # (label, column): read from the rows so a reader can rerun the sweep
    ("Sweep", "sweep"), ("Datasets", "dataset"), ("Models", "model"), ("Methods", "method"),
    ("Target speedups", "target_speedup"), ("Seeds", "seed"),
    ("Base-training epochs", "base_epochs"), ("Sparse-learning epochs", "sparse_epochs"),
    ("Fine-tune epochs", "finetune_epochs"), ("Fine-tune workers", "finetune_workers"),
    ("Global pruning", "global_pruning"), ("Iterative steps", "iterative_steps"),
    ("round_to", "round_to"), ("Latency batch size", "latency_batch_size"),
    ("Devices", "device"),
    ("torch", "torch_version"), ("torch-pruning", "torch_pruning_version"),
    ("ray", "ray_version"), ("progprune", "progprune_version"),
)
# contract columns say "not recorded" when blank; the optional ones are left out instead
_CONTRACT = {"sweep", "dataset", "model", "method", "target_speedup", "seed",
             "finetune_epochs", "device"}
_VERSIONS = {"torch_version", "torch_pruning_version", "ray_version", "progprune_version"}


def setup(df: pd.DataFrame) -> list[tuple[str, str]]:
    counts = df["status"].value_counts()
    status = ", ".join(f"{counts[s]} {s}" for s in counts.index)
    items = [("Rows", f"{len(df)} ({status})" if len(df) else "0")]
    for label, col in _SETUP:
        values = distinct(df[col])
        if not values and col not in _CONTRACT | _VERSIONS:
            continue
        text = ", ".join(values) if values else "not recorded"
        if col in _VERSIONS and len(values) > 1:
            text += " (mixed: rows come from different installs)"
        items.append((label, text))
    started, finished = distinct(df["started_at"]), distinct(df["finished_at"])
    if started or finished:
        items.append(("Ran", f"{started[0] if started else '?'} .. "
                             f"{finished[-1] if finished else '?'}"))
    return items


def distinct(s: pd.Series) -> list[str]:
    values = [v for v in s.dropna().unique() if v != ""]
    try:
        values.sort()
    except TypeError:
        values.sort(key=str)
    return [_fmt_value(v) for v in values]


def _fmt_value(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return f"{v:g}"
    return str(v)


def common_settings(df: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str]]:
    """From each row's resolved config_json: settings shared by every row (the recipe),
    and the keys that vary (the sweep's axes)."""
    flat = []
    for blob in df["config_json"].dropna():
        try:
            flat.append(_flatten(json.loads(blob)))
        except (TypeError, ValueError):
            continue
    if not flat:
        return [], []
    keys = sorted(set().union(*flat))
    common, varying = [], []
    for k in keys:
        seen = {json.dumps(f.get(k), sort_keys=True) for f in flat}
        if len(seen) == 1:
            common.append((k, seen.pop()))
        else:
            varying.append(k)
    return common, varying


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def notes(df: pd.DataFrame, agg: pd.DataFrame) -> list[str]:
    """Where the sweep falls short of ShrinkBench's reporting practice, said plainly."""
    out = []
    if agg.empty:
        return out
    points = agg.groupby(PANEL + ["method"]).size()
    short = [f"{d}/{m}/{meth} ({n})" for (d, m, meth), n in points.items() if n < MIN_POINTS]
    if short:
        out.append(f"Curves with fewer than {MIN_POINTS} operating points (targets): "
                   + ", ".join(short) + ".")
    single = agg[agg["n"] < 2]
    if len(single):
        out.append(f"{len(single)} operating point(s) have a single ok seed: no std shown.")
    methods = set(agg["method"])
    if "random" not in methods:
        out.append("No `random` baseline in this sweep.")
    if not methods & {"l1", "l2"}:
        out.append("No magnitude (`l1`/`l2`) baseline in this sweep.")
    if agg["latency_speedup_mean"].isna().all():
        out.append("No latency was measured: only MACs speedups are reported.")
    return out
