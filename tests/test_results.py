"""The result row: its Parquet columns are the contract (names, order, types), pinned here
as they were before the stages returned their own columns."""
from __future__ import annotations

from progprune.results import COLUMNS, SCHEMA, ResultRow, read_rows, write_rows

EXPECTED = [
    ("combo_id", "string"), ("sweep", "string"), ("model", "string"), ("dataset", "string"),
    ("method", "string"), ("seed", "int64"), ("target_speedup", "double"),
    ("achieved_speedup", "double"), ("status", "string"), ("error", "string"),
    ("base_macs", "int64"), ("base_params", "int64"), ("pruned_macs", "int64"),
    ("pruned_params", "int64"), ("prune_steps", "int64"), ("prune_seconds", "double"),
    ("base_top1", "double"), ("pruned_top1", "double"), ("final_top1", "double"),
    ("base_top5", "double"), ("final_top5", "double"), ("base_latency_ms", "double"),
    ("pruned_latency_ms", "double"), ("latency_speedup", "double"), ("device", "string"),
    ("finetune_epochs", "int64"), ("finetune_seconds", "double"), ("artifact_uri", "string"),
    ("torch_version", "string"), ("torch_pruning_version", "string"), ("ray_version", "string"),
    ("progprune_version", "string"), ("started_at", "timestamp[s, tz=UTC]"),
    ("finished_at", "timestamp[s, tz=UTC]"), ("global_pruning", "bool"),
    ("iterative_steps", "int64"), ("round_to", "int64"), ("overshoot_pct", "double"),
    ("crossing", "string"), ("crossing_cut", "string"), ("macs_counter", "string"),
    ("sparse_reg", "double"), ("compression_ratio", "double"), ("num_classes", "int64"),
    ("base_epochs", "int64"), ("sparse_epochs", "int64"), ("latency_batch_size", "int64"),
    ("finetune_workers", "int64"), ("finetune_global_batch", "int64"),
    ("finetune_resumed_from_epoch", "int64"), ("base_latency_iqr_ms", "double"),
    ("pruned_latency_iqr_ms", "double"), ("latency_threads", "int64"), ("latency_noisy", "bool"),
    ("base_top1_pre_sparse", "double"), ("pruned_top1_bn", "double"), ("reset_head", "bool"),
    ("base_checkpoint_sha256", "string"), ("config_json", "string"),
    ("runtime", "string"), ("precision", "string"), ("export_uris", "string"),
    # issue 20: the target's metric, and MACs beside it
    ("target_metric", "string"), ("macs_speedup", "double"), ("achieved_ci_low", "double"),
    ("achieved_ci_high", "double"), ("target_points", "int64"),
    ("control", "string"), ("architecture_of", "string"), ("scratch_epochs", "int64"), ("scratch_seconds", "double"),
    ("task", "string"), ("base_perplexity", "double"), ("pruned_perplexity", "double"),
    ("final_perplexity", "double"), ("pruned_shape", "string"),
]


def test_columns_names_order_and_types_are_pinned():
    assert [(f.name, str(f.type)) for f in SCHEMA] == EXPECTED
    assert COLUMNS == tuple(name for name, _ in EXPECTED)
    assert SCHEMA.metadata == {b"progprune.schema_version": b"2"}


def test_a_row_round_trips_through_parquet(tmp_path):
    row = ResultRow(combo_id="c", sweep="s", model="m", dataset="d", method="l1", seed=0,
                    target_speedup=2.0, status="ok", base_macs=10, latency_noisy=False,
                    started_at="2024-01-01T00:00:00+00:00")
    (back,) = read_rows(write_rows([row], tmp_path / "r.parquet"))
    assert back == row


def test_compose_lays_records_in_stage_order_and_refuses_unknown_columns():
    import pytest

    from progprune.results import compose

    class Stage:
        def columns(self):
            return {"status": "ok", "base_top1": 0.5}

    row = compose({"combo_id": "c", "sweep": "s", "model": "m", "dataset": "d", "method": "l1",
                   "seed": 0, "target_speedup": 2.0}, None, Stage(), {"base_top1": 0.6}, final_top1=0.7)
    assert (row.status, row.base_top1, row.final_top1, row.error) == ("ok", 0.6, 0.7, None)
    with pytest.raises(TypeError):
        compose({"combo_id": "c", "not_a_column": 1})


def test_a_combinations_row_is_its_stages_columns():
    """The records of a sparse method's combination, composed: the base a sparse method
    pruned is the sparse-learned one (the trained base moves to base_top1_pre_sparse),
    Ray Train's artifact and workers win over the pruned model's, a diverged fine-tune
    keeps what ran before it and no artifact."""
    from progprune.pipeline import BaseInfo, Finetuned, Pruned, build_row
    from progprune.tasks.image import PruneInfo
    from progprune.pruning import PruneOutcome
    from progprune.spec import load_spec_dict

    (cfg,) = load_spec_dict({"name": "r", "models": ["resnet20"], "speedups": [2.0], "methods": ["slim"],
                             "dataset": {"name": "synthetic", "num_classes": 10},
                             "sparse_learning": {"epochs": 2}}).combinations()
    o = PruneOutcome("ok", 2.0, 40_000_000, 270_000, 19_900_000, 120_000, 7, 2.25, crossing="fine",
                     max_pruning_ratio=1.0, crossing_cut="prefix")
    prune = PruneInfo(o, 0.3, 0.6, 2.0, 1.25, 0.1, 0.05, 4, False, 0.5, unpruned_top1=(0.6, 0.85))
    pruned = Pruned(BaseInfo("trained", 0.8, 0.95, 0.79, 3, 1.5), prune, "cpu", 10, "2024-01-01T00:00:00+00:00",
                    "s3://b/pruned.pt")
    row = build_row(cfg, pruned, Finetuned(0.7, 0.9, 12.5, "s3://b/final.pt", 2, 1))
    assert (row.status, row.error, row.method, row.sparse_epochs) == ("ok", None, "slim", 2)
    assert (row.base_top1, row.base_top5, row.base_top1_pre_sparse) == (0.6, 0.85, 0.8)
    assert (row.pruned_macs, row.compression_ratio, row.latency_speedup) == (19_900_000, 270_000 / 120_000, 1.6)
    assert (row.artifact_uri, row.finetune_workers, row.finetune_resumed_from_epoch) == ("s3://b/final.pt", 2, 1)
    assert (row.final_top1, row.device, row.crossing, row.num_classes) == (0.7, "cpu", "fine", 10)
    failed = build_row(cfg, Pruned(pruned.base, prune, "cpu", 10, pruned.started_at), error="fine-tune diverged")
    assert (failed.status, failed.error, failed.artifact_uri, failed.final_top1) == (
        "failed", "fine-tune diverged", None, None)
    assert (failed.pruned_top1, failed.finetune_workers) == (0.3, 0)


# ---- older and newer tables (issue 23 item 31) ------------------------------------------------
def _old_table(path, rows, drop=("compression_ratio",), version=b"1"):
    """A real Parquet file as an earlier progprune wrote it: without the columns added since,
    started_at as ISO text (version 1), and that version in its metadata (none for 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from progprune.results import rows_to_table

    t = rows_to_table(rows)
    t = t.drop_columns(list(drop))
    if version == b"1":
        t = t.set_column(t.column_names.index("started_at"), "started_at",
                         pa.array([r.started_at for r in rows], pa.string()))
        t = t.replace_schema_metadata(None)
    else:
        t = t.replace_schema_metadata({b"progprune.schema_version": version})
    pq.write_table(t, path)
    return path


def _row(**kw):
    base = dict(combo_id="c", sweep="s", model="resnet20", dataset="digits", method="l1", seed=0,
                target_speedup=2.0, achieved_speedup=2.01, status="ok", base_params=1000,
                pruned_params=400, base_latency_ms=4.0, pruned_latency_ms=2.5,
                started_at="2024-01-01T00:00:00+00:00")
    return ResultRow(**(base | kw))


def test_an_older_table_reads_as_this_version(tmp_path):
    import pyarrow.parquet as pq

    from progprune.results import upgrade

    rows = [_row(), _row(combo_id="d", pruned_params=None, status="failed")]
    path = _old_table(tmp_path / "old.parquet", rows,
                      drop=("compression_ratio", "latency_speedup", "overshoot_pct", "pruned_top1_bn"))
    up = upgrade(pq.read_table(path), str(path))
    assert up.version == "1" and up.table.schema == SCHEMA
    assert up.derived == ["latency_speedup", "overshoot_pct", "compression_ratio"]
    assert up.missing == ["pruned_top1_bn"]
    got = up.table.to_pylist()
    assert got[0]["compression_ratio"] == 1000 / 400 and got[1]["compression_ratio"] is None
    assert got[0]["latency_speedup"] == 4.0 / 2.5
    assert abs(got[0]["overshoot_pct"] - 0.5) < 1e-9 and got[0]["pruned_top1_bn"] is None
    assert got[0]["started_at"].isoformat() == "2024-01-01T00:00:00+00:00"


def test_a_newer_table_is_refused_naming_both_versions(tmp_path):
    import pyarrow.parquet as pq
    import pytest

    from progprune.errors import BadInput
    from progprune.results import upgrade

    path = _old_table(tmp_path / "new.parquet", [_row()], drop=(), version=b"3")
    with pytest.raises(BadInput) as e:
        upgrade(pq.read_table(path), "new.parquet")
    assert str(e.value) == ("new.parquet is a results table of schema version 3; this progprune "
                            "reads versions 1 to 2: use a newer progprune")
