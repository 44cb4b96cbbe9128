"""Evaluating a saved run without training: the trainer's numbers, checkpoint choice, CLI, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dist_utils import run_on_ranks
from towerrec.trainer.checkpoint import CheckpointError, CheckpointMeta
from towerrec.trainer.evaluate import RunEvaluator, evaluate_run, trained_epoch


def _train(rank: int, world_size: int, config_path: str, run_dir: str) -> dict:
    import logging

    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    logging.getLogger("towerrec.trainer").setLevel(logging.WARNING)
    overrides = [
        f"run_dir={run_dir}",
        "training.batch_size=512",
        "training.max_steps=10",
        "training.eval_interval=5",
        "training.num_workers=0",
        "checkpoint.interval=5",
    ]
    return Trainer(load_config(config_path, overrides), init_distributed()).fit()


@pytest.fixture(scope="module")
def saved_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, 10 steps of 512 rows; evaluated and saved at steps 5 and 10."""
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    [(status, value)] = run_on_ranks(_train, 1, args=(str(synth_data / "config.yaml"), str(run_dir)))
    assert status == "ok", value
    return run_dir


def _eval_lines(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in lines if x["phase"] == "eval"}


def _assert_close(got: dict, want: dict) -> None:
    for task in ("click", "conversion"):
        for name in ("auc", "ne", "logloss"):
            assert got[task][name] == pytest.approx(want[task][name], abs=1e-4), (task, name)
        for name in ("examples", "positives"):
            assert got[task][name] == want[task][name], (task, name)


def test_evaluate_run_reproduces_the_trainers_metrics(saved_run: Path, synth_data: Path) -> None:
    eval_data = [str(synth_data / "eval" / "*.parquet")]
    _assert_close(
        evaluate_run(saved_run, eval_data), json.loads((saved_run / "eval_metrics.json").read_text())
    )
    # --step picks the earlier checkpoint, evaluated by the trainer at step 5; any batch size.
    _assert_close(evaluate_run(saved_run, eval_data, step=5, batch_size=300), _eval_lines(saved_run)[5])


def test_cli_prints_and_writes_json_with_step_and_epoch(
    saved_run: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from towerrec.launch.cli import main

    out = tmp_path / "sub" / "test.json"
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(saved_run),
                "--step",
                "5",
                "--data",
                str(synth_data / "eval"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    assert written["step"] == 5 and written["epoch"] == 0
    assert written["checkpoint"] == {
        "path": str(saved_run / "checkpoints" / "step-00000005"),
        "epoch": 0,
        "batch_in_epoch": 5,
        "chosen": "--step",
    }
    assert len(written["data"]) == 3 and written["batch_size"] == 512
    _assert_close(written["metrics"], _eval_lines(saved_run)[5])


def test_trained_epoch_of_an_epoch_boundary_checkpoint() -> None:
    def meta(epoch: int, batch: int) -> CheckpointMeta:
        return CheckpointMeta.model_construct(step=64, epoch=epoch, batch_in_epoch=batch)

    assert trained_epoch(meta(0, 10)) == 0
    assert trained_epoch(meta(1, 32)) == 1
    assert trained_epoch(meta(2, 0)) == 1  # end of the second epoch: the next one has no batch yet


def test_unknown_step_names_the_existing_ones(saved_run: Path, synth_data: Path) -> None:
    from towerrec.launch.cli import main

    with pytest.raises(
        CheckpointError, match=r"step-00000007 does not exist; complete checkpoint steps: \[5, 10\]"
    ):
        RunEvaluator(saved_run, step=7)
    assert main(["evaluate", "--run", str(saved_run), "--step", "7", "--data", str(synth_data / "eval")]) == 1


def test_run_dir_without_checkpoints_or_config(saved_run: Path, synth_data: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match=f"run directory {bare} has no config.yaml"):
        RunEvaluator(bare)
    with pytest.raises(FileNotFoundError, match="run directory .*missing does not exist"):
        RunEvaluator(tmp_path / "missing")
    shutil.copy(saved_run / "config.yaml", bare / "config.yaml")
    with pytest.raises(CheckpointError, match=f"{bare}: no checkpoints"):
        RunEvaluator(bare)

    from towerrec.launch.cli import main

    assert main(["evaluate", "--run", str(bare), "--data", str(synth_data / "eval")]) == 1
    assert main(["evaluate", "--run", str(tmp_path / "missing"), "--data", str(synth_data / "eval")]) == 2
    assert main(["importance", "--run", str(bare)]) == 1


def test_unknown_field_and_unmatched_data(saved_run: Path, synth_data: Path, tmp_path: Path) -> None:
    from towerrec.launch.cli import main
    from towerrec.trainer.importance import importance_from_run

    eval_data = [str(synth_data / "eval")]
    with pytest.raises(ValueError, match="permute_feature: 'price' is not a sparse feature"):
        evaluate_run(saved_run, eval_data, permute_feature="price")
    with pytest.raises(ValueError, match=r"fields \['nope'\] are not sparse features of"):
        importance_from_run(saved_run, data=eval_data, fields=["nope"])
    assert main(["evaluate", "--run", str(saved_run), "--data", str(tmp_path / "none*.parquet")]) == 2
    assert not (saved_run / "importance").exists()
