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
    achieved_speedup: float | None = None  # base / pruned in the target metric (MACs by default)
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
    latency_speedup: float | None = None  # median of the paired rounds' base / pruned ms
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
    latency_threads: int | None = None  # intra-op threads while timing (torch's; onnxruntime's session)
    latency_noisy: bool | None = None  # IQR > 25% of the median (or < 5 runs): do not trust it
    base_top1_pre_sparse: float | None = None  # sparse methods: base_top1 is after sparse learning
    pruned_top1_bn: float | None = None  # zero-shot, after BatchNorm statistics re-estimated
    reset_head: bool | None = None  # the checkpoint's classifier was re-initialised
    base_checkpoint_sha256: str | None = None  # content of the base checkpoint, if one was given
    config_json: str | None = None  # the resolved ComboConfig, so the row can be rerun
    runtime: str | None = None  # what every latency column was measured in: eager | compile | onnxruntime | tensorrt
    precision: str | None = None  # fp32 | fp16 | bf16
    export_uris: str | None = None  # JSON list of the exported files (spec `export:`), beside artifact_uri
    target_metric: str | None = None  # macs | latency | params (blank in older tables: macs)
    macs_speedup: float | None = None  # base MACs / pruned MACs, whatever the target metric
    # latency: the 95% interval of achieved_speedup as the stop rule measured it (params:
    # achieved_speedup itself; macs: blank); target_points: points measured on the way (0: macs)
    achieved_ci_low: float | None = None
    achieved_ci_high: float | None = None
    target_points: int | None = None
    # controls (README "Controls"): blank in a method's row
    control: str | None = None  # random | scratch
    architecture_of: str | None = None  # scratch: combo_id of the method row whose pruned architecture it trained
    scratch_epochs: int | None = None  # scratch: epochs trained from the re-initialised architecture
    scratch_seconds: float | None = None
    # tasks (progprune.tasks): blank in older tables: image_classification
    task: str | None = None  # image_classification | causal_lm
    # causal LMs: exp(mean next-token loss) on the test split; top-1/top-5 columns are next-token
    base_perplexity: float | None = None
    pruned_perplexity: float | None = None  # before fine-tuning
    final_perplexity: float | None = None
    pruned_shape: str | None = None  # causal LMs: JSON of the config's widths after pruning


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


# The table's version, in its Parquet metadata. What each version changed, so that `upgrade`
# reads every earlier table (results tables are kept for years):
#   1 (no version key): started_at/finished_at are ISO strings
#   2: they are UTC timestamps
# A column added without a version change reads as blank in older tables, or is derived
# from the columns it is computed from (DERIVED). Bump the version when a column changes
# meaning or type, and say here how the older one is read.
SCHEMA_VERSION = "2"
VERSION_KEY = b"progprune.schema_version"
_TIMESTAMP = pa.timestamp("s", tz="UTC")
_TIMES = ("started_at", "finished_at")
SCHEMA = pa.schema(
    [pa.field(f.name, _TIMESTAMP if f.name in _TIMES else _arrow_type(f.type)) for f in fields(ResultRow)],
    metadata={VERSION_KEY.decode(): SCHEMA_VERSION},
)
COLUMNS = tuple(SCHEMA.names)
# column -> (the columns it is computed from, how), as the pipeline computes it: what an older
# table lacks but its other columns state
DERIVED = {
    "compression_ratio": (("base_params", "pruned_params"), lambda base, pruned: base / pruned),
    "macs_speedup": (("base_macs", "pruned_macs"), lambda base, pruned: base / pruned),
    "latency_speedup": (("base_latency_ms", "pruned_latency_ms"), lambda base, pruned: base / pruned),
    "overshoot_pct": (("achieved_speedup", "target_speedup"), lambda got, target: (got / target - 1) * 100),
}


def schema_version(table: pa.Table) -> str:
    """The schema version a table was written with ("1": before tables carried one)."""
    return ((table.schema.metadata or {}).get(VERSION_KEY) or b"1").decode(errors="replace")


@dataclass
class Upgraded:
    table: pa.Table  # with this version's SCHEMA
    version: str  # the version it was written with
    derived: list[str]  # columns it lacked, computed from its other columns
    missing: list[str]  # columns it lacked that nothing states: blank


def upgrade(table: pa.Table, source: str) -> Upgraded:
    """A results table of this or any earlier schema version, as this version's: columns it
    lacks derived (DERIVED) or blank, columns this version does not know dropped. A table of
    a newer version is refused (BadInput, naming both versions): its columns may mean what
    this version cannot know."""
    from progprune.errors import BadInput

    version = schema_version(table)
    if not (version.isdigit() and int(version) <= int(SCHEMA_VERSION)):
        raise BadInput(f"{source} is a results table of schema version {version}; this progprune "
                       f"reads versions 1 to {SCHEMA_VERSION}: use a newer progprune")
    have, n = set(table.column_names), table.num_rows
    derived, missing, arrays = [], [], []
    for field in SCHEMA:
        name = field.name
        if name in have:
            col = table[name]
            if name in _TIMES and not pa.types.is_timestamp(col.type):  # version 1: ISO text
                col = pa.array([_utc(v) for v in col.to_pylist()], type=field.type)
        elif name in DERIVED and set(DERIVED[name][0]) <= have:
            args = [table[c].to_pylist() for c in DERIVED[name][0]]
            col = pa.array([DERIVED[name][1](*v) if None not in v and v[-1] else None
                            for v in zip(*args)], type=field.type)
            derived.append(name)
        else:
            col = pa.nulls(n, field.type)
            missing.append(name)
        try:
            arrays.append(col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
            raise BadInput(f"{source}: column {name} is {col.type}, not {field.type}: not a "
                           "progprune results table") from None
    return Upgraded(pa.Table.from_arrays(arrays, schema=SCHEMA), version, derived, missing)


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
