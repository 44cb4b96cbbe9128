"""Feature transforms (data.transforms) against hand computations: hashing, vocabularies,
buckets, dense transforms, nulls under every on_null, Arrow types and type drift."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from towerrec.data.config import DataConfig, DenseFeatureConfig, SparseFeatureConfig
from towerrec.data.errors import DataError, Where
from towerrec.data.features import Boundaries, FittedFeatures, Moments, Vocab, _KeyIndex
from towerrec.data.hashing import hash_ids, hash_strings
from towerrec.data.transforms import (
    check_type_drift,
    column_type_ok,
    encode_dense,
    encode_sparse,
    expected_type,
    string_hashes,
)

WHERE = Where("f.parquet", 2, 100)  # errors then say "row group 2" and "row 100 + index"


def sparse(**fields) -> SparseFeatureConfig:
    return SparseFeatureConfig(name=fields.pop("name", "s"), table="t", **fields)


def fitted_with(name: str, stats) -> FittedFeatures:
    return FittedFeatures(["train.parquet"], {name: stats})


def encode(values, feature: SparseFeatureConfig, size: int = 100, fitted=None, type_=None):
    ids = encode_sparse(pa.array(values, type_), feature, fitted, size, WHERE)
    assert ids.values.dtype == np.int64 and ids.lengths.dtype == np.int32
    return ids.values.tolist(), ids.lengths.tolist(), ids.nulls_replaced


# ---- string hash ---------------------------------------------------------------------------

PINNED = {  # the documented hash: changing it changes every trained model's rows
    "": 0xC617FDD9887C08F4,
    "a": 0xAB38A1AED66E5C89,
    "Private": 0x21CDCF6818BE1564,
    "exactly8": 0xCF170E568246E1E5,
    "nine char": 0xF2C04B2F2F60BF5B,
    "Self-emp-not-inc": 0xF2EE144BC2AF953E,
    "Ünïcødé 🙂": 0xE02170EE93770776,
}


def _mix(x: int) -> int:
    """splitmix64 with Python integers, from the published constants."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _hand_hash(text: str) -> int:
    data = text.encode()
    h = _mix(len(data) ^ 0x5F3759DF2C1B3C6D)
    for i in range(0, len(data), 8):
        h = _mix(h ^ int.from_bytes(data[i : i + 8], "little"))
    return h


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_string_hash_is_pinned_and_matches_the_definition(type_):
    values = list(PINNED)
    got = string_hashes(pa.array(values, type_)).tolist()
    assert got == list(PINNED.values())
    assert got == [_hand_hash(v) for v in values]


def test_string_hash_of_a_slice_and_of_many_lengths():
    rng = np.random.default_rng(0)
    values = ["x" * int(n) + str(i) for i, n in enumerate(rng.integers(0, 40, 300))]
    array = pa.array(values)
    assert string_hashes(array.slice(7, 50)).tolist() == [_hand_hash(v) for v in values[7:57]]
    offsets = np.frombuffer(array.buffers()[1], np.int32)[: len(array) + 1]
    assert hash_strings(offsets, array.buffers()[2].to_pybytes()).tolist() == [_hand_hash(v) for v in values]


def test_hash_mode_strings_take_the_hash_modulo_the_table():
    values, lengths, nulls = encode(["Private", "a", "Private"], sparse(id_mode="hash"), size=1000)
    assert values == [PINNED["Private"] % 1000, PINNED["a"] % 1000, PINNED["Private"] % 1000]
    assert lengths == [1, 1, 1] and nulls == 0


@pytest.mark.parametrize("type_", [pa.int64(), pa.int32(), pa.uint64()])
def test_hash_mode_integers_equal_hash_ids(type_):
    raw = [0, 7, 2**31 - 1] + ([2**64 - 1] if type_ == pa.uint64() else [-3])
    values, _, _ = encode(raw, sparse(id_mode="hash"), size=977, type_=type_)
    expected = hash_ids(np.array(raw, np.uint64 if type_ == pa.uint64() else np.int64).view(np.int64), 977)
    assert values == expected.tolist()


@pytest.mark.parametrize("list_type", [pa.list_(pa.string()), pa.large_list(pa.large_string())])
def test_hash_mode_string_lists(list_type):
    rows = [["a", "Private"], [], ["nine char"]]
    values, lengths, _ = encode(rows, sparse(id_mode="hash", multi_hot=True), size=50, type_=list_type)
    assert values == [PINNED["a"] % 50, PINNED["Private"] % 50, PINNED["nine char"] % 50]
    assert lengths == [2, 0, 1]


# ---- check mode (today's behaviour) --------------------------------------------------------


def test_check_mode_keeps_ids_and_names_a_bad_one():
    assert encode([3, 0, 99], sparse())[0] == [3, 0, 99]
    with pytest.raises(DataError) as info:
        encode([[1], [2, 100]], sparse(multi_hot=True))
    message = str(info.value)
    assert "f.parquet: row group 2, column 's', row 101: value 100 (element 1 of the row's list)" in message
    assert "[0, 100) of table 't'" in message


# ---- vocab ---------------------------------------------------------------------------------


def test_vocab_ids_and_unseen_values():
    fitted = fitted_with("s", Vocab(["Private", "Self-emp", "Gov"], 0, {}))
    feature = sparse(id_mode="vocab")
    values, _, _ = encode(["Gov", "never seen", "Private", "", "Self-emp"], feature, fitted=fitted)
    assert values == [3, 0, 1, 0, 2]
    large, _, _ = encode(["Gov", "nope"], feature, fitted=fitted, type_=pa.large_string())
    assert large == [3, 0]


def test_vocab_of_integers():
    fitted = fitted_with("s", Vocab([40, -2, 7], 0, {}))
    values, _, _ = encode([7, 8, -2, 40, 0], sparse(id_mode="vocab"), fitted=fitted, type_=pa.int32())
    assert values == [3, 0, 2, 1, 0]


def test_vocab_must_fit_the_table_and_match_the_column_kind():
    fitted = fitted_with("s", Vocab(["a", "b", "c"], 0, {}))
    with pytest.raises(ValueError, match="needs num_embeddings >= 4"):
        encode(["a"], sparse(id_mode="vocab"), size=3, fitted=fitted)
    with pytest.raises(DataError, match="holds str values"):
        encode([1], sparse(id_mode="vocab"), fitted=fitted)
    with pytest.raises(ValueError, match="needs fitted statistics"):
        encode(["a"], sparse(id_mode="vocab"))


def test_key_index_finds_keys_that_share_a_slot():
    # Keys equal in their low bits share one slot: all but one are found by the sorted fallback.
    keys = (np.arange(40, dtype=np.uint64) << np.uint64(20)) | np.uint64(5)
    index = _KeyIndex(keys)
    queries = np.concatenate([keys[::-1], keys + np.uint64(1 << 19), np.zeros(1, np.uint64)])
    assert index.find(queries).tolist() == list(range(39, -1, -1)) + [-1] * 41


# ---- bucketize -----------------------------------------------------------------------------


def test_bucketize_explicit_boundaries_right_side():
    feature = sparse(id_mode="bucketize", boundaries=[20, 35, 40])
    values, _, _ = encode([-5.0, 20.0, 34.9, 35.0, 40.0, 1e9], feature, size=4)
    assert values == [0, 1, 1, 2, 3, 3]  # v goes to the number of boundaries <= v
    assert encode([19, 20, 41], feature, size=4, type_=pa.int16())[0] == [0, 1, 3]


def test_bucketize_fitted_boundaries_and_nan_as_null():
    fitted = fitted_with("s", Boundaries([1.5, 2.5], {}))
    feature = sparse(id_mode="bucketize", quantiles=3, on_null="default", default_id=0)
    assert encode([1.0, 2.0, None, math.nan, 3.0], feature, size=3, fitted=fitted) == (
        [0, 1, 0, 0, 2],
        [1] * 5,
        2,
    )
    with pytest.raises(ValueError, match="2 boundaries need num_embeddings >= 3"):
        encode([1.0], feature, size=2, fitted=fitted)


# ---- nulls ---------------------------------------------------------------------------------

SINGLE = {  # on_null -> (ids, lengths, replaced) of [5, None, 7]; default_id 9 where allowed
    "default": ([5, 9, 7], [1, 1, 1], 1),
    "empty": ([5, 7], [1, 0, 1], 1),
}
LISTS = {  # on_null -> result of [[1, None, 2], None, [], [None]]
    "default": ([1, 9, 2, 9, 9], [3, 1, 0, 1], 3),
    "empty": ([1, 2], [2, 0, 0, 0], 3),
}


def _on_null(on_null: str, **fields) -> SparseFeatureConfig:
    extra = {"default_id": 9} if on_null == "default" else {}
    return sparse(on_null=on_null, **extra, **fields)


@pytest.mark.parametrize("on_null", list(SINGLE))
def test_nulls_of_single_hot_ids(on_null):
    assert encode([5, None, 7], _on_null(on_null)) == SINGLE[on_null]


@pytest.mark.parametrize("on_null", list(LISTS))
def test_nulls_of_lists_and_list_elements(on_null):
    got = encode([[1, None, 2], None, [], [None]], _on_null(on_null, multi_hot=True))
    assert got == LISTS[on_null]


@pytest.mark.parametrize("on_null", list(SINGLE))
def test_nulls_of_hashed_and_vocab_strings(on_null):
    hashed = encode(["a", None, "Private"], _on_null(on_null, id_mode="hash"), size=1000)
    a, private = PINNED["a"] % 1000, PINNED["Private"] % 1000
    assert hashed == (
        ([a, 9, private], [1, 1, 1], 1) if on_null == "default" else ([a, private], [1, 0, 1], 1)
    )
    fitted = fitted_with("s", Vocab(["Private"], 0, {}))
    vocab = encode(["x", None, "Private"], _on_null(on_null, id_mode="vocab"), fitted=fitted)
    assert vocab == (([0, 9, 1], [1, 1, 1], 1) if on_null == "default" else ([0, 1], [1, 0, 1], 1))


def test_string_lists_with_nulls():
    rows = [["a", None], None, ["Private"]]
    feature = _on_null("empty", id_mode="hash", multi_hot=True)
    values, lengths, nulls = encode(rows, feature, size=1000, type_=pa.large_list(pa.string()))
    assert (values, lengths, nulls) == ([PINNED["a"] % 1000, PINNED["Private"] % 1000], [1, 0, 1], 2)


NULL_ERRORS = {
    "single": ([5, None], {}, "row 101: value None; expected a non-null integer id"),
    "string": (["a", None], {"id_mode": "hash"}, "row 101: value None; expected a non-null value"),
    "list": (
        [[1], None],
        {"multi_hot": True},
        "row 101: value None; expected a list of ids, not a null list",
    ),
    "element": ([[1], [2, None]], {"multi_hot": True}, "row 101: value [2, None] (element 1 is null)"),
}


@pytest.mark.parametrize("case", list(NULL_ERRORS))
def test_nulls_under_on_null_error(case):
    values, fields, expected = NULL_ERRORS[case]
    with pytest.raises(DataError) as info:
        encode(values, sparse(**fields), size=1000)
    assert f"f.parquet: row group 2, column 's', {expected}" in str(info.value)


def test_error_names_the_parquet_column_of_a_renamed_feature():
    with pytest.raises(DataError, match="column 'age', row 100"):
        encode([None], sparse(name="age_bucket", column="age", id_mode="bucketize", boundaries=[1.0]))


def test_a_chunked_column_counts_rows_across_chunks():
    column = pa.chunked_array([pa.array([1, 2], pa.int64()), pa.array([3, None], pa.int64())])
    ids = encode_sparse(column, sparse(on_null="empty"), None, 100, WHERE)
    assert (
        ids.values.tolist() == [1, 2, 3] and ids.lengths.tolist() == [1, 1, 1, 0] and ids.nulls_replaced == 1
    )
    with pytest.raises(DataError, match="row 103: value None"):
        encode_sparse(column, sparse(), None, 100, WHERE)


def test_sliced_list_column():
    column = pa.array([["skip"], ["a", None], None, ["Private"]]).slice(1)
    ids = encode_sparse(column, _on_null("default", id_mode="hash", multi_hot=True), None, 1000, WHERE)
    assert ids.values.tolist() == [PINNED["a"] % 1000, 9, 9, PINNED["Private"] % 1000]
    assert ids.lengths.tolist() == [2, 1, 1]


# ---- dense ---------------------------------------------------------------------------------


def dense(**fields) -> DenseFeatureConfig:
    return DenseFeatureConfig(name=fields.pop("name", "d"), **fields)


def test_dense_plain_column_as_today():
    x, nulls = encode_dense(pa.array([1, 2, 3], pa.int32()), "d", None, WHERE)
    assert x.dtype == np.float32 and x.tolist() == [1.0, 2.0, 3.0] and nulls == 0
    x, _ = encode_dense(pa.array([0.5, math.nan]), dense(), None, WHERE)
    assert x[0] == 0.5 and math.isnan(x[1])


def test_dense_transforms_apply_in_order():
    raw = np.array([-0.5, 0.0, 3.0, 100.0])
    column = pa.array(raw)
    moments = Moments(mean=1.25, std=0.5, fitted_for={})
    log_then_clip = dense(transforms=["log1p", "clip"], clip=[0.0, 2.0])
    clip_then_log = dense(transforms=["clip", "log1p"], clip=[0.0, 2.0])
    full = dense(transforms=["clip", "log1p", "standardize"], clip=[0.0, None])
    assert np.array_equal(
        encode_dense(column, log_then_clip, None, WHERE)[0], np.clip(np.log1p(raw), 0, 2).astype(np.float32)
    )
    assert np.array_equal(
        encode_dense(column, clip_then_log, None, WHERE)[0], np.log1p(np.clip(raw, 0, 2)).astype(np.float32)
    )
    got, _ = encode_dense(column, full, fitted_with("d", moments), WHERE)
    assert np.array_equal(got, ((np.log1p(np.clip(raw, 0, None)) - 1.25) / 0.5).astype(np.float32))


def test_dense_log1p_of_a_value_at_or_below_minus_one_is_an_error():
    with pytest.raises(DataError) as info:
        encode_dense(pa.array([0.0, -1.0]), dense(name="gain", transforms=["log1p"]), None, WHERE)
    message = str(info.value)
    assert "column 'gain', row 101: value -1.0" in message and "put clip" in message


def test_dense_nulls():
    feature = dense(transforms=["log1p"], on_null="default", default=-7.5)
    x, nulls = encode_dense(pa.array([0.0, None, math.e - 1]), feature, None, WHERE)
    assert x.tolist() == [0.0, -7.5, np.float32(1.0)] and nulls == 1  # default is not transformed
    x, nulls = encode_dense(pa.array([None, 2], pa.int64()), dense(on_null="default"), None, WHERE)
    assert x.tolist() == [0.0, 2.0] and nulls == 1
    with pytest.raises(DataError, match="column 'd', row 100: value None; expected a non-null number"):
        encode_dense(pa.array([None, 1.0]), dense(), None, WHERE)


# ---- types ---------------------------------------------------------------------------------

TYPE_CASES = [  # (feature fields, arrow type, accepted)
    ({}, pa.int32(), True),
    ({}, pa.string(), False),
    ({"id_mode": "hash"}, pa.large_string(), True),
    ({"id_mode": "hash"}, pa.float64(), False),
    ({"id_mode": "vocab"}, pa.uint16(), True),
    ({"id_mode": "vocab", "multi_hot": True}, pa.large_list(pa.string()), True),
    ({"id_mode": "hash", "multi_hot": True}, pa.string(), False),
    ({"multi_hot": True}, pa.list_(pa.string()), False),
    ({"id_mode": "bucketize", "boundaries": [1.0]}, pa.float32(), True),
    ({"id_mode": "bucketize", "boundaries": [1.0]}, pa.string(), False),
]


@pytest.mark.parametrize("fields, type_, accepted", TYPE_CASES)
def test_column_types(fields, type_, accepted):
    feature = sparse(**fields)
    assert column_type_ok(feature, type_) is accepted
    assert f"id_mode: {feature.id_mode}" in expected_type(feature)


def test_dense_column_types():
    assert column_type_ok("price", pa.int8()) and column_type_ok(dense(), pa.float64())
    assert not column_type_ok(dense(), pa.string())
    assert "float or integer" in expected_type("price")


def _write(path: Path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_type_drift_string_and_large_string_accepted(tmp_path):
    a = _write(tmp_path / "a.parquet", c=pa.array(["x"]), n=pa.array([1], pa.int32()))
    b = _write(tmp_path / "b.parquet", c=pa.array(["y"], pa.large_string()), n=pa.array([2], pa.int64()))
    types = check_type_drift([a, b], ["c", "n"])
    assert types == {"c": pa.string(), "n": pa.int32()}


def test_type_drift_int_and_string_rejected_naming_both_files(tmp_path):
    a = _write(tmp_path / "a.parquet", c=pa.array([1]))
    b = _write(tmp_path / "b.parquet", c=pa.array(["1"]))
    with pytest.raises(DataError) as info:
        check_type_drift([a, b], ["c"])
    message = str(info.value)
    assert f"column 'c' has type int64 in {a} but string in {b}" in message
    c = _write(tmp_path / "c.parquet", c=pa.array([[1]]))
    with pytest.raises(DataError, match="but list<element: int64> in"):
        check_type_drift([a, c], ["c"])
    with pytest.raises(DataError, match="column 'x' is missing"):
        check_type_drift([a], ["x"])


# ---- config --------------------------------------------------------------------------------

MISPLACED = {  # feature fields -> part of the config error
    "min_count for hash": (
        {"id_mode": "hash", "min_count": 3},
        "min_count applies to id_mode: vocab, not hash",
    ),
    "vocab_file for check": ({"vocab_file": "v.txt"}, "vocab_file applies to id_mode: vocab"),
    "boundaries for vocab": (
        {"id_mode": "vocab", "boundaries": [1.0]},
        "boundaries applies to id_mode: bucketize",
    ),
    "quantiles for hash": ({"id_mode": "hash", "quantiles": 4}, "quantiles applies to id_mode: bucketize"),
    "min_count with vocab_file": (
        {"id_mode": "vocab", "vocab_file": "v.txt", "min_count": 2},
        "min_count applies to a fitted vocabulary",
    ),
    "bucketize without boundaries": ({"id_mode": "bucketize"}, "exactly one of boundaries, quantiles"),
    "bucketize with both": (
        {"id_mode": "bucketize", "boundaries": [1.0], "quantiles": 4},
        "exactly one of boundaries, quantiles",
    ),
    "bucketize multi-hot": ({"id_mode": "bucketize", "quantiles": 4, "multi_hot": True}, "single-hot only"),
    "unsorted boundaries": ({"id_mode": "bucketize", "boundaries": [2.0, 1.0]}, "strictly increasing"),
    "default_id without on_null default": ({"default_id": 3}, "default_id applies to on_null: default"),
    "quantiles 1": ({"id_mode": "bucketize", "quantiles": 1}, "greater than or equal to 2"),
    "min_count 0": ({"id_mode": "vocab", "min_count": 0}, "greater than or equal to 1"),
}


@pytest.mark.parametrize("case", list(MISPLACED))
def test_sparse_config_errors(case):
    fields, expected = MISPLACED[case]
    with pytest.raises(ValidationError, match=expected) as info:
        SparseFeatureConfig(name="workclass", table="t", **fields)
    if "applies" in expected or "bucketize" in expected:
        assert "'workclass'" in str(info.value)


DENSE_ERRORS = {
    "clip without clip transform": ({"clip": [0.0, 1.0]}, "required exactly when transforms has clip"),
    "clip transform without clip": ({"transforms": ["clip"]}, "required exactly when transforms has clip"),
    "clip lo > hi": ({"transforms": ["clip"], "clip": [2.0, 1.0]}, "lo > hi"),
    "transform twice": ({"transforms": ["log1p", "log1p"]}, "appears more than once"),
    "default without on_null default": ({"default": 1.0}, "default applies to on_null: default"),
    "unknown transform": ({"transforms": ["sqrt"]}, "log1p"),
}


@pytest.mark.parametrize("case", list(DENSE_ERRORS))
def test_dense_config_errors(case):
    fields, expected = DENSE_ERRORS[case]
    with pytest.raises(ValidationError, match=expected):
        DenseFeatureConfig(name="gain", **fields)


def _data(sparse_features, dense_features=(), num_embeddings=10) -> DataConfig:
    return DataConfig.model_validate(
        {
            "train": "t",
            "eval": "e",
            "tables": [{"name": "t", "num_embeddings": num_embeddings, "embedding_dim": 4}],
            "sparse_features": list(sparse_features),
            "dense_features": list(dense_features),
            "tasks": [{"name": "click", "label": "click"}],
        }
    )


def test_data_config_reads_the_new_fields():
    data = _data(
        [
            {
                "name": "age_bucket",
                "column": "age",
                "table": "t",
                "id_mode": "bucketize",
                "boundaries": [20, 40],
            },
            {"name": "w", "table": "t", "id_mode": "vocab", "on_null": "default", "default_id": 9},
        ],
        [
            "age",
            {"name": "gain", "column": "capital_gain", "transforms": ["log1p", "clip"], "clip": [0, None]},
        ],
    )
    assert data.dense_feature_names == ["age", "gain"]
    assert [f.parquet_column for f in data.dense_feature_configs] == ["age", "capital_gain"]
    assert data.columns == ["age", "w", "capital_gain", "click"]
    assert data.sparse_feature_names == ["age_bucket", "w"]


DATA_ERRORS = {
    "default_id outside the table": (
        [{"name": "w", "table": "t", "on_null": "default", "default_id": 10}],
        [],
        "default_id 10 is not a row of table 't'",
    ),
    "boundaries beyond the table": (
        [{"name": "b", "table": "t", "id_mode": "bucketize", "boundaries": list(range(10))}],
        [],
        "10 boundaries make 11 buckets",
    ),
    "duplicate dense names": (
        [{"name": "w", "table": "t"}],
        ["x", {"name": "x"}],
        "'x' appears more than once",
    ),
    "fitted name clash": (
        [{"name": "x", "table": "t", "id_mode": "vocab"}],
        [{"name": "x", "transforms": ["standardize"]}],
        "both a fitted sparse and a standardized dense feature",
    ),
}


@pytest.mark.parametrize("case", list(DATA_ERRORS))
def test_data_config_errors(case):
    sparse_features, dense_features, expected = DATA_ERRORS[case]
    with pytest.raises(ValidationError, match=expected):
        _data(sparse_features, dense_features)


def test_vocab_needs_a_table_of_two_rows():
    with pytest.raises(ValidationError, match="num_embeddings >= 2"):
        _data([{"name": "w", "table": "t", "id_mode": "vocab"}], num_embeddings=1)


def test_a_dumped_config_validates_again():
    # The trainer writes the resolved config (every field, defaults included) and reads it back.
    data = _data(
        [
            {
                "name": "a",
                "table": "t",
                "id_mode": "vocab",
                "min_count": 2,
                "on_null": "default",
                "default_id": 3,
            },
            {"name": "b", "column": "x", "table": "t", "id_mode": "bucketize", "boundaries": [1, 2]},
            {"name": "c", "table": "t", "id_mode": "hash", "on_null": "empty"},
        ],
        ["p", {"name": "q", "transforms": ["clip"], "clip": [None, 3], "on_null": "default", "default": 1.5}],
    )
    assert DataConfig.model_validate(data.model_dump()) == data
