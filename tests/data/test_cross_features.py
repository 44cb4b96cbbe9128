"""Hashed cross ids (data.cross) and permuted features (permutation importance) in the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from towerrec.data.hashing import cross_ids, hash_pairs
from towerrec.data.parquet import ParquetDataset, make_dataloader

CROSS_TABLES = [
    {"name": "rows", "num_embeddings": 1_000_000, "embedding_dim": 4},
    {"name": "user", "num_embeddings": 50, "embedding_dim": 4},
    {"name": "item", "num_embeddings": 100, "embedding_dim": 4},
    {"name": "codebook", "num_embeddings": 977, "embedding_dim": 4},
]


def cross_config(data_config, fields=("row_id", "user_id"), num_hashes=2):
    return data_config(
        tables=CROSS_TABLES, cross={"table": "codebook", "fields": list(fields), "num_hashes": num_hashes}
    )


def by_row(batches, key: str) -> dict[int, list[int]]:
    """row_id -> the ids of ``key`` in that row, over real rows of all batches."""
    out: dict[int, list[int]] = {}
    for batch in batches:
        rows = batch.sparse["row_id"].values().tolist()
        jagged = batch.sparse[key]
        offsets = jagged.offsets().tolist()
        for r, row in enumerate(rows):
            out[row] = jagged.values()[offsets[r] : offsets[r + 1]].tolist()
    return out


def test_cross_ids_are_the_pair_hashes_of_the_raw_ids(tmp_path: Path, files, data_config):
    paths, total = files(tmp_path, [37, 101], row_group_rows=16)
    config = cross_config(data_config)
    batches = list(make_dataloader(ParquetDataset(paths, config, batch_size=16), num_workers=1))
    keys = batches[0].sparse.keys()
    assert keys == ["row_id", "user_id", "history", "row_id_x_user_id_h0", "row_id_x_user_id_h1"]
    users = by_row(batches, "user_id")
    for k in range(2):
        crosses = by_row(batches, f"row_id_x_user_id_h{k}")
        assert len(crosses) == total
        rows = np.array(sorted(crosses))
        expected = hash_pairs(rows, np.array([users[r][0] for r in rows]), 977, k)
        assert [crosses[r][0] for r in rows] == expected.tolist()
    h0, h1 = by_row(batches, "row_id_x_user_id_h0"), by_row(batches, "row_id_x_user_id_h1")
    assert sum(h0[r] != h1[r] for r in h0) > 0.9 * total  # two independent functions
    padded = batches[-1]
    n = padded.real_rows
    assert n < 16 and not padded.sparse["row_id_x_user_id_h0"].lengths()[n:].any()


def test_cross_ids_are_hash_pairs_pair_by_pair_then_function_by_function():
    rng = np.random.default_rng(0)
    raw = {f: rng.integers(-(2**62), 2**62, 500) for f in ("a", "b", "c")}
    pairs = [("a", "b"), ("a", "c"), ("c", "b")]
    expected = [hash_pairs(raw[a], raw[b], 977, k) for a, b in pairs for k in range(3)]
    got = cross_ids(raw, pairs, 3, 977)
    assert len(got) == 9 and all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    # Pinned values: a change of the hash would silently remap every trained codebook row.
    assert hash_pairs(np.array([3, 3]), np.array([5, 6]), 100_000, 0).tolist() == [1641, 34459]
    assert hash_pairs(np.array([-3, 2**62]), np.array([5, -6]), 977, 1).tolist() == [703, 554]


def test_hash_pairs_spreads_and_keeps_order():
    a, b = np.arange(20_000) % 200, np.arange(20_000) // 200
    buckets = hash_pairs(a, b, 100_000, 0)
    assert buckets.min() >= 0 and buckets.max() < 100_000 and len(set(buckets.tolist())) > 18_000
    assert not np.array_equal(hash_pairs(a, b, 100_000, 0), hash_pairs(b, a, 100_000, 0))
    with pytest.raises(ValueError, match="hash_pairs: id arrays of shapes \\(1,\\) and \\(3,\\)"):
        hash_pairs(np.array([1]), np.array([1, 2, 3]), 10, 0)


def test_generated_cross_names_must_be_unique(data_config):
    features = [{"name": n, "table": "user"} for n in ("a_x_b", "c", "a", "b_x_c")]
    tables = [CROSS_TABLES[1], CROSS_TABLES[3]]
    with pytest.raises(
        ValueError, match="data.cross \\(generated cross feature names\\): name 'a_x_b_x_c_h0'"
    ):
        data_config(
            tables=tables,
            sparse_features=features,
            cross={"table": "codebook", "fields": ["a_x_b", "c", "a", "b_x_c"]},
        )


def test_permuted_feature_moves_between_rows_and_its_crosses_follow(tmp_path: Path, files, data_config):
    paths, total = files(tmp_path, [300], row_group_rows=300)
    config = cross_config(data_config)
    plain = list(ParquetDataset(paths, config, batch_size=64))
    permuted = list(ParquetDataset(paths, config, batch_size=64, permute_feature="user_id"))
    again = list(ParquetDataset(paths, config, batch_size=64, permute_feature="user_id"))
    before, after = by_row(plain, "user_id"), by_row(permuted, "user_id")
    assert sorted(map(tuple, before.values())) == sorted(map(tuple, after.values()))  # same multiset
    assert sum(before[r] != after[r] for r in before) > total // 2
    assert by_row(again, "user_id") == after  # seeded: every pass permutes the same way
    assert by_row(permuted, "history") == by_row(plain, "history")  # other features stay
    cross = by_row(permuted, "row_id_x_user_id_h1")
    rows = np.array(sorted(cross))
    expected = hash_pairs(rows, np.array([after[r][0] for r in rows]), 977, 1)
    assert [cross[r][0] for r in rows] == expected.tolist()  # recomputed from the permuted ids


def test_permuting_a_multi_hot_feature_keeps_bags_whole(tmp_path: Path, files, data_config):
    paths, _ = files(tmp_path, [200], row_group_rows=200)
    plain = by_row(ParquetDataset(paths, data_config(), 32), "history")
    permuted = by_row(ParquetDataset(paths, data_config(), 32, permute_feature="history"), "history")
    assert sorted(map(tuple, plain.values())) == sorted(map(tuple, permuted.values()))
    with pytest.raises(ValueError, match="permute_feature: 'price' is not a sparse feature"):
        ParquetDataset(paths, data_config(), 32, permute_feature="price")
