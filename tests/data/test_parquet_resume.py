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
    # 7 batches over 3 workers: stretches of 2, 2, 3; one batch per item: turns 0 1 2 0 1 2 2.
    assert resume_plan(7, 3, 0, item=1) == (0, [0, 0, 0])
    assert resume_plan(7, 3, 4, item=1) == (1, [2, 1, 1])
    assert resume_plan(7, 3, 6, item=1) == (2, [2, 2, 2])
    assert resume_plan(7, 3, 7, item=1) == (0, [2, 2, 3])
    assert resume_plan(5, 0, 3) == (0, [3])  # no workers: the main process reads alone
    # Items of 2: turns 0 0 1 1 2 2 2 (worker 2's second item is its last batch).
    assert resume_plan(7, 3, 3, item=2) == (1, [2, 1, 0])
    assert resume_plan(7, 3, 6, item=2) == (2, [2, 2, 2])
    # 40 batches over 2 workers, items of 8: turns 0 x8, 1 x8, 0 x8, 1 x8, 0 x4, 1 x4.
    assert resume_plan(40, 2, 20) == (0, [12, 8])
    assert resume_plan(40, 2, 24) == (1, [16, 8])
    assert resume_plan(40, 2, 34) == (0, [18, 16])
    assert resume_plan(40, 2, 36) == (1, [20, 16])


@pytest.mark.parametrize("num_workers", [2, 3])
def test_resume_inside_a_workers_item(uneven_files, data_config, num_workers):
    """Stretches longer than an item (26 batches of 4 rows per rank): resuming inside an item
    continues with the rest of it, then the turns go on as in the uninterrupted epoch."""
    files, _ = uneven_files

    def run(start_batch: int) -> list[tuple]:
        dataset = ParquetDataset(files, data_config(), 4, rank=1, world_size=2, shuffle_buffer=12, seed=5)
        dataset.set_epoch(2, start_batch=start_batch)
        return [fingerprint(b) for b in make_dataloader(dataset, num_workers)]

    full = run(0)
    assert len(full) == 26 and len(set(full)) == 26
    for k in (1, 5, 8, 9, 11, 15, 17, 20, 25, 26):
        assert run(k) == full[k:], k


def test_start_batch_outside_the_epoch_is_refused(uneven_files, data_config):
    files, _ = uneven_files
    dataset = ParquetDataset(files, data_config(), B, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"start_batch 8 is not in \[0, 7\]"):
        dataset.set_epoch(0, start_batch=8)
