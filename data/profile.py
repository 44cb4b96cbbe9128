"""What a set of Parquet files holds, per column: type, nulls, cardinality, ranges, list lengths.

Read by ``towerrec init`` to write a config for the user's own data. Every file's footer is read
(schemas, row counts, column statistics); rows are read only as a bounded, seeded sample.

Example::

    profile = profile_files(["data/part-0.parquet", "data/part-1.parquet"], sample_rows=200_000)
    profile.rows, profile.sampled_rows        # 3_000_000, 200_000
    c = profile.columns["workclass"]
    c.kind, c.distinct, c.exact, c.nulls      # "string", 9, False, 12

Sample: when the files hold at most ``sample_rows`` rows, every row is read (``exact``: the counts
are the data's). Otherwise the row groups are visited in a seeded random order and each gives at
most ``ceil(sample_rows / min(G, 64))`` uniformly drawn rows (G row groups) until ``sample_rows``
are taken, so the sample spreads over at least ``min(G, 64)`` row groups, not the first few.
Memory: the sample plus one row group of the read columns.

Per column (lists: over their elements, plus the list lengths):

* ``nulls``: null values in the sample; ``file_nulls``: nulls over every row of every file (also
  the footer-only ones) from the footers' statistics (flat columns whose every row group records
  them; else None).
* ``distinct``: distinct non-null values in the sample (exact, by ``pyarrow.compute.value_counts``);
  ``distinct_estimate``: over all rows, the same number when the sample is every row, else the GEE
  estimate of Charikar et al. (PODS 2000), ``sqrt(N/n) * f1 + sum_{j>=2} f_j`` (f_j: values seen
  exactly j times in a sample of n of the N values), between ``distinct`` and N.
* numerics: ``min``/``max`` over all rows of every file from the footers where every row group
  records them, else over the sample (``range_exact`` says which); sample quantiles ``q001, q01, q99, q999``
  (0.1 %, 1 %, 99 %, 99.9 %) of the finite values; ``nonfinite``: NaN and infinities seen.

Types may differ between files as the loader accepts (string / large_string, int32 / int64,
dictionary-encoded values, and integer / float, read as float); anything else (an integer column
in one file and a string in another) is a :class:`ProfileError` naming both files and types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Kinds of columns the raw-feature config reads; anything else is "unsupported".
SCALAR_KINDS = ("integer", "float", "string", "bool")
# Row groups the sample spreads over when the files have more (the per-group quota divides by it).
SPREAD_ROW_GROUPS = 64
TOP_VALUES = 5


class ProfileError(ValueError):
    """Files that cannot be profiled together; the message names the files, column and types."""


def column_kind(t: pa.DataType) -> str:
    """``integer``, ``float``, ``string``, ``bool``, ``list<K>`` (K one of those), ``null`` (the
    type of a column with no values) or ``unsupported``.

    Example::

        column_kind(pa.large_list(pa.large_string()))  # "list<string>"
    """
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):  # a file where the column is always null: takes the other files' kind
        return "null"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = column_kind(t.value_type)
        return f"list<{inner}>" if inner in SCALAR_KINDS else "unsupported"
    return "unsupported"


def _merge_kinds(first: str, second: str) -> str | None:
    """The kind two files' types read as together, or None when they are incompatible."""
    if first == second or second == "null":
        return first
    if first == "null":
        return second
    if {first, second} == {"integer", "float"}:
        return "float"
    return None


@dataclass(frozen=True)
class FileSchema:
    """One file's footer: its Arrow schema and row-group sizes."""

    path: str
    schema: pa.Schema
    row_groups: tuple[int, ...]
    metadata: pq.FileMetaData = field(repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return sum(self.row_groups)


def read_schemas(files: list[str]) -> list[FileSchema]:
    """Every file's footer.

    Raises:
        ProfileError: a file is not readable Parquet (naming it).
    """
    out = []
    for path in files:
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise ProfileError(f"{path}: not a readable Parquet file: {e}") from None
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        out.append(FileSchema(path, schema, groups, meta))
    return out


@dataclass(frozen=True)
class ColumnLayout:
    """A column across files: its kind, the type in the first file that has it, and where it is
    missing."""

    name: str
    kind: str
    type: str
    missing_in: tuple[str, ...]
    note: str = ""
    arrow_type: pa.DataType | None = field(default=None, compare=False)


def column_layouts(schemas: list[FileSchema]) -> dict[str, ColumnLayout]:
    """Every column of any file, in first-seen order, with its kind over all files.

    Raises:
        ProfileError: a column's types are incompatible between two files (naming both).
    """
    seen: dict[str, tuple[str, str, str]] = {}  # name -> (kind, type, first path)
    types: dict[str, pa.DataType] = {}
    notes: dict[str, str] = {}
    for s in schemas:
        for f in s.schema:
            kind = column_kind(f.type)
            if f.name not in seen or seen[f.name][0] == "null":  # the first file with values sets the type
                seen[f.name] = (kind, str(f.type), s.path)
                types[f.name] = f.type
                if pa.types.is_dictionary(f.type):
                    notes[f.name] = "dictionary-encoded"
                continue
            known, known_type, where = seen[f.name]
            merged = _merge_kinds(known, kind)
            if merged is None:
                raise ProfileError(
                    f"column {f.name!r} has type {known_type} in {where} and {f.type} in {s.path}; "
                    "a column must keep one kind (integer, float, string, bool or a list of one) in "
                    "every file (string/large_string and int32/int64 may mix)"
                )
            if merged != known:
                notes[f.name] = f"integer in some files, float in others ({where}, {s.path}): read as float"
            seen[f.name] = (merged, known_type, where)
    return {
        name: ColumnLayout(
            name,
            kind,
            type_,
            tuple(s.path for s in schemas if s.schema.get_field_index(name) < 0),
            notes.get(name, ""),
            types[name],
        )
        for name, (kind, type_, _) in seen.items()
    }


@dataclass(frozen=True)
class ColumnProfile:
    """What the sample and the footers say about one column (module docstring)."""

    name: str
    kind: str
    type: str
    rows: int
    nulls: int
    file_nulls: int | None
    distinct: int
    distinct_estimate: int
    exact: bool
    top: tuple[tuple[Any, int], ...] = ()
    null_elements: int = 0
    values: int = 0  # non-null values in the sample (lists: elements)
    min: float | None = None
    max: float | None = None
    range_exact: bool = False
    q001: float | None = None
    q01: float | None = None
    q50: float | None = None
    q99: float | None = None
    q999: float | None = None
    nonfinite: int = 0
    list_lengths: tuple[int, float, int] | None = None  # min, mean, max
    note: str = ""

    @property
    def any_nulls(self) -> bool:
        """Nulls in the sample, or in any file by the footers' statistics (elements of lists too)."""
        return self.nulls > 0 or self.null_elements > 0 or bool(self.file_nulls)

    @property
    def element_kind(self) -> str:
        """The kind of the values: the column's, or its elements' for a list."""
        return self.kind[5:-1] if self.kind.startswith("list<") else self.kind


@dataclass(frozen=True)
class DataProfile:
    """Files, their row count, the sample (with ``_file`` and ``_row`` provenance) and per-column
    profiles of the readable columns present in every file (``layouts``: every column;
    ``footers``: every file's, the footer-only ones after ``files``)."""

    files: list[str]
    rows: int
    sample: pa.Table = field(repr=False)
    columns: dict[str, ColumnProfile]
    layouts: dict[str, ColumnLayout]
    footers: list[FileSchema] = field(repr=False)
    seed: int

    @property
    def sampled_rows(self) -> int:
        return self.sample.num_rows

    @property
    def exact(self) -> bool:
        """The sample is every row of the files."""
        return self.sampled_rows == self.rows

    def where(self, index: int) -> str:
        """``path, row R`` of sample row ``index`` (R counts from 0 within the file)."""
        f = self.sample.column("_file")[index].as_py()
        return f"{self.files[f]}, row {self.sample.column('_row')[index].as_py()}"


def profile_files(
    files: list[str], sample_rows: int = 200_000, seed: int = 0, also: list[str] | None = None
) -> DataProfile:
    """Footers of every file, a sample of ``sample_rows`` rows of ``files`` and the per-column
    statistics. ``also``: files read by footer only (evaluation files): their columns and types
    join the layouts and the footer statistics (nulls, ranges), never the sample, so nothing
    fitted from the sample comes from them.

    Raises:
        ProfileError: no files, an unreadable file, or a column whose kind differs between files.
    """
    if not files:
        raise ProfileError("no Parquet files to profile")
    if sample_rows <= 0:
        raise ValueError(f"sample_rows must be > 0, got {sample_rows}")
    schemas = read_schemas(files)
    every = schemas + read_schemas(list(also or []))
    layouts = column_layouts(every)
    readable = [
        c for c, lay in layouts.items() if lay.kind not in ("unsupported", "null") and not lay.missing_in
    ]
    sample = sample_table(schemas, readable, sample_rows, seed)
    rows = sum(s.num_rows for s in schemas)
    exact = sample.num_rows == rows
    columns = {}
    for name in readable:
        columns[name] = _profile_column(sample.column(name), layouts[name], every, rows, exact)
    return DataProfile(files, rows, sample, columns, layouts, every, seed)


def sample_table(schemas: list[FileSchema], columns: list[str], sample_rows: int, seed: int) -> pa.Table:
    """``columns`` of at most ``sample_rows`` rows (module docstring), plus ``_file`` (index into
    ``schemas``) and ``_row`` (row within the file), in the order the row groups were read."""
    groups = [
        (f, g, n, sum(s.row_groups[:g])) for f, s in enumerate(schemas) for g, n in enumerate(s.row_groups)
    ]
    total = sum(n for _, _, n, _ in groups)
    rng = np.random.default_rng(seed)
    everything = total <= sample_rows
    order = range(len(groups)) if everything else rng.permutation(len(groups))
    quota = math.ceil(sample_rows / max(1, min(len(groups), SPREAD_ROW_GROUPS)))
    parts, taken = [], 0
    for i in order:
        f, g, n, first = groups[i]
        if n == 0:
            continue
        want = n if everything else min(n, quota, sample_rows - taken)
        if want <= 0:
            break
        table = _read_row_group(schemas[f].path, g, columns)
        index = np.arange(n) if want == n else np.sort(rng.choice(n, want, replace=False))
        part = table.take(pa.array(index)) if want < n else table
        part = part.append_column("_file", pa.array(np.full(want, f, np.int32)))
        parts.append(part.append_column("_row", pa.array(first + index)))
        taken += want
    if not parts:
        empty = {c: pa.array([], pa.null()) for c in columns}
        return pa.table({**empty, "_file": pa.array([], pa.int32()), "_row": pa.array([], pa.int64())})
    return pa.concat_tables(parts, promote_options="permissive")


def _read_row_group(path: str, group: int, columns: list[str]) -> pa.Table:
    table = pq.ParquetFile(path).read_row_group(group, columns=columns)
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
    return table


def _profile_column(
    column: pa.ChunkedArray, layout: ColumnLayout, schemas: list[FileSchema], rows: int, exact: bool
) -> ColumnProfile:
    is_list = layout.kind.startswith("list<")
    values = pc.list_flatten(column) if is_list else column  # flatten drops null lists
    counts = pc.value_counts(values.drop_null()) if len(values) else pa.array([], pa.struct([]))
    distinct = len(counts)
    n_values = len(values) - values.null_count
    top: tuple[tuple[Any, int], ...] = ()
    estimate = distinct
    if distinct:
        freq = counts.field("counts").to_numpy()
        order = np.argsort(-freq, kind="stable")[:TOP_VALUES]
        vals = counts.field("values")
        top = tuple((vals[int(i)].as_py(), int(freq[i])) for i in order)
        if not exact:
            population = rows * n_values / max(len(column), 1)
            estimate = _gee(freq, n_values, population)
    stats: dict[str, Any] = {}
    if is_list:
        lengths = pc.list_value_length(column).drop_null().to_numpy(zero_copy_only=False)
        if lengths.size:
            stats["list_lengths"] = (int(lengths.min()), float(lengths.mean()), int(lengths.max()))
        stats["null_elements"] = values.null_count
    else:
        stats["file_nulls"] = footer_nulls(schemas, layout.name)
        if layout.kind in ("integer", "float"):
            stats.update(_numeric_stats(values, schemas, layout.name))
    return ColumnProfile(
        name=layout.name,
        kind=layout.kind,
        type=layout.type,
        rows=len(column),
        nulls=column.null_count,
        file_nulls=stats.pop("file_nulls", None),
        distinct=distinct,
        distinct_estimate=estimate,
        exact=exact,
        top=top,
        values=n_values,
        note=layout.note,
        **stats,
    )


def _gee(freq: np.ndarray, n: int, population: float) -> int:
    """GEE distinct-value estimate from the per-value counts of a sample of ``n`` of ``population``."""
    f1 = int((freq == 1).sum())
    guess = math.sqrt(max(population, n) / max(n, 1)) * f1 + (len(freq) - f1)
    return int(min(max(round(guess), len(freq)), max(population, len(freq))))


def _numeric_stats(values: pa.ChunkedArray, schemas: list[FileSchema], name: str) -> dict[str, Any]:
    x = values.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
    finite = x[np.isfinite(x)]
    out: dict[str, Any] = {"nonfinite": int(x.size - finite.size)}
    if finite.size:
        q = np.quantile(finite, [0.001, 0.01, 0.5, 0.99, 0.999])
        out.update(q001=float(q[0]), q01=float(q[1]), q50=float(q[2]), q99=float(q[3]), q999=float(q[4]))
        out.update(min=float(finite.min()), max=float(finite.max()))
    footer = _footer_range(schemas, name)
    if footer is not None:
        out.update(min=footer[0], max=footer[1], range_exact=True)
    return out


def _leaf_statistics(schemas: list[FileSchema], name: str) -> list[Any] | None:
    """The statistics of flat column ``name`` in every row group, None if any is not recorded."""
    out = []
    for s in schemas:
        paths = [s.metadata.schema.column(j).path for j in range(s.metadata.num_columns)]
        if name not in paths:
            return None
        j = paths.index(name)
        for g in range(s.metadata.num_row_groups):
            stats = s.metadata.row_group(g).column(j).statistics
            if stats is None:
                return None
            out.append(stats)
    return out


def footer_nulls(schemas: list[FileSchema], name: str) -> int | None:
    """Nulls of flat column ``name`` over ``schemas``' row groups, None if any does not record them."""
    stats = _leaf_statistics(schemas, name)
    if stats is None or not all(s.has_null_count for s in stats):
        return None
    return sum(s.null_count for s in stats)


def _footer_range(schemas: list[FileSchema], name: str) -> tuple[float, float] | None:
    """Min and max over every row group's statistics (NaN is never recorded there)."""
    stats = _leaf_statistics(schemas, name)
    if stats is None or not stats:
        return None
    ranges = [(s.min, s.max) for s in stats if s.has_min_max]
    empty = [s for s in stats if not s.has_min_max and s.num_values > 0]
    if empty or not ranges:
        return None
    try:
        return float(min(r[0] for r in ranges)), float(max(r[1] for r in ranges))
    except (TypeError, ValueError):  # statistics of an unexpected logical type
        return None


def footer_ranges(schema: FileSchema, name: str) -> list[tuple[int, Any, Any]]:
    """``(row group, min, max)`` of flat column ``name`` in one file, for the row groups that
    record them (a label check over all rows without reading them).

    Example::

        footer_ranges(read_schemas(["a.parquet"])[0], "click")  # [(0, 0, 1), (1, 0, 1)]
    """
    stats = _leaf_statistics([schema], name) or []
    return [(g, s.min, s.max) for g, s in enumerate(stats) if s.has_min_max]
