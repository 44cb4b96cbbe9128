"""Streaming Parquet input in which every rank takes the same number of fixed-size batches.

Example::

    dataset = ParquetDataset(files, config.data, batch_size=1024, rank=rank, world_size=world)
    dataset.set_epoch(epoch)
    for batch in make_dataloader(dataset, num_workers=2):
        ...  # exactly dataset.steps_per_epoch() batches of exactly 1024 rows

Sharding and padding policy (equal steps on every rank, so no collective waits on a rank that
ran out of data, and every row is read exactly once per epoch):

* Global row order: the files in sorted order, each file's row groups in order. With
  ``shuffle_row_groups`` the row groups are permuted per epoch, seeded by ``(seed, epoch)``,
  identically on every rank. N rows in all.
* Rank r of W reads the contiguous rows ``[r*N//W, (r+1)*N//W)``.
* Every rank yields ``steps_per_epoch = ceil(ceil(N/W) / B)`` batches. Batch i of rank r holds
  the rows ``[start_r + i*B, min(start_r + (i+1)*B, end_r))`` and is padded to exactly B rows with
  zero-weight rows (no ids, dense 0, labels 0). A rank with fewer rows ends with a fully padded
  batch if it must. Nothing is dropped or repeated.
* DataLoader worker w of nw takes batches ``[w*S//nw, (w+1)*S//nw)`` of its rank's S batches: a
  contiguous row range, so workers read mostly distinct row groups.
* ``shuffle_buffer`` > 0: a worker permutes the real rows of ``ceil(shuffle_buffer / B)``
  consecutive batches (seeded by seed, epoch, rank, worker) and splits them back with the same
  real-row count per batch, so padding stays where it was.
* Resume: ``set_epoch(epoch, start_batch=k)`` yields exactly the batches an uninterrupted epoch
  yields after its first k, in the same order, for the same ``num_workers``. The DataLoader takes
  one batch from each worker in turn (skipping exhausted ones), so the first k batches are a known
  number from each worker's stretch (``resume_plan``); each worker skips its share without reading
  it (with ``shuffle_buffer``, up to the start of its shuffle group, which must be re-read), and
  the workers' roles are rotated so that the turn continues with the worker that was next.

Memory: only the configured columns are read, one row group at a time in slices of about a batch,
so a worker holds a few batches plus one row group's column chunks, whatever the data size. The
dataset object holds only file names and row-group sizes.

Cross features (``data.cross``): computed per slice from the raw ids of the cross fields with
``hash_pairs`` (vectorised, no per-row Python) and appended after the sparse features, one id per
real row. ``permute_feature`` (permutation importance): that feature's bags are permuted among the
rows of each read slice (up to ``max(B, 1024)`` consecutive rows; fewer where a row group, a rank's
or a worker's range ends), before the crosses are computed, so a permuted field's crosses change
with it. The permutation is seeded by the seed, the file's index and the slice's first row, so a
pass with the same files, world size and workers permutes the same way.

Validation: column presence and types are checked from the footers when the dataset is built
(``inspect_files``); values while reading. Ids must be non-null (single-hot values, lists and
list elements), and inside the table for ``id_mode: check``; labels exactly 0 or 1; dense values
non-null (NaN passes through unchanged). A violation raises ``DataError`` naming the file, row
group, column, row within the file, the value and what was expected.
"""

from __future__ import annotations

import atexit
import copy
import functools
import itertools
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from towerrec.data.batch import Batch, PackedBatch
from towerrec.data.config import DataConfig, SparseFeatureConfig
from towerrec.data.hashing import hash_ids, hash_pairs

# Arrow record batches are read in slices of at least this many rows: small batch sizes then
# still convert in vectorised blocks. Memory stays O(max(B, _MIN_READ_ROWS)) rows per slice.
_MIN_READ_ROWS = 1024


class DataError(ValueError):
    """Bad input data; the message names file, row group, column, row, value and expectation."""


@dataclass(frozen=True)
class FileInfo:
    """What the footer says about one file: its path and the row count of each row group."""

    path: str
    row_groups: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_groups)


_EXPECTED = {
    "single-hot sparse feature": "an integer type (int8..int64, uint8..uint64)",
    "multi-hot sparse feature": "list<integer> or large_list<integer>",
    "dense feature": "a float or integer type",
    "label": "an integer, bool or float type",
}


def _type_ok(role: str, t: pa.DataType) -> bool:
    if role == "single-hot sparse feature":
        return pa.types.is_integer(t)
    if role == "multi-hot sparse feature":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
    if role == "dense feature":
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    return pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)


def _column_roles(data: DataConfig, labels: bool = True) -> list[tuple[str, str]]:
    roles = [
        (f.name, "multi-hot sparse feature" if f.multi_hot else "single-hot sparse feature")
        for f in data.sparse_features
    ]
    roles += [(c, "dense feature") for c in data.dense_features]
    return roles + [(c, "label") for c in dict.fromkeys(data.label_columns) if labels]


def inspect_files(files: list[str], data: DataConfig, labels: bool = True) -> list[FileInfo]:
    """Check from the footers alone that every configured column exists with a usable type
    (label columns only with ``labels``: prediction data may have none).

    Raises:
        DataError: naming the file, the column, the type found and the type expected.
    """
    roles = _column_roles(data, labels)
    infos = []
    for path in files:
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        for column, role in roles:
            if schema.get_field_index(column) < 0:
                raise DataError(
                    f"{path}: column {column!r} ({role}) is missing or ambiguous; "
                    f"expected {_EXPECTED[role]}; the file has columns {schema.names}"
                )
            found = schema.field(column).type
            if not _type_ok(role, found):
                raise DataError(
                    f"{path}: column {column!r} has type {found}; expected {_EXPECTED[role]} for a {role}"
                )
        infos.append(FileInfo(path, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))))
    return infos


class _Where(NamedTuple):
    """Where a slice of rows came from, for error messages."""

    path: str
    row_group: int
    first_row: int  # row index within the file of the slice's row 0

    def error(self, column: str, index: int, value: object, expected: str, note: str = "") -> DataError:
        return DataError(
            f"{self.path}: row group {self.row_group}, column {column!r}, "
            f"row {self.first_row + index}: value {value!r}{note}; expected {expected}"
        )


def _first(mask: pa.Array | np.ndarray) -> int:
    return int(np.argmax(np.asarray(mask)))


@dataclass
class _Rows:
    """Columnar numpy rows between reading and batching; jagged ids kept per feature."""

    values: list[np.ndarray]  # per sparse feature, int64 ids of all rows
    lengths: list[np.ndarray]  # per sparse feature, int32 [n]
    dense: np.ndarray  # [n, D] float32
    labels: np.ndarray  # [T, n] float32, one row per distinct label column

    def __len__(self) -> int:
        return self.dense.shape[0]

    @staticmethod
    def empty(num_sparse: int, num_dense: int, num_labels: int) -> "_Rows":
        return _Rows(
            [np.zeros(0, np.int64) for _ in range(num_sparse)],
            [np.zeros(0, np.int32) for _ in range(num_sparse)],
            np.zeros((0, num_dense), np.float32),
            np.zeros((num_labels, 0), np.float32),
        )

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]
        return _Rows(
            [np.concatenate(v) for v in zip(*(p.values for p in parts), strict=True)],
            [np.concatenate(n) for n in zip(*(p.lengths for p in parts), strict=True)],
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.labels for p in parts], axis=1),
        )

    def slice(self, start: int, stop: int) -> "_Rows":
        values = []
        for v, n in zip(self.values, self.lengths, strict=True):
            begin = int(n[:start].sum())
            values.append(v[begin : begin + int(n[start:stop].sum())])
        lengths = [n[start:stop] for n in self.lengths]
        return _Rows(values, lengths, self.dense[start:stop], self.labels[:, start:stop])

    def take(self, index: np.ndarray) -> "_Rows":
        values = [_take_bags(v, n, index) for v, n in zip(self.values, self.lengths, strict=True)]
        return _Rows(values, [n[index] for n in self.lengths], self.dense[index], self.labels[:, index])


def _take_bags(values: np.ndarray, lengths: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The flat ids of the bags (rows) ``index`` of a jagged feature, in that order."""
    starts = (np.cumsum(lengths, dtype=np.int64) - lengths)[index]
    new_lengths = lengths[index].astype(np.int64)
    # Element k of the output belongs to output row r: source position starts[r] + (k - first[r]).
    first = np.cumsum(new_lengths) - new_lengths
    gather = np.arange(int(new_lengths.sum())) + np.repeat(starts - first, new_lengths)
    return values[gather]


def _ids(
    column: pa.Array, feature: SparseFeatureConfig, where: _Where
) -> tuple[pa.Array, np.ndarray, np.ndarray | None]:
    """(flat id array, lengths int32, offsets or None for single-hot); rejects nulls."""
    name = feature.name
    if not feature.multi_hot:
        if column.null_count:
            raise where.error(name, _first(column.is_null()), None, "a non-null integer id")
        return column, np.ones(len(column), np.int32), None
    lengths = column.value_lengths()
    if lengths.null_count:
        raise where.error(name, _first(lengths.is_null()), None, "a list of ids, not a null list")
    flat = column.flatten()  # honours the slice offset, unlike .values
    lengths_np = lengths.to_numpy().astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths_np, dtype=np.int64)])
    if flat.null_count:
        k = _first(flat.is_null())
        row = int(np.searchsorted(offsets, k, side="right")) - 1
        raise where.error(
            name, row, column[row].as_py(), "non-null ids", f" (element {k - offsets[row]} is null)"
        )
    return flat, lengths_np, offsets


def _raw_ids(flat: pa.Array) -> np.ndarray:
    # Wrapping cast: uint64 ids keep their bits (hash mode) or turn negative (rejected by check).
    return flat.cast(pa.int64(), safe=False).to_numpy()


def _map_ids(
    ids: np.ndarray,
    flat: pa.Array,
    offsets: np.ndarray | None,
    feature: SparseFeatureConfig,
    size: int,
    where: _Where,
) -> np.ndarray:
    """Table rows of the raw ``ids`` (``flat`` as read, for error messages)."""
    if feature.id_mode == "hash":
        return hash_ids(ids, size)
    bad = (ids < 0) | (ids >= size)
    if bad.any():
        k, note = _first(bad), ""
        row = k if offsets is None else int(np.searchsorted(offsets, k, side="right")) - 1
        if offsets is not None:
            note = f" (element {k - offsets[row]} of the row's list)"
        raise where.error(
            feature.name,
            row,
            flat[k].as_py(),
            f"an id in [0, {size}) of table {feature.table!r} (num_embeddings={size}); "
            "id_mode: hash accepts any id",
            note,
        )
    return ids


def _dense(column: pa.Array, name: str, where: _Where) -> np.ndarray:
    if column.null_count:
        raise where.error(name, _first(column.is_null()), None, "a non-null number (NaN is allowed)")
    return column.to_numpy().astype(np.float32, copy=False)


def _label(column: pa.Array, name: str, where: _Where) -> np.ndarray:
    if column.null_count:
        raise where.error(name, _first(column.is_null()), None, "a label of exactly 0 or 1")
    y = column.to_numpy(zero_copy_only=False)  # bool columns are bit-packed in Arrow
    bad = (y != 0) & (y != 1)  # in the original dtype, so 1.0000001 is not rounded to 1
    if bad.any():
        k = _first(bad)
        raise where.error(name, k, column[k].as_py(), "a label of exactly 0 or 1")
    return y.astype(np.float32)


class _RowGroup(NamedTuple):
    file: int
    index: int
    rows: int
    first_row: int  # row index within the file


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([p % 2**64 for p in parts])


def resume_plan(steps: int, workers: int, start_batch: int) -> tuple[int, list[int]]:
    """Where an epoch of ``steps`` batches over ``workers`` DataLoader workers stands after the
    loader yielded ``start_batch`` of them: ``(next worker, batches taken from each worker)``.

    Worker w holds the stretch ``[w*S//nw, (w+1)*S//nw)``; the DataLoader takes one batch from
    each worker in turn and skips exhausted workers.
    """
    workers = max(workers, 1)
    lengths = [(w + 1) * steps // workers - w * steps // workers for w in range(workers)]
    taken, w = [0] * workers, 0
    for _ in range(start_batch):
        while taken[w] >= lengths[w]:
            w = (w + 1) % workers
        taken[w] += 1
        w = (w + 1) % workers
    while start_batch < steps and taken[w] >= lengths[w]:
        w = (w + 1) % workers
    return w, taken


def _rebatch(chunks: Iterator[_Rows], counts: list[int], empty: _Rows) -> Iterator[_Rows]:
    """Cut the row stream into pieces of exactly ``counts[i]`` rows (0 allowed)."""
    pending, have = [], 0
    for count in counts:
        while have < count:
            chunk = next(chunks, None)
            if chunk is None:
                raise RuntimeError(f"read {have} rows, {count} needed: files changed while reading?")
            pending.append(chunk)
            have += len(chunk)
        rows = _Rows.concat(pending) if pending else empty
        rest = rows.slice(count, len(rows))
        pending, have = ([rest] if len(rest) else []), len(rest)
        yield rows.slice(0, count)


def _shuffle(batches: Iterator[_Rows], group: int, rng: np.random.Generator) -> Iterator[_Rows]:
    """Permute the rows of ``group`` consecutive pieces; each piece keeps its row count."""
    buffer: list[_Rows] = []
    for rows in batches:
        buffer.append(rows)
        if len(buffer) == group:
            yield from _permute(buffer, rng)
            buffer = []
    if buffer:
        yield from _permute(buffer, rng)


def _permute(parts: list[_Rows], rng: np.random.Generator) -> Iterator[_Rows]:
    rows = _Rows.concat(parts)
    rows = rows.take(rng.permutation(len(rows)))
    start = 0
    for part in parts:
        yield rows.slice(start, start + len(part))
        start += len(part)


def _check_sparse_feature(data: DataConfig, name: str) -> None:
    names = data.sparse_feature_names
    if name not in names:
        raise ValueError(f"permute_feature: {name!r} is not a sparse feature; features: {names}")


class ParquetDataset(IterableDataset[Batch]):
    """Fixed-size, padded batches of a rank's share of Parquet files (policy: module docstring).

    Example::

        ds = ParquetDataset(["a.parquet", "b.parquet"], data, batch_size=512, rank=1, world_size=4)
        ds.steps_per_epoch()           # the same on all four ranks
        ds.set_epoch(3)                # before creating the loader's iterator
        batch = next(iter(ds))         # Batch of 512 rows; padding rows have weight 0

    Raises:
        DataError: at construction for a missing column, a wrong type or no rows at all; while
            iterating for a bad value.
    """

    def __init__(
        self,
        files: list[str],
        data: DataConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        shuffle_row_groups: bool = False,
        labels: bool = True,
        permute_feature: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.data = data
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.shuffle_row_groups = shuffle_row_groups
        self.epoch = 0
        self.start_batch = 0
        self.files = sorted(files)
        self.infos = inspect_files(self.files, data, labels)
        self.num_rows = sum(info.num_rows for info in self.infos)
        if self.num_rows == 0:
            raise DataError(f"no rows in {len(self.files)} file(s): {self.files[:3]}")
        # labels=False (prediction): no label column is read; batches carry all-zero labels.
        self._label_columns = list(dict.fromkeys(data.label_columns)) if labels else []
        self._columns = list(dict.fromkeys(c for c, _ in _column_roles(data, labels)))
        self._table_size = {t.name: t.num_embeddings for t in data.tables}
        if permute_feature is not None:
            _check_sparse_feature(data, permute_feature)
        self.permute_feature = permute_feature

    def with_permutation(self, feature: str) -> "ParquetDataset":
        """The same files, rank split, batch size and seed with ``feature``'s bags permuted
        (module docstring): the evaluation set of one permutation-importance pass."""
        _check_sparse_feature(self.data, feature)
        permuted = copy.copy(self)
        permuted.permute_feature = feature
        return permuted

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's row-group order and shuffle; call before iterating.

        ``start_batch`` k > 0 resumes the epoch after the first k batches the loader yielded
        (policy: module docstring); k must be counted with the same ``num_workers``.
        """
        if not 0 <= start_batch <= self.steps_per_epoch():
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.steps_per_epoch()}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def steps_per_epoch(self) -> int:
        """Batches every rank yields per epoch: ``ceil(ceil(N / W) / B)``."""
        return _ceil_div(_ceil_div(self.num_rows, self.world_size), self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def rank_rows(self) -> tuple[int, int]:
        """This rank's global row range ``[start, end)``."""
        n, w, r = self.num_rows, self.world_size, self.rank
        return r * n // w, (r + 1) * n // w

    def batch_rows(self, batch: int, num_workers: int = 0) -> tuple[list[tuple[str, int, int]], bool]:
        """Where the loader's ``batch``-th batch (from 0) of this rank's current epoch was read,
        with ``num_workers`` DataLoader workers: ``(file, first row, end row)`` ranges of rows
        within each file (none for a batch of padding only), and whether its rows were drawn at
        random from them (``shuffle_buffer``: the ranges are then its shuffle group's). Worked out
        from the layout alone (module docstring); reads no data.

        Example::

            ds.batch_rows(6)   # ([("data/part-0.parquet", 3072, 3584)], False)
        """
        steps, size, workers = self.steps_per_epoch(), self.batch_size, max(num_workers, 1)
        role, taken = resume_plan(steps, workers, batch)  # whose turn it was, and its progress
        stretch_start, stretch_end = role * steps // workers, (role + 1) * steps // workers
        first = stretch_start + taken[role]
        last = first + 1
        if self.shuffle_buffer > 0:
            group = _ceil_div(self.shuffle_buffer, size)
            first = stretch_start + taken[role] // group * group
            last = min(first + group, stretch_end)
        start, end = self.rank_rows()
        lo, hi = min(start + first * size, end), min(start + last * size, end)
        ranges: list[tuple[str, int, int]] = []
        offset = 0
        for group_ in self._row_groups():
            begin, stop = max(lo, offset) - offset, min(hi, offset + group_.rows) - offset
            offset += group_.rows
            if begin >= stop:
                continue
            path, a, b = self.files[group_.file], group_.first_row + begin, group_.first_row + stop
            if ranges and ranges[-1][0] == path and ranges[-1][2] == a:
                ranges[-1] = (path, ranges[-1][1], b)  # consecutive row groups of one file
            else:
                ranges.append((path, a, b))
        return ranges, self.shuffle_buffer > 0

    def __iter__(self) -> Iterator[Batch]:
        return (packed.unpack() for packed in self.packed_batches())

    def packed_batches(self) -> Iterator[PackedBatch]:
        """This rank's (and, inside a DataLoader worker, this worker's) batches, packed."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        steps, size = self.steps_per_epoch(), self.batch_size
        # On resume this worker plays the stretch (role) of the worker whose turn comes next.
        rotation, taken = resume_plan(steps, workers, self.start_batch)
        role = (worker + rotation) % workers
        first, last = role * steps // workers, (role + 1) * steps // workers
        start, end = self.rank_rows()
        counts = [max(0, min(size, end - start - i * size)) for i in range(first, last)]
        skip = read_from = taken[role]  # batches of the stretch already consumed; not read
        rng, group = None, 1
        if self.shuffle_buffer > 0:
            # Seeded per worker too, so the shuffled order depends on num_workers.
            group = _ceil_div(self.shuffle_buffer, size)
            rng = _rng(self.seed, self.epoch, self.rank, role)
            read_from = skip // group * group
            for g in range(0, read_from, group):  # replay the skipped groups' draws, no reading
                rng.permutation(sum(counts[g : g + group]))
        lo, hi = min(start + (first + read_from) * size, end), min(start + last * size, end)
        # Decoding threads only in the main process: workers already are the parallelism.
        chunks = self._read(lo, hi, use_threads=info is None)
        empty = _Rows.empty(
            len(self.data.feature_names), len(self.data.dense_features), len(self._label_columns)
        )
        pieces = _rebatch(chunks, counts[read_from:], empty)
        if rng is not None:
            pieces = _shuffle(pieces, group, rng)
        for rows in itertools.islice(pieces, skip - read_from, None):
            yield self._pack(rows)

    def _row_groups(self) -> list[_RowGroup]:
        groups = []
        for f, info in enumerate(self.infos):
            first_rows = np.cumsum((0,) + info.row_groups[:-1]) if info.row_groups else []
            groups += [
                _RowGroup(f, g, n, int(r))
                for g, (n, r) in enumerate(zip(info.row_groups, first_rows, strict=True))
            ]
        if self.shuffle_row_groups:
            order = _rng(self.seed, self.epoch).permutation(len(groups))
            groups = [groups[i] for i in order]
        return groups

    def _read(self, lo: int, hi: int, use_threads: bool) -> Iterator[_Rows]:
        """Validated rows ``[lo, hi)`` of the epoch's global order, a slice at a time."""
        offset, opened, parquet = 0, -1, None
        try:
            for group in self._row_groups():
                begin, stop = max(lo, offset) - offset, min(hi, offset + group.rows) - offset
                offset += group.rows
                if begin < stop:
                    if group.file != opened:  # consecutive row groups share the open file
                        if parquet is not None:
                            parquet.close()
                        opened, parquet = group.file, pq.ParquetFile(self.files[group.file])
                    yield from self._read_row_group(parquet, group, begin, stop, use_threads)
                if offset >= hi:
                    break
        finally:
            if parquet is not None:
                parquet.close()

    def _read_row_group(
        self, parquet: pq.ParquetFile, group: _RowGroup, begin: int, stop: int, use_threads: bool
    ) -> Iterator[_Rows]:
        path = self.files[group.file]
        pos = 0
        for record_batch in parquet.iter_batches(
            batch_size=max(self.batch_size, _MIN_READ_ROWS),
            row_groups=[group.index],
            columns=self._columns,
            use_threads=use_threads,
        ):
            n = record_batch.num_rows
            a, b = max(begin - pos, 0), min(stop - pos, n)
            if a < b:
                where = _Where(path, group.index, group.first_row + pos + a)
                yield self._convert(record_batch.slice(a, b - a), where)
            pos += n
            if pos >= stop:
                break

    def _convert(self, rb: pa.RecordBatch, where: _Where) -> _Rows:
        values, lengths = [], []
        cross = self.data.cross
        raw: dict[str, np.ndarray] = {}  # raw ids of the cross fields
        for feature in self.data.sparse_features:
            flat, feature_lengths, offsets = _ids(rb.column(feature.name), feature, where)
            raw_ids = _raw_ids(flat)
            ids = _map_ids(raw_ids, flat, offsets, feature, self._table_size[feature.table], where)
            if cross is not None and feature.name in cross.fields:
                raw[feature.name] = raw_ids
            if feature.name == self.permute_feature:
                # Seeded by the slice's position, so every pass permutes the same way.
                file_index = self.files.index(where.path)
                perm = _rng(self.seed, self.epoch, file_index, where.first_row).permutation(rb.num_rows)
                ids, feature_lengths = _take_bags(ids, feature_lengths, perm), feature_lengths[perm]
                if feature.name in raw:
                    raw[feature.name] = raw[feature.name][perm]
            values.append(ids)
            lengths.append(feature_lengths)
        if cross is not None:
            size = self._table_size[cross.table]
            for a, b in cross.pairs:
                for k in range(cross.num_hashes):
                    values.append(hash_pairs(raw[a], raw[b], size, k))
                    lengths.append(np.ones(rb.num_rows, np.int32))
        if self.data.dense_features:
            dense = np.stack([_dense(rb.column(c), c, where) for c in self.data.dense_features], axis=1)
        else:
            dense = np.zeros((rb.num_rows, 0), np.float32)
        labels = [_label(rb.column(c), c, where) for c in self._label_columns]
        stacked = np.stack(labels) if labels else np.zeros((0, rb.num_rows), np.float32)
        return _Rows(values, lengths, dense, stacked)

    def _pack(self, rows: _Rows) -> PackedBatch:
        """Pad ``rows`` to B rows (zero-weight rows: no ids, zero dense and labels) and pack them."""
        size, n = self.batch_size, len(rows)
        lengths = np.zeros((len(rows.lengths), size), np.int64)  # key-major, padding rows 0
        for i, feature_lengths in enumerate(rows.lengths):
            lengths[i, :n] = feature_lengths
        dense = np.zeros((size, rows.dense.shape[1]), np.float32)
        dense[:n] = rows.dense
        column = {c: i for i, c in enumerate(self._label_columns)}
        labels = np.zeros((len(self.data.tasks), size), np.float32)
        if self._label_columns:
            labels[:, :n] = rows.labels[[column[t.label] for t in self.data.tasks]]
        weights = np.zeros(size, np.float32)
        weights[:n] = 1.0
        return PackedBatch.pack(
            np.concatenate(rows.values),
            lengths,
            dense,
            labels,
            weights,
            keys=tuple(self.data.feature_names),
            tasks=tuple(t.name for t in self.data.tasks),
        )


class _PackedBatches(IterableDataset[PackedBatch]):
    """What DataLoader workers iterate: the dataset's batches, still packed for the hop."""

    def __init__(self, dataset: ParquetDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[PackedBatch]:
        return self.dataset.packed_batches()


class BatchLoader:
    """Iterates :class:`Batch` es: a DataLoader over packed batches, unpacked on arrival."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        return (packed.unpack() for packed in self.loader)

    def __len__(self) -> int:
        return len(self.loader.dataset.dataset)  # type: ignore[attr-defined]


def make_dataloader(dataset: ParquetDataset, num_workers: int, prefetch_factor: int = 2) -> BatchLoader:
    """A loader over ready-made batches; workers are re-created each epoch so ``set_epoch`` applies.

    Example::

        loader = make_dataloader(dataset, num_workers=2)
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            for batch in loader: ...
    """
    loader = DataLoader(
        _PackedBatches(dataset),
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # The workers' seeds come from a generator of their own, not the global torch RNG: the
        # model's random stream (dropout) then depends only on the steps taken, which a resumed
        # run restores exactly. The batches use no worker RNG (their shuffles are seeded).
        generator=torch.Generator().manual_seed(dataset.seed),
        worker_init_fn=functools.partial(_init_worker, os.getpid(), _handles_sigterm()),
        multiprocessing_context=_worker_context() if num_workers > 0 else None,
    )
    return BatchLoader(loader)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers start from a forkserver, not by forking the rank: a forked worker shares the rank's
    tables copy-on-write, and every page training updates afterwards becomes the worker's own copy
    (up to one extra copy of the rank's tables per worker over an epoch). The server preloads this
    module, so a worker starts in milliseconds; it also inherits none of the rank's gloo sockets."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


@atexit.register  # registered after multiprocessing's own exit handler, so it runs before it
def end_workers() -> None:
    """SIGKILL the DataLoader workers still alive (a loader abandoned mid-epoch, a rank leaving on
    an error or a signal). Under a rank they ignore SIGTERM, and multiprocessing's exit handler
    SIGTERMs daemonic children and then joins them: the process would never exit (or, under
    torchrun, wait for its SIGKILL 30 s later). The DataLoader's SIGCHLD handler, which raises for
    a killed worker, is reset first."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join(timeout=5)


def _handles_sigterm() -> bool:
    """True when this process handles SIGTERM itself (the trainer's preemption handler)."""
    return signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)


def _init_worker(rank_pid: int, leave_sigterm_to_rank: bool, worker_id: int) -> None:
    # Only under a rank that handles SIGTERM: elsewhere (tests, tools) multiprocessing's exit
    # handler SIGTERMs leftover workers and then joins them, which would wait forever.
    if leave_sigterm_to_rank:
        _ignore_sigterm(worker_id)
    threading.Thread(target=_exit_with, args=(rank_pid,), name="exit-with-rank", daemon=True).start()


def _exit_with(rank_pid: int, poll_s: float = 1.0) -> None:
    """End the worker once its rank is gone (kill -9, OOM). Its parent is the forkserver, which
    lives while any of its children does (each holds the server's alive pipe), so the DataLoader's
    own check of the parent would never fire: the worker, its forkserver and their resource
    tracker would outlive a killed rank for good."""
    while True:
        time.sleep(poll_s)
        try:
            os.kill(rank_pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (the pid may be another's by now)
            os._exit(0)


def _ignore_sigterm(worker_id: int) -> None:
    """Workers leave SIGTERM to the trainer (trainer.preemption), which ends them when it stops: a
    SIGTERM sent to every process of a job (Slurm, ``kill -- -PGID``) would otherwise kill them
    first, and the trainer would fail at its next batch instead of saving."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
