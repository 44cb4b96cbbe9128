"""Raw rows to an exported artifact's inputs, for a serving client: the training loader's
transforms (``data.transforms``), driven by the artifact's schema alone.

Example::

    artifact = load_artifact("model.pt")                  # trainer.predict
    transform = RowTransform(artifact.schema)              # once: parses config and statistics
    rows = {"user": ["u1", None], "tags": [["a", "b"], []], "age": [31, 57], "gain": [0.0, None]}
    values, lengths, dense = transform(rows)               # or a pyarrow Table / RecordBatch
    artifact.module(values, lengths, dense)                # {"click": [2], ...}

    transform_rows(artifact.schema, table)                 # the same, one call

What it computes, per row, is what ``ParquetDataset`` computes for the same values read from
Parquet (tested equal): each sparse feature through ``encode_sparse`` (``id_mode``: ``check``,
``hash`` of integers and strings, ``vocab`` and ``bucketize`` with the fitted statistics in
``schema["features"]``; nulls per ``on_null``), the cross features of ``schema["data"]["cross"]``
from the cross fields' raw ids, each dense feature through ``encode_dense`` (``transforms``,
``on_null``). Output layout: ``trainer.export`` (``forward``).

Input: a ``pyarrow.Table`` or ``RecordBatch`` with the feature columns (others are ignored), or a
dict of column name to a Python list (converted by ``pyarrow.array``; a column of only None takes
the type the feature reads). A missing column, a type the feature does not take, a null where
``on_null: error`` or an id outside its table under ``id_mode: check`` is a ``DataError`` naming
the column, row and value. Vectorised per column: no per-row Python on the Arrow paths.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import torch
from towerrec.data.config import DataConfig, SparseFeatureConfig
from towerrec.data.errors import DataError
from towerrec.data.features import FittedFeatures
from towerrec.data.hashing import cross_ids
from towerrec.data.transforms import column_type_ok, encode_dense, encode_sparse, expected_type

Rows = pa.Table | pa.RecordBatch | Mapping[str, Sequence[Any]]
SERVING_PATH = "<serving rows>"  # stands for the data files in the schema's DataConfig


def schema_data_config(schema: dict[str, Any], files: list[str] | None = None) -> DataConfig:
    """The artifact's data section (tables, features, tasks) as a ``DataConfig`` reading ``files``
    (default: none real, for transforming rows in memory)."""
    files = files if files is not None else [SERVING_PATH]
    return DataConfig.model_validate({**schema["data"], "train": files, "eval": files})


class _RowSite(NamedTuple):
    """Error site of in-memory rows: column, row and value (no file)."""

    what: str

    def error(self, column: str, index: int, value: object, expected: str, note: str = "") -> DataError:
        return DataError(
            f"{self.what}: column {column!r}, row {index}: value {value!r}{note}; expected {expected}"
        )


class RowTransform:
    """Raw rows to ``(values, lengths, dense)`` for an artifact of ``schema`` (module docstring).

    ``nulls_replaced``: per feature, the nulls replaced or dropped per its ``on_null`` so far
    (the loader reports the same per epoch).

    Raises:
        ValueError: a schema whose features need fitted statistics it does not carry.
    """

    def __init__(self, schema: dict[str, Any]) -> None:
        self.data = schema_data_config(schema)
        raw = schema.get("features")
        self.features: FittedFeatures | None = (
            FittedFeatures.from_json(raw, "the artifact's schema") if raw is not None else None
        )
        if FittedFeatures.needs_fit(self.data):
            if self.features is None:
                raise ValueError(
                    "the artifact's schema has features that need fitted statistics (vocab, "
                    "bucketize quantiles, standardize) but no 'features' entry: re-export the run"
                )
            self.features.check(self.data)
        self.sizes = {t.name: t.num_embeddings for t in self.data.tables}
        self.nulls_replaced = dict.fromkeys(
            [f.name for f in self.data.sparse_features] + self.data.dense_feature_names, 0
        )

    def __call__(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``values`` int64 ``[sum(lengths)]``, ``lengths`` int32 ``[F * B]`` feature-major,
        ``dense`` float32 ``[B, D]`` of the ``B`` rows."""
        columns = self._columns(rows)
        n = len(next(iter(columns.values()))) if columns else 0
        site = _RowSite("serving rows")
        values, lengths = [], []
        cross = self.data.cross
        raw: dict[str, np.ndarray] = {}
        for feature in self.data.sparse_features:
            column = columns[feature.parquet_column]
            ids = encode_sparse(column, feature, self.features, self.sizes[feature.table], site)
            self.nulls_replaced[feature.name] += ids.nulls_replaced
            values.append(ids.values)
            lengths.append(ids.lengths)
            if cross is not None and feature.name in cross.fields:
                raw[feature.name] = _cross_raw(column, feature)
        if cross is not None:
            ids = cross_ids(raw, cross.pairs, cross.num_hashes, self.sizes[cross.table])
            values += ids
            lengths += [np.ones(n, np.int32) for _ in ids]
        dense = np.empty((n, len(self.data.dense_features)), np.float32)
        for j, feature in enumerate(self.data.dense_feature_configs):
            dense[:, j], replaced = encode_dense(
                columns[feature.parquet_column], feature, self.features, site
            )
            self.nulls_replaced[feature.name] += replaced
        return (
            torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            torch.from_numpy(np.concatenate(lengths).astype(np.int32, copy=False)),
            torch.from_numpy(dense),
        )

    def _columns(self, rows: Rows) -> dict[str, pa.Array | pa.ChunkedArray]:
        """The feature columns of ``rows``, of the same length, with types the features take."""
        readers: dict[str, list[Any]] = {}
        for feature in [*self.data.sparse_features, *self.data.dense_feature_configs]:
            readers.setdefault(feature.parquet_column, []).append(feature)
        names = rows.column_names if isinstance(rows, (pa.Table, pa.RecordBatch)) else list(rows)
        columns: dict[str, pa.Array | pa.ChunkedArray] = {}
        for name, features in readers.items():
            if name not in names:
                raise DataError(
                    f"serving rows: column {name!r} (feature {features[0].name!r}) is missing; "
                    f"the rows have columns {list(names)}"
                )
            if isinstance(rows, (pa.Table, pa.RecordBatch)):
                column = rows.column(name)
            else:
                column = _from_python(rows[name], name, features[0], self.features)
            for feature in features:
                if not column_type_ok(feature, column.type):
                    raise DataError(
                        f"serving rows: column {name!r} has type {column.type}; expected "
                        f"{expected_type(feature)} ({feature.name!r})"
                    )
            columns[name] = column
        counts = {name: len(c) for name, c in columns.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"serving rows: the columns have different numbers of rows: {counts}")
        return columns


def transform_rows(schema: dict[str, Any], rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``RowTransform(schema)(rows)``: one call (parse the schema once with RowTransform to serve
    many requests).

    Example::

        values, lengths, dense = transform_rows(artifact.schema, pa.table({...}))
    """
    return RowTransform(schema)(rows)


def _from_python(values: Sequence[Any], name: str, feature: Any, fitted: FittedFeatures | None) -> pa.Array:
    """A Python list as an Arrow array; only None: the type ``feature`` reads."""
    try:
        column = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"serving rows: column {name!r} is not one Arrow type: {e}") from None
    if pa.types.is_null(column.type):
        column = pa.nulls(len(column), _null_type(feature, fitted))
    elif pa.types.is_list(column.type) and pa.types.is_null(column.type.value_type):
        column = column.cast(pa.list_(_null_type(feature, fitted, element=True)))
    return column


def _null_type(feature: Any, fitted: FittedFeatures | None, element: bool = False) -> pa.DataType:
    """The type of a column of only nulls (or of lists of only nulls): what the feature reads."""
    if not isinstance(feature, SparseFeatureConfig):
        return pa.float64()
    value = pa.int64()
    if feature.id_mode == "bucketize":
        value = pa.float64()
    elif feature.id_mode == "vocab" and fitted is not None:
        vocab = fitted.vocab(feature.name).values
        value = pa.large_string() if vocab and isinstance(vocab[0], str) else pa.int64()
    return pa.list_(value) if feature.multi_hot and not element else value


def _cross_raw(column: pa.Array | pa.ChunkedArray, feature: SparseFeatureConfig) -> np.ndarray:
    """The raw ids of a cross field, as the loader takes them (``data.config.CrossConfig``): an
    integer column read as it is (wrapping cast, as the loader's); nulls were refused by
    ``encode_sparse`` (a cross field has ``on_null: error``)."""
    if not pa.types.is_integer(column.type):
        raise DataError(
            f"serving rows: column {feature.parquet_column!r} has type {column.type}; a cross field "
            f"({feature.name!r}) is an integer id column"
        )
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.cast(pa.int64(), safe=False).to_numpy()
