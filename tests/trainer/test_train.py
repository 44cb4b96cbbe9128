"""The trainer on real sharded tables over two gloo ranks, on real Parquet files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from dist_utils import free_port, run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
CPU_TYPES = {"data_parallel", "table_wise", "column_wise", "table_column_wise"}


def torchrun(config: Path, overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "towerrec.trainer.main",
        "--config",
        str(config),
    ]
    for override in overrides:
        cmd += ["--set", override]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_two_rank_run_trains_evaluates_and_records(synth_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = torchrun(
        synth_data / "config.yaml",
        [
            f"run_dir={run_dir}",
            "training.batch_size=256",
            "training.epochs=2",
            "training.eval_interval=20",
            "training.log_interval=10",
        ],
    )
    assert result.returncode == 0, result.stderr[-4000:]

    final = json.loads((run_dir / "eval_metrics.json").read_text())
    assert set(final) == {"click", "conversion"}
    for task in final.values():
        assert set(task) == {"auc", "ne", "logloss", "examples", "positives"}
    # Evaluation saw every eval row exactly once and nothing else: its counts are the files'.
    eval_rows = pq.read_table(synth_data / "eval", columns=["click", "conversion"])
    clicks = pc.sum(eval_rows["click"]).as_py()
    assert final["click"]["examples"] == eval_rows.num_rows == 4000
    assert final["click"]["positives"] == clicks
    assert final["conversion"]["examples"] == clicks  # sample space: clicked rows
    assert final["conversion"]["positives"] == pc.sum(eval_rows["conversion"]).as_py()
    # Learning, not chance: the synthetic labels come from id and dense effects.
    assert final["click"]["auc"] > 0.6 and final["conversion"]["auc"] > 0.6

    # 16,000 train rows / 2 ranks / 256 = 32 steps per epoch: evals at 20, 32 (epoch end), 40, 60, 64.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["phase"] == "eval"] == [20, 32, 40, 60, 64]
    assert [x["step"] for x in lines if x["phase"] == "train"] == [10, 20, 30, 40, 50, 60]
    assert all(x["samples_per_s"] > 0 and 0 <= x["input_wait"] < 1 for x in lines if x["phase"] == "train")
    assert lines[-1]["click"] == final["click"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    plan = json.loads((run_dir / "sharding_plan.json").read_text())
    tables = plan["model.ebc"]
    assert set(tables) == {"user", "item", "category", "city", "device"}
    assert {t["sharding_type"] for t in tables.values()} <= CPU_TYPES
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["training"]["batch_size"] == 256
    # The placement logged by rank 0 is the plan written to the run directory.
    for name, placement in tables.items():
        assert f"model.ebc.{name}: {placement['sharding_type']} on ranks {placement['ranks']}" in (
            result.stderr + result.stdout
        )


def _train_and_compare_tables(rank: int, world_size: int, config_path: str, run_dir: str) -> dict:
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    config = load_config(
        config_path, [f"run_dir={run_dir}", "training.batch_size=512", "training.max_steps=8"]
    )
    trainer = Trainer(config, init_distributed())

    def local_tables() -> dict[str, torch.Tensor]:
        """This rank's copy of every table it holds a shard or replica of."""
        out = {}
        for key, value in trainer.model.state_dict().items():
            if "embedding_bags" not in key:
                continue
            if isinstance(value, ShardedTensor):
                if not value.local_shards():
                    continue  # the table lives on the other rank
                value = value.local_shards()[0].tensor
            out[key.split(".")[-2]] = value.detach().clone()
        return out

    before = local_tables()
    trainer.fit()
    after = local_tables()
    return {name: bool((after[name] != before[name]).any()) for name in before}


def test_every_table_learns_whatever_its_placement(synth_data: Path, tmp_path: Path) -> None:
    results = run_on_ranks(
        _train_and_compare_tables, 2, args=(str(synth_data / "config.yaml"), str(tmp_path))
    )
    changed: dict[str, bool] = {}
    for status, value in results:
        assert status == "ok", value
        for table, moved in value.items():
            changed[table] = changed.get(table, False) or moved
    assert changed == {t: True for t in ("user", "item", "category", "city", "device")}


def test_bad_row_stops_every_rank_with_a_named_error(synth_data: Path, tmp_path: Path) -> None:
    # A last file (rank 1's share of the rows) whose row 37 has an item id beyond the table.
    bad_file = _file_with_bad_item_id(synth_data / "train", tmp_path)
    result = torchrun(
        synth_data / "config.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            "training.batch_size=256",
            f"data.train=[{synth_data / 'train'}, {bad_file}]",
        ],
        timeout=120,  # the collective timeout is 600 s: finishing here means no rank waited on it
    )
    assert result.returncode != 0
    err = result.stderr
    for fragment in ["zz-bad.parquet", "row group 0", "item_id", "1000000000", "row 37"]:
        assert fragment in err, f"{fragment!r} missing from:\n{err[-3000:]}"
    assert "rank 1: DataError: " in err  # the worker's own message, not the DataLoader wrapper
    assert "Original Traceback" not in err
    assert "[rank 0] error: RankFailure: input failed on 1 of 2 ranks" in err
    assert "[rank 1] error: RankFailure: input failed on 1 of 2 ranks" in err


def test_bad_eval_row_stops_every_rank_from_the_eval_pipelines_loader_thread(
    synth_data: Path, tmp_path: Path
) -> None:
    """Evaluation reads in TorchRec's eval pipeline's loader thread (lockstep on its own gloo
    group): a bad row there still stops every rank with the named error, at once."""
    bad_file = _file_with_bad_item_id(synth_data / "eval", tmp_path)
    result = torchrun(
        synth_data / "config.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            "training.batch_size=256",
            "training.max_steps=2",
            "training.num_workers=0",
            f"data.eval=[{synth_data / 'eval'}, {bad_file}]",
        ],
        timeout=120,  # the collective timeout is 600 s: finishing here means no rank waited on it
    )
    assert result.returncode != 0
    err = result.stderr
    for fragment in ["zz-bad.parquet", "item_id", "1000000000", "row 37"]:
        assert fragment in err, f"{fragment!r} missing from:\n{err[-3000:]}"
    assert "[rank 0] error: RankFailure: input failed on 1 of 2 ranks" in err
    assert "[rank 1] error: RankFailure: input failed on 1 of 2 ranks" in err


def _file_with_bad_item_id(split: Path, tmp_path: Path) -> Path:
    """300 rows of ``split``'s first file, row 37's item id beyond its table; named to sort last
    (so it is the last rank's share)."""
    good = pq.read_table(next(split.glob("*.parquet"))).slice(0, 300)
    item_ids = good.column("item_id").to_pylist()
    item_ids[37] = 10**9
    bad = good.set_column(good.schema.get_field_index("item_id"), "item_id", pa.array(item_ids, pa.int64()))
    bad_file = tmp_path / "zz-bad.parquet"
    pq.write_table(bad, bad_file, row_group_size=100)
    return bad_file
