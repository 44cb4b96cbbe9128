"""Fitted feature statistics (data.features): one streaming pass over the training files,
checked against hand computations, and features.json surviving save/load exactly."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from towerrec.data import features as features_module
from towerrec.data.config import DataConfig
from towerrec.data.errors import DataError, Where
from towerrec.data.features import Boundaries, FittedFeatures, Moments, Vocab
from towerrec.data.transforms import encode_dense, encode_sparse

WHERE = Where("x.parquet", 0, 0)


def make_data(sparse_features=(), dense_features=(), tables=None) -> DataConfig:
    sparse_features = list(sparse_features) or [{"name": "plain", "table": "plain"}]
    tables = dict(tables or {})
    for feature in sparse_features:
        tables.setdefault(feature["table"], 1000)
    return DataConfig.model_validate(
        {
            "train": "unused",
            "eval": "unused",
            "tables": [{"name": n, "num_embeddings": size, "embedding_dim": 4} for n, size in tables.items()],
            "sparse_features": sparse_features,
            "dense_features": list(dense_features),
            "tasks": [{"name": "click", "label": "click"}],
        }
    )


def write(path: Path, row_group_size: int = 3, **columns) -> str:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


WORKCLASS = [
    ["Private", "Gov", "Private", None, "Self", "Private", "Gov", "Never"],
    ["Gov", "Private", "Self", "Self", None, "Rare"],
]


def workclass_files(tmp_path: Path) -> list[str]:
    """Two files of one string column, string in one and large_string in the other."""
    return [
        write(tmp_path / "a.parquet", w=pa.array(WORKCLASS[0], pa.string())),
        write(tmp_path / "b.parquet", w=pa.array(WORKCLASS[1], pa.large_string())),
    ]


def hand_vocab(values, min_count: int) -> list:
    counts = Counter(v for v in values if v is not None)
    return sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))


@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_vocab_counts_across_files_and_types(tmp_path, min_count):
    files = workclass_files(tmp_path)
    data = make_data([{"name": "w", "table": "w", "id_mode": "vocab", "min_count": min_count}])
    fitted = FittedFeatures.fit(files, data)
    vocab = fitted.vocab("w")
    assert vocab.values == hand_vocab(WORKCLASS[0] + WORKCLASS[1], min_count)
    assert vocab.dropped == 0 and vocab.oov_id == 0
    # Rare and unseen values read as the out-of-vocabulary id 0.
    ids = encode_sparse(pa.array(["Private", "Rare", "unseen"]), data.sparse_features[0], fitted, 1000, WHERE)
    expected = [vocab.values.index(v) + 1 if v in vocab.values else 0 for v in ["Private", "Rare", "unseen"]]
    assert ids.values.tolist() == expected and expected[0] == 1


def test_vocab_keeps_the_most_frequent_that_fit_the_table(tmp_path, caplog):
    files = workclass_files(tmp_path)
    data = make_data([{"name": "w", "table": "w", "id_mode": "vocab"}], tables={"w": 3})
    with caplog.at_level(logging.WARNING, logger="towerrec.data.features"):
        vocab = FittedFeatures.fit(files, data).vocab("w")
    full = hand_vocab(WORKCLASS[0] + WORKCLASS[1], 1)
    assert vocab.values == full[:2] and vocab.dropped == len(full) - 2
    assert f"keeps the first 2, {len(full) - 2} go to the out-of-vocabulary id 0" in caplog.text


def test_vocab_of_integer_lists_merged_over_many_batches(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 40, rng.integers(0, 5)).tolist() for _ in range(300)]
    rows[5] = None
    files = [
        write(tmp_path / "a.parquet", 16, h=pa.array(rows[:150], pa.list_(pa.int32()))),
        write(tmp_path / "b.parquet", 16, h=pa.array(rows[150:], pa.large_list(pa.int64()))),
    ]
    data = make_data([{"name": "h", "table": "h", "id_mode": "vocab", "multi_hot": True, "min_count": 2}])
    monkeypatch.setattr(features_module, "_READ_ROWS", 7)  # many record batches ...
    monkeypatch.setattr(features_module, "_MERGE_ROWS", 10)  # ... and many merges of their counts
    vocab = FittedFeatures.fit(files, data).vocab("h")
    assert vocab.values == hand_vocab([v for row in rows if row for v in row], 2)


def test_vocab_file_strings_and_integers(tmp_path):
    (tmp_path / "w.txt").write_text("Self\nPrivate\nGov\n")
    (tmp_path / "n.txt").write_text("40\n-3\n7\n")
    files = [write(tmp_path / "a.parquet", w=pa.array(["Gov", "x"]), n=pa.array([7, 8], pa.int16()))]
    data = make_data(
        [
            {"name": "w", "table": "w", "id_mode": "vocab", "vocab_file": str(tmp_path / "w.txt")},
            {"name": "n", "table": "n", "id_mode": "vocab", "vocab_file": str(tmp_path / "n.txt")},
        ],
        tables={"n": 3},
    )
    fitted = FittedFeatures.fit(files, data)
    assert fitted.vocab("w").values == ["Self", "Private", "Gov"]
    assert fitted.vocab("n").values == [40, -3] and fitted.vocab("n").dropped == 1
    ids = encode_sparse(pa.array([7, -3, 40], pa.int16()), data.sparse_features[1], fitted, 3, WHERE)
    assert ids.values.tolist() == [0, 2, 1]  # 7 did not fit the table


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1\nx\n", "line 2: 'x' is not an integer"),
        ("1\n2\n1\n", "line 3: '1' repeats line 1"),
        ("1\n\n2", "line 2 is empty"),
    ],
)
def test_vocab_file_errors_name_the_line(tmp_path, text, expected):
    (tmp_path / "v.txt").write_text(text)
    files = [write(tmp_path / "a.parquet", n=pa.array([1]))]
    data = make_data([{"name": "n", "table": "n", "id_mode": "vocab", "vocab_file": str(tmp_path / "v.txt")}])
    with pytest.raises(ValueError, match=f"v.txt: {expected}"):
        FittedFeatures.fit(files, data)


def test_quantiles_exact_below_the_sample_size(tmp_path):
    rng = np.random.default_rng(0)
    ages = rng.integers(17, 90, 500).astype(np.float64)
    ages[[3, 99]] = np.nan
    column = pa.array([None if i == 7 else v for i, v in enumerate(ages)], pa.float64())  # a null too
    files = [
        write(tmp_path / "a.parquet", 64, age=column.slice(0, 250)),
        write(tmp_path / "b.parquet", 64, age=column.slice(250)),
    ]
    data = make_data(
        [{"name": "age_b", "column": "age", "table": "b", "id_mode": "bucketize", "quantiles": 8}]
    )
    boundaries = FittedFeatures.fit(files, data).boundaries("age_b")
    finite = np.array([v for v in column.to_pylist() if v is not None and not np.isnan(v)])
    assert boundaries.tolist() == np.unique(np.quantile(finite, np.arange(1, 8) / 8)).tolist()


def test_quantiles_deduplicated_and_checked_against_the_table(tmp_path):
    values = [0] * 80 + list(range(20))  # 81 zeros
    files = [write(tmp_path / "a.parquet", x=pa.array(values, pa.int32()))]
    feature = {"name": "x", "table": "x", "id_mode": "bucketize", "quantiles": 10}
    boundaries = FittedFeatures.fit(files, make_data([feature])).boundaries("x")
    # The 0.1 .. 0.8 quantiles are all 0; the 0.9 one is 9 + 0.1 * (10 - 9).
    assert boundaries.tolist() == pytest.approx([0.0, 9.1], abs=1e-12)
    data = make_data([{**feature, "quantiles": 20}], tables={"x": 3})
    with pytest.raises(ValueError, match="fitted boundaries make .* buckets; table 'x' has num_embeddings=3"):
        FittedFeatures.fit([write(tmp_path / "b.parquet", x=pa.array(np.arange(100)))], data)


def test_quantiles_of_a_sample_are_seeded_and_close(tmp_path):
    values = np.random.default_rng(1).exponential(10.0, 20_000)
    files = [write(tmp_path / "a.parquet", 4096, x=pa.array(values))]
    data = make_data([{"name": "x", "table": "x", "id_mode": "bucketize", "quantiles": 4}])
    first = FittedFeatures.fit(files, data, seed=5, sample_size=2000).boundaries("x")
    again = FittedFeatures.fit(files, data, seed=5, sample_size=2000).boundaries("x")
    other = FittedFeatures.fit(files, data, seed=6, sample_size=2000).boundaries("x")
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()
    exact = np.quantile(values, [0.25, 0.5, 0.75])
    assert np.allclose(first, exact, rtol=0.1), (first, exact)


def test_standardize_fits_after_the_preceding_transforms(tmp_path):
    gain = [0.0, 10.0, None, 1e6, float("nan"), 3.0, 250.0]
    files = [
        write(tmp_path / "a.parquet", 2, gain=pa.array(gain[:4])),
        write(tmp_path / "b.parquet", 2, gain=pa.array(gain[4:])),
    ]
    feature = {
        "name": "g",
        "column": "gain",
        "transforms": ["clip", "log1p", "standardize"],
        "clip": [None, 500.0],
    }
    data = make_data(dense_features=[feature, {"name": "s", "column": "gain", "transforms": ["standardize"]}])
    fitted = FittedFeatures.fit(files, data)
    finite = np.array([v for v in gain if v is not None and not np.isnan(v)])
    stepped = np.log1p(np.clip(finite, None, 500.0))
    assert fitted.moments("g").mean == pytest.approx(stepped.mean(), rel=1e-12)
    assert fitted.moments("g").std == pytest.approx(stepped.std(), rel=1e-12)
    assert fitted.moments("s").mean == pytest.approx(finite.mean(), rel=1e-12)
    x, _ = encode_dense(pa.array([10.0]), data.dense_feature_configs[0], fitted, WHERE)
    assert x[0] == np.float32((np.log1p(10.0) - fitted.moments("g").mean) / fitted.moments("g").std)


def test_standardize_of_a_constant_column_divides_by_one(tmp_path):
    files = [write(tmp_path / "a.parquet", x=pa.array([4, 4, 4]))]
    fitted = FittedFeatures.fit(
        files, make_data(dense_features=[{"name": "x", "transforms": ["standardize"]}])
    )
    assert (fitted.moments("x").mean, fitted.moments("x").std) == (4.0, 1.0)


def test_fit_errors_name_file_row_and_types(tmp_path):
    bad = write(tmp_path / "a.parquet", 2, gain=pa.array([0.0, 1.0, 2.0, -2.0]))
    data = make_data(dense_features=[{"name": "gain", "transforms": ["log1p", "standardize"]}])
    with pytest.raises(DataError, match=rf"{bad}: row group 1, column 'gain', row 3: value -2.0"):
        FittedFeatures.fit([bad], data)
    a = write(tmp_path / "b.parquet", w=pa.array([1, 2]))
    b = write(tmp_path / "c.parquet", w=pa.array(["1", "2"]))
    vocab = make_data([{"name": "w", "table": "w", "id_mode": "vocab"}])
    with pytest.raises(DataError, match=f"column 'w' has type int64 in {a} but string in {b}"):
        FittedFeatures.fit([a, b], vocab)
    floats = write(tmp_path / "d.parquet", w=pa.array([1.5]))
    with pytest.raises(DataError, match="has type double; expected an integer or string type"):
        FittedFeatures.fit([a, floats], vocab)


def test_needs_fit():
    assert not FittedFeatures.needs_fit(
        make_data([{"name": "u", "table": "u", "id_mode": "hash"}], ["price"])
    )
    assert FittedFeatures.needs_fit(make_data([{"name": "u", "table": "u", "id_mode": "vocab"}]))
    assert FittedFeatures.needs_fit(
        make_data([{"name": "u", "table": "u", "id_mode": "bucketize", "quantiles": 2}])
    )
    assert not FittedFeatures.needs_fit(
        make_data([{"name": "u", "table": "u", "id_mode": "bucketize", "boundaries": [1.0]}])
    )
    assert FittedFeatures.needs_fit(make_data(dense_features=[{"name": "x", "transforms": ["standardize"]}]))


# ---- features.json ------------------------------------------------------------------------


def fitted_example() -> FittedFeatures:
    return FittedFeatures(
        ["train/a.parquet", "train/b.parquet"],
        {
            "w": Vocab(["Private", "Ünïcødé", ""], 2, {"column": "w", "min_count": 1}),
            "n": Vocab([2**62, -5], 0, {"column": "n"}),
            "age_b": Boundaries([0.1 + 0.2, 1 / 3, 1e300], {"column": "age", "quantiles": 4}),
            "gain": Moments(
                np.log1p(1234.5).item(), 2 / 3, {"column": "gain", "transforms": ["log1p"], "clip": None}
            ),
        },
    )


def test_save_load_is_exact(tmp_path):
    fitted = fitted_example()
    fitted.save(tmp_path / "features.json")
    loaded = FittedFeatures.load(tmp_path / "features.json")
    assert loaded == fitted
    assert loaded.moments("gain").mean == fitted.moments("gain").mean  # bit for bit
    assert loaded.boundaries("age_b").tolist() == [0.1 + 0.2, 1 / 3, 1e300]
    raw = json.loads((tmp_path / "features.json").read_text())
    assert (
        raw["version"] == 1 and raw["features"]["w"]["oov_id"] == 0 and raw["features"]["w"]["dropped"] == 2
    )


def test_fit_save_load_round_trip(tmp_path):
    files = workclass_files(tmp_path)
    data = make_data([{"name": "w", "table": "w", "id_mode": "vocab", "min_count": 2}])
    fitted = FittedFeatures.fit(files, data)
    fitted.save(tmp_path / "features.json")
    loaded = FittedFeatures.load(tmp_path / "features.json")
    assert loaded == fitted and loaded.fitted_on == files
    loaded.check(data)
    column = pa.array(WORKCLASS[0] + ["unseen"]).drop_null()
    feature = data.sparse_features[0]
    assert np.array_equal(
        encode_sparse(column, feature, loaded, 1000, WHERE).values,
        encode_sparse(column, feature, fitted, 1000, WHERE).values,
    )


def _edit(raw: dict, path: list, value) -> dict:
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


_DELETE = object()
BAD_FILES = {  # (path into the JSON, new value, expected message part)
    "missing version": (["version"], _DELETE, "field 'version' is missing"),
    "version 2": (["version"], 2, "field 'version' is 2"),
    "unknown top field": (["extra"], 1, "field 'extra' is unknown"),
    "fitted_on not a list": (["fitted_on"], "a.parquet", "field 'fitted_on' must be a list"),
    "missing oov_id": (["features", "w", "oov_id"], _DELETE, "field 'features.w.oov_id' is missing"),
    "oov_id 1": (["features", "w", "oov_id"], 1, "field 'features.w.oov_id' must be 0"),
    "mixed vocab": (["features", "w", "vocab", 1], 3, r"field 'features.w.vocab\[1\]' must be a str"),
    "dropped as text": (["features", "w", "dropped"], "2", "field 'features.w.dropped' must be an integer"),
    "boundaries unsorted": (["features", "age_b", "boundaries"], [2.0, 1.0], "strictly increasing"),
    "boundary as text": (
        ["features", "age_b", "boundaries", 0],
        "0.3",
        r"'features.age_b.boundaries\[0\]' must be a finite",
    ),
    "missing std": (["features", "gain", "std"], _DELETE, "field 'features.gain.std' is missing"),
    "std 0": (["features", "gain", "std"], 0.0, "field 'features.gain.std' must be > 0"),
    "mean bool": (["features", "gain", "mean"], True, "field 'features.gain.mean' must be a finite number"),
    "missing fitted_for": (
        ["features", "gain", "fitted_for"],
        _DELETE,
        "'features.gain.fitted_for' is missing",
    ),
    "no kind": (
        ["features", "gain"],
        {"fitted_for": {}},
        "must have one of the fields vocab, boundaries, mean",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_rejects_a_bad_file_naming_the_field(tmp_path, case):
    path, value, expected = BAD_FILES[case]
    target = tmp_path / "features.json"
    target.write_text(json.dumps(_edit(fitted_example().to_json(), path, value)))
    with pytest.raises(
        ValueError, match=rf"{target}: {expected}" if "field" in expected[:6] else expected
    ) as info:
        FittedFeatures.load(target)
    assert str(target) in str(info.value)


def test_from_json_round_trips_to_json():
    fitted = fitted_example()
    raw = json.loads(json.dumps(fitted.to_json()))  # as a broadcast or an artifact's schema carries it
    parsed = FittedFeatures.from_json(raw, "model.pt")
    assert parsed == fitted and parsed.source == "model.pt"
    assert parsed.moments("gain").mean == fitted.moments("gain").mean  # bit for bit
    assert parsed.to_json() == fitted.to_json()


@pytest.mark.parametrize("case", ["missing oov_id", "boundary as text", "unknown top field"])
def test_from_json_rejects_a_bad_record_as_load_does(tmp_path, case):
    path, value, expected = BAD_FILES[case]
    raw = _edit(fitted_example().to_json(), path, value)
    target = tmp_path / "features.json"
    target.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as from_file:
        FittedFeatures.load(target)
    with pytest.raises(ValueError, match=f"^the artifact's schema: .*{expected}") as from_raw:
        FittedFeatures.from_json(raw, "the artifact's schema")
    assert str(from_raw.value) == str(from_file.value).replace(str(target), "the artifact's schema")


def test_load_rejects_broken_json(tmp_path):
    target = tmp_path / "features.json"
    target.write_text('{"version": 1,')
    with pytest.raises(ValueError, match=f"{target}: not valid JSON"):
        FittedFeatures.load(target)


def test_check_rejects_statistics_of_another_config(tmp_path):
    files = workclass_files(tmp_path)
    data = make_data([{"name": "w", "table": "w", "id_mode": "vocab", "min_count": 2}])
    fitted = FittedFeatures.fit(files, data)
    fitted.save(tmp_path / "features.json")
    loaded = FittedFeatures.load(tmp_path / "features.json")
    changed = make_data([{"name": "w", "table": "w", "id_mode": "vocab", "min_count": 3}])
    with pytest.raises(
        ValueError, match="feature 'w' was fitted for .*'min_count': 2.* now says .*'min_count': 3"
    ):
        loaded.check(changed)
    other = make_data(dense_features=[{"name": "x", "transforms": ["standardize"]}])
    with pytest.raises(ValueError, match=r"features.json: feature 'x' has no fitted mean and std"):
        loaded.check(other)
