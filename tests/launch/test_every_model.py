"""Every model type trains through the same TorchX path (``towerrec train``) on 2 processes."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from launch_helpers import REPO, script

SMALL = {"tower_hidden": [16]}
MODELS = {
    "ple": {"type": "ple", "num_levels": 2, "expert_hidden": [16], **SMALL},
    "cgc": {"type": "cgc", "expert_hidden": [16], **SMALL},
    "mmoe": {"type": "mmoe", "num_experts": 2, "expert_hidden": [16], **SMALL},
    "shared_bottom": {"type": "shared_bottom", "bottom_hidden": [16], **SMALL},
    "single_task": {"type": "single_task", "hidden": [16], **SMALL},
    "dtn": {
        "type": "dtn",
        "methods": ["gdcn", "masknet", "memonet"],
        "module_width": 8,
        "masknet_block_width": 8,
        "masknet_hidden": [16],
        "dependencies": {"conversion": "click"},
        **SMALL,
    },
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_through_torchx_on_two_processes(name, synth_data, tmp_path):
    config = yaml.safe_load((synth_data / "config.yaml").read_text())
    data = config["data"]
    if name == "dtn":  # the hashed cross codebook: a table of the sharded collection
        data["tables"].append({"name": "codebook", "num_embeddings": 5000, "embedding_dim": 4})
        data["cross"] = {"table": "codebook", "fields": ["user_id", "item_id", "device"]}
    if name == "single_task":  # the papers' single-task baseline: one run per task
        data["tasks"] = [data["tasks"][0]]
    run_dir = tmp_path / "run"
    config.update(model=MODELS[name], run_dir=str(run_dir), checkpoint={"enabled": False})
    # 30 steps of 2 x 256 rows with raised learning rates: enough to learn, not only to run.
    config["training"].update(batch_size=256, max_steps=30, eval_interval=0, num_workers=0)
    config["training"]["dense_optimizer"]["lr"] = 0.01
    config["training"]["sparse_optimizer"]["lr"] = 0.2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(script("towerrec")), "train", "--config", str(path), "--nproc_per_node", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    assert set(metrics) == {t["name"] for t in data["tasks"]}
    assert all(m["auc"] > 0.6 for m in metrics.values()), metrics  # learned: chance is 0.5
    assert metrics["click"]["examples"] == 4000  # every eval row once (conversion: the clicked ones)
    plan = json.loads((run_dir / "sharding_plan.json").read_text())
    tables = {table for module in plan.values() for table in module}
    assert tables == {t["name"] for t in data["tables"]}  # the planner placed every table
