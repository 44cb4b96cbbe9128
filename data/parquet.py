"""Streaming Parquet input in which every rank takes the same number of fixed-size batches.

Example::

    dataset = ParquetDataset(files, config.data, batch_size=1024, rank=rank, world_size=world)
    dataset.set_epoch(epoch)
    for batch in make_dataloader(dataset, num_workers=0):
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
* Workers hand their batches over ``WORKER_BATCHES`` (8) at a time, on a grid from their
  stretch's start; the DataLoader takes one such item from each worker in turn (skipping
  exhausted ones).
* Resume: ``set_epoch(epoch, start_batch=k)`` yields exactly the batches an uninterrupted epoch
  yields after its first k, in the same order, for the same ``num_workers``. The first k batches
  are a known number from each worker's stretch (``resume_plan``); each worker skips its share
  without reading it (with ``shuffle_buffer``, up to the start of its shuffle group, which must
  be re-read), and the workers' roles are rotated so that the turn continues with the worker
  that was next, with the rest of its item.
  ``num_workers`` 0 reads in the trainer's process: one stretch, in order.

Reading (the fast path): the rows of a stretch are cut into decode units, consecutive row groups
of one file holding at least ``read_rows`` rows (32,768). A small pool of threads (as many as
Arrow's CPU pool in the trainer's process, one in a DataLoader worker) decodes the next units
ahead, in order, each with one Arrow ``iter_batches`` call in chunks of ``read_rows`` rows that
may span row groups; Arrow decodes without the GIL. The consumer's thread (in a DataLoader
worker, a second thread) converts each chunk once when its batches are due, vectorised over all
its rows (``ParquetDataset._convert``: ids, lengths, dense, labels,
validation), and lays the batches it completes out together in their final buffers
(``ParquetDataset._layout``: per batch one int64 buffer of ids and int32 lengths, one float32
buffer of dense, labels and weights, padding included), each :class:`Batch` views of them made
by a few torch calls per chunk. Lengths stay int32 from the Parquet offsets to the
KeyedJaggedTensor. In the rank a chunk's conversion (a few ms per 32k rows) costs the training
loop less than a converting thread would: that thread's Python holds the GIL in turns with the
loop's (:class:`_InConsumer`). In a DataLoader worker
each batch's two buffers are numpy views, pickled as two byte strings through the worker's pipe
(``WORKER_BATCHES`` batches per message): a batch crosses processes once, and no shared-memory
segment or file descriptor is handed over per tensor.

Memory: only the configured columns are read; a reader holds a few units and chunks (decoding,
decoded, converted, laid out, being consumed), whatever the data size.
The dataset object holds only file names and row-group sizes.

Cross features (``data.cross``): computed per chunk from the raw ids of the cross fields with
``cross_ids`` (vectorised, no per-row Python) and appended after the sparse features, one id per
real row. ``permute_feature`` (permutation importance): that feature's bags are permuted among
blocks of up to ``max(B, 1024)`` consecutive rows from each row group's start (fewer where a row
group, a rank's or a worker's range ends), before the crosses are computed, so a permuted
field's crosses change with it. Each block's permutation is seeded by the seed, the epoch, the
file's index and the block's first row, so a pass with the same files, world size and workers
permutes the same way.

Nulls: a feature with ``on_null`` default or empty has its nulls replaced (``data.transforms``),
counted per feature in each chunk's conversion. The counts travel with the batches (a block of
a run's batches; a worker's message), so the consumer's process holds
the counts of every row its pass read: ``ParquetDataset.nulls_replaced()``. The trainer sums them
over the ranks once per pass (metrics.jsonl, phase ``nulls``).

Validation: column presence and types are checked from the footers when the dataset is built
(``inspect_files``); values while reading. Ids must be non-null (single-hot values, lists and
list elements), and inside the table for ``id_mode: check``; labels exactly 0 or 1; dense values
non-null (NaN passes through unchanged). A violation raises ``DataError`` naming the file, row
group, column, row within the file, the value and what was expected; raised while converting
(in a worker's thread too), it reaches the consumer at the batch where it happened.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import concurrent.futures
import contextlib
import copy
import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import queue
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from towerrec.data.batch import Batch, PackedBatch
from towerrec.data.config import DataConfig, SparseFeatureConfig
from towerrec.data.errors import DataError  # one class for the whole data path (re-exported)
from towerrec.data.hashing import cross_ids, hash_ids
from towerrec.data.transforms import (
    FittedFeatures,
    check_type_drift,
    checked_ids,
    column_type_ok,
    encode_dense,
    encode_sparse,
    expected_type,
)

# Rows decoded and converted at a time by default (one Arrow record batch, which may span row
# groups of a file): per-chunk Python costs nothing next to decoding them, and the few chunks in
# flight stay a few tens of MB.
READ_ROWS = 32768
# permute_feature permutes bags within blocks of max(B, PERMUTE_ROWS) rows of a row group.
PERMUTE_ROWS = 1024
# A DataLoader worker hands its batches over this many at a time (one pickled message, a fixed
# grid from its stretch's start that resume_plan follows): each message costs a pipe write and
# several context switches, which one batch at a time would pay per batch.
WORKER_BATCHES = 8

# Decoding threads at most: beyond a few, converting (one thread) is the bound, and each one
# holds a decoded unit.
MAX_DECODERS = 4
# Name prefix of the decoding threads (tests look for them).
_DECODE_THREADS = "towerrec-loader-decode"

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileInfo:
    """What the footer says about one file: its path and the row count of each row group."""

    path: str
    row_groups: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_groups)


_LABEL_EXPECTED = "an integer, bool or float type for a label"


def _label_type_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)


def _column_checks(
    data: DataConfig, labels: bool = True
) -> list[tuple[str, str, Callable[[pa.DataType], bool], str]]:
    """``(Parquet column, what reads it, type check, expected type)`` of every column read."""
    checks = []
    for f in data.sparse_features:
        role = f"sparse feature {f.name!r}" if f.parquet_column != f.name else "sparse feature"
        checks.append((f.parquet_column, role, functools.partial(column_type_ok, f), expected_type(f)))
    for d in data.dense_feature_configs:
        role = f"dense feature {d.name!r}" if d.parquet_column != d.name else "dense feature"
        checks.append((d.parquet_column, role, functools.partial(column_type_ok, d), expected_type(d)))
    if labels:
        checks += [(c, "label", _label_type_ok, _LABEL_EXPECTED) for c in dict.fromkeys(data.label_columns)]
    return checks


def inspect_files(files: list[str], data: DataConfig, labels: bool = True) -> list[FileInfo]:
    """Check from the footers alone that every configured column exists with a usable type
    (label columns only with ``labels``: prediction data may have none), and that no column's
    type drifts between files beyond what its transform accepts (string vs large_string, integer
    widths: accepted; integer in one file and string in another: an error naming both).

    Raises:
        DataError: naming the file, the column, the type found and the type expected.
    """
    checks = _column_checks(data, labels)
    infos = []
    for path in files:
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        for column, role, type_ok, expected in checks:
            if schema.get_field_index(column) < 0:
                raise DataError(
                    f"{path}: column {column!r} ({role}) is missing or ambiguous; "
                    f"expected {expected}; the file has columns {schema.names}"
                )
            found = schema.field(column).type
            if not type_ok(found):
                raise DataError(f"{path}: column {column!r} has type {found}; expected {expected}")
        infos.append(FileInfo(path, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))))
    if len(files) > 1:
        # Labels may mix bool, integer and float files: each is checked for 0/1 values as read.
        check_type_drift(files, list(dict.fromkeys(c for c, role, *_ in checks if role != "label")))
    return infos


class _Where(NamedTuple):
    """Where the rows of a chunk came from, for error messages: one file, and the pieces of row
    groups the chunk's rows span, in chunk order (a chunk may span several row groups)."""

    path: str
    file: int  # index in the dataset's sorted files
    starts: tuple[int, ...]  # chunk row of each piece's first row; starts[0] == 0
    row_groups: tuple[int, ...]  # row group of each piece
    first_rows: tuple[int, ...]  # row within the file of each piece's first row
    group_first_rows: tuple[int, ...]  # row within the file of each piece's row group's first row

    def locate(self, index: int) -> tuple[int, int]:
        """(row group, row within the file) of the chunk's row ``index``."""
        piece = bisect.bisect_right(self.starts, index) - 1
        return self.row_groups[piece], self.first_rows[piece] + index - self.starts[piece]

    def error(self, column: str, index: int, value: object, expected: str, note: str = "") -> DataError:
        row_group, row = self.locate(index)
        return DataError(
            f"{self.path}: row group {row_group}, column {column!r}, "
            f"row {row}: value {value!r}{note}; expected {expected}"
        )


def _first(mask: pa.Array | np.ndarray) -> int:
    return int(np.argmax(np.asarray(mask)))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """``[0, cumsum(lengths)]`` as int64: where each row's bag starts, and the end."""
    out = np.empty(len(lengths) + 1, np.int64)
    out[0] = 0
    np.cumsum(lengths, dtype=np.int64, out=out[1:])
    return out


@dataclass
class _Rows:
    """Converted rows between reading and batching, columnar. Slices are views (O(features)).

    Sparse feature k: for a feature with one id per row (single-hot, crosses) ``offsets[k]`` and
    ``lengths[k]`` are None and ``values[k]`` holds exactly the rows' ids; otherwise row i's ids
    are ``values[k][offsets[k][i] : offsets[k][i + 1]]``, and a slice shares ``values[k]`` and
    views ``offsets[k]``, whose first entry is then not 0.
    """

    values: list[np.ndarray]  # per sparse feature, int64 ids
    offsets: list[np.ndarray | None]  # per sparse feature, int64 [n + 1] positions in values
    lengths: list[np.ndarray | None]  # per sparse feature, int32 [n] bag sizes
    dense: np.ndarray  # [n, D] float32
    labels: np.ndarray  # [T, n] float32, one row per distinct label column

    @staticmethod
    def build(
        values: list[np.ndarray],
        lengths: list[np.ndarray | None],
        dense: np.ndarray,
        labels: np.ndarray,
        offsets: list[np.ndarray | None] | None = None,
    ) -> "_Rows":
        """Rows from each feature's flat int64 ids and int32 bag sizes (None: one id per row);
        ``offsets``: the bags' positions where known already (else computed from the sizes)."""
        if offsets is None:
            offsets = [None] * len(values)
        offsets = [
            o if o is not None or n is None else _offsets(n) for o, n in zip(offsets, lengths, strict=True)
        ]
        return _Rows(values, offsets, lengths, dense, labels)

    def __len__(self) -> int:
        return self.dense.shape[0]

    def ids(self, k: int) -> np.ndarray:
        """The flat ids of sparse feature ``k`` of these rows (a view)."""
        offsets = self.offsets[k]
        return self.values[k] if offsets is None else self.values[k][offsets[0] : offsets[-1]]

    def bag_lengths(self, k: int) -> np.ndarray:
        """Sparse feature ``k``'s int32 bag size of each row."""
        lengths = self.lengths[k]
        return np.ones(len(self), np.int32) if lengths is None else lengths

    @staticmethod
    def empty(num_sparse: int, num_dense: int, num_labels: int) -> "_Rows":
        return _Rows.build(
            [np.zeros(0, np.int64) for _ in range(num_sparse)],
            [None] * num_sparse,
            np.zeros((0, num_dense), np.float32),
            np.zeros((num_labels, 0), np.float32),
        )

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]
        features = range(len(parts[0].values))
        single = [all(p.lengths[k] is None for p in parts) for k in features]
        return _Rows.build(
            [np.concatenate([p.ids(k) for p in parts]) for k in features],
            [None if single[k] else np.concatenate([p.bag_lengths(k) for p in parts]) for k in features],
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.labels for p in parts], axis=1),
        )

    def slice(self, start: int, stop: int) -> "_Rows":
        return _Rows(
            [v[start:stop] if o is None else v for v, o in zip(self.values, self.offsets, strict=True)],
            [None if o is None else o[start : stop + 1] for o in self.offsets],
            [None if n is None else n[start:stop] for n in self.lengths],
            self.dense[start:stop],
            self.labels[:, start:stop],
        )

    def take(self, index: np.ndarray) -> "_Rows":
        values = [
            self.values[k][index] if n is None else _take_bags(self.ids(k), n, index)
            for k, n in enumerate(self.lengths)
        ]
        lengths = [None if n is None else n[index] for n in self.lengths]
        return _Rows.build(values, lengths, self.dense[index], self.labels[:, index])


def _take_bags(values: np.ndarray, lengths: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The flat ids of the bags (rows) ``index`` of a jagged feature, in that order."""
    starts = (np.cumsum(lengths, dtype=np.int64) - lengths)[index]
    new_lengths = lengths[index].astype(np.int64)
    # Element k of the output belongs to output row r: source position starts[r] + (k - first[r]).
    first = np.cumsum(new_lengths) - new_lengths
    gather = np.arange(int(new_lengths.sum())) + np.repeat(starts - first, new_lengths)
    return values[gather]


def _sparse(
    column: pa.Array, feature: SparseFeatureConfig, where: _Where
) -> tuple[pa.Array, np.ndarray | None, np.ndarray | None]:
    """(flat ids as read; int32 bag sizes and int64 offsets ``[n + 1]`` of a list column, or None
    and None for one id per row); rejects nulls. The offsets come from Arrow's, no cumsum."""
    name = feature.name
    if not feature.multi_hot:
        if column.null_count:
            raise where.error(name, _first(column.is_null()), None, "a non-null integer id")
        return column, None, None
    if column.null_count:
        raise where.error(name, _first(column.is_null()), None, "a list of ids, not a null list")
    positions = column.offsets.to_numpy()  # int32 or int64 [n + 1], honours the slice offset
    offsets = np.subtract(positions, positions[0], dtype=np.int64)
    lengths = np.diff(positions).astype(np.int32, copy=False)
    flat = column.flatten()  # honours the slice offset, unlike .values
    if flat.null_count:
        k = _first(flat.is_null())
        row = int(np.searchsorted(offsets, k, side="right")) - 1
        raise where.error(
            name, row, column[row].as_py(), "non-null ids", f" (element {k - offsets[row]} is null)"
        )
    return flat, lengths, offsets


def _raw_ids(flat: pa.Array) -> np.ndarray:
    if flat.type == pa.int64():
        return flat.to_numpy()  # zero-copy, read-only: never written to
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

    def locate(k: int) -> tuple[int, str]:
        if offsets is None:
            return k, ""
        row = int(np.searchsorted(offsets, k, side="right")) - 1
        return row, f" (element {k - offsets[row]} of the row's list)"

    return checked_ids(ids, flat, feature, size, where, locate)


def _dense(column: pa.Array, name: str, where: _Where) -> np.ndarray:
    if column.null_count:
        raise where.error(name, _first(column.is_null()), None, "a non-null number (NaN is allowed)")
    return column.to_numpy()  # cast to float32 by the caller's assignment


def _label(column: pa.Array, name: str, where: _Where) -> np.ndarray:
    if column.null_count:
        raise where.error(name, _first(column.is_null()), None, "a label of exactly 0 or 1")
    y = column.to_numpy(zero_copy_only=False)  # bool columns are bit-packed in Arrow
    if y.dtype.kind in "iu" and len(y) and y.min() >= 0 and y.max() <= 1:
        return y  # the usual case, in two reductions
    bad = (y != 0) & (y != 1)  # in the original dtype, so 1.0000001 is not rounded to 1
    if bad.any():
        k = _first(bad)
        raise where.error(name, k, column[k].as_py(), "a label of exactly 0 or 1")
    return y


class _RowGroup(NamedTuple):
    file: int
    index: int
    rows: int
    first_row: int  # row index within the file


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([p % 2**64 for p in parts])


def resume_plan(steps: int, workers: int, start_batch: int, item: int | None = None) -> tuple[int, list[int]]:
    """Where an epoch of ``steps`` batches over ``workers`` DataLoader workers stands after the
    loader yielded ``start_batch`` of them: ``(next worker, batches taken from each worker)``.

    Worker w holds the stretch ``[w*S//nw, (w+1)*S//nw)`` and hands it over in items of
    ``item`` batches (default :data:`WORKER_BATCHES`), counted from its stretch's start; the
    DataLoader takes one item from each worker in turn and skips exhausted workers.

    Example::

        resume_plan(7, 2, 5, item=2)   # (1, [4, 1]): worker 0 gave 2+2, worker 1 is one into its first
    """
    item = WORKER_BATCHES if item is None else item
    workers = max(workers, 1)
    lengths = [(w + 1) * steps // workers - w * steps // workers for w in range(workers)]
    taken, w = [0] * workers, 0
    for _ in range(start_batch):
        while taken[w] >= lengths[w]:
            w = (w + 1) % workers
        taken[w] += 1
        if taken[w] % item == 0 or taken[w] == lengths[w]:  # its item is complete: the next one's turn
            w = (w + 1) % workers
    while start_batch < steps and taken[w] >= lengths[w]:
        w = (w + 1) % workers
    return w, taken


class _Run(NamedTuple):
    """The real rows of consecutive batches: ``counts[j]`` rows of batch j, one after the other."""

    rows: _Rows
    counts: list[int]

    def split(self, batches: int) -> tuple["_Run", "_Run"]:
        """The first ``batches`` batches, and the rest."""
        cut = sum(self.counts[:batches])
        return (
            _Run(self.rows.slice(0, cut), self.counts[:batches]),
            _Run(self.rows.slice(cut, len(self.rows)), self.counts[batches:]),
        )


def _rebatch(chunks: Iterator[_Rows], counts: list[int], empty: _Rows) -> Iterator[_Run]:
    """Cut the row stream into batches of exactly ``counts[i]`` real rows (0 allowed), yielded as
    runs: the whole batches inside a chunk are one run of views of it; a batch across a chunk
    boundary is a run of its own, copied once."""
    i, pending, have = 0, [], 0
    for chunk in chunks:
        pos, n = 0, len(chunk)
        if pending:  # finish the batch begun in the previous chunks
            need = counts[i] - have
            if need > n:
                pending.append(chunk)
                have += n
                continue
            yield _Run(_Rows.concat(pending + [chunk.slice(0, need)]), [counts[i]])
            pending, have, pos, i = [], 0, need, i + 1
        end, j = pos, i
        while j < len(counts) and counts[j] <= n - end:
            end, j = end + counts[j], j + 1
        if j > i:
            yield _Run(chunk.slice(pos, end), counts[i:j])
            pos, i = end, j
        if pos < n:
            if i == len(counts):
                raise RuntimeError(f"read {n - pos} rows more than the {sum(counts)} needed: files changed?")
            pending, have = [chunk.slice(pos, n)], n - pos
    if have or any(counts[i:]):
        raise RuntimeError(f"read {have} rows, {counts[i]} needed: files changed while reading?")
    if i < len(counts):
        yield _Run(empty, counts[i:])  # padding-only batches after the rank's last row


def _shuffle(runs: Iterator[_Run], group: int, rng: np.random.Generator) -> Iterator[_Run]:
    """Permute the rows of each ``group`` consecutive batches; each batch keeps its row count."""
    parts: list[_Rows] = []
    counts: list[int] = []
    for run in runs:
        while run.counts:
            head, run = run.split(group - len(counts))
            parts.append(head.rows)
            counts += head.counts
            if len(counts) == group:
                yield _permute(parts, counts, rng)
                parts, counts = [], []
    if counts:
        yield _permute(parts, counts, rng)


def _permute(parts: list[_Rows], counts: list[int], rng: np.random.Generator) -> _Run:
    rows = _Rows.concat(parts)
    return _Run(rows.take(rng.permutation(len(rows))), counts)


def _drop(runs: Iterator[_Run], count: int) -> Iterator[_Run]:
    """The batches after the first ``count``."""
    for run in runs:
        if count >= len(run.counts):
            count -= len(run.counts)
            continue
        yield run.split(count)[1] if count else run
        count = 0


_ITEM, _ERROR, _END = range(3)
# Stop flag -> (thread, queue) of each prefetch thread alive in this process (end_workers stops
# them).
_PREFETCHERS: dict[threading.Event, tuple[threading.Thread, queue.Queue]] = {}


def _prefetch(produce: Callable[[], Iterator[T]], depth: int = 1) -> Iterator[T]:
    """``produce()``'s items, made in a daemon thread up to ``depth`` items ahead of the consumer:
    Parquet decoding (Arrow releases the GIL), numpy conversion and batch building overlap what
    the consumer does with the previous items.

    The producer's exception is raised in the consumer, at the item where it happened. Leaving
    the loop early (``close``, an error, the generator collected) stops the thread and joins it;
    :func:`end_workers` stops those still alive at exit.

    Example::

        for chunk in _prefetch(lambda: dataset._read(0, 4096, use_threads=True)): ...
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(
        target=_produce, args=(produce, items, stop), name="towerrec-loader-prefetch", daemon=True
    )
    _PREFETCHERS[stop] = (thread, items)
    thread.start()
    try:
        while True:
            try:
                kind, item = items.get(timeout=1.0)
            except queue.Empty:
                if stop.is_set() and not thread.is_alive():  # stopped from outside (end_workers)
                    raise RuntimeError("the loader's reading thread was stopped (end_workers)") from None
                continue
            if kind == _ITEM:
                yield item
            elif kind == _ERROR:
                raise item
            else:
                return
    finally:
        _stop_prefetch(stop, thread, items)


def _produce(produce: Callable[[], Iterator[T]], items: queue.Queue, stop: threading.Event) -> None:
    def put(entry: tuple[int, object]) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        source = produce()
        try:
            for item in source:
                if not put((_ITEM, item)):
                    return
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # in this thread: a generator closes where it runs (open files, readers)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        put((_ERROR, e))
        return
    put((_END, None))


class _InConsumer(Generic[T]):
    """``produce()``'s items made in the consumer's own thread, when it asks for them (the rank's
    training loop; its decode pool still reads ahead without the GIL). :func:`end_workers` stops
    it as it stops a prefetch thread: the next item is then an error.

    Why not a converting thread in the rank: its Python holds the GIL in turns with the training
    loop's, and the loop waits for it (a 1-rank demo run trained ~20 % slower with one;
    ``benchmarks.ceiling``). In a DataLoader worker, whose main thread only sends, ``_prefetch``.
    """

    def __init__(self, produce: Callable[[], Iterator[T]]) -> None:
        self._items = produce()
        self._stopped = False
        _IN_CONSUMER.add(self)

    def __iter__(self) -> "_InConsumer[T]":
        return self

    def __next__(self) -> T:
        if self._stopped:
            raise RuntimeError("the loader's reading was stopped (end_workers)")
        if not getattr(_THREAD, "sized", False):
            _one_torch_thread_unless_main()
        return next(self._items)

    def close(self) -> None:
        self._items.close()

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(ValueError):  # being advanced in another thread: it ends there
            self._items.close()


_IN_CONSUMER: "weakref.WeakSet[_InConsumer]" = weakref.WeakSet()
_THREAD = threading.local()


def _one_torch_thread_unless_main() -> None:
    """A consumer in a thread other than the main one (TorchRec's evaluation pipeline reads its
    batches in a thread of its own) converts with one torch thread. With more, its first parallel
    op gives that thread an OpenMP team of its own; libgomp then counts more threads than cores
    and, for the rest of the process, makes every team's waits sleep in the kernel instead of
    spinning: a 1-rank Census run trained at ~5,000-11,000 samples/s after its first evaluation
    instead of ~28,000. ``torch.set_num_threads`` here sizes only this thread's OpenMP pool
    (torch reads the thread's own OpenMP setting); the training loop's stays as planned."""
    if threading.current_thread() is not threading.main_thread():
        torch.set_num_threads(1)
    _THREAD.sized = True


def _stop_prefetch(
    stop: threading.Event, thread: threading.Thread, items: queue.Queue, timeout: float = 30.0
) -> None:
    """Stop a prefetch thread and join it (it notices at its next item, after the chunk it may
    be decoding). A consumer still waiting then gets an error instead of waiting forever."""
    stop.set()
    if thread is threading.current_thread():  # collected by the garbage collector in that thread
        return
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):  # make room for a producer waiting to put
            items.get_nowait()
        thread.join(0.01)
    _PREFETCHERS.pop(stop, None)


class _Block(NamedTuple):
    """The batches of one run, and the nulls replaced (``on_null``) per feature in the rows
    converted since the previous block: the counts travel with the batches, from the reading
    thread to the consumer (and, in a worker's message, to the rank)."""

    items: list[Batch] | list[PackedBatch]
    nulls: dict[str, int]


def _flatten(blocks: Iterator[_Block], nulls: dict[str, int], label: str) -> Iterator:
    """The batches of each block, adding its null counts to ``nulls`` as it arrives; closing it
    closes ``blocks`` (and so stops their thread). ``label`` names the pass in the debug log."""
    try:
        for block in blocks:
            _add_counts(nulls, block.nulls)
            yield from block.items
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
    _log_nulls(label, nulls)


def _add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for name, n in counts.items():
        total[name] = total.get(name, 0) + n


def _new_counts(counts: dict[str, int], sent: dict[str, int]) -> dict[str, int]:
    """What was added to ``counts`` since it was last copied into ``sent`` (updated here)."""
    new = {name: n - sent.get(name, 0) for name, n in counts.items() if n != sent.get(name, 0)}
    sent.update(counts)
    return new


def format_nulls(counts: dict[str, int]) -> str:
    """``feature count`` pairs for a log line. Example: ``"user 1,204; city 0"``."""
    return "; ".join(f"{name} {n:,}" for name, n in counts.items())


def report_nulls(dataset: "ParquetDataset", what: str) -> None:
    """Log, at INFO, the nulls ``dataset``'s finished pass replaced (``on_null``), when any:
    ``towerrec evaluate`` and ``predict`` say so as training does (``Trainer._record_nulls``)."""
    counts = dataset.nulls_replaced()
    if any(counts.values()):
        logger.info("%s: nulls replaced (on_null) per feature: %s", what, format_nulls(counts))


def _log_nulls(label: str, counts: dict[str, int]) -> None:
    """One rank's (or worker's) share at the end of a pass, at DEBUG: the trainer logs and
    records the total over the ranks (``Trainer._record_nulls``), one number per feature."""
    if any(counts.values()):
        logger.debug("%s: nulls replaced (on_null) per feature: %s", label, format_nulls(counts))


def _check_features(data: DataConfig, features: FittedFeatures | None) -> None:
    """The fitted statistics a config's transforms need (vocab, quantiles, standardize) are given
    and fit it; cross fields are integer ids read as they are."""
    from towerrec.data.features import FittedFeatures as Fitted

    if features is None and Fitted.needs_fit(data):
        raise ValueError(
            "the config's transforms need fitted statistics (id_mode vocab, bucketize quantiles, "
            "standardize): pass features=FittedFeatures.fit(train files, data) or "
            ".load(RUN_DIR/features.json)"
        )
    if features is not None:
        features.check(data)
    if data.cross is not None:
        by_name = {f.name: f for f in data.sparse_features}
        for name in data.cross.fields:
            f = by_name[name]
            if f.id_mode not in ("check", "hash") or f.on_null != "error" or f.parquet_column != f.name:
                raise ValueError(
                    f"data.cross.fields: {name!r} has id_mode {f.id_mode}, on_null {f.on_null}; a cross "
                    "field is an integer id column read as it is (id_mode check or hash, on_null error)"
                )


def _fast_ids(feature: SparseFeatureConfig, t: pa.DataType) -> bool:
    """Integer ids used or hashed as they are, nulls refused: the loader's own vectorised path."""
    if feature.id_mode not in ("check", "hash") or feature.on_null != "error":
        return False
    return pa.types.is_integer(t.value_type if feature.multi_hot else t)


def _check_sparse_feature(data: DataConfig, name: str) -> None:
    names = data.sparse_feature_names
    if name not in names:
        raise ValueError(f"permute_feature: {name!r} is not a sparse feature; features: {names}")


class _Piece(NamedTuple):
    """Rows ``[begin, stop)`` of one row group, read as part of a run of one file's row groups."""

    group: _RowGroup
    begin: int
    stop: int


class ParquetDataset(IterableDataset[Batch]):
    """Fixed-size, padded batches of a rank's share of Parquet files (policy: module docstring).

    Example::

        ds = ParquetDataset(["a.parquet", "b.parquet"], data, batch_size=512, rank=1, world_size=4)
        ds.steps_per_epoch()           # the same on all four ranks
        ds.set_epoch(3)                # before creating the loader's iterator
        batch = next(iter(ds))         # Batch of 512 rows; padding rows have weight 0

    ``read_rows``: rows decoded and converted at a time (a chunk; a reader holds a few).

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
        read_rows: int = READ_ROWS,
        features: FittedFeatures | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if read_rows <= 0:
            raise ValueError(f"read_rows must be positive, got {read_rows}")
        self.data = data
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.shuffle_row_groups = shuffle_row_groups
        self.read_rows = read_rows
        self.epoch = 0
        self.start_batch = 0
        self.files = sorted(files)
        _check_features(data, features)
        self.features = features
        self.infos = inspect_files(self.files, data, labels)
        self.num_rows = sum(info.num_rows for info in self.infos)
        if self.num_rows == 0:
            raise DataError(f"no rows in {len(self.files)} file(s): {self.files[:3]}")
        # labels=False (prediction): no label column is read; batches carry all-zero labels.
        self._label_columns = list(dict.fromkeys(data.label_columns)) if labels else []
        self._columns = list(dict.fromkeys(c for c, *_ in _column_checks(data, labels)))
        self._table_size = {t.name: t.num_embeddings for t in data.tables}
        self._keys = tuple(data.feature_names)
        self._tasks = tuple(t.name for t in data.tasks)
        # Row of each task's label among the labels read (none read: all-zero labels).
        self._task_rows = [self._label_columns.index(t.label) for t in data.tasks] if labels else []
        if permute_feature is not None:
            _check_sparse_feature(data, permute_feature)
        self.permute_feature = permute_feature
        # The latest pass's null counts in this process (``nulls_replaced``); each pass binds a
        # new dict, so a copy (``with_permutation``, an iterator's snapshot) never adds to another's.
        self._pass_nulls: dict[str, int] = {}

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

    def null_features(self) -> list[str]:
        """The features whose nulls are replaced (``on_null`` default or empty), in config order."""
        features = self.data.sparse_features + self.data.dense_feature_configs
        return [f.name for f in features if f.on_null != "error"]

    def nulls_replaced(self) -> dict[str, int]:
        """Per :meth:`null_features` feature (zeros included), the nulls replaced or dropped in the
        rows that this dataset's latest pass in this process has read so far, from every
        DataLoader worker: this rank's whole share once the pass has ended. A pass cut short
        counts the rows read (read-ahead included); a resumed epoch, those read since the resume.
        Empty for a config without such features.

        Example::

            batches = list(make_dataloader(ds, num_workers=2))
            ds.nulls_replaced()   # {"city": 31, "gain": 12}
        """
        counts = self._pass_nulls
        return {name: counts.get(name, 0) for name in self.null_features()}

    def _new_pass(self) -> dict[str, int]:
        self._pass_nulls = {}
        return self._pass_nulls

    def __iter__(self) -> Iterator[Batch]:
        """This rank's batches, read in this process: Arrow's threads decode the next chunks
        while the consumer works; each chunk is converted and laid out when its batches are due."""
        return self._iterate(0, 1, unpack=True)

    def packed_batches(self) -> Iterator[PackedBatch]:
        """This rank's (inside a DataLoader worker: this worker's) batches, packed for the hop."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._iterate(worker, workers, unpack=False)

    def _iterate(self, worker: int, workers: int, unpack: bool) -> Iterator:
        # A snapshot when the iterator is made: set_epoch for the next epoch must not change an
        # epoch being read (a pipeline may still hold the last one's iterator).
        snapshot = copy.copy(self)
        # In the rank: Arrow's decoding threads, conversion in the consumer's thread (_InConsumer).
        # In a worker: one decoding thread (workers already are the parallelism), a converting one.
        in_rank = get_worker_info() is None
        produce = functools.partial(snapshot._blocks, worker, workers, in_rank, unpack)
        blocks = _InConsumer(produce) if in_rank else _prefetch(produce)
        label = f"rank {self.rank} epoch {self.epoch}" + (f" worker {worker}" if workers > 1 else "")
        return _flatten(blocks, self._new_pass(), label)

    def _blocks(self, worker: int, workers: int, use_threads: bool, unpack: bool) -> Iterator[_Block]:
        """The batches of each run of ``_batch_runs``, laid out (in the consumer's thread, or a
        worker's prefetch thread),
        with the nulls replaced in the chunks converted since the previous block."""
        self._null_counts: dict[str, int] = {}
        for run in self._batch_runs(worker, workers, use_threads):
            layout = self._layout(run)
            nulls, self._null_counts = self._null_counts, {}
            yield _Block(self._batches(layout) if unpack else self._packed(layout), nulls)

    def _count_nulls(self, feature: str, count: int) -> None:
        if count:
            counts = self.__dict__.setdefault("_null_counts", {})
            counts[feature] = counts.get(feature, 0) + count

    def _batch_runs(self, worker: int, workers: int, use_threads: bool) -> Iterator[_Run]:
        """The real rows of worker ``worker``'s batches (module docstring), as runs."""
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
        empty = _Rows.empty(len(self._keys), len(self.data.dense_features), len(self._label_columns))
        runs = _rebatch(self._read(lo, hi, use_threads), counts[read_from:], empty)
        if rng is not None:
            runs = _shuffle(runs, group, rng)
        return _drop(runs, skip - read_from)

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

    def _units(self, lo: int, hi: int) -> list[list[_Piece]]:
        """Rows ``[lo, hi)`` of the epoch's global order as decode units: consecutive (in that
        order) row groups of one file, added to a unit until it holds ``read_rows`` rows. Each
        unit is one Arrow read, whose chunks may span its groups; units decode independently."""
        units: list[list[_Piece]] = []
        rows, offset = 0, 0
        for group in self._row_groups():
            begin, stop = max(lo, offset) - offset, min(hi, offset + group.rows) - offset
            offset += group.rows
            if begin < stop:
                # permute_feature: one group per read, so that no chunk splits a block.
                same = units and units[-1][-1].group.file == group.file and self.permute_feature is None
                if same and rows < self.read_rows:
                    units[-1].append(_Piece(group, begin, stop))
                    rows += stop - begin
                else:
                    units.append([_Piece(group, begin, stop)])
                    rows = stop - begin
            if offset >= hi:
                break
        return units

    def _read(self, lo: int, hi: int, use_threads: bool) -> Iterator[_Rows]:
        """Converted rows ``[lo, hi)`` of the epoch's global order, a chunk at a time. Decode
        units are decoded ahead, in order, by as many threads as Arrow's CPU pool has, up to
        ``MAX_DECODERS`` (``use_threads``; else one): Arrow decodes without the GIL, so they run
        in parallel."""
        decoders = min(max(1, pa.cpu_count()), MAX_DECODERS) if use_threads else 1
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        footers: dict[int, pq.FileMetaData] = {}  # read once per file, in this thread
        with concurrent.futures.ThreadPoolExecutor(decoders, thread_name_prefix=_DECODE_THREADS) as pool:
            try:
                for unit in self._units(lo, hi) + [None]:
                    if unit is not None:
                        file = unit[0].group.file
                        if file not in footers:
                            footers[file] = pq.read_metadata(self.files[file])
                        pending.append(pool.submit(self._decode_unit, unit, footers[file]))
                    while pending and (len(pending) > decoders or unit is None):
                        for record_batch, where in pending.popleft().result():
                            yield self._convert(record_batch, where)
            finally:
                for future in pending:
                    future.cancel()

    def _decode_unit(
        self, unit: list[_Piece], footer: pq.FileMetaData
    ) -> list[tuple[pa.RecordBatch, _Where]]:
        """The decoded rows of a unit, in chunks of up to ``read_rows`` rows (in a pool thread)."""
        # Positions in the unit's row stream: group j holds [starts[j], starts[j + 1]).
        starts = np.cumsum([0] + [p.group.rows for p in unit]).tolist()
        keep_lo, keep_hi = unit[0].begin, starts[-2] + unit[-1].stop  # the middle groups are whole
        chunk = self.read_rows
        if self.permute_feature is not None:  # a multiple of the permutation block
            block = max(self.batch_size, PERMUTE_ROWS)
            chunk = max(block, chunk // block * block)
        out, pos = [], 0
        with pq.ParquetFile(self.files[unit[0].group.file], metadata=footer) as parquet:
            for record_batch in parquet.iter_batches(
                batch_size=chunk,
                row_groups=[p.group.index for p in unit],
                columns=self._columns,
                use_threads=False,  # the units are the parallelism
            ):
                n = record_batch.num_rows
                a, b = max(keep_lo - pos, 0), min(keep_hi - pos, n)
                if a < b:
                    rows = record_batch if b - a == n else record_batch.slice(a, b - a)
                    out.append((rows, self._where(unit, starts, pos + a, pos + b)))
                pos += n
                if pos >= keep_hi:
                    break
        return out

    def _where(self, unit: list[_Piece], starts: list[int], lo: int, hi: int) -> _Where:
        """The row groups of the unit's rows ``[lo, hi)`` (positions in the unit's row stream)."""
        j = bisect.bisect_right(starts, lo) - 1
        pieces = []
        while j < len(unit) and starts[j] < hi:
            at = max(starts[j], lo)
            group = unit[j].group
            pieces.append((at - lo, group.index, group.first_row + at - starts[j], group.first_row))
            j += 1
        chunk_starts, row_groups, first_rows, group_first_rows = zip(*pieces, strict=True)
        file = unit[0].group.file
        return _Where(self.files[file], file, chunk_starts, row_groups, first_rows, group_first_rows)

    def _convert(self, rb: pa.RecordBatch, where: _Where) -> _Rows:
        """The per-chunk step: Arrow columns of N rows (a chunk of many batches) to each sparse
        feature's int64 ids and int32 bag sizes (None: one id per row), dense float32 [N, D] and
        labels float32 [T, N], validated. Vectorised over the chunk, run by the consumer (a
        worker's converting thread); per-column transforms belong here (``_Rows.build`` takes ids
        and sizes)."""
        n = rb.num_rows
        values, lengths, offsets = [], [], []
        cross = self.data.cross
        raw: dict[str, np.ndarray] = {}  # raw ids of the cross fields
        for feature in self.data.sparse_features:
            column, size = rb.column(feature.parquet_column), self._table_size[feature.table]
            if _fast_ids(feature, column.type):
                flat, feature_lengths, feature_offsets = _sparse(column, feature, where)
                raw_ids = _raw_ids(flat)
                ids = _map_ids(raw_ids, flat, feature_offsets, feature, size, where)
                if cross is not None and feature.name in cross.fields:
                    raw[feature.name] = raw_ids
            else:  # strings, vocabularies, buckets, nulls replaced (data.transforms)
                encoded = encode_sparse(column, feature, self.features, size, where)
                ids, feature_lengths, feature_offsets = encoded.values, encoded.lengths, None
                if not feature.multi_hot and encoded.nulls_replaced == 0:
                    feature_lengths = None  # one id per row
                self._count_nulls(feature.name, encoded.nulls_replaced)
            if feature.name == self.permute_feature:
                perm = self._permutation(where, n)
                if feature_lengths is None:
                    ids = ids[perm]
                else:
                    ids, feature_lengths = _take_bags(ids, feature_lengths, perm), feature_lengths[perm]
                    feature_offsets = None  # recomputed from the permuted sizes
                if feature.name in raw:
                    raw[feature.name] = raw[feature.name][perm]
            values.append(ids)
            lengths.append(feature_lengths)
            offsets.append(feature_offsets)
        if cross is not None:
            ids = cross_ids(raw, cross.pairs, cross.num_hashes, self._table_size[cross.table])
            values += ids
            lengths += [None] * len(ids)
            offsets += [None] * len(ids)
        dense = np.empty((n, len(self.data.dense_features)), np.float32)
        for j, d in enumerate(self.data.dense_feature_configs):
            column = rb.column(d.parquet_column)
            if not d.transforms and d.on_null == "error":
                dense[:, j] = _dense(column, d.name, where)
            else:
                dense[:, j], nulls = encode_dense(column, d, self.features, where)
                self._count_nulls(d.name, nulls)
        labels = np.empty((len(self._label_columns), n), np.float32)
        for t, c in enumerate(self._label_columns):
            labels[t] = _label(rb.column(c), c, where)
        return _Rows.build(values, lengths, dense, labels, offsets)

    def _permutation(self, where: _Where, n: int) -> np.ndarray:
        """``permute_feature``'s row permutation of a chunk: within blocks of ``max(B, 1024)``
        rows from each row group's start, cut where the chunk's pieces start or end; each block
        seeded by the seed, the epoch, the file and its first row."""
        block = max(self.batch_size, PERMUTE_ROWS)
        ends = where.starts[1:] + (n,)
        parts = []
        for start, end, first, group_first in zip(
            where.starts, ends, where.first_rows, where.group_first_rows, strict=True
        ):
            row, stop = first, first + end - start
            while row < stop:
                block_end = min(stop, group_first + ((row - group_first) // block + 1) * block)
                perm = _rng(self.seed, self.epoch, where.file, row).permutation(block_end - row)
                parts.append(perm + (start + row - first))
                row = block_end
        return np.concatenate(parts)

    def _layout(self, run: _Run) -> _Layout:
        """The batches of ``run`` padded to B rows (zero-weight rows: no ids, zero dense and
        labels) in their final buffers, laid out together with one copy of each value: one int64
        buffer (per batch its ids feature by feature, then its int32 lengths) and one float32
        buffer (per batch dense, labels, weights)."""
        rows, counts = run
        size, m, n = self.batch_size, len(counts), len(rows)
        num_keys, num_dense, num_tasks = len(self._keys), rows.dense.shape[1], len(self._tasks)
        bounds = np.zeros(m + 1, np.int64)  # the batches' first rows in ``rows``, and the end
        np.cumsum(counts, out=bounds[1:])
        full = n == m * size
        if not full:  # padded position j*B + r of the run's row i, as (batch j, row r)
            padded = np.arange(n) + np.repeat(np.arange(m) * size - bounds[:-1], counts)
            at = np.divmod(padded, size)
        words = (num_keys * size + 1) // 2  # int64 words of a batch's int32 lengths
        # Padding rows and the odd pad word are 0; a full run writes every other entry below.
        lengths = np.empty((m, 2 * words), np.int32) if full else np.zeros((m, 2 * words), np.int32)
        lengths[:, num_keys * size :] = 0
        ids, positions = [], []
        for k in range(num_keys):
            ids.append(rows.ids(k))
            offsets, bags = rows.offsets[k], rows.lengths[k]
            positions.append(bounds if offsets is None else offsets[bounds] - offsets[0])
            part = lengths[:, k * size : (k + 1) * size]
            if full:
                part[:] = 1 if bags is None else bags.reshape(m, size)
            else:
                part[at] = 1 if bags is None else bags
        sizes = np.diff(np.stack(positions), axis=1).sum(axis=0)  # ids per batch
        words_of = lengths.view(np.int64)
        where = [p.tolist() for p in positions]
        pieces = []
        for j in range(m):
            pieces += [ids[k][where[k][j] : where[k][j + 1]] for k in range(num_keys)]
            pieces.append(words_of[j])
        ints = np.concatenate(pieces)
        floats = np.empty((m, size * (num_dense + num_tasks + 1)), np.float32)
        dense = floats[:, : size * num_dense].reshape(m, size, num_dense)
        labels = floats[:, size * num_dense : size * (num_dense + num_tasks)].reshape(m, num_tasks, size)
        weights = floats[:, size * (num_dense + num_tasks) :]
        if full:
            dense[:] = rows.dense.reshape(m, size, num_dense)
            weights.fill(1.0)
            for t, row in enumerate(self._task_rows):
                labels[:, t] = rows.labels[row].reshape(m, size)
        else:
            dense.fill(0.0)
            dense[at] = rows.dense
            weights.fill(0.0)
            weights[at] = 1.0
            labels.fill(0.0)
            for t, row in enumerate(self._task_rows):
                labels[:, t][at] = rows.labels[row]
        if not self._task_rows:
            labels.fill(0.0)
        return _Layout(ints, floats, sizes.tolist(), words)

    def _batches(self, layout: _Layout) -> list[Batch]:
        """The layout's batches as :class:`Batch` es of views, made by a few torch calls per
        layout (not per batch: a torch call costs microseconds)."""
        size, num_dense, keys = self.batch_size, layout.num_dense(self), list(self._keys)
        num_lengths, pad = len(keys) * size, 2 * layout.words - len(keys) * size
        ints = torch.from_numpy(layout.ints)
        values = ints.split([w for v in layout.sizes for w in (v, layout.words)])[::2]
        split = [w for v in layout.sizes for w in (2 * v, num_lengths, pad)[: 3 if pad else 2]]
        lengths = ints.view(torch.int32).split(split)[1 :: 3 if pad else 2]
        floats = torch.from_numpy(layout.floats)
        dense_end, labels_end = size * num_dense, size * (num_dense + len(self._tasks))
        dense = floats[:, :dense_end].unflatten(1, (size, num_dense)).unbind(0)
        labels = [t.unbind(0) for t in floats[:, dense_end:labels_end].unflatten(1, (-1, size)).unbind(1)]
        weights = floats[:, labels_end:].unbind(0)
        return [
            Batch(
                dense=dense[j],
                sparse=KeyedJaggedTensor(keys=list(keys), values=values[j], lengths=lengths[j], stride=size),
                labels={task: labels[t][j] for t, task in enumerate(self._tasks)},
                weights=weights[j],
            )
            for j in range(len(layout.sizes))
        ]

    def _packed(self, layout: _Layout) -> list[PackedBatch]:
        """The layout's batches as :class:`PackedBatch` es of numpy views: a DataLoader worker
        pickles each as two plain byte strings through its pipe (a torch tensor would cost a
        shared-memory segment and a file descriptor hand-over each)."""
        ints = np.split(layout.ints, np.cumsum([v + layout.words for v in layout.sizes])[:-1])
        num_dense = layout.num_dense(self)
        return [
            PackedBatch(i, f, self._keys, self._tasks, self.batch_size, num_dense, v)
            for i, f, v in zip(ints, layout.floats, layout.sizes, strict=True)
        ]


class _Layout(NamedTuple):
    """Batches laid out together (``ParquetDataset._layout``)."""

    ints: np.ndarray  # int64: per batch its ids, then ``words`` words of int32 lengths
    floats: np.ndarray  # float32 [m, B*D + T*B + B]: per batch dense, labels, weights
    sizes: list[int]  # ids per batch
    words: int

    def num_dense(self, dataset: ParquetDataset) -> int:
        return self.floats.shape[1] // dataset.batch_size - len(dataset._tasks) - 1


class _Message(NamedTuple):
    """One item a DataLoader worker sends: its next batches, packed, and the nulls replaced
    (per feature) in the rows it converted since its previous message. The block holding a
    worker's last batch is laid out after its last conversion, so its last message carries the
    rest of its counts (and no extra message shifts the DataLoader's turns)."""

    batches: list[PackedBatch]
    nulls: dict[str, int]


class _PackedBatches(IterableDataset[_Message]):
    """What DataLoader workers iterate: the dataset's batches, packed, ``WORKER_BATCHES`` per item
    on a grid from the worker's stretch's start (``resume_plan``)."""

    def __init__(self, dataset: ParquetDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[_Message]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ds = self.dataset
        rotation, taken = resume_plan(ds.steps_per_epoch(), workers, ds.start_batch)
        size = WORKER_BATCHES - taken[(worker + rotation) % workers] % WORKER_BATCHES  # to the grid
        item: list[PackedBatch] = []
        batches = ds.packed_batches()
        counts, sent = ds._pass_nulls, {}  # this pass's counts, added to as its blocks arrive
        for packed in batches:
            item.append(packed)
            if len(item) == size:
                yield _Message(item, _new_counts(counts, sent))
                item, size = [], WORKER_BATCHES
        if item:
            yield _Message(item, _new_counts(counts, sent))


class BatchLoader:
    """Iterates :class:`Batch` es: read in this process (no workers; a thread reads ahead), or a
    DataLoader over packed batches from worker processes, unpacked on arrival. Each iteration is
    a pass of ``dataset``: ``dataset.nulls_replaced()`` counts it, workers included."""

    def __init__(self, dataset: ParquetDataset, loader: DataLoader | None, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.loader = loader
        self.pin_memory = pin_memory

    def __iter__(self) -> Iterator[Batch]:
        if self.loader is not None:  # the DataLoader pins for itself
            ds = self.dataset
            return self._unpacked(iter(self.loader), ds._new_pass(), f"rank {ds.rank} epoch {ds.epoch}")
        batches = iter(self.dataset)
        return (batch.pin_memory() for batch in batches) if self.pin_memory else batches

    @staticmethod
    def _unpacked(messages: Iterator[_Message], nulls: dict[str, int], label: str) -> Iterator[Batch]:
        for message in messages:
            _add_counts(nulls, message.nulls)
            for packed in message.batches:
                yield packed.unpack()
        _log_nulls(label, nulls)

    def __len__(self) -> int:
        return len(self.dataset)


def make_dataloader(dataset: ParquetDataset, num_workers: int, prefetch_factor: int = 2) -> BatchLoader:
    """A loader over ready-made batches. ``num_workers`` 0 reads in this process (Arrow's threads
    decode ahead); otherwise DataLoader worker processes, re-created each epoch so ``set_epoch`` applies.

    Example::

        loader = make_dataloader(dataset, num_workers=0)
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            for batch in loader: ...
    """
    pin_memory = torch.cuda.is_available()
    if num_workers == 0:
        return BatchLoader(dataset, None, pin_memory)
    loader = DataLoader(
        _PackedBatches(dataset),
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        persistent_workers=False,
        pin_memory=pin_memory,
        # The workers' seeds come from a generator of their own, not the global torch RNG: the
        # model's random stream (dropout) then depends only on the steps taken, which a resumed
        # run restores exactly. The batches use no worker RNG (their shuffles are seeded).
        generator=torch.Generator().manual_seed(dataset.seed),
        worker_init_fn=functools.partial(_init_worker, os.getpid(), _handles_sigterm()),
        multiprocessing_context=_worker_context(),
    )
    return BatchLoader(dataset, loader, pin_memory)


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
    """Stop this process's loader prefetch threads and in-rank readers, and SIGKILL the
    DataLoader workers still alive (a loader abandoned mid-epoch, a rank leaving on an error or a
    signal). Under a rank they
    ignore SIGTERM, and multiprocessing's exit handler SIGTERMs daemonic children and then joins
    them: the process would never exit (or, under torchrun, wait for its SIGKILL 30 s later). The
    DataLoader's SIGCHLD handler, which raises for a killed worker, is reset first."""
    for stop, (thread, items) in list(_PREFETCHERS.items()):
        _stop_prefetch(stop, thread, items, timeout=5.0)
    for reader in list(_IN_CONSUMER):
        reader.stop()
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
