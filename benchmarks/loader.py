"""Loader throughput: towerrec's loader against a raw pyarrow scan of the same columns and files.

    python -m benchmarks.loader --rows 1000000 --batch-size 1024

The raw scan only decodes Arrow record batches (``ParquetFile.iter_batches``, batch size B, Arrow's
threads); the loader also validates ids and labels, builds the padded KeyedJaggedTensor batches
and, with workers, ships them between processes. One row per supported ``num_workers`` setting;
the default of ``training.num_workers`` is marked. After one untimed pass of each (one-time
costs: imports, the workers' forkserver), the passes interleave (raw, then each setting, repeated)
and each row reports its median, so a busy machine slows all rows alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from towerrec.data.config import resolve_paths
from towerrec.data.parquet import MAX_DECODERS, WORKER_BATCHES, ParquetDataset, make_dataloader
from towerrec.data.synth import write_synthetic
from towerrec.trainer.config import TrainingConfig, load_config

from benchmarks.report import markdown_table, write_section

WORKERS = (0, 1, 2)


def raw_scan(files: list[str], columns: list[str], batch_size: int) -> int:
    rows = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            rows += batch.num_rows
    return rows


def loader_scan(dataset: ParquetDataset, num_workers: int) -> int:
    return sum(batch.real_rows for batch in make_dataloader(dataset, num_workers))


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    rows = fn()
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", help="synthetic data folder, made if absent (default runs/bench-data-ROWS)")
    args = parser.parse_args()

    data_dir = Path(args.data or f"runs/bench-data-{args.rows}")
    if not (data_dir / "config.yaml").exists():
        write_synthetic(str(data_dir), rows=args.rows, files=4, seed=0, eval_fraction=0.0001)
    data = load_config(data_dir / "config.yaml").data
    files = resolve_paths(data.train, "data.train")
    default = TrainingConfig().num_workers

    scans: dict[str, Callable[[], int]] = {"raw": lambda: raw_scan(files, data.columns, args.batch_size)}
    for workers in WORKERS:
        dataset = ParquetDataset(files, data, args.batch_size)
        scans[f"loader {workers}"] = lambda d=dataset, w=workers: loader_scan(d, w)
    for scan in scans.values():  # untimed: one-time costs (imports, the workers' forkserver)
        scan()
    times: dict[str, list[float]] = {name: [] for name in scans}
    rows: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, scan in scans.items():
            seconds, rows[name] = timed(scan)
            times[name].append(seconds)
    raw_rows = rows["raw"]
    raw_rate = raw_rows / statistics.median(times["raw"])
    table = [["raw pyarrow iter_batches", "-", f"{raw_rows:,}", f"{raw_rate:,.0f}", "1.00"]]
    for workers in WORKERS:
        name = f"loader {workers}"
        assert rows[name] == raw_rows, f"loader read {rows[name]} rows, raw scan {raw_rows}"
        rate = rows[name] / statistics.median(times[name])
        label = f"{workers} (default)" if workers == default else str(workers)
        table.append(["towerrec loader", label, f"{rows[name]:,}", f"{rate:,.0f}", f"{rate / raw_rate:.2f}"])
    body = (
        f"{raw_rows:,} rows in {len(files)} files, {len(data.columns)} columns "
        f"({len(data.sparse_features)} sparse incl. one multi-hot list, {len(data.dense_features)} dense, "
        f"{len(data.tasks)} labels), batch {args.batch_size}, median of {args.repeats} interleaved passes "
        "after a warm-up pass. "
        "num_workers 0 reads in the consuming process: Arrow's CPU count of threads (here "
        f"{min(pa.cpu_count(), MAX_DECODERS)}) decode row-group units ahead while one thread converts "
        "each chunk and lays its batches out; with workers, each DataLoader worker does the same "
        f"with one decoding thread and sends {WORKER_BATCHES} batches per message.\n\n"
        + markdown_table(["reader", "num_workers", "rows", "rows/s", "vs raw"], table)
    )
    write_section("loader", "Loader rows/s against a raw pyarrow scan", body)


if __name__ == "__main__":
    main()
