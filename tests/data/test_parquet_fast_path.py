"""The loader's fast path: reading threads that stop and report, chunks that cut batches anywhere,
and batches built once in shared buffers with int32 lengths."""

from __future__ import annotations

import gc
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from towerrec.data.parquet import MAX_DECODERS, DataError, ParquetDataset, end_workers, make_dataloader

B = 16


def reader_threads() -> list[threading.Thread]:
    names = ("towerrec-loader-prefetch", "towerrec-loader-decode")
    return [t for t in threading.enumerate() if t.name.startswith(names)]


def row_ids(batches) -> list[int]:
    return [i for b in batches for i in b.sparse["row_id"].values().tolist()]


@pytest.mark.parametrize("read_rows", [1, 7, 16, 50, 65536])
def test_every_row_once_whatever_the_chunk_size(uneven_files, data_config, read_rows):
    """Chunks of any size (within a row group, across row groups, a whole file) cut the same
    batches: a batch across a chunk boundary is copied together, the others are views."""
    files, total = uneven_files
    for rank in range(2):
        dataset = ParquetDataset(files, data_config(), B, rank, 2, read_rows=read_rows)
        reference = ParquetDataset(files, data_config(), B, rank, 2)
        batches, expected = list(dataset), list(reference)
        assert [b.real_rows for b in batches] == [b.real_rows for b in expected]
        for got, want in zip(batches, expected, strict=True):
            assert torch.equal(got.sparse.values(), want.sparse.values())
            assert torch.equal(got.sparse.lengths(), want.sparse.lengths())
            assert torch.equal(got.dense, want.dense) and torch.equal(got.weights, want.weights)
            assert all(torch.equal(got.labels[t], want.labels[t]) for t in want.labels)
    start, end = 207 // 2, 207
    assert sorted(row_ids(batches)) == list(range(start, end)) and total == 207


def test_batch_is_views_of_two_buffers_with_int32_lengths(uneven_files, data_config):
    files, _ = uneven_files
    batch = next(iter(ParquetDataset(files, data_config(), B)))
    lengths = batch.sparse.lengths()
    assert lengths.dtype == torch.int32 and batch.sparse.values().dtype == torch.int64
    # Values and lengths share one int64 buffer; dense, labels and weights one float32 buffer.
    assert lengths.untyped_storage().data_ptr() == batch.sparse.values().untyped_storage().data_ptr()
    floats = {batch.dense.untyped_storage().data_ptr(), batch.weights.untyped_storage().data_ptr()}
    floats |= {label.untyped_storage().data_ptr() for label in batch.labels.values()}
    assert len(floats) == 1


def test_abandoned_iterator_stops_its_threads(tmp_path, files, data_config):
    paths, _ = files(tmp_path, [4000], row_group_rows=256)
    before = len(reader_threads())
    batches = iter(ParquetDataset(paths, data_config(), B, read_rows=64))
    next(batches)
    # Arrow's CPU count decode ahead; the consumer converts and lays out (no thread of its own).
    assert len(reader_threads()) == before + min(pa.cpu_count(), MAX_DECODERS)
    assert not [t for t in reader_threads() if t.name.startswith("towerrec-loader-prefetch")]
    del batches  # as a trainer leaving at max_steps does
    gc.collect()
    assert len(reader_threads()) == before
    loader = iter(make_dataloader(ParquetDataset(paths, data_config(), B, read_rows=64), 0))
    next(loader)
    loader.close()
    assert len(reader_threads()) == before


def test_error_reaches_the_consumer_after_the_good_batches(tmp_path, table, data_config):
    good = table(0, 64)
    labels = good.column("click").to_pylist()
    labels[40] = 3  # batch 2 (rows 32..47); chunks of 8 rows, so batches 0 and 1 come first
    bad = good.set_column(good.schema.get_field_index("click"), "click", pa.array(labels, pa.int8()))
    path = tmp_path / "bad.parquet"
    pq.write_table(bad, path, row_group_size=32)
    batches = iter(ParquetDataset([str(path)], data_config(), B, read_rows=8))
    assert [next(batches).real_rows, next(batches).real_rows] == [B, B]
    with pytest.raises(DataError, match=r"bad.parquet: row group 1, column 'click', row 40: value 3"):
        next(batches)
    gc.collect()
    assert not reader_threads()


def test_end_workers_stops_a_held_iterator(tmp_path, files, data_config):
    paths, _ = files(tmp_path, [4000], row_group_rows=256)
    batches = iter(ParquetDataset(paths, data_config(), B, read_rows=64))
    next(batches)
    end_workers()  # at exit, or trainer.main on the way out
    assert not reader_threads()
    with pytest.raises(RuntimeError, match="stopped"):
        list(batches)


def test_set_epoch_does_not_change_an_epoch_being_read(uneven_files, data_config):
    files, _ = uneven_files
    dataset = ParquetDataset(files, data_config(), B, shuffle_row_groups=True, seed=1)
    dataset.set_epoch(0)
    first = list(dataset)
    dataset.set_epoch(0)
    batches = iter(dataset)
    dataset.set_epoch(1, start_batch=3)  # e.g. a pipeline still holding the last epoch's iterator
    assert [row_ids([b]) for b in batches] == [row_ids([b]) for b in first]
