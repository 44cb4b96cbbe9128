"""Typed description of a data set: files, embedding tables, sparse and dense features, tasks.

Example::

    data:
      train: data/demo/train/*.parquet
      eval: data/demo/eval/*.parquet
      tables:
        - {name: user, num_embeddings: 50000, embedding_dim: 16}
      sparse_features:
        - {name: user_id, table: user}
        - {name: item_hist, table: item, multi_hot: true, id_mode: hash}
      dense_features: [price, age]
      tasks:
        - {name: click, label: click}
        - {name: conversion, label: conversion, sample_space: click}
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
    """One embedding table; several sparse features may share it."""

    name: str
    num_embeddings: Annotated[int, Field(gt=0)]
    embedding_dim: Annotated[int, Field(gt=0)]
    pooling: Literal["sum", "mean"] = "sum"


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


PathList = Annotated[list[str], Field(min_length=1)]


class DataConfig(StrictModel):
    train: PathList
    eval: PathList
    tables: Annotated[list[TableConfig], Field(min_length=1)]
    sparse_features: Annotated[list[SparseFeatureConfig], Field(min_length=1)]
    dense_features: list[str] = []
    tasks: Annotated[list[TaskConfig], Field(min_length=1)]

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

    def table(self, name: str) -> TableConfig:
        return next(t for t in self.tables if t.name == name)

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
