"""The nulls a pass over Parquet files must count (``on_null``), computed from the files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def nulls_in(files: list[Path], columns: list[str]) -> dict[str, int]:
    """Per column, its null values; a list column's null lists plus its null elements."""
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    counts = {}
    for name in columns:
        column = table[name]
        counts[name] = column.null_count
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            counts[name] += pc.sum(pc.is_null(pc.list_flatten(column))).as_py() or 0
    return counts
