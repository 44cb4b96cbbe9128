"""Early stopping: its config, its decisions, and a real 2-rank run that stops at the step its own
metrics.jsonl implies, keeps the best checkpoint, resumes to the same stop, and is what
``towerrec evaluate`` and ``export`` read by default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from config_utils import write_config
from dist_utils import run_on_ranks

# ---- config ------------------------------------------------------------------------------------


def _load(tmp_path: Path, stopping: dict[str, Any]) -> Any:
    import yaml
    from towerrec.trainer.config import load_config

    path = write_config(tmp_path, {"type": "shared_bottom"})
    raw = yaml.safe_load(path.read_text())
    raw["training"] = {"early_stopping": stopping}
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_mode_defaults_to_the_metric_direction(tmp_path: Path) -> None:
    auc = _load(tmp_path, {"metric": "click.auc"}).training.early_stopping
    ne = _load(
        tmp_path, {"metric": "conversion.ne", "patience": 5, "min_delta": 0.001}
    ).training.early_stopping
    assert (auc.resolved_mode, auc.patience, auc.min_delta) == ("max", 3, 0.0)
    assert (ne.resolved_mode, ne.patience, ne.min_delta) == ("min", 5, 0.001)
    assert _load(tmp_path, None).training.early_stopping is None


@pytest.mark.parametrize(
    ("stopping", "message"),
    [
        ({"metric": "purchase.auc"}, "training.early_stopping.metric: unknown task 'purchase'"),
        (
            {"metric": "click.accuracy"},
            "training.early_stopping: metric: 'click.accuracy' is not <task>.<metric>",
        ),
        ({"metric": "auc"}, "training.early_stopping: metric: 'auc' is not <task>.<metric>"),
        (
            {"metric": "click.auc", "mode": "min"},
            "training.early_stopping: mode: min, but auc is better when max",
        ),
        (
            {"metric": "click.auc", "patience": 0},
            "training.early_stopping.patience: Input should be greater than 0",
        ),
        (
            {"metric": "click.auc", "min_delta": -1},
            "training.early_stopping.min_delta: Input should be greater",
        ),
        ({"metric": "click.auc", "since": 1}, "training.early_stopping.since: unknown key"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, stopping: dict[str, Any], message: str) -> None:
    from towerrec.trainer.config import ConfigError

    with pytest.raises(ConfigError) as error:
        _load(tmp_path, stopping)
    assert message in str(error.value)


# ---- decisions ---------------------------------------------------------------------------------


def _stopping(metric: str, patience: int, min_delta: float = 0.0) -> Any:
    from towerrec.trainer.config import EarlyStoppingConfig
    from towerrec.trainer.early_stopping import EarlyStopping
    from towerrec.trainer.evaluate import single_process_env

    config = EarlyStoppingConfig(metric=metric, patience=patience, min_delta=min_delta)
    return EarlyStopping(config, single_process_env())


def test_improvements_must_exceed_min_delta_in_the_metric_direction() -> None:
    auc = _stopping("click.auc", patience=2, min_delta=0.01)
    decisions = [auc.update(step, {"click": {"auc": v}}) for step, v in [(1, 0.6), (2, 0.605), (3, 0.62)]]
    assert decisions == [True, False, True] and auc.best_step == 3 and not auc.should_stop
    assert [auc.update(s, {"click": {"auc": 0.629}}) for s in (4, 5)] == [False, False]
    assert auc.should_stop and auc.reason()["best_step"] == 3 and auc.reason()["best"] == 0.62

    logloss = _stopping("click.logloss", patience=1)
    assert logloss.update(1, {"click": {"logloss": 0.5}}) and logloss.update(2, {"click": {"logloss": 0.4}})
    assert not logloss.update(3, {"click": {"logloss": 0.45}}) and logloss.should_stop


def test_nan_never_improves_and_state_round_trips() -> None:
    auc = _stopping("click.auc", patience=3)
    assert not auc.update(1, {"click": {"auc": float("nan")}}) and auc.best_step is None
    assert auc.update(2, {"click": {"auc": 0.7}}) and not auc.update(3, {"click": {"auc": float("nan")}})
    resumed = _stopping("click.auc", patience=3)
    resumed.load_state_dict(json.loads(json.dumps(auc.state_dict())))
    assert resumed.state == auc.state and resumed.state.evaluations_since_best == 1
    other = _stopping("click.ne", patience=3)
    other.load_state_dict(auc.state_dict())  # another metric: tracking starts afresh
    assert other.best_step is None and other.state.metric == "click.ne"


# ---- a real 2-rank run -------------------------------------------------------------------------

# 16 steps per epoch (16,000 rows / 2 ranks / 512); a learning rate high enough that click's AUC
# peaks within the second epoch: the run stops long before its 4 epochs (64 steps).
STOPPING = [
    "training.batch_size=512",
    "training.num_workers=0",
    "training.log_interval=1",
    "training.epochs=4",
    "training.eval_interval=4",
    "training.dense_optimizer.lr=0.03",
    "training.sparse_optimizer.lr=0.3",
    "training.early_stopping={metric: click.auc, patience: 2}",
    "checkpoint.interval=5",
    "checkpoint.keep_last=1",  # the best checkpoint must survive retention on its own
]
INTERRUPT = 20  # an evaluation step after the best and before the stop (found by the run below)


def _fit_stop_resume(rank: int, world_size: int, config_path: str, root: str) -> dict[str, Any]:
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    env = init_distributed()

    def fit(name: str, *extra: str) -> dict[str, Any]:
        trainer = Trainer(load_config(config_path, [f"run_dir={root}/{name}", *STOPPING, *extra]), env)
        resumed = trainer.resumed.step if trainer.resumed else None
        trainer.fit()
        return {"step": trainer.step, "resumed": resumed, "state": trainer.early_stopping.state_dict()}

    a = fit("a")
    b1 = fit("b", f"training.max_steps={INTERRUPT}")
    if rank == 0:  # as if killed between moving latest and best: the resumed run repairs best
        (Path(root) / "b" / "checkpoints" / "best").unlink()
    b2 = fit("b")
    again = fit("a")  # a stopped run, started again: resumes stopped and trains nothing
    return {"a": a, "b1": b1, "b2": b2, "a_again": again}


def _records(run_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("samples_per_s", "input_wait")} for line in lines]


def _expected_stop(evals: list[tuple[int, float]], patience: int) -> tuple[int, int]:
    """(stop step, best step) by the rule, from the recorded evaluations: the first evaluation
    after which ``patience`` evaluations in a row did not exceed the best so far (min_delta 0)."""
    best, best_step, since = float("-inf"), -1, 0
    for step, value in evals:
        if value > best:
            best, best_step, since = value, step, 0
        else:
            since += 1
        if since == patience:
            return step, best_step
    raise AssertionError(f"the recorded evaluations never trigger the stop: {evals}")


@pytest.fixture(scope="module")
def stopped_runs(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("early")
    results = run_on_ranks(
        _fit_stop_resume, 2, args=(str(synth_data / "config.yaml"), str(root)), timeout_s=400
    )
    for status, value in results:
        assert status == "ok", value
    return root, [value for _, value in results]


def test_stops_at_the_step_its_metrics_imply_and_keeps_the_best(stopped_runs: tuple[Path, list]) -> None:
    root, ranks = stopped_runs
    records = _records(root / "a")
    evals = [(r["step"], r["click"]["auc"]) for r in records if r["phase"] == "eval"]
    stop_step, best_step = _expected_stop(evals, patience=2)
    assert stop_step < 64, "the run was meant to stop early"
    assert INTERRUPT in [s for s, _ in evals] and best_step < INTERRUPT < stop_step
    assert max(v for s, v in evals) == dict(evals)[best_step]  # the best recorded metric
    # every rank stopped there, with the same state
    assert ranks[0]["a"] == ranks[1]["a"] and ranks[0]["a"]["step"] == stop_step
    assert ranks[0]["a"]["state"]["best_step"] == best_step
    assert evals[-1][0] == stop_step and max(r["step"] for r in records) == stop_step
    stop = [r for r in records if r["phase"] == "stop"]
    assert len(stop) == 1 and stop[0]["step"] == stop_step
    assert stop[0]["reason"] == "early_stopping" and stop[0]["best_step"] == best_step
    assert stop[0]["best"] == dict(evals)[best_step]
    # best beside latest; keep_last 1 prunes every other step but the best
    checkpoints = root / "a" / "checkpoints"
    assert (checkpoints / "best").read_text().strip() == f"step-{best_step:08d}"
    assert (checkpoints / "latest").read_text().strip() == f"step-{stop_step:08d}"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        ["best", "latest", f"step-{best_step:08d}", f"step-{stop_step:08d}"]
    )
    best_meta = json.loads((checkpoints / f"step-{best_step:08d}" / "meta.json").read_text())
    assert best_meta["early_stopping"]["best_step"] == best_step  # saved at its step, off-interval
    assert best_step % 5 != 0


def test_a_resumed_run_stops_at_the_same_step(stopped_runs: tuple[Path, list]) -> None:
    root, ranks = stopped_runs
    for value in ranks:
        a, b1, b2, again = value["a"], value["b1"], value["b2"], value["a_again"]
        assert b1["step"] == INTERRUPT and b1["state"]["evaluations_since_best"] == 1
        assert b2["resumed"] == INTERRUPT and (b2["step"], b2["state"]) == (a["step"], a["state"])
        assert (again["resumed"], again["step"], again["state"]) == (a["step"], a["step"], a["state"])
    assert _records(root / "b") == _records(root / "a")  # every loss and evaluation, and the stop
    for name in ("best", "latest"):
        assert (root / "b" / "checkpoints" / name).read_text() == (
            root / "a" / "checkpoints" / name
        ).read_text()


def test_evaluate_export_and_importance_read_best_unless_step_is_given(
    stopped_runs: tuple[Path, list], synth_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from towerrec.data.config import resolve_paths
    from towerrec.launch.cli import main
    from towerrec.trainer.evaluate import RunEvaluator
    from towerrec.trainer.predict import load_artifact

    run = stopped_runs[0] / "a"
    best = int((run / "checkpoints" / "best").read_text().strip().removeprefix("step-"))
    latest = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    evaluator = RunEvaluator(run)
    assert (evaluator.meta.step, evaluator.chosen) == (best, "best")
    assert (RunEvaluator(run, latest).meta.step, RunEvaluator(run, latest).chosen) == (latest, "--step")
    # the best checkpoint's metrics on data.eval are those the run recorded at that step
    recorded = next(r for r in _records(run) if r["phase"] == "eval" and r["step"] == best)
    eval_files = resolve_paths(evaluator.config.data.eval, "data.eval")
    auc = evaluator.evaluate(eval_files)["click"]["auc"]
    assert auc == pytest.approx(recorded["click"]["auc"], abs=1e-4)  # 1 process: other float sums

    assert main(["evaluate", "--run", str(run), "--data", str(synth_data / "eval")]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["step"] == best and report["checkpoint"]["chosen"] == "best"
    assert f"step-{best:08d} (checkpoints/best" in out.err

    artifact = tmp_path / "model.pt"
    assert main(["export", "--run", str(run), "--out", str(artifact), "--check_rows", "0"]) == 0
    assert f"step-{best:08d} (checkpoints/best" in capsys.readouterr().err
    assert load_artifact(artifact).schema["source"]["step"] == best
    importance = ["importance", "--run", str(run), "--out", str(tmp_path / "imp"), "--fields", "user_id"]
    assert main(importance) == 0
    assert f"step-{best:08d} (checkpoints/best" in capsys.readouterr().err
    assert json.loads((tmp_path / "imp" / "importance.json").read_text())["step"] == best
