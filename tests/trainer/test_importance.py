"""Permutation feature importance: the writers, a known signal, the saved-run and end-of-training paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from dist_utils import run_on_ranks
from towerrec.trainer.importance import (
    ImportanceResult,
    average_ranks,
    importance_from_run,
    importance_markdown,
    spearman,
    write_importance,
)

# ------------------------------------------------------------------------------------------ writers


def test_average_ranks_share_ties_and_put_nan_last() -> None:
    assert average_ranks([0.3, 0.1, 0.3]) == [1.5, 3.0, 1.5]
    assert average_ranks([0.3, 0.1, 0.3], descending=False) == [2.5, 1.0, 2.5]
    assert average_ranks([math.nan, 0.2, 0.5]) == [3.0, 2.0, 1.0]
    assert average_ranks([]) == []


def test_spearman_on_known_vectors() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)  # scipy's value
    # ties: ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]: Pearson of the ranks
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([1, 2], [2, 1]) == pytest.approx(-1.0, rel=1e-5)  # torchmetrics' epsilon: < 1e-5
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant: undefined (torchmetrics says 0)
    assert math.isnan(spearman([1], [2]))
    assert math.isnan(spearman([1, math.nan], [1, 2]))
    with pytest.raises(ValueError, match="lengths 2 and 3"):
        spearman([1, 2], [1, 2, 3])


def _result() -> ImportanceResult:
    base = {"click": {"auc": 0.80}, "conversion": {"auc": 0.70}}
    aucs = {"a": (0.60, 0.69), "b": (0.79, 0.55), "c": (0.78, 0.68), "d": (0.80, 0.70)}
    permuted = {f: {"click": {"auc": x}, "conversion": {"auc": y}} for f, (x, y) in aucs.items()}
    return ImportanceResult(["a", "b", "c", "d"], ["click", "conversion"], base, permuted, {"step": 7})


def test_result_drops_ranks_and_divergence() -> None:
    result = _result()
    assert result.drop["a"]["click"] == pytest.approx(0.20)
    assert result.ranks["a"] == {"click": 1.0, "conversion": 3.0}
    assert result.ranks["b"] == {"click": 3.0, "conversion": 1.0}
    assert result.ordered_fields() == ["a", "b", "c", "d"]  # mean drops 0.105, 0.08, 0.02, 0
    [pair] = result.spearman()
    assert pair["tasks"] == ["click", "conversion"]
    assert pair["spearman"] == pytest.approx(spearman([0.2, 0.01, 0.02, 0], [0.01, 0.15, 0.02, 0]))
    divergent = result.divergent_fields()
    assert [d["field"] for d in divergent] == ["a", "b"]  # drop gaps 0.19, 0.14; c and d: none
    assert divergent[0]["drop_gap"] == pytest.approx(0.19) and divergent[0]["rank_spread"] == 2
    assert divergent[0]["most_important_for"] == "click"


def test_writers_md_json_png(tmp_path: Path) -> None:
    result = _result()
    paths = write_importance(result, tmp_path / "out")
    md = paths["md"].read_text()
    for name in ("a", "b", "c", "d"):
        assert f"| {name} |" in md
    assert "click ΔAUC | click rank" in md and "Baseline AUC (nothing permuted): click 0.8000" in md
    assert "| click / conversion |" in md and "- a: AUC-drop gap +0.1900" in md
    # sorted by mean drop
    assert md.index("| a |") < md.index("| b |") < md.index("| c |") < md.index("| d |")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(paths["json"].read_text())
    assert payload["step"] == 7 and payload["baseline_auc"] == {"click": 0.8, "conversion": 0.7}
    assert payload["fields"] == ["a", "b", "c", "d"]
    assert payload["rank"]["a"] == {"click": 1.0, "conversion": 3.0}
    assert payload["spearman"][0]["spearman"] == pytest.approx(result.spearman()[0]["spearman"])
    assert importance_markdown(result) == md


def test_single_task_and_nan_auc_write_valid_json(tmp_path: Path) -> None:
    base = {"t": {"auc": math.nan}}
    result = ImportanceResult(["a", "b"], ["t"], base, {"a": {"t": {"auc": 0.5}}, "b": {"t": {"auc": 0.5}}})
    paths = write_importance(result, tmp_path)
    payload = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert payload["auc_drop"]["a"]["t"] is None and payload["spearman"] == []
    assert "Divergence" not in paths["md"].read_text()


# ------------------------------------------------------------------------------ a known signal
# Two tasks, each decided by its own field: `a` decides task_a, `b` decides task_b, `noise` neither.


def write_signal_data(root: Path, rows: int = 6000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", rows), ("eval", rows // 3)):
        a, b, noise = (rng.integers(0, 50, n) for _ in range(3))
        table = pa.table(
            {
                "a": a,
                "b": b,
                "noise": noise,
                "x": rng.normal(size=n).astype(np.float32),
                "task_a": ((a % 2 == 0) ^ (rng.random(n) < 0.1)).astype(np.int64),
                "task_b": ((b < 25) ^ (rng.random(n) < 0.1)).astype(np.int64),
            }
        )
        (root / split).mkdir(parents=True)
        pq.write_table(table, root / split / "part-0.parquet")
    config = {
        "run_dir": str(root / "run"),
        "data": {
            "train": str(root / "train"),
            "eval": str(root / "eval"),
            "tables": [{"name": n, "num_embeddings": 50, "embedding_dim": 4} for n in ("ta", "tb", "tn")],
            "sparse_features": [
                {"name": "a", "table": "ta"},
                {"name": "b", "table": "tb"},
                {"name": "noise", "table": "tn"},
            ],
            "dense_features": ["x"],
            "tasks": [{"name": "task_a", "label": "task_a"}, {"name": "task_b", "label": "task_b"}],
        },
        "model": {"type": "shared_bottom", "bottom_hidden": [16], "tower_hidden": [8]},
        "training": {
            "batch_size": 64,
            "epochs": 3,
            "num_workers": 0,
            "log_interval": 1000,
            "sparse_optimizer": {"type": "rowwise_adagrad", "lr": 0.1},
            "dense_optimizer": {"type": "adam", "lr": 0.01},
        },
        "checkpoint": {"interval": 0},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(rank: int, world_size: int, config_path: str, overrides: list[str]) -> dict:
    import logging

    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    logging.getLogger("towerrec.trainer").setLevel(logging.WARNING)
    return Trainer(load_config(config_path, overrides), init_distributed()).fit()


def train_run(config_path: Path, world_size: int = 1, overrides: tuple[str, ...] = ()) -> dict:
    results = run_on_ranks(_train, world_size, args=(str(config_path), list(overrides)), timeout_s=150)
    for status, value in results:
        assert status == "ok", value
    return results[0][1]


def test_permuting_the_label_field_drops_auc_far_more(tmp_path: Path) -> None:
    config = write_signal_data(tmp_path)
    final = train_run(config)  # 6000 rows / 64 = 94 steps per epoch, 3 epochs: 282 steps
    assert final["task_a"]["auc"] > 0.8 and final["task_b"]["auc"] > 0.8

    result, paths = importance_from_run(tmp_path / "run")  # latest checkpoint, data.eval
    drop = result.drop
    assert drop["a"]["task_a"] > 0.25 and drop["b"]["task_b"] > 0.25
    for irrelevant in (
        drop["noise"]["task_a"],
        drop["b"]["task_a"],
        drop["noise"]["task_b"],
        drop["a"]["task_b"],
    ):
        assert abs(irrelevant) < 0.05
    assert result.ranks["a"]["task_a"] == 1 and result.ranks["b"]["task_b"] == 1
    [pair] = result.spearman()
    assert pair["spearman"] < 0  # the tasks disagree about which field matters
    # The baseline is the trained model's evaluation on data.eval (same weights, one process).
    for task in ("task_a", "task_b"):
        assert result.baseline[task]["auc"] == pytest.approx(final[task]["auc"], abs=1e-4)
    assert paths["json"] == tmp_path / "run" / "importance" / "importance.json"
    assert json.loads(paths["json"].read_text())["step"] == 282

    # The command line: a subset of fields into another directory.
    from towerrec.launch.cli import main

    out = tmp_path / "cli-out"
    assert main(["importance", "--run", str(tmp_path / "run"), "--out", str(out), "--fields", "a,noise"]) == 0
    assert json.loads((out / "importance.json").read_text())["fields"] == ["a", "noise"]
    assert main(["importance", "--run", str(tmp_path / "run"), "--fields", "a,nope", "--out", str(out)]) == 2


def test_importance_at_the_end_of_two_rank_training(synth_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = (
        f"run_dir={run_dir}",
        "training.batch_size=512",
        "training.max_steps=6",
        "training.num_workers=0",
        "checkpoint.enabled=false",
        "importance.enabled=true",
    )
    final = train_run(synth_data / "config.yaml", world_size=2, overrides=overrides)
    out = run_dir / "importance"
    payload = json.loads((out / "importance.json").read_text())
    fields = ["user_id", "item_id", "item_category", "user_city", "device", "user_history"]
    assert sorted(payload["fields"]) == sorted(fields)
    assert payload["step"] == 6
    written = json.loads((run_dir / "eval_metrics.json").read_text())
    for task in ("click", "conversion"):
        assert payload["baseline_auc"][task] == written[task]["auc"] == final[task]["auc"]
        assert set(payload["auc_drop"][payload["fields"][0]]) == {"click", "conversion"}
    md = (out / "importance.md").read_text()
    assert all(f"| {f} |" in md for f in fields)
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    # The permuted passes are not evaluations of the run: metrics.jsonl has the final one only.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["phase"] == "eval"] == [6]
