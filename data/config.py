"""Typed description of a data set: files, embedding tables, sparse and dense features, tasks.

Example::

    data:
      train: data/demo/train/*.parquet
      eval: data/demo/eval/*.parquet
      tables:
        - {name: user, num_embeddings: 50000, embedding_dim: 16, data_type: fp16}
      sparse_features:
        - {name: user_id, table: user}
        - {name: item_hist, table: item, multi_hot: true, id_mode: hash}
        - {name: workclass, table: workclass, id_mode: vocab, min_count: 5, on_null: default}
        - {name: age_bucket, column: age, table: age_bucket, id_mode: bucketize, quantiles: 20}
      dense_features:
        - price
        - {name: capital_gain, transforms: [log1p, standardize], on_null: default, default: 0.0}
        - {name: hours, transforms: [clip, standardize], clip: [0.0, 80.0]}
      tasks:
        - {name: click, label: click}
        - {name: conversion, label: conversion, sample_space: click}
      cross:                        # optional: hashed pair crosses for DTN's memonet method
        table: cross_codebook       # a table of `tables`, e.g. {num_embeddings: 100000, embedding_dim: 64}
        fields: [user_id, item_id, city]
"""

from __future__ import annotations

import glob
import math
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """Base for every config section: unknown keys and silent type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TableConfig(StrictModel):
    """One embedding table; several sparse features may share it.

    ``data_type``: the precision the table's weights are stored and updated in (TorchRec's
    ``EmbeddingBagConfig.data_type``); ``fp16`` halves the table's memory, and the planner counts
    it so. Its pooled vectors reach the network in fp32.
    """

    name: str
    num_embeddings: Annotated[int, Field(gt=0)]
    embedding_dim: Annotated[int, Field(gt=0)]
    pooling: Literal["sum", "mean"] = "sum"
    data_type: Literal["fp32", "fp16"] = "fp32"


class SparseFeatureConfig(StrictModel):
    """A sparse feature: ids for one embedding table from one Parquet column. ``name`` is the
    KeyedJaggedTensor key; ``column`` the Parquet column (default: ``name``), so one column can
    feed several features (e.g. a dense input and a bucketized embedding).

    ``multi_hot`` columns are lists (``list`` or ``large_list``) of values, one bag per row;
    single-hot columns hold one value per row. ``id_mode`` turns values into table rows
    (``data.transforms``):

    * ``check``: integer ids used as-is; an id outside ``[0, num_embeddings)`` is an error.
    * ``hash``: integers through a fixed 64-bit mix (``data.hashing.hash_ids``), strings through
      a fixed 64-bit hash of their UTF-8 bytes (``hash_strings``), modulo the table size
      (collisions accepted).
    * ``vocab``: strings or integers through a vocabulary fitted on the training files (values
      seen at least ``min_count`` times, default 1) or read from ``vocab_file`` (one value per
      line); entries get ids 1..V, unseen and rare values the out-of-vocabulary id 0.
    * ``bucketize``: a numeric column to the number of ``boundaries`` ``<=`` the value, in
      ``[0, len(boundaries)]``; ``boundaries`` explicit, or ``quantiles: Q`` fitted on the
      training files. Single-hot only.

    ``on_null``: ``error`` (a null value, list or list element is a DataError), ``default`` (it
    becomes ``default_id``, a table row; a null list becomes the bag ``[default_id]``) or ``empty``
    (a null row becomes an empty bag; null list elements are dropped).

    Example::

        {name: workclass, table: workclass, id_mode: vocab, min_count: 5, on_null: default}
    """

    name: str
    table: str
    column: str | None = None
    multi_hot: bool = False
    id_mode: Literal["check", "hash", "vocab", "bucketize"] = "check"
    min_count: Annotated[int, Field(ge=1)] | None = None
    vocab_file: str | None = None
    boundaries: Annotated[list[float], Field(min_length=1)] | None = None
    quantiles: Annotated[int, Field(ge=2)] | None = None
    on_null: Literal["error", "default", "empty"] = "error"
    default_id: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _fields_fit_the_mode(self) -> "SparseFeatureConfig":
        where = f"sparse feature {self.name!r}"
        for field, mode in _SPARSE_MODE_FIELDS.items():
            if getattr(self, field) is not None and self.id_mode != mode:
                raise ValueError(f"{where}: {field} applies to id_mode: {mode}, not {self.id_mode}")
        if self.min_count is not None and self.vocab_file is not None:
            raise ValueError(f"{where}: min_count applies to a fitted vocabulary, not to vocab_file")
        if self.id_mode == "bucketize":
            if (self.boundaries is None) == (self.quantiles is None):
                raise ValueError(f"{where}: id_mode: bucketize needs exactly one of boundaries, quantiles")
            if self.multi_hot:
                raise ValueError(f"{where}: id_mode: bucketize is single-hot only (multi_hot: false)")
        if self.boundaries is not None:
            b = self.boundaries
            if not all(math.isfinite(x) for x in b) or b != sorted(set(b)):
                raise ValueError(f"{where}: boundaries {b} must be finite and strictly increasing")
        # Compared with the default, not "was it given": a dumped config must validate again.
        if self.default_id != 0 and self.on_null != "default":
            raise ValueError(f"{where}: default_id applies to on_null: default, not {self.on_null}")
        return self

    @property
    def parquet_column(self) -> str:
        """The Parquet column the feature reads."""
        return self.column if self.column is not None else self.name

    @property
    def needs_fit(self) -> bool:
        """Whether the feature uses statistics of the training files (``data.features``)."""
        return self.id_mode == "vocab" or self.quantiles is not None


# The fields that only one id_mode reads: giving one for another mode is a config error.
_SPARSE_MODE_FIELDS = {
    "min_count": "vocab",
    "vocab_file": "vocab",
    "boundaries": "bucketize",
    "quantiles": "bucketize",
}


class DenseFeatureConfig(StrictModel):
    """A dense input from a numeric Parquet column ``column`` (default: ``name``).

    ``transforms`` apply in the listed order: ``log1p`` (a value ``<= -1`` is a DataError; clip
    first), ``clip`` to ``clip: [lo, hi]`` (either may be null: unbounded), ``standardize`` with
    the mean and std fitted on the training files over the values as they reach that step (std 0
    counts as 1). ``on_null``: ``error``, or ``default``: a null becomes ``default``, a value in
    transformed space (it is not transformed). NaN passes through every transform unchanged.

    Example::

        {name: capital_gain, transforms: [log1p, standardize], on_null: default, default: 0.0}
    """

    name: str
    column: str | None = None
    transforms: list[Literal["log1p", "clip", "standardize"]] = []
    clip: Annotated[list[float | None], Field(min_length=2, max_length=2)] | None = None
    on_null: Literal["error", "default"] = "error"
    default: float = 0.0

    @model_validator(mode="after")
    def _fields_fit_the_transforms(self) -> "DenseFeatureConfig":
        where = f"dense feature {self.name!r}"
        _require_unique(f"{where}: transforms", list(self.transforms))
        if ("clip" in self.transforms) != (self.clip is not None):
            raise ValueError(f"{where}: clip: [lo, hi] is required exactly when transforms has clip")
        if self.clip is not None:
            lo, hi = self.clip
            if (lo is not None and math.isnan(lo)) or (hi is not None and math.isnan(hi)):
                raise ValueError(f"{where}: clip {self.clip} has NaN")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{where}: clip {self.clip} has lo > hi")
        if self.default != 0.0 and self.on_null != "default":
            raise ValueError(f"{where}: default applies to on_null: default, not {self.on_null}")
        return self

    @property
    def parquet_column(self) -> str:
        """The Parquet column the feature reads."""
        return self.column if self.column is not None else self.name

    @property
    def needs_fit(self) -> bool:
        """Whether the feature uses statistics of the training files (``data.features``)."""
        return "standardize" in self.transforms


class TaskConfig(StrictModel):
    """A binary task: label column, loss weight with optional per-epoch decay, sample space.

    ``sample_space``: name of another task; this task's loss and metrics then count only the
    examples where that task's label is 1 (e.g. conversion counted on clicked examples).
    """

    name: str
    label: str
    loss_weight: Annotated[float, Field(ge=0)] = 1.0
    loss_weight_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    pos_weight: Annotated[float, Field(gt=0)] | None = None
    sample_space: str | None = None


class CrossConfig(StrictModel):
    """MemoNet-style hashed crosses: for every pair ``(a, b)`` of ``fields`` (in the listed order,
    a before b) and each of ``num_hashes`` independent hash functions k, the loader computes one id
    per row, ``hash_pairs(raw id of a, raw id of b, num_embeddings, k)`` (``data.hashing``), and
    feeds it as the single-id feature ``cross_feature_name(a, b, k)`` to ``table``: the codebook,
    an embedding table like any other (the planner places it). Fields must be single-hot; raw ids
    are the Parquet values, before any ``id_mode: hash`` mapping.
    """

    table: str
    fields: Annotated[list[str], Field(min_length=2)]
    num_hashes: Annotated[int, Field(gt=0)] = 2

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(a, b) for i, a in enumerate(self.fields) for b in self.fields[i + 1 :]]

    @property
    def feature_names(self) -> list[str]:
        """Pair-major, hash-minor: the order the codebook's pooled vectors reach the model."""
        return [cross_feature_name(a, b, k) for a, b in self.pairs for k in range(self.num_hashes)]


def cross_feature_name(first: str, second: str, function: int) -> str:
    return f"{first}_x_{second}_h{function}"


PathList = Annotated[list[str], Field(min_length=1)]


class DataConfig(StrictModel):
    train: PathList
    eval: PathList
    tables: Annotated[list[TableConfig], Field(min_length=1)]
    sparse_features: Annotated[list[SparseFeatureConfig], Field(min_length=1)]
    dense_features: list[str | DenseFeatureConfig] = []
    tasks: Annotated[list[TaskConfig], Field(min_length=1)]
    cross: CrossConfig | None = None

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cross_references(self) -> "DataConfig":
        _require_unique("data.tables", [t.name for t in self.tables])
        _require_unique("data.sparse_features", [f.name for f in self.sparse_features])
        _require_unique("data.tasks", [t.name for t in self.tasks])
        tables = {t.name for t in self.tables}
        for i, feature in enumerate(self.sparse_features):
            if feature.table not in tables:
                raise ValueError(
                    f"data.sparse_features[{i}].table: unknown table {feature.table!r} "
                    f"for feature {feature.name!r}; declared tables: {sorted(tables)}"
                )
            self._check_table_rows(i, feature)
        self._check_dense_names()
        used = {f.table for f in self.sparse_features}
        if self.cross is not None:
            self._check_cross(self.cross, tables)
            used.add(self.cross.table)
        for i, table in enumerate(self.tables):
            if table.name not in used:
                raise ValueError(
                    f"data.tables[{i}]: table {table.name!r} is not used by any sparse feature; "
                    "remove it or point a feature's `table` at it"
                )
        task_names = [t.name for t in self.tasks]
        for i, task in enumerate(self.tasks):
            if task.sample_space is None:
                continue
            if task.sample_space not in task_names or task.sample_space == task.name:
                raise ValueError(
                    f"data.tasks[{i}].sample_space: {task.sample_space!r} must name another "
                    f"task; tasks: {task_names}"
                )
        return self

    def _check_table_rows(self, i: int, feature: SparseFeatureConfig) -> None:
        """The rows a feature's config alone implies must exist in its table."""
        size = self.table(feature.table).num_embeddings
        key = f"data.sparse_features[{i}] ({feature.name!r})"
        if feature.on_null == "default" and feature.default_id >= size:
            raise ValueError(
                f"{key}: default_id {feature.default_id} is not a row of table {feature.table!r} "
                f"(num_embeddings={size})"
            )
        if feature.boundaries is not None and len(feature.boundaries) + 1 > size:
            raise ValueError(
                f"{key}: {len(feature.boundaries)} boundaries make {len(feature.boundaries) + 1} buckets; "
                f"table {feature.table!r} has num_embeddings={size}"
            )
        if feature.id_mode == "vocab" and size < 2:
            raise ValueError(
                f"{key}: id_mode: vocab needs num_embeddings >= 2 (row 0 is the out-of-vocabulary id); "
                f"table {feature.table!r} has {size}"
            )

    def _check_dense_names(self) -> None:
        _require_unique("data.dense_features", self.dense_feature_names)
        # data.features keys fitted statistics by feature name.
        fitted_sparse = {f.name for f in self.sparse_features if f.needs_fit}
        clash = sorted(fitted_sparse & {f.name for f in self.dense_feature_configs if f.needs_fit})
        if clash:
            raise ValueError(
                f"data: features {clash} are both a fitted sparse and a standardized dense feature; "
                "rename one (their fitted statistics are stored by name)"
            )

    def _check_cross(self, cross: CrossConfig, tables: set[str]) -> None:
        features = {f.name: f for f in self.sparse_features}
        if cross.table not in tables:
            raise ValueError(
                f"data.cross.table: unknown table {cross.table!r}; declared tables: {sorted(tables)}"
            )
        readers = [f.name for f in self.sparse_features if f.table == cross.table]
        if readers:
            raise ValueError(
                f"data.cross.table: {cross.table!r} is the cross codebook; sparse features {readers} "
                "must use another table"
            )
        _require_unique("data.cross.fields", cross.fields)
        for i, name in enumerate(cross.fields):
            if name not in features:
                raise ValueError(
                    f"data.cross.fields[{i}]: {name!r} is not a sparse feature; "
                    f"sparse features: {sorted(features)}"
                )
            if features[name].multi_hot:
                raise ValueError(
                    f"data.cross.fields[{i}]: {name!r} is multi-hot; a cross field must be single-valued "
                    "(one id per row)"
                )
        _require_unique("data.cross (generated cross feature names)", cross.feature_names)
        clash = sorted(set(cross.feature_names) & set(features))
        if clash:
            raise ValueError(f"data.cross: generated cross features {clash} clash with sparse feature names")

    def table(self, name: str) -> TableConfig:
        return next(t for t in self.tables if t.name == name)

    @property
    def sparse_feature_names(self) -> list[str]:
        """The configured sparse features (Parquet columns), without the derived cross features."""
        return [f.name for f in self.sparse_features]

    @property
    def feature_names(self) -> list[str]:
        """Keys of the loader's KeyedJaggedTensor: the sparse features, then the cross features."""
        return self.sparse_feature_names + (self.cross.feature_names if self.cross is not None else [])

    def table_features(self, table: str) -> list[str]:
        """The features (sparse and cross) that look up ``table``, in KJT order."""
        if self.cross is not None and table == self.cross.table:
            return list(self.cross.feature_names)
        return [f.name for f in self.sparse_features if f.table == table]

    @property
    def dense_feature_configs(self) -> list[DenseFeatureConfig]:
        """The dense features, a plain column name read as ``{name: column}``."""
        return [DenseFeatureConfig(name=f) if isinstance(f, str) else f for f in self.dense_features]

    @property
    def dense_feature_names(self) -> list[str]:
        """The dense features' names, in the order of the model's dense input."""
        return [f if isinstance(f, str) else f.name for f in self.dense_features]

    @property
    def label_columns(self) -> list[str]:
        return [t.label for t in self.tasks]

    @property
    def columns(self) -> list[str]:
        """Every Parquet column the loader reads, in a fixed order."""
        names = [f.parquet_column for f in self.sparse_features]
        names += [f.parquet_column for f in self.dense_feature_configs]
        return list(dict.fromkeys(names + self.label_columns))


def _require_unique(key: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{key}: name {name!r} appears more than once")
        seen.add(name)


def resolve_paths(patterns: list[str], key: str) -> list[str]:
    """Expand files, directories (their ``*.parquet``) and globs into a sorted list of files.

    Raises:
        FileNotFoundError: naming ``key`` and the pattern that matched nothing.
    """
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matched = sorted(glob.glob(os.path.join(pattern, "*.parquet")))
        else:
            matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"{key}: {pattern!r} matches no file")
        files.extend(matched)
    return sorted(dict.fromkeys(files))


def ready_training_section() -> dict[str, Any]:
    """The ``training`` section the data generators (synthetic, public data sets) write into the
    ready ``config.yaml`` beside their data: one place for those defaults."""
    return {
        "batch_size": 1024,
        "epochs": 1,
        "seed": 0,
        "num_workers": 0,
        "shuffle_buffer": 0,
        "eval_interval": 0,
        "log_interval": 50,
        "sparse_optimizer": {"type": "rowwise_adagrad", "lr": 0.05},
        "dense_optimizer": {"type": "adam", "lr": 0.001},
    }
