"""The nulls replaced (``on_null``) per feature reach metrics.jsonl as one number per feature per
epoch and per evaluation, summed over the ranks and their DataLoader workers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import yaml
from dist_utils import run_on_ranks
from nulls_utils import nulls_in
from raw_helpers import raw_table
from towerrec.trainer.train import Trainer

FEATURES = ["user", "city", "tags", "gain"]  # config order of the features with on_null


def _config(root: Path) -> dict:
    table = lambda name, rows: {"name": name, "num_embeddings": rows, "embedding_dim": 4}  # noqa: E731
    return {
        "run_dir": str(root / "run"),
        "data": {
            "train": str(root / "train" / "*.parquet"),
            "eval": str(root / "eval" / "*.parquet"),
            "tables": [table("user", 50), table("city", 20), table("tag", 30), table("item", 200)],
            "sparse_features": [
                {"name": "user", "table": "user", "id_mode": "hash", "on_null": "default"},
                {"name": "city", "table": "city", "id_mode": "hash", "on_null": "empty"},
                {"name": "tags", "table": "tag", "multi_hot": True, "id_mode": "hash", "on_null": "empty"},
                {"name": "item_id", "table": "item"},
            ],
            "dense_features": [{"name": "gain", "on_null": "default", "default": 0.0}, "hours"],
            "tasks": [{"name": "click", "label": "click"}],
        },
        "model": {"type": "mmoe", "num_experts": 1, "expert_hidden": [8], "tower_hidden": [4]},
        "training": {
            "batch_size": 128,
            "epochs": 2,
            "log_interval": 100,
            "progress_bar": False,
        },
        "checkpoint": {"enabled": False},
    }


def _train_twice(rank: int, world_size: int, config_path: str, root: str) -> list[str]:
    """Train with 0, then 1 DataLoader workers; rank 0's log lines about nulls."""
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("towerrec.trainer.train")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    env = init_distributed()
    for workers in (0, 1):
        overrides = [f"run_dir={root}/run{workers}", f"training.num_workers={workers}"]
        Trainer(load_config(config_path, overrides), env).fit()
    return [line for line in lines if line.startswith("nulls ")]


def test_two_ranks_record_the_total_per_feature_per_epoch(tmp_path: Path) -> None:
    train = [tmp_path / "train" / f"part-{i}.parquet" for i in range(2)]
    evaluation = [tmp_path / "eval" / "part-0.parquet"]
    for path, (n, seed) in zip(train + evaluation, [(700, 1), (450, 2), (300, 3)], strict=True):
        path.parent.mkdir(exist_ok=True)
        pq.write_table(raw_table(n, seed), path, row_group_size=200)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path), sort_keys=False))
    expected = {"train": nulls_in(train, FEATURES), "eval": nulls_in(evaluation, FEATURES)}
    assert all(n > 0 for counts in expected.values() for n in counts.values())

    results = run_on_ranks(_train_twice, 2, args=(str(config), str(tmp_path)), timeout_s=120)
    assert [status for status, _ in results] == ["ok", "ok"], results
    (_, logged), (_, other) = results
    assert other == []  # one line per pass, rank 0's
    # 1150 rows / 2 ranks / 128 = 5 steps per epoch; the epoch ends with an evaluation.
    for workers in (0, 1):
        lines = [
            json.loads(x) for x in (tmp_path / f"run{workers}" / "metrics.jsonl").read_text().splitlines()
        ]
        nulls = [x for x in lines if x["phase"] == "nulls"]
        assert [(x["split"], x["epoch"], x["step"]) for x in nulls] == [
            ("eval", 0, 5),
            ("train", 0, 5),
            ("eval", 1, 10),
            ("train", 1, 10),
        ], workers
        for x in nulls:
            assert list(x["nulls_replaced"]) == FEATURES
            assert x["nulls_replaced"] == expected[x["split"]], (workers, x)
    assert len(logged) == 8
    assert logged[1] == "nulls step 5 epoch 0 | train, replaced on all ranks: " + "; ".join(
        f"{name} {n:,}" for name, n in expected["train"].items()
    )


def test_no_collective_and_no_record_without_on_null_features() -> None:
    """An integer-id config: the pass's counts are empty, so nothing is reduced or recorded."""
    untouchable = SimpleNamespace()  # any use of env or recorder would raise AttributeError
    dataset = SimpleNamespace(nulls_replaced=dict)
    Trainer._record_nulls(untouchable, dataset, "train", 0)  # type: ignore[arg-type]
