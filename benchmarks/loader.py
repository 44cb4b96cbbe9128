"""Loader throughput: towerrec's ParquetDataset against a raw pyarrow scan of the same columns.

    python benchmarks/loader.py --rows 1000000 --batch-size 1024

The raw scan only decodes Arrow record batches; the loader also validates ids and labels, builds
KeyedJaggedTensors, pads the last batch and (with workers) ships batches between processes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq
from towerrec.data.config import resolve_paths
from towerrec.data.parquet import ParquetDataset, make_dataloader
from towerrec.data.synth import write_synthetic
from towerrec.trainer.config import load_config

from benchmarks.report import markdown_table, write_section


def raw_scan(files: list[str], columns: list[str], batch_size: int) -> int:
    rows = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            rows += batch.num_rows
    return rows


def loader_scan(dataset: ParquetDataset, num_workers: int) -> int:
    return int(sum(float(b.weights.sum()) for b in make_dataloader(dataset, num_workers)))


def best_of(repeats: int, fn, *args) -> tuple[float, int]:  # noqa: ANN001 - any scan
    times, rows = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="runs/bench-data", help="synthetic data folder (made if absent)")
    args = parser.parse_args()

    data_dir = Path(args.data)
    if not (data_dir / "config.yaml").exists():
        write_synthetic(str(data_dir), rows=args.rows, files=4, seed=0, eval_fraction=0.0001)
    data = load_config(data_dir / "config.yaml").data
    files = resolve_paths(data.train, "data.train")

    raw_time, raw_rows = best_of(args.repeats, raw_scan, files, data.columns, args.batch_size)
    raw_rate = raw_rows / raw_time
    rows = [["raw pyarrow iter_batches", "-", f"{raw_rows:,}", f"{raw_rate:,.0f}", "1.00"]]
    for workers in (0, 1, 2):
        dataset = ParquetDataset(files, data, args.batch_size)
        seconds, n = best_of(args.repeats, loader_scan, dataset, workers)
        assert n == raw_rows, f"loader read {n} rows, raw scan {raw_rows}"
        rate = n / seconds
        rows.append(["towerrec ParquetDataset", workers, f"{n:,}", f"{rate:,.0f}", f"{rate / raw_rate:.2f}"])
    body = (
        f"{raw_rows:,} rows in {len(files)} files, {len(data.columns)} columns "
        f"({len(data.sparse_features)} sparse incl. one multi-hot list, {len(data.dense_features)} dense, "
        f"{len(data.tasks)} labels), batch {args.batch_size}, median of {args.repeats} passes.\n\n"
        + markdown_table(["reader", "workers", "rows", "rows/s", "vs raw"], rows)
    )
    write_section("loader", "Loader rows/s against a raw pyarrow scan", body)


if __name__ == "__main__":
    main()
