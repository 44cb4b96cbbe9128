"""data.public raw mode (``towerrec data census --raw``): the original columns and a config of generic
transforms that give the hand conversion's ids and inputs; and benchmarks.gbdt on such data."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_public_datasets import census_rows, read_split, write_census, write_hillstrom
from towerrec.data.config import DataConfig, resolve_paths
from towerrec.data.errors import Where
from towerrec.data.features import FittedFeatures
from towerrec.data.public import (
    CENSUS_COLUMNS,
    CENSUS_NUMERIC,
    ZERO_BOUNDARY,
    DatasetError,
    bucket_boundaries,
    convert_census,
    convert_hillstrom,
)
from towerrec.data.transforms import encode_dense, encode_sparse
from towerrec.launch import cli
from towerrec.trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the benchmarks live beside the installed packages, not in them

from benchmarks import gbdt  # noqa: E402

SPLITS = ("train", "valid", "test")


def split_files(out: Path, split: str) -> list[str]:
    return [str(p) for p in sorted((out / split).glob("*.parquet"))]


def assert_raw_equals_hand(raw: Path, hand: Path, labels: list[str]) -> DataConfig:
    """Same rows and labels per split; the raw config's transforms, fitted on the raw training files,
    give the hand conversion's vocabularies, buckets, ids and (up to float rounding) dense inputs."""
    data = load_config(raw / "config.yaml").data
    hand_data = load_config(hand / "config.yaml").data
    preprocessing = json.loads((hand / "preprocessing.json").read_text())
    assert not (raw / "preprocessing.json").exists()
    assert {t.name: t.num_embeddings for t in data.tables} == {
        t.name: t.num_embeddings for t in hand_data.tables
    }
    assert data.sparse_feature_names == hand_data.sparse_feature_names
    assert data.dense_feature_names == hand_data.dense_feature_names

    fitted = FittedFeatures.fit(resolve_paths(data.train, "data.train"), data)
    for name, vocab in preprocessing["vocabularies"].items():
        assert fitted.vocab(name).values == vocab, name  # ids 1..V in the same order
    for feature in data.sparse_features:
        if feature.id_mode == "bucketize":
            assert feature.boundaries == [ZERO_BOUNDARY, *preprocessing["bucket_edges"][feature.column]]

    for split in SPLITS:
        raw_table = pq.read_table(split_files(raw, split))
        hand_table = pq.read_table(split_files(hand, split))
        assert raw_table.num_rows == hand_table.num_rows
        for label in labels:
            assert raw_table.schema.field(label).type == pa.int8()
            assert raw_table[label].equals(hand_table[label]), (split, label)
        where = Where(f"{split}/*.parquet", 0, 0)
        for feature in data.sparse_features:
            column = raw_table[feature.parquet_column]
            if feature.id_mode == "vocab":
                assert pa.types.is_string(column.type), feature.name  # strings as strings
            size = data.table(feature.table).num_embeddings
            ids = encode_sparse(column, feature, fitted, size, where)
            np.testing.assert_array_equal(ids.values, hand_table[feature.name].to_numpy(), feature.name)
        for feature in data.dense_feature_configs:
            x, nulls = encode_dense(raw_table[feature.parquet_column], feature, fitted, where)
            np.testing.assert_allclose(x, hand_table[feature.name].to_numpy(), rtol=1e-5, atol=1e-6)
            assert nulls == 0
    return data


def test_census_raw_matches_the_hand_conversion(tmp_path, capsys):
    source = write_census(tmp_path / "src", train_rows=300, test_rows=120)
    hand, raw = tmp_path / "hand", tmp_path / "raw"
    convert_census(str(hand), source=str(source), seed=3, row_group_rows=64)
    argv = ["data", "census", "--out", str(raw), "--source", str(source), "--seed", "3", "--raw"]
    assert cli.main(argv) == 0
    assert str(raw / "config.yaml") in capsys.readouterr().out
    # the tiny source still has the money columns' zeros and enough distinct values for many buckets
    data = assert_raw_equals_hand(raw, hand, ["income", "marital"])

    train = read_split(raw, "train")
    assert pq.read_schema(split_files(raw, "train")[0]).field("age").type == pa.int64()
    expected = [r[CENSUS_COLUMNS.index("class_worker")] for r in census_rows(300, seed=0, test=False)]
    assert train["class_worker"] == expected  # original values, original row order
    assert not any(c.endswith("_bucket") for c in train) and "instance_weight" not in train
    features = {f.name: f for f in data.sparse_features}
    assert features["class_worker"].id_mode == "vocab"
    assert features["capital_gains_bucket"].column == "capital_gains"
    dense = {f.name: f.transforms for f in data.dense_feature_configs}
    assert dense["capital_gains"] == ["log1p", "standardize"] and dense["age"] == ["standardize"]
    assert load_config(raw / "config.yaml").run_dir == "runs/census-raw-ple"  # not the hand run's dir

    # raw into a directory of a hand conversion: its preprocessing.json would describe other files
    summary = convert_census(str(hand), source=str(source), seed=3, raw=True)
    assert not (hand / "preprocessing.json").exists()
    assert any("preprocessing.json" in note for note in summary.notes)


@pytest.mark.parametrize("space", ["visited", "all"])
def test_hillstrom_raw_matches_the_hand_conversion(tmp_path, space):
    source = write_hillstrom(tmp_path / "hillstrom.csv.zip")
    hand, raw = tmp_path / "hand", tmp_path / "raw"
    convert_hillstrom(str(hand), source=str(source), conversion_space=space, row_group_rows=64)
    convert_hillstrom(str(raw), source=str(source), conversion_space=space, row_group_rows=64, raw=True)
    data = assert_raw_equals_hand(raw, hand, ["visit", "conversion"])
    schema = pq.read_schema(split_files(raw, "train")[0])
    assert schema.field("history").type == pa.float64() and schema.field("recency").type == pa.int64()
    assert schema.field("mens").type == pa.string() and "spend" not in schema.names
    conversion = next(t for t in data.tasks if t.name == "conversion")
    assert conversion.sample_space == ("visit" if space == "visited" else None)


def test_bucket_boundaries_need_a_non_negative_column():
    assert bucket_boundaries([], "a") == [ZERO_BOUNDARY]
    assert bucket_boundaries([0.5, 3.0], "a") == [ZERO_BOUNDARY, 0.5, 3.0]
    assert 0 < ZERO_BOUNDARY < 1e-300  # 0 alone below it: every positive value is above
    assert np.searchsorted([ZERO_BOUNDARY], [0.0, 1e-300, 1.0], "right").tolist() == [0, 1, 1]
    with pytest.raises(DatasetError, match=r"column 'gain': bucket edge -2.0 <= 0"):
        bucket_boundaries([-2.0, 3.0], "gain")


# ---- benchmarks.gbdt ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def census_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gbdt")
    source = write_census(root / "src", train_rows=400, test_rows=200)
    convert_census(str(root / "raw"), source=str(source), raw=True)
    return root / "raw"


def test_gbdt_reads_the_configs_columns(census_raw):
    columns = gbdt.feature_columns(load_config(census_raw / "config.yaml").data)
    assert columns.numeric == list(CENSUS_NUMERIC)  # bucketize features leave no second copy
    assert "class_worker" in columns.categorical and not set(columns.categorical) & set(CENSUS_NUMERIC)
    table = gbdt.read_split(census_raw, "valid", columns.all)
    codes = {c: gbdt.ordinal_codes(gbdt.read_split(census_raw, "train", [c])[c]) for c in columns.categorical}
    x = gbdt.matrix(table, columns, codes)
    j = columns.categorical.index("class_worker")
    unseen = np.array(table["class_worker"].to_pylist()) == "Only in test"
    assert unseen.any() and np.isnan(x[unseen, j]).all() and not np.isnan(x[~unseen, j]).any()
    assert np.array_equal(x[:, len(columns.categorical)], table["age"].to_numpy())


def test_gbdt_writes_a_section_per_task(census_raw, tmp_path, capsys):
    pytest.importorskip("sklearn", minversion="1.7")
    results = tmp_path / "RESULTS.md"
    argv = ["--dataset", "census", "--data", str(census_raw), "--results", str(results)]
    assert gbdt.main([*argv, "--max_iter", "20", "--patience", "5", "--threads", "1"]) == 0
    text, printed = results.read_text(), capsys.readouterr().out
    assert "<!-- gbdt-census:start -->" in text and "<!-- gbdt-census:end -->" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for task in ("income", "marital"):
        auc = float(rows[task].split("|")[7].strip().strip("*"))
        assert 0.0 <= auc <= 1.0 and not math.isnan(auc)
        assert f"{task}: " in printed and f"test AUC {auc:.4f}" in printed


def test_gbdt_without_sklearn_says_how_to_install(census_raw, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    argv = ["--dataset", "census", "--data", str(census_raw), "--results", str(tmp_path / "R.md")]
    assert gbdt.main(argv) == 2
    assert "pip install -e .[bench]" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()
