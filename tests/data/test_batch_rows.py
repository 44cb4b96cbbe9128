"""``ParquetDataset.batch_rows``: the file rows a batch was read from, worked out from the layout
alone, against the row ids the batches really hold (what a non-finite loss message names)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from towerrec.data.parquet import ParquetDataset, make_dataloader

B = 16


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    "shuffle",
    [
        {},
        {"shuffle_row_groups": True, "seed": 3},
        {"shuffle_buffer": 40, "seed": 7, "shuffle_row_groups": True},
    ],
    ids=["plain", "row-groups", "buffer"],
)
def test_batch_rows_name_the_file_rows_of_every_batch(uneven_files, data_config, num_workers, shuffle):
    files, _ = uneven_files
    starts = np.cumsum([0] + [pq.read_metadata(f).num_rows for f in files])

    def where(row_id: int) -> tuple[str, int]:  # row ids count the rows of the sorted files
        f = int(np.searchsorted(starts, row_id, side="right")) - 1
        return files[f], row_id - int(starts[f])

    dataset = ParquetDataset(files, data_config(), B, rank=1, world_size=2, **shuffle)
    dataset.set_epoch(1)
    batches = list(make_dataloader(dataset, num_workers))
    assert len(batches) == 7
    for i, batch in enumerate(batches):
        ranges, shuffled = dataset.batch_rows(i, num_workers)
        read = {where(r) for r in batch.sparse["row_id"].values().tolist()}
        named = [(path, r) for path, a, b in ranges for r in range(a, b)]
        assert len(named) == len(set(named)), ranges  # no row named twice
        if "shuffle_buffer" in shuffle:
            # Drawn from its shuffle group of up to ceil(40 / 16) = 3 batches of rows.
            assert shuffled and read <= set(named) and len(named) <= 3 * B, (i, ranges)
        else:
            assert not shuffled and read == set(named), (i, ranges)
    padding_only = ParquetDataset(files, data_config(), B, rank=0, world_size=300)  # 207 rows
    assert padding_only.batch_rows(0) == ([], False)
