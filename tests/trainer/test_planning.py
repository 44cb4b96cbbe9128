"""`towerrec plan`: topology specs, TorchRec-equal estimates, the fast planner against TorchRec's,
CPU limits, the no-fit message, reports and the plan file checks. No training here (see
test_planning_train.py for the plan-file round trip through a real 2-rank run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from towerrec.launch import cli
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.planning.topology import TopologyError, TopologySpec, parse_topologies

ROOT = Path(__file__).resolve().parents[2]
CPU_TYPES = {"data_parallel", "table_wise", "column_wise", "table_column_wise"}


pytestmark = pytest.mark.usefixtures("quiet_torchrec")


def raw_config(tables: list[tuple[str, int, int]], constraints: dict | None = None, batch: int = 512) -> dict:
    return {
        "run_dir": "runs/t",
        "data": {
            "train": "nowhere/train/*.parquet",  # planning reads no data
            "eval": "nowhere/eval/*.parquet",
            "tables": [{"name": n, "num_embeddings": r, "embedding_dim": d} for n, r, d in tables],
            "sparse_features": [{"name": f"{n}_id", "table": n} for n, _, _ in tables],
            "tasks": [{"name": "click", "label": "click"}],
        },
        "model": {"type": "ple", "num_levels": 1, "expert_hidden": [16], "tower_hidden": [8]},
        "training": {"batch_size": batch},
        "sharding": {"constraints": constraints or {}},
    }


def config_of(*args, **kwargs) -> ExperimentConfig:
    return ExperimentConfig.model_validate(raw_config(*args, **kwargs))


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


MIXED = [
    ("user", 2_000_000, 64),
    ("item", 500_000, 128),
    ("ad", 500_000, 128),  # same shape as item: estimates shared
    ("city", 5_000, 16),
    ("device", 30, 8),
    ("query", 80_000, 256),  # two column-wise shards
]


# ------------------------------------------------------------------------------------- topology


def test_topology_presets_pairs_overrides_and_files(tmp_path: Path) -> None:
    spec = parse_topologies("2x8xA100-80GB")[0]
    assert (spec.nodes, spec.devices_per_node, spec.device, spec.hbm_gb, spec.world_size) == (
        2,
        8,
        "cuda",
        80,
        16,
    )
    spec = parse_topologies("2x8xH100-80GB,batch_size=8192,inter_node_bw=100")[0]
    assert spec.batch_size == 8192 and spec.inter_node_bw == 100
    spec = parse_topologies("nodes=4,devices=2,device=cpu,ddr_gb=32")[0]
    assert (spec.world_size, spec.device, spec.device_memory_gb) == (8, "cpu", 32)
    assert parse_topologies("1x2xCPU-16GB")[0].ddr_gb == 16
    path = tmp_path / "topologies.yaml"
    path.write_text(
        yaml.safe_dump(
            {"topologies": [{"preset": "8x8xA100-80GB", "name": "prod"}, {"nodes": 1, "hbm_gb": 24}]}
        )
    )
    specs = parse_topologies(str(path))
    assert [s.label for s in specs] == ["prod", "1x8 cuda 24GB"]
    topology = specs[0].to_torchrec()
    assert topology.world_size == 64 and topology.local_world_size == 8
    assert topology.devices[0].storage.hbm == 80 * 1024**3


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nodes=0", "nodes: Input should be greater than 0"),
        ("nodes=2,devices_per_node=eight", "devices_per_node: Input should be a valid integer"),
        ("nodes=2,hbm=80", "hbm: unknown field"),
        ("device=cpu,hbm_gb=16", "hbm_gb: a cpu topology has no device memory"),
        ("device=tpu", "device: Input should be 'cuda' or 'cpu'"),
        ("storage_reserve=1.5", "storage_reserve: Input should be less than 1"),
        ("2x8xB300", "unknown device kind 'B300'"),
        ("nodes=2,2x8xA100-80GB", "a preset may only come first"),
        ("missing.yaml", "topology file missing.yaml does not exist"),
    ],
)
def test_malformed_or_impossible_topology_names_the_field(spec: str, fragment: str) -> None:
    with pytest.raises(TopologyError, match="topology") as error:
        parse_topologies(spec)
    assert fragment in str(error.value)


def test_topology_file_error_names_file_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump([{"nodes": 2}, {"nodes": 1, "ddr_gb": -4}]))
    with pytest.raises(TopologyError) as error:
        parse_topologies(str(path))
    assert f"{path} [1]" in str(error.value) and "ddr_gb: Input should be greater than 0" in str(error.value)


# ------------------------------------------------------------------------------------ estimates


def _planning_inputs(config: ExperimentConfig, spec: TopologySpec):
    from towerrec.trainer.planning.planner import (
        _quiet_reservation,
        build_module,
        sharders,
        table_constraints,
    )

    spec = spec.resolved(config.training.batch_size, 0.15, "rowwise_adagrad")
    module = build_module(config, "rowwise_adagrad")
    topology = spec.to_torchrec()
    constraints = table_constraints(config, spec.device)
    reserved = _quiet_reservation(0.15).reserve(topology, spec.batch_size, module, sharders(), constraints)
    return module, topology, reserved, constraints, spec.batch_size


def test_shared_estimates_equal_torchrec_enumerator_shard_by_shard() -> None:
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from towerrec.trainer.planning.enumeration import enumerate_options
    from towerrec.trainer.planning.planner import sharders

    config = config_of(MIXED)
    module, topology, reserved, constraints, batch = _planning_inputs(
        config, parse_topologies("2x4xA100-40GB")[0]
    )
    reference = EmbeddingEnumerator(topology, batch, constraints).enumerate(module, sharders())
    _, options, stats, too_large = enumerate_options(
        module, sharders(), topology, reserved, batch, constraints, narrow=False
    )
    assert not too_large
    ours = {(o.name, o.sharding_type, o.compute_kernel): o for opts in options.values() for o in opts}
    assert len(ours) == len(reference) == stats.options_torchrec
    for ref in reference:
        mine = ours[(ref.name, ref.sharding_type, ref.compute_kernel)]
        assert [s.size for s in mine.shards] == [s.size for s in ref.shards]
        assert [s.offset for s in mine.shards] == [s.offset for s in ref.shards]
        assert [s.storage for s in mine.shards] == [s.storage for s in ref.shards], ref.name
        assert [s.perf for s in mine.shards] == [s.perf for s in ref.shards], ref.name
    # far fewer estimator calls: item/ad share, row-wise shards of one size share
    assert stats.shard_estimates * 3 < stats.shard_estimates_torchrec


def test_fast_planner_is_no_worse_than_torchrec_default_planner() -> None:
    from torchrec.distributed.planner.planners import validate_rank_assignment
    from towerrec.trainer.planning.planner import plan_config
    from towerrec.trainer.planning.torchrec_compat import critical_path_ms

    config = config_of(MIXED + [(f"t{i}", 10_000 * (i + 1), 32) for i in range(6)])
    spec = parse_topologies("2x4xA100-40GB")[0]
    fast = plan_config(config, spec, planner="fast")
    default = plan_config(config, spec, planner="torchrec")
    assert fast.fits and default.fits
    # TorchRec's estimated step (critical path) and its planner's objective (slowest rank)
    step = {r.planner: critical_path_ms(r.best_plan) for r in (fast, default)}
    assert step["fast"] <= step["torchrec"] * (1 + 1e-9), step
    assert fast.rating_ms <= default.rating_ms * (1 + 1e-9), (fast.rating_ms, default.rating_ms)
    validate_rank_assignment(fast.sharding_plan, fast.topology)
    planned = {t for module_plan in fast.sharding_plan.plan.values() for t in module_plan}
    assert planned == {t[0] for t in MIXED} | {f"t{i}" for i in range(6)}
    # every device holds what the plan puts on it
    for device, free in zip(fast.storage_constraint.devices, _free_after(fast), strict=True):
        assert free.hbm >= 0 and free.ddr >= 0, device.rank


def _free_after(result):
    free = [d.storage for d in result.storage_constraint.devices]
    for so in result.best_plan:
        for shard in so.shards:
            free[shard.rank] = free[shard.rank] - shard.storage
    return free


# ------------------------------------------------------------------------------------ CPU limits


def test_cpu_topology_offers_only_what_torchrec_runs_on_cpu(tmp_path: Path) -> None:
    from towerrec.trainer.planning.enumeration import enumerate_options
    from towerrec.trainer.planning.figures import compute_figures
    from towerrec.trainer.planning.planner import plan_config, sharders
    from towerrec.trainer.planning.render import markdown

    config = config_of(MIXED)
    spec = parse_topologies("1x4xCPU-16GB")[0]
    module, topology, reserved, constraints, batch = _planning_inputs(config, spec)
    _, options, _, _ = enumerate_options(
        module, sharders(), topology, reserved, batch, constraints, narrow=False
    )
    offered = {(o.sharding_type, o.compute_kernel) for opts in options.values() for o in opts}
    assert {t for t, _ in offered} == CPU_TYPES
    assert {k for _, k in offered} == {"fused", "dense"}

    result = plan_config(config, spec)
    assert result.fits
    assert {so.sharding_type for so in result.best_plan} <= CPU_TYPES
    text = markdown(compute_figures(result, "mixed"), [])
    assert (
        "CPU topology: TorchRec runs only data_parallel, table_wise, column_wise, table_column_wise" in text
    )
    assert "row-wise and table-row-wise sharding and host-memory caching need CUDA" in text


def test_cpu_topology_rejects_a_row_wise_constraint_naming_the_key(tmp_path: Path) -> None:
    raw = raw_config(MIXED, constraints={"user": {"sharding_types": ["row_wise"]}})
    code, _, err = run_cli(
        "plan",
        "--config",
        str(write_config(tmp_path, raw)),
        "--topology",
        "1x2xCPU-8GB",
        "--out",
        str(tmp_path),
    )
    assert code == 2
    assert "sharding.constraints.user.sharding_types: ['row_wise'] cannot run on CPU" in err


# ---------------------------------------------------------------------------------------- no fit


def test_table_that_fits_no_device_gives_one_message_with_remedies(tmp_path: Path) -> None:
    from towerrec.trainer.planning.planner import TableTooLargeError, plan_config

    config = config_of([("huge", 50_000_000, 64), ("small", 1000, 8)])
    with pytest.raises(TableTooLargeError) as error:
        plan_config(config, parse_topologies("1x2xCPU-4GB")[0])
    message = str(error.value)
    assert (
        "table 'huge' (50,000,000 x 64) fits on no device: 12.1 GB with its rowwise_adagrad state" in message
    )
    assert "(11.9 GB weights + 0.2 GB optimizer)" in message
    assert (
        "largest device: " in message
        and "GB of host memory for embeddings (4.0 GB less the 15% reserve" in message
    )
    for remedy in ["more devices", "column-wise", "smaller embedding_dim", "host-memory caching"]:
        assert remedy in message
    assert "'small'" not in message

    out = tmp_path / "out"
    code, _, err = run_cli(
        "plan", "--config", str(write_config(tmp_path, raw_config([("huge", 50_000_000, 64)]))),
        "--topology", "1x2xCPU-4GB", "--out", str(out),
    )  # fmt: skip
    assert code == 1 and "table 'huge'" in err
    report = (out / "report.md").read_text()
    assert "**Fits: no.** table 'huge'" in report and not (out / "plan.json").exists()
    assert json.loads((out / "report.json").read_text())["summary"]["fits"] is False


def test_adagrad_state_counts_as_much_as_the_table(tmp_path: Path) -> None:
    from towerrec.trainer.planning.planner import TableTooLargeError, plan_config

    config = config_of([("big", 4_000_000, 64)])  # 0.95 GB of weights
    assert plan_config(config, parse_topologies("1x1xCPU-1.5GB")[0]).fits  # rowwise: + 1 float per row
    with pytest.raises(TableTooLargeError, match=r"1.9 GB with its adagrad state"):
        plan_config(config, parse_topologies("1x1xCPU-1.5GB,sparse_optimizer=adagrad")[0])


def test_fp16_table_counts_half_the_memory_in_plan_report_and_fit_check() -> None:
    from towerrec.trainer.planning.figures import compute_figures
    from towerrec.trainer.planning.planner import TableTooLargeError, plan_config

    def config(data_type: str) -> ExperimentConfig:
        raw = raw_config([("big", 4_000_000, 64)])
        raw["data"]["tables"][0]["data_type"] = data_type
        return ExperimentConfig.model_validate(raw)

    spec = parse_topologies("1x2xCPU-8GB,sparse_optimizer=adagrad")[0]
    fp32, fp16 = (compute_figures(plan_config(config(t), spec), t) for t in ("fp32", "fp16"))
    [t32], [t16] = fp32.tables, fp16.tables
    assert t32.weights_bytes == 4_000_000 * 64 * 4 == 2 * t16.weights_bytes
    assert t32.bytes_with_optimizer == 2 * t16.bytes_with_optimizer  # adagrad: state as the weights
    # TorchRec's storage estimate (what placement and the memory check read): half, but for the
    # per-batch input/output buffers
    assert t16.ddr_bytes == pytest.approx(t32.ddr_bytes / 2, rel=0.01)
    # the fit check: 1.9 GB with adagrad state does not fit 1.5 GB, fp16's 0.95 GB does
    small = parse_topologies("1x1xCPU-1.5GB,sparse_optimizer=adagrad")[0]
    with pytest.raises(TableTooLargeError, match=r"1.9 GB with its adagrad state"):
        plan_config(config("fp32"), small)
    assert plan_config(config("fp16"), small).fits


# -------------------------------------------------------------------------------- command, files


def run_cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_plan_command_writes_plan_report_and_charts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write_config(tmp_path, raw_config(MIXED))
    code, stdout, _ = run_cli("plan", "--config", str(path), "--topology", "1x2xCPU-8GB", "--out", str(out))
    assert code == 0, stdout
    assert "fits: yes" in stdout and f"sharding.plan_file={out / 'plan.json'}" in stdout
    for name in ["plan.json", "report.md", "report.json", "memory.png", "time.png"]:
        assert (out / name).stat().st_size > 0, name
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == "towerrec-shard-plan/1" and plan["world_size"] == 2
    assert set(plan["plan"]["model.ebc"]) == {t[0] for t in MIXED}
    figures = json.loads((out / "report.json").read_text())
    summary = figures["summary"]
    assert summary["fits"] and summary["est_step_time_ms"] > 0 and summary["est_samples_per_s"] > 0
    assert 0 < summary["peak_device_memory_pct"] < 100
    assert len(figures["ranks"]) == 2 and len(figures["tables"]) == len(MIXED)
    assert figures["critical_path"]["total_ms"] == pytest.approx(summary["est_step_time_ms"], rel=1e-3)
    report = (out / "report.md").read_text()
    for section in ["## Summary", "## Critical path", "## Imbalance", "## Ranks", "## Tables", "![memory]"]:
        assert section in report
    assert report.index("## Summary") < report.index("## Ranks")


def test_compare_gives_one_table_and_one_chart(tmp_path: Path) -> None:
    out = tmp_path / "whatif"
    path = write_config(tmp_path, raw_config(MIXED))
    code, stdout, err = run_cli(
        "plan", "--config", str(path), "--topology", "1x2xCPU-8GB", "--topology", "1x4xCPU-8GB",
        "--batch_sizes", "256,4096", "--compare", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((out / "compare.json").read_text())
    assert [(r["world_size"], r["batch_size_per_rank"]) for r in rows] == [
        (2, 256),
        (2, 4096),
        (4, 256),
        (4, 4096),
    ]
    assert all(r["fits"] and r["est_step_time_ms"] > 0 for r in rows)
    text = (out / "compare.md").read_text()
    assert (
        "| topology | ranks | batch per rank | fits | peak memory % | est. step ms | est. samples/s |" in text
    )
    assert (out / "compare.png").stat().st_size > 0
    assert len(list(out.glob("*/report.md"))) == 4


def test_several_topologies_without_compare_is_a_usage_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, raw_config(MIXED))
    code, _, err = run_cli(
        "plan", "--config", str(path), "--topology", "1x2xCPU-8GB", "--topology", "1x4xCPU-8GB", "--out", "x"
    )
    assert code == 2 and "add --compare" in err


def test_plan_help_is_fast_and_imports_no_torch() -> None:
    script = (
        "import sys, contextlib, io\n"
        "from towerrec.launch import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: cli.main(['plan', '--help'])\n"
        "    except SystemExit: pass\n"
        "assert '--topology' in out.getvalue() and '--compare' in out.getvalue()\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_plan_file_is_checked_against_the_model_and_the_job(tmp_path: Path) -> None:
    from towerrec.trainer.model import build_train_module
    from towerrec.trainer.planning.plan_file import PlanFileError, load_plan_file

    out = tmp_path / "out"
    config_path = write_config(tmp_path, raw_config(MIXED))
    assert (
        run_cli("plan", "--config", str(config_path), "--topology", "1x2xCPU-8GB", "--out", str(out))[0] == 0
    )
    module = build_train_module(config_of(MIXED), torch.device("meta"))
    plan = load_plan_file(out / "plan.json", module, world_size=2, local_world_size=2, device_type="cpu")
    assert set(plan.plan["model.ebc"]) == {t[0] for t in MIXED}

    def fails(payload: dict, match: str, **job) -> None:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(payload))
        kwargs = {"world_size": 2, "local_world_size": 2, "device_type": "cpu", **job}
        with pytest.raises(PlanFileError, match=match):
            load_plan_file(path, module, **kwargs)

    good = json.loads((out / "plan.json").read_text())
    fails(good, r"made for world size 2; this job has 4 ranks", world_size=4, local_world_size=4)
    fails(good, r"made for cpu devices; this job runs on cuda", device_type="cuda")
    missing = json.loads(json.dumps(good))
    del missing["plan"]["model.ebc"]["city"]
    fails(missing, r"table 'city' of the model \(model.ebc\) is not in the plan")
    unknown = json.loads(json.dumps(good))
    unknown["plan"]["model.ebc"]["zip"] = unknown["plan"]["model.ebc"]["city"]
    fails(unknown, r"table 'zip' is not in the model")
    small = config_of([(n, r // 2 if n == "user" else r, d) for n, r, d in MIXED])
    with pytest.raises(
        PlanFileError, match=r"table 'user'.*another table size|table 'user'.*outside the table"
    ):
        load_plan_file(out / "plan.json", build_train_module(small, torch.device("meta")), 2, 2, "cpu")
    rank9 = json.loads(json.dumps(good))
    entry = rank9["plan"]["model.ebc"]["city"]
    if entry["sharding_type"] != "data_parallel":
        entry["ranks"] = [9] * len(entry["ranks"])
        fails(rank9, r"ranks \[9\] are outside this job's 2 ranks")


def test_billion_scale_example_config_loads() -> None:
    from towerrec.trainer.config import load_config

    config = load_config(ROOT / "configs" / "billion_scale.yaml")
    big = [t for t in config.data.tables if t.num_embeddings == 1_000_000_000]
    assert len(big) == 2 and all(t.embedding_dim == 128 for t in big) and len(config.data.tables) == 102


@pytest.mark.parametrize("name, world_size", [("billion-2x8", 16), ("billion-8x8-adagrad", 64)])
def test_committed_example_plans_load_for_their_config(name: str, world_size: int) -> None:
    from towerrec.trainer.config import load_config
    from towerrec.trainer.model import build_train_module
    from towerrec.trainer.planning.plan_file import load_plan_file

    path = ROOT / "docs" / "plans" / name / "plan.json"
    module = build_train_module(load_config(ROOT / "configs" / "billion_scale.yaml"), torch.device("meta"))
    plan = load_plan_file(path, module, world_size=world_size, local_world_size=8, device_type="cuda")
    types = {p.sharding_type for p in plan.plan["model.ebc"].values()}  # type: ignore[union-attr]
    assert ("row_wise" if "adagrad" in name else "table_row_wise") in types
    assert "does not fit" not in (path.parent / "report.md").read_text()
