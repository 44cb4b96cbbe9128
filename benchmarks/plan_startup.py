"""Training start-up with each planner: process start to the first training step, 2 ranks.

    python -m benchmarks.plan_startup                      # 500 tables, both planners; 1,000 on 64 GPUs
    python -m benchmarks.plan_startup --tables 10 --plan_tables 30 --no_docs   # smoke run

The trainer plans on rank 0 with ``sharding.planner`` through ``plan_config`` (the path of
``towerrec plan``) and broadcasts the plan. Here a synthetic model of ``--tables`` tables (one
single-hot feature each, 1k-50k rows, dim 8-32, seeded) trains on 2 CPU ranks under torchrun with
each planner; the time is from starting torchrun to rank 0's log line of training step 1, beside
the planner's own time (from the trainer's log). Then the 1,000-table / 64-GPU config of
``benchmarks.planner`` (10 tables of 1e9 rows) is planned through the same ``plan_config`` call for
the 8 x 8 A100-80GB topology. Results go to docs/BENCHMARKS.md (section ``plan_startup``).
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.report import markdown_table, write_section

ROOT = Path(__file__).resolve().parents[1]
ROWS = [1_000, 10_000, 50_000]
DIMS = [8, 16, 32]
BATCH = 64  # per rank
_PLANNED = re.compile(r"sharding plan: (\w+) planner on rank 0 in ([\d.]+) s")


def write_model(out: Path, n_tables: int, rows: int, seed: int = 0) -> Path:
    """Parquet data and a config of ``n_tables`` tables (one feature each); returns the config."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    rng = random.Random(seed)
    ids = np.random.default_rng(seed)
    tables, features, columns = [], [], {}
    for i in range(n_tables):
        size, dim = rng.choice(ROWS), rng.choice(DIMS)
        tables.append({"name": f"t{i:04d}", "num_embeddings": size, "embedding_dim": dim})
        features.append({"name": f"f{i:04d}", "table": f"t{i:04d}"})
        columns[f"f{i:04d}"] = ids.integers(0, size, rows)
    columns["click"] = ids.integers(0, 2, rows).astype("float32")
    (out / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), out / "data" / "part-0.parquet")
    config = {
        "run_dir": str(out / "run"),
        "data": {
            "train": str(out / "data" / "*.parquet"),
            "eval": str(out / "data" / "*.parquet"),
            "tables": tables,
            "sparse_features": features,
            "tasks": [{"name": "click", "label": "click"}],
        },
        "model": {"type": "ple", "num_levels": 1, "expert_hidden": [32], "tower_hidden": [16]},
        "training": {"batch_size": BATCH, "max_steps": 2, "log_interval": 1, "num_workers": 0},
        "checkpoint": {"enabled": False},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def time_to_first_step(config: Path, planner: str, run_dir: Path) -> dict[str, Any]:
    """torchrun with 2 ranks; seconds from its start to rank 0's ``train step 1`` line."""
    from towerrec.trainer.distributed import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "towerrec.trainer.main", "--config", str(config),
        "--set", f"sharding.planner={planner}", "--set", f"run_dir={run_dir}",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_step, plan_s, tail = None, None, []
    assert proc.stderr is not None
    for line in proc.stderr:
        tail = (tail + [line])[-30:]
        planned = _PLANNED.search(line)
        if planned:
            plan_s = float(planned[2])
        if first_step is None and "train step 1 " in line:
            first_step = time.perf_counter() - start
    code = proc.wait()
    if code != 0 or first_step is None:
        raise RuntimeError(f"{planner} run failed (exit {code}):\n{''.join(tail)}")
    row = {"planner": planner, "first_step_s": first_step, "plan_s": plan_s}
    print(f"{planner:<9} first step after {first_step:7.1f} s (planning {plan_s:.2f} s)", flush=True)
    return row


def plan_64_gpus(n_tables: int) -> dict[str, Any]:
    """The 1,000-table config of ``benchmarks.planner`` through ``plan_config``, 8 x 8 A100-80GB."""
    from benchmarks.planner import TOPOLOGY, run, synthetic_config

    label = f"{n_tables:,} tables, 10 of 1e9 rows x 64"
    return run(synthetic_config(n_tables, n_billion=10, billion_dim=64), "fast", label, TOPOLOGY, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", type=int, default=500, help="tables of the 2-rank training runs")
    parser.add_argument("--plan_tables", type=int, default=1000, help="tables of the 64-GPU plan")
    parser.add_argument("--planners", default="fast,torchrec", help="planners of the training runs")
    parser.add_argument("--no_docs", action="store_true", help="print only; docs/BENCHMARKS.md untouched")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="plan-startup-") as tmp:
        config = write_model(Path(tmp), args.tables, rows=BATCH * 2 * 4)
        for planner in args.planners.split(","):
            r = time_to_first_step(config, planner, Path(tmp) / f"run-{planner}")
            rows.append(
                [
                    f"{args.tables} tables, 2 CPU ranks",
                    planner,
                    f"{r['plan_s']:.2f}",
                    f"{r['first_step_s']:.1f}",
                ]
            )
    big = plan_64_gpus(args.plan_tables)
    rows.append([big["config"] + ", 8x8 A100-80GB", "fast", f"{big['seconds']:.2f}", "- (plan only)"])
    table = markdown_table(["model", "planner", "planning s (rank 0)", "process start to step 1, s"], rows)
    if args.no_docs:
        print(table)
        return
    body = (
        "`sharding.planner` in the trainer: rank 0 plans with `plan_config` (as `towerrec plan`) "
        "for the job's topology and broadcasts the plan. Training rows: torchrun with 2 CPU ranks, "
        f"a synthetic model of {args.tables} tables (1k-50k rows, dim 8-32, one single-hot feature "
        f"each, seeded), batch {BATCH} per rank; time from starting torchrun to rank 0's log of "
        "training step 1 (imports, data, planning, sharding, first step); planning time from the "
        "trainer's log. Last row: the 1,000-table config of the planner benchmark planned through "
        "the same `plan_config` call for 8 nodes x 8 A100-80GB (TorchRec's default planner did not "
        "finish it in 15 min, see above).\n\n" + table
    )
    write_section("plan_startup", "Training start-up: planner time to the first step", body)


if __name__ == "__main__":
    main()
