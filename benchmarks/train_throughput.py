"""Training samples/s of the demo model at 1 and 2 ranks (gloo on CPU), side by side in one run.

    python -m benchmarks.train_throughput --rows 400000

Each run is the real trainer under torch.distributed.run on the same synthetic data; samples/s
is read from the run's metrics.jsonl (the train records after the first, which holds warm-up),
so it covers loading, input all-to-all, forward, backward and the optimizers, not evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from towerrec.data.synth import write_synthetic
from towerrec.trainer.distributed import free_port

from benchmarks.report import markdown_table, write_section


def train(config: Path, nproc: int, run_dir: Path, batch_size: int, workers: int) -> list[float]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), "-m", "towerrec.trainer.main", "--config", str(config),
        "--set", f"run_dir={run_dir}", "--set", f"training.batch_size={batch_size}",
        "--set", f"training.num_workers={workers}", "--set", "training.log_interval=20",
        "--set", "checkpoint.enabled=false",  # measure training alone; never resume an earlier run
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"training failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["samples_per_s"] for x in lines if x["phase"] == "train"][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batch-size", type=int, default=1024, help="per rank")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--out", default="runs/bench-train")
    args = parser.parse_args()

    out = Path(args.out)
    if not (out / "data" / "config.yaml").exists():
        write_synthetic(str(out / "data"), rows=args.rows, files=4, seed=0, eval_fraction=0.05)
    config = out / "data" / "config.yaml"
    results = {n: train(config, n, out / f"run-{n}", args.batch_size, args.workers) for n in (1, 2)}
    base = statistics.median(results[1])
    rows = []
    for nproc, rates in results.items():
        median = statistics.median(rates)
        threads = max(1, (os.cpu_count() or 1) // nproc)
        rows.append(
            [nproc, threads, len(rates), f"{median:,.0f}", f"{median / nproc:,.0f}", f"{median / base:.2f}"]
        )
    body = (
        f"Demo PLE model (5 tables, 6 sparse features incl. a multi-hot history, 2 tasks) on {args.rows:,} "
        f"synthetic rows, batch {args.batch_size} per rank, {args.workers} loader worker(s) per rank, "
        f"fused row-wise Adagrad + Adam, TrainPipelineSparseDist, gloo on {os.cpu_count()} CPU cores.\n\n"
        + markdown_table(
            ["ranks", "threads/rank", "windows", "samples/s (median)", "per rank", "vs 1 rank"], rows
        )
        + "\n\nOn a 2-core machine two ranks share the cores the single rank had, so the ratio shows the "
        "cost of sharding (input all-to-all, pooled-embedding all-to-all, DDP all-reduce) more than "
        "a scaling gain; on a cluster each rank brings its own device."
    )
    write_section("train_throughput", "Training samples/s at 1 and 2 ranks", body)


if __name__ == "__main__":
    main()
