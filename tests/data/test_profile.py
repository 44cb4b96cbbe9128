"""data.profile: per-column statistics of Parquet files from their footers and a seeded sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from towerrec.data.profile import ProfileError, column_kind, footer_ranges, profile_files, read_schemas


def write(path: Path, columns: dict, row_group_size: int = 1000) -> str:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def mixed(n: int, seed: int, large: bool = False) -> dict:
    """Strings with nulls, ints, floats with nulls, a list<string> with null lists and elements,
    a struct, a 0/1 label."""
    rng = np.random.default_rng(seed)
    city = np.array(["Paris", "Lyon", "Nice"])[rng.integers(0, 3, n)].astype(object)
    city[::10] = None
    price = rng.normal(5, 1, n).astype(object)
    price[::4] = None
    tags = [None if i % 7 == 0 else ["a", None, "b"][: i % 4] for i in range(n)]
    return {
        "city": pa.array(city, pa.large_string() if large else pa.string()),
        "age": pa.array(rng.integers(18, 80, n), pa.int32() if large else pa.int64()),
        "price": pa.array(price, pa.float64()),
        "tags": pa.array(tags, pa.list_(pa.string())),
        "meta": pa.array([{"k": i} for i in range(n)]),
        "click": pa.array(rng.integers(0, 2, n).astype(np.int8)),
    }


def test_every_row_read_gives_exact_counts(tmp_path):
    a = write(tmp_path / "a.parquet", mixed(3000, 0))
    b = write(tmp_path / "b.parquet", mixed(2000, 1, large=True))
    profile = profile_files([a, b], sample_rows=10_000)
    assert profile.rows == profile.sampled_rows == 5000 and profile.exact

    city = profile.columns["city"]
    assert (city.kind, city.distinct, city.distinct_estimate, city.exact) == ("string", 3, 3, True)
    assert city.nulls == 300 + 200 == city.file_nulls
    assert {v for v, _ in city.top} == {"Paris", "Lyon", "Nice"}
    assert sum(n for _, n in city.top) == 4500

    age = profile.columns["age"]  # int64 in a, int32 in b: one integer column
    values = np.concatenate([pq.read_table(p, columns=["age"])["age"].to_numpy() for p in (a, b)])
    assert age.kind == "integer" and (age.min, age.max) == (values.min(), values.max()) and age.range_exact
    assert age.distinct == len(np.unique(values)) and age.nulls == 0 and age.file_nulls == 0

    price = profile.columns["price"]
    assert price.kind == "float" and price.nulls == 750 + 500 and price.nonfinite == 0
    assert price.q01 < price.q50 < price.q99 and price.min <= price.q001 and price.q999 <= price.max

    tags = profile.columns["tags"]
    assert tags.kind == "list<string>" and tags.element_kind == "string"
    nulls_a = len(range(0, 3000, 7))
    nulls_b = len(range(0, 2000, 7))
    assert tags.nulls == nulls_a + nulls_b and tags.null_elements > 0 and tags.distinct == 2
    assert tags.list_lengths == (0, pytest.approx(tags.list_lengths[1]), 3)
    assert tags.file_nulls is None and tags.any_nulls

    assert "meta" not in profile.columns and profile.layouts["meta"].kind == "unsupported"


def test_sample_is_bounded_spread_seeded_and_traceable(tmp_path):
    files = [
        write(tmp_path / f"p{i}.parquet", {"x": np.arange(i * 20_000, (i + 1) * 20_000)}) for i in range(5)
    ]
    profile = profile_files(files, sample_rows=7000, seed=3)
    sample = profile.sample
    assert profile.sampled_rows == 7000 and profile.rows == 100_000 and not profile.exact
    # Spread: 100 row groups of 1000 rows, at least 64 of them give rows; every file is visited.
    where = zip(sample["_file"].to_pylist(), sample["_row"].to_pylist(), strict=True)
    groups = {(f, r // 1000) for f, r in where}
    assert len(groups) >= 64 and {f for f, _ in groups} == set(range(5))
    # Provenance: the sample row is the file's row.
    x, f, r = (sample[c].to_numpy() for c in ("x", "_file", "_row"))
    assert np.array_equal(x, f * 20_000 + r)
    assert len(np.unique(x)) == 7000  # drawn without replacement
    again = profile_files(files, sample_rows=7000, seed=3).sample
    other = profile_files(files, sample_rows=7000, seed=4).sample
    assert again["x"].equals(sample["x"]) and not other["x"].equals(sample["x"])
    assert profile.where(0) == f"{files[f[0]]}, row {r[0]}"


def test_distinct_estimate_of_a_sample(tmp_path):
    n = 50_000
    rng = np.random.default_rng(0)
    path = write(
        tmp_path / "a.parquet",
        {"user": rng.permutation(n), "device": rng.integers(0, 5, n), "y": np.zeros(n, np.int8)},
        row_group_size=5000,
    )
    profile = profile_files([path], sample_rows=5000)
    user, device = profile.columns["user"], profile.columns["device"]
    assert user.distinct == 5000 and not user.exact
    # GEE: sqrt(N/n) * f1 = sqrt(10) * 5000 (all values seen once): above the sample, below N.
    assert user.distinct_estimate == round(np.sqrt(10) * 5000)
    assert (device.distinct, device.distinct_estimate) == (5, 5)  # no singletons: nothing unseen


def test_type_drift_between_files_names_both(tmp_path):
    a = write(tmp_path / "a.parquet", {"user": np.arange(10)})
    b = write(tmp_path / "b.parquet", {"user": [str(i) for i in range(10)]})
    with pytest.raises(ProfileError) as e:
        profile_files([a, b])
    assert "'user'" in str(e.value) and a in str(e.value) and b in str(e.value)
    assert "int64" in str(e.value) and "string" in str(e.value)


def test_accepted_drift_missing_columns_and_footer_only_files(tmp_path):
    a = write(tmp_path / "a.parquet", {"v": np.arange(10), "gone": np.arange(10), "n": pa.nulls(10)})
    b = write(tmp_path / "b.parquet", {"v": np.arange(10) + 0.5, "n": pa.array(["x"] * 10)})
    ev = write(
        tmp_path / "ev.parquet", {"v": pa.array([None, 1.0]), "n": pa.array(["y", None]), "gone": [1, 2]}
    )
    profile = profile_files([a, b], also=[ev])
    v = profile.columns["v"]
    assert v.kind == "float" and "read as float" in v.note
    assert v.file_nulls == 1 and v.nulls == 0  # the eval file's null: in the footers, not the sample
    assert v.max == 9.5 and profile.rows == 20  # eval rows are never sampled
    assert profile.layouts["gone"].missing_in == (b,) and "gone" not in profile.columns
    assert profile.layouts["n"].kind == "string" and profile.columns["n"].nulls == 10  # null type joins
    assert [s.path for s in profile.footers] == [a, b, ev]


def test_unreadable_file_and_no_files(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ProfileError, match="bad.parquet: not a readable Parquet file"):
        profile_files([str(bad)])
    with pytest.raises(ProfileError, match="no Parquet files"):
        profile_files([])


def test_nan_counted_and_footer_ranges(tmp_path):
    path = write(tmp_path / "a.parquet", {"x": [1.0, float("nan"), 3.0, float("inf")], "y": [0, 1, 1, 0]}, 2)
    x = profile_files([path]).columns["x"]
    assert x.nonfinite == 2 and x.q99 <= 3.0
    assert footer_ranges(read_schemas([path])[0], "y") == [(0, 0, 1), (1, 0, 1)]


def test_column_kinds():
    assert column_kind(pa.large_list(pa.large_string())) == "list<string>"
    assert column_kind(pa.dictionary(pa.int32(), pa.string())) == "string"
    assert column_kind(pa.list_(pa.float32())) == "list<float>"
    assert column_kind(pa.list_(pa.list_(pa.int64()))) == "unsupported"
    assert column_kind(pa.timestamp("s")) == "unsupported" and column_kind(pa.null()) == "null"
