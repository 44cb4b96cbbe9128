"""Raw Parquet (strings, lists of strings, nulls, heavy tails) through a run's whole life: the
fitted features are written once by training, reused by the resumed run, read by evaluate,
importance and export, carried in the artifact; predict on the raw columns and the serving helper
equal the training evaluation on the same rows."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from dist_utils import run_on_ranks
from raw_helpers import write_raw_data
from towerrec.data.features import FittedFeatures
from towerrec.trainer.evaluate import RunEvaluator, single_process_env
from towerrec.trainer.features import FeaturesFileError, features_path
from towerrec.trainer.metrics import TaskMetrics
from towerrec.trainer.predict import load_artifact, predict
from towerrec.trainer.serving import transform_rows

TASKS = ["click", "conversion"]


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train(rank: int, world_size: int, config_path: str, max_steps: int, *overrides: str) -> dict:
    """Train to ``max_steps`` (resuming from the run's checkpoint if any); the features' log."""
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    messages = _Messages()
    logger = logging.getLogger("towerrec.trainer.features")
    logger.setLevel(logging.INFO)
    logger.addHandler(messages)
    config = load_config(config_path, [f"training.max_steps={max_steps}", *overrides])
    trainer = Trainer(config, init_distributed())
    resumed = trainer.step
    trainer.fit()
    return {"resumed_at": resumed, "step": trainer.step, "log": messages.lines}


@functools.lru_cache(maxsize=None)
def _trained(root: Path) -> tuple[Path, dict, dict, int]:
    """A run trained 10 steps, then resumed to 20; (run_dir, first log, second log, features.json
    mtime after the first)."""
    config = write_raw_data(root)
    [(status, first)] = run_on_ranks(_train, 1, args=(str(config), 10), timeout_s=300)
    assert status == "ok", first
    run_dir = root / "run"
    mtime = features_path(run_dir).stat().st_mtime_ns
    [(status, second)] = run_on_ranks(_train, 1, args=(str(config), 20), timeout_s=300)
    assert status == "ok", second
    return run_dir, first, second, mtime


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict, int]:
    return _trained(tmp_path_factory.mktemp("raw-run"))


def _eval_files(run_dir: Path) -> list[str]:
    return [str(run_dir.parent / "eval" / "part-0.parquet")]


def test_resumed_run_reuses_features_json(trained: tuple[Path, dict, dict, int]) -> None:
    run_dir, first, second, mtime = trained
    path = features_path(run_dir)
    assert first["resumed_at"] == 0 and first["step"] == 10
    assert any(line.startswith("fitted features: 5 features on 2 training file(s)") for line in first["log"])
    assert second["resumed_at"] == 10 and second["step"] == 20
    assert second["log"] == [f"fitted features: reused {path} (5 features)"]
    assert path.stat().st_mtime_ns == mtime
    fitted = FittedFeatures.load(path)
    assert fitted.fitted_on == sorted(str(p) for p in (run_dir.parent / "train").glob("*.parquet"))


def test_two_ranks_train_through_rank_0s_features(
    trained: tuple[Path, dict, dict, int], tmp_path: Path
) -> None:
    config = trained[0].parent / "config.yaml"
    run_dir = tmp_path / "run2"
    results = run_on_ranks(_train, 2, args=(str(config), 4, f"run_dir={run_dir}"), timeout_s=300)
    assert [status for status, _ in results] == ["ok", "ok"], results
    (_, first), (_, second) = results
    assert first["step"] == second["step"] == 4
    assert any(line.startswith("fitted features: 5 features") for line in first["log"])
    assert second["log"] == []  # rank 1 received them: it neither fitted nor read a file
    assert FittedFeatures.load(features_path(run_dir)) == FittedFeatures.load(features_path(trained[0]))


def test_evaluate_reads_the_runs_features(trained: tuple[Path, dict, dict, int], tmp_path: Path) -> None:
    run_dir = trained[0]
    evaluator = RunEvaluator(run_dir)
    assert evaluator.features == FittedFeatures.load(features_path(run_dir))
    result = evaluator.evaluate(_eval_files(run_dir))
    final = json.loads((run_dir / "eval_metrics.json").read_text())  # the trainer's last evaluation
    for task in TASKS:
        assert result[task]["auc"] == pytest.approx(final[task]["auc"], abs=1e-6)
    assert result["click"]["auc"] > 0.6
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    features_path(copy).unlink()
    with pytest.raises(FeaturesFileError, match=rf"{features_path(copy)} is missing"):
        RunEvaluator(copy)


def test_importance_from_a_saved_run(trained: tuple[Path, dict, dict, int], tmp_path: Path) -> None:
    from towerrec.trainer.importance import importance_from_run

    result, paths = importance_from_run(trained[0], out=tmp_path / "imp", fields=["user", "tags"])
    assert set(result.drop) == {"user", "tags"} and paths["json"].is_file()


def test_predict_and_serving_equal_the_training_evaluation(
    trained: tuple[Path, dict, dict, int], tmp_path: Path
) -> None:
    from towerrec.trainer.export import export_model

    run_dir = trained[0]
    files = _eval_files(run_dir)
    out = tmp_path / "model.pt"
    report = export_model(run_dir, out, quantize="none", check_data=files, check_rows=600)
    assert report is not None and report.passed and report.rows == 600
    artifact = load_artifact(out)
    fitted = FittedFeatures.load(features_path(run_dir))
    assert artifact.schema["features"] == json.loads(features_path(run_dir).read_text())
    assert artifact.features == fitted

    # The trained float model as evaluation runs it: the loader with the run's features.
    evaluator = RunEvaluator(run_dir)
    trained_p: dict[str, list[torch.Tensor]] = {t: [] for t in TASKS}
    labels: dict[str, list[torch.Tensor]] = {t: [] for t in TASKS}
    weights: dict[str, list[torch.Tensor]] = {t: [] for t in TASKS}
    with torch.no_grad():
        for batch in evaluator.dataset(files):
            _, step = evaluator.module(batch)
            n = batch.real_rows
            for t in TASKS:
                trained_p[t].append(torch.sigmoid(step.logits[t][:n]))
                labels[t].append(step.labels[t][:n])
                weights[t].append(step.example_weights[t][:n])
    trained = {t: torch.cat(v) for t, v in trained_p.items()}

    # predict on the raw columns only (labels dropped), moved away from the run: the artifact alone.
    raw = pq.read_table(files[0]).drop_columns(TASKS)
    pq.write_table(raw, tmp_path / "raw.parquet", row_group_size=250)
    path, rows = predict(out, [str(tmp_path / "raw.parquet")], tmp_path / "pred", batch_size=256)
    predicted = pq.read_table(path)
    assert rows == 600
    assert predicted.column_names[:4] == ["user", "city", "item_id", "age"]  # columns, each once
    for t in TASKS:
        np.testing.assert_allclose(predicted[f"p_{t}"].to_numpy(), trained[t].numpy(), rtol=0, atol=1e-5)

    # The metrics of predict's probabilities are the evaluation's.
    metrics = TaskMetrics(TASKS, single_process_env(), 600, 600)
    served = {t: torch.from_numpy(predicted[f"p_{t}"].to_numpy()) for t in TASKS}
    metrics.update_probabilities(
        served, {t: torch.cat(v) for t, v in labels.items()}, {t: torch.cat(v) for t, v in weights.items()}
    )
    expected = evaluator.evaluate(files)
    for t, m in metrics.compute().items():
        assert m["auc"] == pytest.approx(expected[t]["auc"], abs=1e-6)

    # A serving client with the raw rows and the artifact: the same probabilities.
    values, lengths, dense = transform_rows(artifact.schema, raw)
    with torch.inference_mode():
        direct = artifact.module(values, lengths, dense)
    for t in TASKS:
        np.testing.assert_allclose(direct[t].numpy(), predicted[f"p_{t}"].to_numpy(), rtol=0, atol=1e-6)
