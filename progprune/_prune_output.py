"""What `progprune prune` writes: --output read as a local directory and checked before any
work (creatable, writable, nothing in the way, no earlier prune's files unless --force), and
the summary it prints at the end. The files themselves are staged and published by
`_atomic.StagedDir`."""
from __future__ import annotations

import json
import os

from progprune._atomic import nearest_existing
from progprune.errors import BadInput


def local_out_dir(output: str) -> str:
    """--output as the local directory it names (as a sweep reads a local output: file:// and
    ~ understood); bad values refused before anything is imported or run."""
    if not output.strip():
        raise BadInput(f"empty path {output!r}; name a directory (made if missing)", field="--output")
    if output.startswith("file://"):
        return os.path.expanduser(output[len("file://"):]) or "/"
    if "://" in output:
        raise BadInput(f"prune writes a local directory, got {output!r}; give a local path "
                       "(a sweep spec's output may be s3:// or gs://)", field="--output")
    return os.path.expanduser(output)


def check_out_dir(out: str, force: bool) -> None:
    """Before any work: the directory can be created and written, nothing is in the way, and
    it holds no earlier prune's files (unless `force`)."""
    from progprune.storage.layout import PRUNE_LAYOUT

    parent = nearest_existing(out)
    if os.path.islink(parent) and not os.path.exists(parent):
        raise BadInput(f"{parent} is a symlink to {os.readlink(parent)}, which does not exist; create "
                       "its target or choose another --output", field="--output")
    if not os.path.isdir(parent):
        raise BadInput(f"{parent} exists and is not a directory; choose another --output", field="--output")
    for name in PRUNE_LAYOUT.files:
        if os.path.isdir(os.path.join(out, name)):
            raise BadInput(f"{os.path.join(out, name)} is a directory; remove it or choose "
                                 "another --output", field="--output")
    held = [n for n in PRUNE_LAYOUT.files if os.path.lexists(os.path.join(out, n))]
    if held and not force:
        raise BadInput(f"{out} already holds {_earlier_run(out, held)}; choose another --output, or pass "
                       "--force to replace it", field="--output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to {parent}; choose a writable directory", field="--output")


def _earlier_run(out: str, held: list) -> str:
    """What an earlier prune left in `out`, as its row names it (else the file names)."""
    from progprune.storage.layout import PRUNE_LAYOUT

    files = " and ".join(held)
    try:
        import pyarrow.parquet as pq

        (r,) = pq.read_table(os.path.join(out, PRUNE_LAYOUT.row),
                             columns=["model", "method", "target_speedup", "seed"]).to_pylist()
        return f"the prune of {r['model']} / {r['method']} / {r['target_speedup']}x / seed {r['seed']} ({files})"
    except Exception:  # unreadable or another format: name the files
        return files


def summary(row, log) -> None:
    """The end of a prune's log: its row in words (the target's metric marked)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    log("")
    log(f"{row.model} / {row.dataset} / {row.method}: {row.status}")
    if row.achieved_speedup:
        target = f"  (target {row.target_speedup}x, {row.overshoot_pct:+.3f}%)"
        shown = {row.target_metric or "macs": target}
        if row.target_metric == "latency":
            shown["latency"] = (f"  (target {row.target_speedup}x: stop rule {row.achieved_speedup:.3f}x, 95% "
                                f"[{row.achieved_ci_low:.3f}, {row.achieved_ci_high:.3f}])")
        log(f"  MACs    {row.base_macs / 1e6:.2f}M -> {row.pruned_macs / 1e6:.2f}M  "
            f"speedup {row.macs_speedup:.4f}x{shown.get('macs', '')}")
        log(f"  params  {row.base_params / 1e6:.3f}M -> {row.pruned_params / 1e6:.3f}M  "
            f"compression {row.compression_ratio:.4f}x{shown.get('params', '')}")
        if row.base_latency_ms is not None:
            log(f"  latency {row.base_latency_ms:.2f} ms -> {row.pruned_latency_ms:.2f} ms  "
                f"({row.latency_speedup:.2f}x, batch {row.latency_batch_size}, {row.device}, {row.runtime} "
                f"{row.precision}){shown.get('latency', '')}")
    if row.base_perplexity is not None:  # a causal LM: lower is better
        num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        log(f"  perplexity base {num(row.base_perplexity)}  pruned {num(row.pruned_perplexity)}  "
            f"fine-tuned {num(row.final_perplexity)}")
    top1 = "next-token top-1" if row.base_perplexity is not None else "top-1  "
    log(f"  {top1} base {pct(row.base_top1)}  pruned {pct(row.pruned_top1)}  fine-tuned {pct(row.final_top1)}")
    if row.error:
        log(f"  {row.error}")
    if row.artifact_uri:
        log(f"  artifact {row.artifact_uri}" + "".join(f"\n  export   {u}" for u in json.loads(row.export_uris or "[]")))


def controls_summary(rows, log) -> None:
    """With --control: the final top-1 of the combination and of each control, and the
    differences (one seed: no interval; `progprune report` of a sweep over seeds gives them)."""
    if len(rows) < 2:
        return
    method = rows[0]
    label = {"random": "random control", "scratch": f"scratch ({method.method}'s architecture)"}
    log("")
    log(f"controls at {method.target_speedup:g}x {method.target_metric or 'macs'}, seed {method.seed}: final top-1")
    log(f"  {method.method:<36} {_pct(method.final_top1)}")
    for r in rows[1:]:
        diff = ("" if None in (r.final_top1, method.final_top1) else
                f"   {method.method} - {r.control}: {100 * (method.final_top1 - r.final_top1):+.2f} points")
        shown = _pct(r.final_top1) if r.status == "ok" else f"{r.status}: {r.error}"
        log(f"  {label[r.control]:<36} {shown}{diff}")
    log("  one seed: no confidence interval; a sweep over seeds gives one (`progprune report`)")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"
