"""Raw Parquet columns to table rows and dense inputs, per the feature's config (vectorised).

Example::

    ids = encode_sparse(batch.column("workclass"), feature, fitted, num_embeddings=16, where=where)
    ids.values, ids.lengths, ids.nulls_replaced  # int64 rows, int32 bag sizes, nulls handled
    dense, nulls = encode_dense(batch.column("capital_gain"), dense_feature, fitted, where)

Sparse values become rows by ``id_mode`` (``data.config.SparseFeatureConfig``): ``check``
(integers as-is, in range), ``hash`` (integers: ``hash_ids``; strings: ``hash_strings`` of the
UTF-8 bytes, modulo the table size), ``vocab`` (0 out of vocabulary, entries 1..V, from
``data.features``), ``bucketize`` (the number of boundaries ``<=`` the value; NaN counts as
null). Nulls follow ``on_null``; ``nulls_replaced`` counts every null single value, null list and
null list element that was replaced or dropped.

Dense values: float64 through ``transforms`` in order, then float32; a null becomes ``default``.

Types: ``column_type_ok`` and ``expected_type`` say which Arrow types a feature accepts;
``check_type_drift`` rejects a column whose kind of value changes between files (integer widths,
string/large_string and list/large_list may mix; integers and strings may not).

All work is per column, never per row in Python. Errors name the file, row group, column, row
and value through the caller's ``where`` (``data.errors.Where``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from towerrec.data.config import DenseFeatureConfig, SparseFeatureConfig
from towerrec.data.errors import DataError, ErrorSite, Shifted, first
from towerrec.data.hashing import hash_ids, hash_strings


class _Vocab(Protocol):
    values: Sequence[str] | Sequence[int]

    def ids(self, column: pa.Array, name: str = "") -> np.ndarray: ...


class _Moments(Protocol):
    mean: float
    std: float


class FittedFeatures(Protocol):
    """What the transforms read of ``data.features.FittedFeatures`` (which imports this module)."""

    def vocab(self, name: str) -> _Vocab: ...

    def boundaries(self, name: str) -> np.ndarray: ...

    def moments(self, name: str) -> _Moments: ...


class SparseIds(NamedTuple):
    """One sparse feature of a slice of rows: flat table rows and the bag size of each row."""

    values: np.ndarray  # int64, the rows' ids one after the other
    lengths: np.ndarray  # int32 [N]
    nulls_replaced: int  # nulls (values, lists, list elements) replaced or dropped per on_null


# ---- types ----------------------------------------------------------------------------------


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _value_ok(id_mode: str, t: pa.DataType) -> bool:
    if id_mode == "check":
        return pa.types.is_integer(t)
    if id_mode in ("hash", "vocab"):
        return pa.types.is_integer(t) or _is_string(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t)  # bucketize


def column_type_ok(feature: SparseFeatureConfig | DenseFeatureConfig | str, t: pa.DataType) -> bool:
    """Whether a column of Arrow type ``t`` can feed ``feature`` (a plain string: a dense column).

    Example::

        column_type_ok(SparseFeatureConfig(name="c", table="t", id_mode="hash"), pa.large_string())  # True
    """
    if not isinstance(feature, SparseFeatureConfig):
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    if feature.multi_hot:
        return _is_list(t) and _value_ok(feature.id_mode, t.value_type)
    return _value_ok(feature.id_mode, t)


_VALUE_TEXT = {
    "check": ("integer", "an integer type (int8..int64, uint8..uint64)"),
    "hash": ("integer|string", "an integer or string type (int8..uint64, string, large_string)"),
    "vocab": ("integer|string", "an integer or string type (int8..uint64, string, large_string)"),
    "bucketize": ("integer|float", "an integer or float type"),
}


def expected_type(feature: SparseFeatureConfig | DenseFeatureConfig | str) -> str:
    """What ``column_type_ok`` accepts for ``feature``, for error messages."""
    if not isinstance(feature, SparseFeatureConfig):
        return "a float or integer type for a dense feature"
    short, long = _VALUE_TEXT[feature.id_mode]
    mode = f"id_mode: {feature.id_mode}"
    if feature.multi_hot:
        return f"list<{short}> or large_list<{short}> for a multi-hot sparse feature with {mode}"
    return f"{long} for a single-hot sparse feature with {mode}"


def _kind(t: pa.DataType) -> str:
    """The kind of value a type holds: types of one kind may mix across files."""
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"  # whether a feature takes floats is column_type_ok's business
    if _is_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if _is_list(t):
        return f"list<{_kind(t.value_type)}>"
    return str(t)


def check_type_drift(files: list[str], columns: list[str]) -> dict[str, pa.DataType]:
    """Read the footers of ``files`` and check that each column holds the same kind of values in
    all of them; returns each column's type in the first file.

    Example::

        check_type_drift(["a.parquet", "b.parquet"], ["workclass"])  # {"workclass": string}

    Raises:
        DataError: a column missing from a file, or an integer column in one file and a string
            one in another (naming both files and types).
    """
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        for column in columns:
            if schema.get_field_index(column) < 0:
                raise DataError(f"{path}: column {column!r} is missing; the file has columns {schema.names}")
            found = schema.field(column).type
            if column not in seen:
                seen[column] = (found, path)
                continue
            before, before_path = seen[column]
            if _kind(found) != _kind(before):
                raise DataError(
                    f"column {column!r} has type {before} in {before_path} but {found} in {path}; "
                    "a column must hold the same kind of values in every file (integer widths, "
                    "string and large_string, list and large_list may mix)"
                )
    return {column: t for column, (t, _) in seen.items()}


# ---- sparse ---------------------------------------------------------------------------------


def encode_sparse(
    column: pa.Array | pa.ChunkedArray,
    feature: SparseFeatureConfig,
    fitted: FittedFeatures | None,
    num_embeddings: int,
    where: ErrorSite,
) -> SparseIds:
    """Table rows of one column of a slice of rows, per ``feature`` (module docstring).

    ``fitted``: the run's fitted statistics, needed for ``vocab`` and ``bucketize: quantiles``.

    Example::

        ids = encode_sparse(pa.array(["a", None]), hash_feature_on_null_empty, None, 100, where)
        ids.lengths  # [1, 0]; ids.nulls_replaced == 1

    Raises:
        DataError: a null under ``on_null: error``, an id outside the table under ``check``,
            through ``where`` (file, row group, column, row, value).
    """
    if isinstance(column, pa.ChunkedArray):
        parts, offset = [], 0
        for chunk in column.chunks:
            parts.append(encode_sparse(chunk, feature, fitted, num_embeddings, Shifted(where, offset)))
            offset += len(chunk)
        if not parts:
            return SparseIds(np.zeros(0, np.int64), np.zeros(0, np.int32), 0)
        return SparseIds(
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            sum(p.nulls_replaced for p in parts),
        )
    if feature.multi_hot:
        return _encode_lists(column, feature, fitted, num_embeddings, where)
    return _encode_single(column, feature, fitted, num_embeddings, where)


def _non_null(feature: SparseFeatureConfig) -> str:
    kind = "integer id" if feature.id_mode == "check" else "value"
    return f"a non-null {kind} (on_null: default or empty replaces nulls)"


def _missing(column: pa.Array, feature: SparseFeatureConfig) -> np.ndarray | None:
    """Null rows (and NaN ones for bucketize) as a bool mask, or None if there are none."""
    mask = column.is_null().to_numpy(zero_copy_only=False) if column.null_count else None
    if feature.id_mode == "bucketize" and pa.types.is_floating(column.type):
        nan = np.isnan(column.to_numpy(zero_copy_only=False))
        if nan.any():
            mask = nan if mask is None else mask | nan
    return mask


def _encode_single(
    column: pa.Array, feature: SparseFeatureConfig, fitted: FittedFeatures | None, size: int, where: ErrorSite
) -> SparseIds:
    n, name = len(column), feature.parquet_column
    missing = _missing(column, feature)
    if missing is None:
        ids = _rows(column, feature, fitted, size, where, lambda k: (k, ""))
        return SparseIds(ids, np.ones(n, np.int32), 0)
    if feature.on_null == "error":
        k = first(missing)
        raise where.error(name, k, column[k].as_py(), _non_null(feature))  # None, or NaN for bucketize
    present = np.flatnonzero(~missing)
    ids = _rows(column.take(pa.array(present)), feature, fitted, size, where, lambda k: (int(present[k]), ""))
    if feature.on_null == "default":
        out = np.full(n, feature.default_id, np.int64)
        out[present] = ids
        return SparseIds(out, np.ones(n, np.int32), int(missing.sum()))
    return SparseIds(ids, (~missing).astype(np.int32), int(missing.sum()))  # empty


def _encode_lists(
    column: pa.Array, feature: SparseFeatureConfig, fitted: FittedFeatures | None, size: int, where: ErrorSite
) -> SparseIds:
    n, name = len(column), feature.parquet_column
    value_lengths = column.value_lengths()  # null for a null list
    null_lists = value_lengths.is_null().to_numpy(zero_copy_only=False) if value_lengths.null_count else None
    lengths = value_lengths.fill_null(0).to_numpy().astype(np.int64)
    if null_lists is not None and feature.on_null == "error":
        expected = "a list of ids, not a null list (on_null: default or empty replaces nulls)"
        raise where.error(name, first(null_lists), None, expected)
    flat = column.flatten()  # honours the slice offset and skips null lists, unlike .values
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    def row_of(k: np.ndarray | int) -> np.ndarray:
        return np.searchsorted(offsets, k, side="right") - 1

    null_items = flat.is_null().to_numpy(zero_copy_only=False) if flat.null_count else None
    if null_items is not None and feature.on_null == "error":
        k = first(null_items)
        row = int(row_of(k))
        raise where.error(
            name,
            row,
            column[row].as_py(),
            "non-null ids (on_null: default or empty replaces nulls)",
            f" (element {k - offsets[row]} is null)",
        )
    present = np.arange(len(flat)) if null_items is None else np.flatnonzero(~null_items)

    def locate(k: int) -> tuple[int, str]:
        item = int(present[k])
        row = int(row_of(item))
        return row, f" (element {item - offsets[row]} of the row's list)"

    ids = _rows(
        flat if null_items is None else flat.take(pa.array(present)), feature, fitted, size, where, locate
    )
    replaced = 0
    if null_items is not None:
        replaced += int(null_items.sum())
        if feature.on_null == "default":
            full = np.full(len(flat), feature.default_id, np.int64)
            full[present] = ids
            ids = full
        else:  # empty: the null elements are dropped from their bags
            lengths = lengths - np.bincount(row_of(np.flatnonzero(null_items)), minlength=n)
    if null_lists is not None:
        replaced += int(null_lists.sum())
        if feature.on_null == "default":  # a null list becomes the bag [default_id]
            starts = np.cumsum(lengths) - lengths
            ids = np.insert(ids, starts[null_lists], feature.default_id)
            lengths = lengths + null_lists
    return SparseIds(ids.astype(np.int64, copy=False), lengths.astype(np.int32), replaced)


def _rows(
    values: pa.Array,
    feature: SparseFeatureConfig,
    fitted: FittedFeatures | None,
    size: int,
    where: ErrorSite,
    locate: Callable[[int], tuple[int, str]],
) -> np.ndarray:
    """Table rows (int64) of non-null ``values``; ``locate(k)``: row and note of value k, for errors."""
    mode = feature.id_mode
    if mode == "check":
        return checked_ids(_integers(values), values, feature, size, where, locate)
    if mode == "hash":
        if _is_string(values.type):
            return (string_hashes(values) % np.uint64(size)).astype(np.int64)
        return hash_ids(_integers(values), size)
    if mode == "vocab":
        vocab = _fitted(fitted, feature.name).vocab(feature.name)
        if len(vocab.values) + 1 > size:
            raise ValueError(
                f"feature {feature.name!r}: a fitted vocabulary of {len(vocab.values)} values needs "
                f"num_embeddings >= {len(vocab.values) + 1}; table {feature.table!r} has {size}"
            )
        return vocab.ids(values, feature.parquet_column)
    boundaries = (
        np.asarray(feature.boundaries, np.float64)
        if feature.boundaries is not None
        else _fitted(fitted, feature.name).boundaries(feature.name)
    )
    if len(boundaries) + 1 > size:
        raise ValueError(
            f"feature {feature.name!r}: {len(boundaries)} boundaries need num_embeddings >= "
            f"{len(boundaries) + 1}; table {feature.table!r} has {size}"
        )
    x = values.to_numpy(zero_copy_only=False)
    return np.searchsorted(boundaries, x, side="right").astype(np.int64)


def checked_ids(
    ids: np.ndarray,
    values: pa.Array,
    feature: SparseFeatureConfig,
    size: int,
    where: ErrorSite,
    locate: Callable[[int], tuple[int, str]],
) -> np.ndarray:
    """``ids`` (``values`` as read) when every one is a row of the table (``id_mode: check``);
    ``locate(k)``: row and note of value k, for the error naming the first that is not."""
    if len(ids) and (ids.min() < 0 or ids.max() >= size):  # two reductions, no temporaries
        k = first((ids < 0) | (ids >= size))
        row, note = locate(k)
        raise where.error(
            feature.parquet_column,
            row,
            values[k].as_py(),
            f"an id in [0, {size}) of table {feature.table!r} (num_embeddings={size}); "
            "id_mode: hash accepts any id",
            note,
        )
    return ids


def _fitted(fitted: FittedFeatures | None, name: str) -> FittedFeatures:
    if fitted is None:
        raise ValueError(
            f"feature {name!r} needs fitted statistics (data.features.FittedFeatures); none given"
        )
    return fitted


def _integers(values: pa.Array) -> np.ndarray:
    # Wrapping cast: uint64 ids keep their bits (hash mode) or turn negative (rejected by check).
    return values.cast(pa.int64(), safe=False).to_numpy()


def string_hashes(values: pa.Array) -> np.ndarray:
    """``hash_strings`` of each value of a string or large_string array (nulls hash as ''
    or as their slot's bytes: filter them out first); uint64.

    Example::

        string_hashes(pa.array(["Private", "Self-emp"]))  # two uint64
    """
    buffers = values.buffers()
    width = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(buffers[1], width)[values.offset : values.offset + len(values) + 1]
    if len(values) == 0:
        return np.zeros(0, np.uint64)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return hash_strings(offsets, data)


# ---- dense ----------------------------------------------------------------------------------


def encode_dense(
    column: pa.Array | pa.ChunkedArray,
    feature: DenseFeatureConfig | str,
    fitted: FittedFeatures | None,
    where: ErrorSite,
) -> tuple[np.ndarray, int]:
    """The float32 ``[N]`` dense input of one column of a slice of rows, and the nulls replaced.

    Example::

        x, nulls = encode_dense(pa.array([0.0, None]), DenseFeatureConfig(name="gain",
            transforms=["log1p"], on_null="default", default=-1.0), None, where)  # [0, -1], 1

    Raises:
        DataError: a null under ``on_null: error``, a value ``<= -1`` reaching ``log1p``.
    """
    if isinstance(feature, str):
        feature = DenseFeatureConfig(name=feature)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()  # numbers only: no 2 GB offset limit to hit
    missing = column.is_null().to_numpy(zero_copy_only=False) if column.null_count else None
    if missing is not None and feature.on_null == "error":
        expected = "a non-null number (NaN is allowed; on_null: default replaces nulls)"
        raise where.error(feature.parquet_column, first(missing), None, expected)
    x = column.to_numpy(zero_copy_only=False)  # nulls read as NaN
    if not feature.transforms:
        x = x.astype(np.float32, copy=False)
    else:
        x = apply_dense_transforms(x.astype(np.float64), feature, fitted, where)
    if missing is None:
        return x.astype(np.float32, copy=False), 0
    x = x.astype(np.float32)
    x[missing] = feature.default
    return x, int(missing.sum())


def apply_dense_transforms(
    x: np.ndarray,
    feature: DenseFeatureConfig,
    fitted: FittedFeatures | None,
    where: ErrorSite,
    stop: int | None = None,
) -> np.ndarray:
    """``feature.transforms[:stop]`` applied in order to float64 ``x`` (NaN passes through).

    Example::

        apply_dense_transforms(np.array([0.0, 9.0]), DenseFeatureConfig(name="a", transforms=["log1p"]),
                               None, where)  # [0, log(10)]
    """
    for step in feature.transforms[:stop]:
        if step == "log1p":
            bad = x <= -1.0
            if bad.any():
                k = first(bad)
                raise where.error(
                    feature.parquet_column,
                    k,
                    float(x[k]),
                    "a value > -1 for log1p (put clip, e.g. clip: [0.0, null], before log1p)",
                    f" (feature {feature.name!r}, at its log1p step)",
                )
            x = np.log1p(x)
        elif step == "clip":
            lo, hi = feature.clip or (None, None)
            x = np.clip(x, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        else:  # standardize
            moments = _fitted(fitted, feature.name).moments(feature.name)
            x = (x - moments.mean) / moments.std
    return x
