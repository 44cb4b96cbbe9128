"""Resuming an epoch at batch k: the same batches in the same order as an uninterrupted epoch."""

from __future__ import annotations

import pytest
from towerrec.data.batch import Batch
from towerrec.data.parquet import ParquetDataset, make_dataloader, resume_plan

B = 16


def fingerprint(batch: Batch) -> tuple:
    return (tuple(batch.sparse["row_id"].values().tolist()), tuple(batch.dense[:, 0].tolist()))


def epoch(files, config, num_workers, start_batch=0, epoch_index=1, **kwargs) -> list[tuple]:
    dataset = ParquetDataset(files, config, B, rank=1, world_size=2, **kwargs)
    dataset.set_epoch(epoch_index, start_batch=start_batch)
    return [fingerprint(b) for b in make_dataloader(dataset, num_workers)]


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize(
    "shuffle", [{}, {"shuffle_buffer": 40, "seed": 7, "shuffle_row_groups": True}], ids=["plain", "shuffled"]
)
def test_resumed_epoch_continues_the_uninterrupted_one(uneven_files, data_config, num_workers, shuffle):
    files, _ = uneven_files
    full = epoch(files, data_config(), num_workers, **shuffle)
    assert len(full) == 7  # 207 rows, 2 ranks, 16 per batch: uneven worker stretches
    for k in range(len(full) + 1):
        assert epoch(files, data_config(), num_workers, start_batch=k, **shuffle) == full[k:], k


def test_skipped_batches_are_not_read(uneven_files, data_config):
    files, _ = uneven_files
    dataset = ParquetDataset(files, data_config(), B, rank=1, world_size=2)
    reads = []
    original = dataset._read
    dataset._read = lambda lo, hi, use_threads: reads.append((lo, hi)) or original(lo, hi, use_threads)
    dataset.set_epoch(0, start_batch=5)
    assert len(list(dataset)) == 2
    start, end = dataset.rank_rows()
    assert reads == [(start + 5 * B, end)]


def test_resume_plan_follows_the_loaders_turns():
    # 7 batches over 3 workers: stretches of 2, 2, 3; turns 0 1 2 0 1 2 2.
    assert resume_plan(7, 3, 0) == (0, [0, 0, 0])
    assert resume_plan(7, 3, 4) == (1, [2, 1, 1])
    assert resume_plan(7, 3, 6) == (2, [2, 2, 2])
    assert resume_plan(7, 3, 7) == (0, [2, 2, 3])
    assert resume_plan(5, 0, 3) == (0, [3])  # no workers: the main process reads alone


def test_start_batch_outside_the_epoch_is_refused(uneven_files, data_config):
    files, _ = uneven_files
    dataset = ParquetDataset(files, data_config(), B, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"start_batch 8 is not in \[0, 7\]"):
        dataset.set_epoch(0, start_batch=8)
