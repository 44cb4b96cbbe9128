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
      dense_features: [price, age]
      tasks:
        - {name: click, label: click}
        - {name: conversion, label: conversion, sample_space: click}
      cross:                        # optional: hashed pair crosses for DTN's memonet method
        table: cross_codebook       # a table of `tables`, e.g. {num_embeddings: 100000, embedding_dim: 64}
        fields: [user_id, item_id, city]
"""

from __future__ import annotations

import glob
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
    """A sparse id column. ``name`` is the Parquet column and the KeyedJaggedTensor key.

    ``multi_hot`` columns are ``list<int64>``; single-hot columns are ``int64``.
    ``id_mode``: ``check`` uses ids as-is and fails on an id outside ``[0, num_embeddings)``;
    ``hash`` maps any int64 id into the table with a fixed 64-bit mix (collisions accepted).
    """

    name: str
    table: str
    multi_hot: bool = False
    id_mode: Literal["check", "hash"] = "check"


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
    dense_features: list[str] = []
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
    def label_columns(self) -> list[str]:
        return [t.label for t in self.tasks]

    @property
    def columns(self) -> list[str]:
        """Every Parquet column the loader reads, in a fixed order."""
        names = [f.name for f in self.sparse_features] + list(self.dense_features)
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
        "num_workers": 1,
        "shuffle_buffer": 0,
        "eval_interval": 0,
        "log_interval": 50,
        "sparse_optimizer": {"type": "rowwise_adagrad", "lr": 0.05},
        "dense_optimizer": {"type": "adam", "lr": 0.001},
    }
