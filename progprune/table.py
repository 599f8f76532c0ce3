"""The merged results table, kept in memory and written at a bounded rate.

`rows/<combo_id>.parquet` fragments stay the source of truth. A sweep reads the fragments
of its combinations once (`load`, one pyarrow dataset scan), adds each finished row in
memory (`add`), and rewrites `results.parquet` at most once every `min_interval_s`
(`flush`), plus once at the end (`flush(force=True)`). So a sweep of N combinations reads N
fragments once, not N^2 times, and writes the table O(duration / interval) times.
"""
from __future__ import annotations

import os
import tempfile
import time

import pyarrow as pa
import pyarrow.dataset as pads

from progprune._env import env_seconds
from progprune.results import SCHEMA, ResultRow, read_rows, rows_from_records, write_rows
from progprune.storage import LAYOUT, Store

INTERVAL_ENV = "PROGPRUNE_RESULTS_INTERVAL_S"
DEFAULT_INTERVAL_S = 10.0
# what a fragment of another shape or a torn write raises when read (pyarrow's, the row's own)
_UNREADABLE = (OSError, ValueError, TypeError, pa.ArrowException)


def interval_seconds() -> float:
    """The least time between two rewrites of results.parquet: $PROGPRUNE_RESULTS_INTERVAL_S,
    else 10 s."""
    return env_seconds(INTERVAL_ENV, DEFAULT_INTERVAL_S, allow_zero=True)


class ResultsTable:
    """The rows of one sweep's combinations (`combo_ids`, in that order) and the
    results.parquet they are written to."""

    def __init__(self, store: Store, combo_ids, min_interval_s: float | None = None):
        self.store = store
        self.ids = list(dict.fromkeys(combo_ids))
        self._known = set(self.ids)
        self.min_interval_s = interval_seconds() if min_interval_s is None else float(min_interval_s)
        self._rows: dict[str, ResultRow] = {}
        self.unreadable: list[str] = []  # combo ids whose fragment exists but cannot be read
        self.writes = 0  # how many times results.parquet was written
        self.fragments_read = 0
        self._dirty = False
        self._last_write: float | None = None

    # ---- reading --------------------------------------------------------------------------
    def load(self) -> list[ResultRow]:
        """Read the existing fragments of these combinations, once. An unreadable fragment
        is left out (and listed in `unreadable`): its combination is simply run again."""
        present = set(self.store.list(*LAYOUT.rows))
        wanted = [cid for cid in self.ids if LAYOUT.row(cid)[-1] in present]
        rows = self._scan(wanted)
        self._rows = {r.combo_id: r for r in rows if r.combo_id in self._known}
        self._dirty = True  # the table on disk may lag the fragments (a driver killed before a flush)
        return self.rows()

    def _scan(self, ids: list[str]) -> list[ResultRow]:
        if not ids:
            return []
        paths = [self.store.path(*LAYOUT.row(cid)) for cid in ids]
        try:  # one dataset over all fragments: parallel reads, missing columns as nulls
            table = pads.dataset(paths, schema=SCHEMA, format="parquet", filesystem=self.store.fs).to_table()
            self.fragments_read += len(paths)
            return rows_from_records(table.to_pylist())
        except _UNREADABLE:  # some fragment is corrupt or of another shape: read them one by one
            pass
        out = []
        for cid in ids:
            self.fragments_read += 1
            try:
                with self.store.local_copy(*LAYOUT.row(cid)) as p:
                    out.extend(read_rows(p))
            except _UNREADABLE:
                self.unreadable.append(cid)
        return out

    def rows(self) -> list[ResultRow]:
        return [self._rows[cid] for cid in self.ids if cid in self._rows]

    def statuses(self) -> dict[str, str]:
        """combo_id -> status of the rows held (what a plan needs to skip finished work)."""
        return {cid: r.status for cid, r in self._rows.items()}

    def __len__(self) -> int:
        return len(self._rows)

    # ---- writing --------------------------------------------------------------------------
    def add(self, row: ResultRow) -> None:
        """Take a finished row (its fragment is already written); replaces an older one."""
        if row.combo_id not in self._known:
            raise ValueError(f"combination {row.combo_id} is not part of this table")
        self._rows[row.combo_id] = row
        self._dirty = True

    def due(self) -> bool:
        return self._dirty and (self._last_write is None
                                or time.monotonic() - self._last_write >= self.min_interval_s)

    def flush(self, force: bool = False) -> list[ResultRow]:
        """Rewrite results.parquet (atomically) when rows changed and the last write is at
        least `min_interval_s` old, or when forced and anything changed. Returns the rows."""
        rows = self.rows()
        if self._dirty and (force or self.due()):
            self._write(rows)
        return rows

    def _write(self, rows: list[ResultRow]) -> None:
        if self.store.local:
            write_rows(rows, self.store.path(*LAYOUT.results))
        else:
            with tempfile.TemporaryDirectory(prefix="progprune-") as d:
                local = write_rows(rows, os.path.join(d, LAYOUT.results[-1]))
                self.store.put_file(local, *LAYOUT.results)
        self.writes += 1
        self._dirty = False
        self._last_write = time.monotonic()
