"""The trainer's sharding plan: planned once on rank 0 through ``towerrec plan``'s path
(``plan_config`` for the job's topology), shared with every rank; a config that fits no device
fails on every rank with the planner's message. Real 2-rank gloo runs under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import torchrun
from towerrec.trainer.config import ConfigError, load_config
from towerrec.trainer.planning.plan_file import plan_to_dict
from towerrec.trainer.planning.planner import plan_config, table_constraints
from towerrec.trainer.planning.topology import GB
from towerrec.trainer.sharding import host_memory_bytes, job_topology

RUN = ["training.batch_size=256", "training.max_steps=4", "checkpoint.enabled=false"]


pytestmark = pytest.mark.usefixtures("quiet_torchrec")


def _planned(config_path: Path, overrides: list[str], planner: str) -> dict:
    """What ``plan_config`` gives for the config and a 2-rank job on this host."""
    config = load_config(config_path, overrides)
    result = plan_config(config, job_topology(2, 2, "cpu"), planner=planner)  # type: ignore[arg-type]
    assert result.fits and result.sharding_plan is not None
    return plan_to_dict(result.sharding_plan)


def test_job_topology_is_this_host_shared_by_its_ranks() -> None:
    spec = job_topology(4, 2, "cpu")
    assert (spec.nodes, spec.devices_per_node, spec.device, spec.world_size) == (2, 2, "cpu", 4)
    assert spec.ddr_gb == round(host_memory_bytes() / 2 / GB, 1)
    with pytest.raises(ValueError, match="world size 3 is not a multiple of the ranks per node"):
        job_topology(3, 2, "cpu")


def test_default_fast_planner_plans_once_and_every_rank_uses_that_plan(
    synth_data: Path, tmp_path: Path
) -> None:
    config = synth_data / "config.yaml"
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *RUN]
    result = torchrun(config, overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr + result.stdout
    assert "sharding plan: fast planner on rank 0 in " in log
    assert log.count("planner on rank 0 in ") == 1  # planned once, by rank 0
    used = json.loads((run_dir / "sharding_plan.json").read_text())
    assert used == _planned(config, overrides, "fast")
    for name, placement in used["model.ebc"].items():  # the plan the sharded model was built with
        assert f"model.ebc.{name}: {placement['sharding_type']} on ranks {placement['ranks']}" in log


def test_torchrec_planner_still_trains_through_the_same_path(synth_data: Path, tmp_path: Path) -> None:
    config = synth_data / "config.yaml"
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *RUN, "sharding.planner=torchrec"]
    result = torchrun(config, overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharding plan: torchrec planner on rank 0 in " in result.stderr + result.stdout
    assert (run_dir / "eval_metrics.json").exists()
    # TorchRec breaks ties between equal proposals by set order (string hashing differs between
    # processes), so its plan is compared by what it places, not shard by shard.
    used = json.loads((run_dir / "sharding_plan.json").read_text())["model.ebc"]
    planned = _planned(config, overrides, "torchrec")["model.ebc"]
    assert set(used) == set(planned) == {"user", "item", "category", "city", "device"}
    assert {t["sharding_type"] for t in used.values()} <= {
        "data_parallel",
        "table_wise",
        "column_wise",
        "table_column_wise",
    }


def test_config_that_fits_no_rank_fails_on_every_rank_with_the_planners_message(
    synth_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # 2e9 x 16 fp32 = 119 GB of weights (+ 7.5 GB of state): more than any rank of this host holds
    overrides = [f"run_dir={run_dir}", *RUN, "data.tables.0.num_embeddings=2000000000"]
    result = torchrun(synth_data / "config.yaml", overrides, timeout=180)
    assert result.returncode != 0
    for rank in (0, 1):
        line = next(x for x in result.stderr.splitlines() if x.startswith(f"[rank {rank}] error:"))
        assert (
            "PlanningError: sharding.planner fast: table 'user' (2,000,000,000 x 16) fits on no device: "
            "126.7 GB with its rowwise_adagrad state (119.2 GB weights + 7.5 GB optimizer)" in line
        )
    assert "largest device: " in result.stderr and "remedies: more devices" in result.stderr
    assert "sharding model.ebc" not in result.stderr  # stopped before sharding anything
    assert not (run_dir / "sharding_plan.json").exists()


# ------------------------------------------------------------------------------------- fp16 tables


def test_fp16_tables_are_planned_sharded_under_adagrad(synth_data: Path) -> None:
    """fp16 replicas would be updated by torch's Adagrad in fp16 (eps rounds to 0: NaN), so the
    planner offers fp16 tables only sharded placements; sgd keeps data_parallel."""
    path = synth_data / "config.yaml"
    fp16 = [f"data.tables.{i}.data_type=fp16" for i in range(5)]
    config = load_config(path, fp16)
    for constraint in table_constraints(config, "cpu").values():
        assert constraint.sharding_types == ["table_wise", "column_wise", "table_column_wise"]
    sgd = load_config(path, [*fp16, "training.sparse_optimizer.type=sgd"])
    assert "data_parallel" in table_constraints(sgd, "cpu")["device"].sharding_types


def test_fp16_data_parallel_constraint_under_adagrad_is_one_config_error(synth_data: Path) -> None:
    overrides = ["data.tables.4.data_type=fp16", "sharding.constraints.device.sharding_types=[data_parallel]"]
    with pytest.raises(ConfigError) as error:
        load_config(synth_data / "config.yaml", overrides)
    message = str(error.value)
    assert "sharding.constraints.device.sharding_types: table 'device' is fp16" in message
    assert "rowwise_adagrad cannot update an fp16 data_parallel replica" in message
    assert "data.tables[device].data_type: fp32" in message
    load_config(synth_data / "config.yaml", [*overrides, "training.sparse_optimizer.type=sgd"])  # fine


def test_fp16_tables_learn_resume_and_export(synth_data: Path, tmp_path: Path) -> None:
    """Every table fp16, placed table- and column-wise: the run learns, its checkpoint resumes on
    two ranks, and the run exports (int8, fp16, none) within each self-check's tolerance."""
    from towerrec.trainer.export import export_model

    config = synth_data / "config.yaml"
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "training.batch_size=256",
        "training.eval_interval=0",
        "sharding.constraints.item.sharding_types=[column_wise]",
        *[f"data.tables.{i}.data_type=fp16" for i in range(5)],
    ]
    first = torchrun(config, [*overrides, "training.epochs=2"])
    assert first.returncode == 0, first.stderr[-4000:]
    final = json.loads((run_dir / "eval_metrics.json").read_text())
    assert final["click"]["auc"] > 0.6 and final["conversion"]["auc"] > 0.6
    plan = json.loads((run_dir / "sharding_plan.json").read_text())["model.ebc"]
    assert "data_parallel" not in {t["sharding_type"] for t in plan.values()}
    assert plan["item"]["sharding_type"] == "column_wise"

    resumed = torchrun(config, [*overrides, "training.epochs=3"])  # 64 steps saved, 32 more
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed" in (resumed.stderr + resumed.stdout).lower()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 96
    again = json.loads((run_dir / "eval_metrics.json").read_text())
    assert again["click"]["auc"] > 0.6

    for quantize in ("int8", "fp16", "none"):
        report = export_model(run_dir, tmp_path / f"model-{quantize}.pt", quantize=quantize)
        assert report is not None and report.passed
        assert report.tasks["click"].auc_trained == pytest.approx(again["click"]["auc"], abs=1e-4)
