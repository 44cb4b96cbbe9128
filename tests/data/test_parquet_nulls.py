"""The nulls replaced (``on_null``) per feature reach the consumer's process: in-process and from
DataLoader workers, one count per feature per pass that adds up over the ranks to the files'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nulls_utils import nulls_in
from towerrec.data.config import DataConfig
from towerrec.data.parquet import ParquetDataset, make_dataloader

B = 16


def null_table(n: int, seed: int) -> pa.Table:
    """Strings, a list of strings and a dense column with nulls; integer ids without."""
    rng = np.random.default_rng(seed)
    words = np.array(["a", "b", "c", ""], dtype=object)
    sizes = rng.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    elements = pa.array(words[rng.integers(0, 4, offsets[-1])], mask=rng.random(offsets[-1]) < 0.1)
    return pa.table(
        {
            "city": pa.array(words[rng.integers(0, 4, n)], mask=rng.random(n) < 0.1),
            "user": pa.array(words[rng.integers(0, 4, n)], mask=rng.random(n) < 0.2),
            "tags": pa.ListArray.from_arrays(pa.array(offsets), elements, mask=pa.array(rng.random(n) < 0.1)),
            "item_id": pa.array(rng.integers(0, 10, n)),
            "gain": pa.array(rng.normal(size=n), mask=rng.random(n) < 0.15),
            "click": pa.array(rng.integers(0, 2, n)),
        }
    )


def expected_nulls(files: list[Path]) -> dict[str, int]:
    """What every rank's passes add up to, from the files."""
    return nulls_in(files, ["city", "user", "tags", "gain"])


def null_config(**changes) -> DataConfig:
    raw = {
        "train": "unused",
        "eval": "unused",
        "tables": [
            {"name": t, "num_embeddings": 10, "embedding_dim": 4} for t in ("city", "user", "tag", "item")
        ],
        "sparse_features": [
            {"name": "city", "table": "city", "id_mode": "hash", "on_null": "empty"},
            {"name": "item_id", "table": "item"},
            {"name": "user", "table": "user", "id_mode": "hash", "on_null": "default"},
            {"name": "tags", "table": "tag", "multi_hot": True, "id_mode": "hash", "on_null": "empty"},
        ],
        "dense_features": [{"name": "gain", "on_null": "default", "default": -1.0}],
        "tasks": [{"name": "click", "label": "click"}],
    }
    raw.update(changes)
    return DataConfig.model_validate(raw)


@pytest.fixture(scope="module")
def null_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("nulls")
    files = [root / "a.parquet", root / "b.parquet"]
    for i, (path, n) in enumerate(zip(files, (300, 217), strict=True)):
        pq.write_table(null_table(n, seed=i), path, row_group_size=64)
    return files


def test_config_order_and_no_features_without_on_null(null_files: list[Path]) -> None:
    ds = ParquetDataset([str(f) for f in null_files], null_config(), B)
    assert ds.null_features() == ["city", "user", "tags", "gain"]
    assert ds.nulls_replaced() == dict.fromkeys(ds.null_features(), 0)  # before any pass
    integer_ids = null_config(
        tables=[{"name": "item", "num_embeddings": 10, "embedding_dim": 4}],
        sparse_features=[{"name": "item_id", "table": "item"}],
        dense_features=[],
    )
    plain = ParquetDataset([str(f) for f in null_files], integer_ids, B)
    list(plain)
    assert plain.null_features() == [] and plain.nulls_replaced() == {}


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_counts_of_every_rank_add_up_to_the_files(null_files: list[Path], num_workers: int) -> None:
    expected = expected_nulls(null_files)
    assert min(expected.values()) > 0
    world, total = 2, dict.fromkeys(expected, 0)
    for rank in range(world):
        ds = ParquetDataset(
            [str(f) for f in null_files], null_config(), B, rank, world, shuffle_buffer=40, read_rows=50
        )
        for epoch in range(2):  # each pass counts afresh
            ds.set_epoch(epoch)
            batches = make_dataloader(ds, num_workers)
            assert sum(b.real_rows for b in batches) == ds.rank_rows()[1] - ds.rank_rows()[0]
            counts = ds.nulls_replaced()
            assert list(counts) == ["city", "user", "tags", "gain"]
            if epoch == 0:
                first = counts
            assert counts == first  # the same rows: the same counts, not twice as many
        for name, n in counts.items():
            total[name] += n
    assert total == expected


def test_direct_iteration_and_a_permuted_copy_count_their_own_pass(null_files: list[Path]) -> None:
    files = [str(f) for f in null_files]
    ds = ParquetDataset(files, null_config(), B)
    list(ds)
    assert ds.nulls_replaced() == expected_nulls(null_files)
    permuted = ds.with_permutation("city")
    partial = iter(permuted)
    next(partial)  # a pass of the copy: the original's counts stay those of its own pass
    assert ds.nulls_replaced() == expected_nulls(null_files)
    partial.close()
