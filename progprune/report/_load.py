"""Find and read a results table: a local file, a sweep directory or a pyarrow URI."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from progprune.errors import ProgpruneError
from progprune.results import COLUMNS

RESULTS_NAME = "results.parquet"

# What the report cannot be made without. The rest of the contract is optional here, so a
# table written by an older progprune (fewer columns) still gets a report, with blanks.
REQUIRED = (
    "model", "dataset", "method", "seed", "target_speedup", "achieved_speedup", "status",
    "error", "base_params", "pruned_params", "base_top1", "pruned_top1", "final_top1",
    "latency_speedup",
)


@dataclass(frozen=True)
class Source:
    display: str  # what the user passed, for messages and the report
    local_path: str | None  # set when the table is on this machine
    frame: pd.DataFrame


def load(results: str) -> Source:
    """Read `results` or raise ProgpruneError with one line saying what is wrong."""
    results = os.fspath(results)
    if "://" in results:
        fs, path = _from_uri(results)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(results)
    path = _locate(fs, path, results)
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ProgpruneError(f"not a Parquet file: {results} ({_one_line(e)})") from None
    except OSError as e:
        raise ProgpruneError(f"cannot read {results}: {_one_line(e)}") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ProgpruneError(
            f"not a progprune results table: {results} lacks required columns "
            f"{', '.join(missing)}"
        )
    frame = table.to_pandas()
    for c in COLUMNS:  # optional columns absent from older tables: present, all missing
        if c not in frame.columns:
            frame[c] = None
    local = path if isinstance(fs, pafs.LocalFileSystem) else None
    return Source(display=results, local_path=local, frame=frame)


def _from_uri(uri: str):
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise ProgpruneError(f"cannot open URI {uri}: {_one_line(e)}") from None


def _locate(fs, path: str, shown: str) -> str:
    """A directory means the sweep output dir: its results.parquet is the table."""
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            path = path.rstrip("/") + "/" + RESULTS_NAME
            if fs.get_file_info(path).type != pafs.FileType.File:
                raise ProgpruneError(f"no {RESULTS_NAME} in directory {shown}")
        elif info.type == pafs.FileType.NotFound:
            raise ProgpruneError(f"results not found: {shown}")
    except OSError as e:
        raise ProgpruneError(f"cannot access {shown}: {_one_line(e)}") from None
    return path


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
