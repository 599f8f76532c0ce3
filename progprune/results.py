"""The result row (the column names are the contract) and the one Parquet writer.

A row is composed, not filled in: each stage's record says which columns it measured
(`columns()`, a dict keyed by column name), and `compose` lays them over one another in
the order the stages ran."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from dataclasses import dataclass, fields

import pyarrow as pa
import pyarrow.parquet as pq

from progprune._atomic import atomic_path

STATUSES = ("ok", "unreachable", "failed")


@dataclass
class ResultRow:
    combo_id: str
    sweep: str
    model: str
    dataset: str
    method: str
    seed: int
    target_speedup: float
    achieved_speedup: float | None = None  # base MACs / pruned MACs
    status: str = "failed"  # ok | unreachable | failed
    error: str | None = None
    base_macs: int | None = None
    base_params: int | None = None
    pruned_macs: int | None = None
    pruned_params: int | None = None
    prune_steps: int | None = None
    prune_seconds: float | None = None
    base_top1: float | None = None
    pruned_top1: float | None = None  # before fine-tuning
    final_top1: float | None = None
    base_top5: float | None = None
    final_top5: float | None = None
    base_latency_ms: float | None = None
    pruned_latency_ms: float | None = None
    latency_speedup: float | None = None
    device: str | None = None
    finetune_epochs: int | None = None
    finetune_seconds: float | None = None
    artifact_uri: str | None = None
    torch_version: str | None = None
    torch_pruning_version: str | None = None
    ray_version: str | None = None
    progprune_version: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    # beyond the contract
    global_pruning: bool | None = None
    iterative_steps: int | None = None
    round_to: int | None = None
    overshoot_pct: float | None = None  # (achieved / target - 1) * 100
    crossing: str | None = None  # pruning.crossing: fine | reference
    crossing_cut: str | None = None  # how the last step was cut: none | whole | prefix | subset
    macs_counter: str | None = None  # counted between steps by: fast (layer widths) | torch_pruning
    sparse_reg: float | None = None  # the regularisation sparse learning used (method recipe or spec)
    compression_ratio: float | None = None  # base params / pruned params
    num_classes: int | None = None
    base_epochs: int | None = None
    sparse_epochs: int | None = None
    latency_batch_size: int | None = None
    finetune_workers: int | None = None
    finetune_global_batch: int | None = None  # split across the Train workers, recipe unchanged
    finetune_resumed_from_epoch: int | None = None  # Ray Train restarted from this checkpoint
    base_latency_iqr_ms: float | None = None  # spread (interquartile range) of the timed runs
    pruned_latency_iqr_ms: float | None = None
    latency_threads: int | None = None  # torch CPU threads while timing
    latency_noisy: bool | None = None  # IQR > 25% of the median (or < 5 runs): do not trust it
    base_top1_pre_sparse: float | None = None  # sparse methods: base_top1 is after sparse learning
    pruned_top1_bn: float | None = None  # zero-shot, after BatchNorm statistics re-estimated
    reset_head: bool | None = None  # the checkpoint's classifier was re-initialised
    base_checkpoint_sha256: str | None = None  # content of the base checkpoint, if one was given
    config_json: str | None = None  # the resolved ComboConfig, so the row can be rerun


def compose(*records, **columns) -> ResultRow:
    """A row from the records of what ran, in order: each a dict of columns or an object
    whose `columns()` gives one (None: did not run); a later record's column replaces an
    earlier one's, then `columns`. A name that is not a column is an error (TypeError)."""
    merged: dict = {}
    for rec in records:
        if rec is not None:
            merged.update(rec if isinstance(rec, dict) else rec.columns())
    return ResultRow(**(merged | columns))


_ARROW_TYPES = {
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    bool: pa.bool_(),
}


def _arrow_type(annotation: str) -> pa.DataType:
    base = annotation.split("|")[0].strip()
    return _ARROW_TYPES[{"int": int, "float": float, "str": str, "bool": bool}[base]]


SCHEMA_VERSION = "2"  # 2: started_at/finished_at are UTC timestamps (were ISO strings)
_TIMESTAMP = pa.timestamp("s", tz="UTC")
_TIMES = ("started_at", "finished_at")
SCHEMA = pa.schema(
    [pa.field(f.name, _TIMESTAMP if f.name in _TIMES else _arrow_type(f.type)) for f in fields(ResultRow)],
    metadata={"progprune.schema_version": SCHEMA_VERSION},
)
COLUMNS = tuple(SCHEMA.names)


def _utc(v):
    """ISO text (rows carry it) or a datetime (older/newer tables) -> an aware UTC datetime."""
    if v is None or isinstance(v, _dt.datetime):
        return v if v is None or v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)
    t = _dt.datetime.fromisoformat(str(v))
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def rows_to_table(rows) -> pa.Table:
    dicts = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]
    cols = {name: [_utc(d.get(name)) if name in _TIMES else d.get(name) for d in dicts]
            for name in COLUMNS}
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def write_rows(rows, path: str | os.PathLike) -> str:
    """Write rows to a local Parquet file atomically (temp file in the same dir + rename)."""
    path = os.fspath(path)
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(rows_to_table(rows), tmp)
    return path


def read_rows(path) -> list[ResultRow]:
    return rows_from_records(pq.read_table(path).to_pylist())


def rows_from_records(records) -> list[ResultRow]:
    """Parquet records -> rows; columns this version does not know are dropped."""
    known = {f.name for f in fields(ResultRow)}
    rows = [ResultRow(**{k: v for k, v in rec.items() if k in known}) for rec in records]
    for r in rows:  # rows carry ISO text, whichever way the file stored it
        for name in _TIMES:
            if getattr(r, name) is not None:
                setattr(r, name, _utc(getattr(r, name)).isoformat(timespec="seconds"))
    return rows
