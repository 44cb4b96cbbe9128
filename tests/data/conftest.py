"""Shared helpers of the data tests: a test config, Parquet writers, a peak-memory probe."""

from __future__ import annotations

import gc
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from towerrec.data.config import DataConfig

USERS, ITEMS, MAX_ROWS = 50, 100, 1_000_000


def make_data_config(**changes: Any) -> DataConfig:
    """row_id (unique per row, to prove exactly-once reading), user_id, a multi-hot history."""
    raw: dict[str, Any] = {
        "train": "unused",
        "eval": "unused",
        "tables": [
            {"name": "rows", "num_embeddings": MAX_ROWS, "embedding_dim": 4},
            {"name": "user", "num_embeddings": USERS, "embedding_dim": 4},
            {"name": "item", "num_embeddings": ITEMS, "embedding_dim": 4},
        ],
        "sparse_features": [
            {"name": "row_id", "table": "rows"},
            {"name": "user_id", "table": "user"},
            {"name": "history", "table": "item", "multi_hot": True},
        ],
        "dense_features": ["price", "age"],
        "tasks": [
            {"name": "click", "label": "click"},
            {"name": "conversion", "label": "conversion", "sample_space": "click"},
        ],
    }
    raw.update(changes)
    return DataConfig.model_validate(raw)


def make_table(start: int, n: int, seed: int = 0, alt_types: bool = False) -> pa.Table:
    """Rows ``start .. start+n`` of the test schema; histories include empty lists.

    ``alt_types`` stores the same kind of values with other accepted types (int32 ids,
    large_list<int16>, float64 and int dense, bool and float labels).
    """
    rng = np.random.default_rng([seed, start])
    lengths = rng.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(0, ITEMS, int(offsets[-1]))
    click = rng.integers(0, 2, n)
    conversion = click & rng.integers(0, 2, n)
    price = rng.normal(size=n)
    age = rng.integers(18, 80, n)
    if alt_types:
        history = pa.LargeListArray.from_arrays(offsets.astype(np.int64), pa.array(items.astype(np.int16)))
        columns = {
            "row_id": pa.array(np.arange(start, start + n), pa.uint32()),
            "user_id": pa.array(rng.integers(0, USERS, n).astype(np.int32)),
            "history": history,
            "price": pa.array(price, pa.float64()),
            "age": pa.array(age, pa.int64()),
            "click": pa.array(click.astype(bool)),
            "conversion": pa.array(conversion.astype(np.float64)),
        }
    else:
        columns = {
            "row_id": pa.array(np.arange(start, start + n)),
            "user_id": pa.array(rng.integers(0, USERS, n)),
            "history": pa.ListArray.from_arrays(offsets.astype(np.int32), pa.array(items)),
            "price": pa.array(price.astype(np.float32)),
            "age": pa.array(age.astype(np.int32)),
            "click": pa.array(click.astype(np.int8)),
            "conversion": pa.array(conversion.astype(np.int8)),
        }
    columns["unused"] = pa.array(rng.normal(size=n))  # never read: not in the config
    return pa.table(columns)


def write_files(
    directory: Path, sizes: list[int], row_group_rows: int, alt_every: int = 0
) -> tuple[list[str], int]:
    """Files of the given (uneven) sizes with consecutive row ids; returns (sorted paths, rows)."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        table = make_table(start, n, alt_types=bool(alt_every) and i % alt_every == alt_every - 1)
        path = directory / f"part-{i:03d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_rows)
        paths.append(str(path))
        start += n
    return paths, start


@pytest.fixture
def uneven_files(tmp_path: Path) -> tuple[list[str], int]:
    """Five files (one empty), 16-row row groups, partial last groups, mixed column types."""
    return write_files(tmp_path, [37, 0, 101, 64, 5], row_group_rows=16, alt_every=2)


_POOLS: list[pa.MemoryPool] = []  # kept alive: Arrow objects made under a probe may outlive it


@contextmanager
def peak_memory() -> Iterator[dict[str, int]]:
    """Peak bytes allocated inside the block: ``arrow`` (Arrow pool) and ``python`` (tracemalloc,
    which sees numpy arrays). Both start at zero for the block."""
    gc.collect()
    base = pa.default_memory_pool()
    proxy = pa.proxy_memory_pool(base)
    _POOLS.append(proxy)
    pa.set_memory_pool(proxy)
    tracemalloc.start()
    peaks: dict[str, int] = {}
    try:
        yield peaks
    finally:
        peaks["python"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks["arrow"] = proxy.max_memory()
        gc.collect()
        pa.set_memory_pool(base)


@pytest.fixture
def data_config():
    """``make_data_config`` (fixtures, so test modules need no import of this conftest)."""
    return make_data_config


@pytest.fixture
def table():
    return make_table


@pytest.fixture
def files():
    return write_files


@pytest.fixture
def memory_probe():
    return peak_memory
