"""A sweep's output: the `Store` (a local directory or an s3:// / gs:// URI, through
pyarrow.fs), the `LAYOUT` of what goes where in it, and the lease that lets one sweep at a
time write it.

    store = Store("s3://bucket/sweep1")
    with store.lock() as lease:
        store.write_bytes(data, *LAYOUT.spec)
"""
from progprune.storage.layout import LAYOUT, PRUNE_LAYOUT, PruneLayout, SweepLayout
from progprune.storage.lease import (DEFAULT_LEASE_S, DEFAULT_SETTLE_S, LEASE_ENV, LOCK_NAME, MAX_LEASE_S, SETTLE_ENV,
                                     Lease, heartbeat_interval, lease_seconds, settle_seconds)
from progprune.storage.store import CHUNK, Store, probe_stuck, redact

# the names the output's parts had before the layout object; kept for the modules that use them
base_parts, sparse_parts, row_parts = LAYOUT.base, LAYOUT.sparse, LAYOUT.row

__all__ = ["Store", "LAYOUT", "PRUNE_LAYOUT", "SweepLayout", "PruneLayout", "Lease", "LOCK_NAME",
           "LEASE_ENV", "DEFAULT_LEASE_S", "MAX_LEASE_S", "SETTLE_ENV", "DEFAULT_SETTLE_S", "CHUNK", "heartbeat_interval",
           "lease_seconds", "settle_seconds", "probe_stuck", "redact", "base_parts", "sparse_parts", "row_parts"]
