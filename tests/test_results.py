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
