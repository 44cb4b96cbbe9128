"""The plan-file round trip: `towerrec plan` for a 2-rank CPU topology, then a real 2-rank gloo
training run with `sharding.plan_file` uses exactly that placement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dist_utils import free_port
from towerrec.launch import cli

ROOT = Path(__file__).resolve().parents[2]


def _other_rank(plan: dict) -> dict:
    """Every table that lives on one rank moves to the other one: a run that re-planned by
    itself instead of obeying the file could not reproduce this placement."""
    moved = json.loads(json.dumps(plan))
    for tables in moved["plan"].values():
        for entry in tables.values():
            if entry["sharding_type"] == "data_parallel" or len(set(entry["ranks"])) != 1:
                continue
            entry["ranks"] = [1 - r for r in entry["ranks"]]
            for shard in entry["shards"]:
                rank = int(shard["placement"].split("/")[0].split(":")[1])
                shard["placement"] = f"rank:{1 - rank}/cpu"
    return moved


def test_training_run_uses_exactly_the_planned_placement(synth_data: Path, tmp_path: Path) -> None:
    config = synth_data / "config.yaml"
    out = tmp_path / "plan"
    code = cli.main(
        ["plan", "--config", str(config), "--topology", "1x2xCPU-8GB", "--out", str(out),
         "--set", "training.batch_size=256"]
    )  # fmt: skip
    assert code == 0
    planned = json.loads((out / "plan.json").read_text())
    assert planned["world_size"] == 2 and planned["compute_device"] == "cpu"
    moved = _other_rank(planned)
    assert moved["plan"] != planned["plan"]  # at least one table moved
    plan_file = tmp_path / "moved.json"
    plan_file.write_text(json.dumps(moved))

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "towerrec.trainer.main", "--config", str(config),
        "--set", f"run_dir={run_dir}", "--set", "training.batch_size=256", "--set", "training.max_steps=4",
        "--set", f"sharding.plan_file={plan_file}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run_dir / "eval_metrics.json").exists()

    used = json.loads((run_dir / "sharding_plan.json").read_text())
    assert used == moved["plan"]
    log = result.stderr + result.stdout
    assert f"sharding plan from {plan_file}" in log
    for name, placement in moved["plan"]["model.ebc"].items():
        assert f"model.ebc.{name}: {placement['sharding_type']} on ranks {placement['ranks']}" in log
