"""Where everything lives in an output folder: the one place the names are spelled.

A sweep's output (a `Store` joins these parts onto its root, a directory or a bucket prefix):
  results.parquet            merged table (rewritten atomically, at a bounded rate)
  rows/<combo_id>.parquet    one fragment per finished combination (the source of truth)
  bases/<base_key>.pt        base models, shared by every combination that needs them
  sparse/<sparse_key>.pt     sparse-learned models, shared per (model, method, seed)
  combos/<combo_id>/         pruned.pt, final.pt (and final.onnx, ... with `export:`)
  train/ft-<combo_id>/       Ray Train run storage (checkpoints for fault tolerance)
  spec.resolved.yaml         the spec with every default filled
  report/                    report.md, plots
  .lock                      the lease of the sweep that owns this output (see storage.lease)

`progprune prune --output DIR` writes a smaller folder: pruned.pt and result.parquet (and
pruned.onnx, pruned.torchscript.pt with --export; control-random.pt, control-scratch.pt with
--control, whose rows follow the combination's in result.parquet).

These names are the on-disk format: a sweep resumes from what an earlier progprune left
only while they stay as they are. Every part is a tuple, spread into the Store's calls:
`store.exists(*LAYOUT.base(cfg))`.
"""
from __future__ import annotations


class SweepLayout:
    """The paths of a sweep's output folder, as tuples of parts under its root."""

    results = ("results.parquet",)
    spec = ("spec.resolved.yaml",)
    report = ("report",)
    rows = ("rows",)
    train = ("train",)
    lock = (".lock",)
    # what the top of an output holds, by kind: checked before any work (a directory where
    # a file goes fails only when it is written), and what marks a folder as a sweep's
    files = (results, spec, lock)
    dirs = (rows, ("bases",), ("sparse",), ("combos",), train, report)

    @staticmethod
    def row(combo_id: str) -> tuple:
        return ("rows", f"{combo_id}.parquet")

    @staticmethod
    def base(cfg) -> tuple:
        return ("bases", f"{cfg.model}-s{cfg.seed}-{cfg.base_key()}.pt")

    @staticmethod
    def sparse(cfg) -> tuple:
        return ("sparse", f"{cfg.model}-{cfg.method}-s{cfg.seed}-{cfg.sparse_key()}.pt")

    @staticmethod
    def pruned(cfg) -> tuple:
        return ("combos", cfg.combo_id(), "pruned.pt")

    @staticmethod
    def final(cfg) -> tuple:
        return ("combos", cfg.combo_id(), "final.pt")

    @staticmethod
    def train_run(combo_id: str) -> tuple:
        """A fine-tune's Ray Train run: `train/` is its storage_path, the last part its name."""
        return ("train", f"ft-{combo_id}")


# an exported model sits beside its artifact, named after it: pruned.pt -> pruned.onnx
EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def export_name(artifact_name: str, fmt: str) -> str:
    """The file an export in `fmt` of the artifact `artifact_name` is written to, beside it."""
    return artifact_name.removesuffix(".pt") + EXPORT_SUFFIX[fmt]


class PruneLayout:
    """The folder `progprune prune --output DIR` writes."""

    artifact = "pruned.pt"
    row = "result.parquet"  # the combination's row, then its controls' (--control)
    exports = tuple(export_name("pruned.pt", f) for f in EXPORT_SUFFIX)  # --export
    controls = ("control-random.pt", "control-scratch.pt")  # --control random, scratch: their models
    files = (artifact, *exports, *controls, row)  # in the order they are published: the row last

    @staticmethod
    def control(name: str) -> str:
        """The model file of control `name` (random, scratch)."""
        return f"control-{name}.pt"


LAYOUT = SweepLayout()
PRUNE_LAYOUT = PruneLayout()
