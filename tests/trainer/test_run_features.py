"""The run's fitted features: fitted once on the training files (rank 0), saved as
RUN_DIR/features.json, reused after, broadcast to the other ranks (which touch no file); a file
fitted for another config is a named error on every rank."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
from dist_utils import run_on_ranks
from raw_helpers import raw_config, write_raw_data
from towerrec.data.features import FittedFeatures
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.evaluate import single_process_env
from towerrec.trainer.features import (
    FeaturesFileError,
    features_path,
    load_run_features,
    run_features,
)

FITTED = {"user", "age_bucket", "age_std", "gain", "hours"}


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    write_raw_data(root)
    return root


def _config(root: Path, run_dir: Path, min_count: int = 2) -> ExperimentConfig:
    raw = copy.deepcopy(raw_config(root))
    raw["run_dir"] = str(run_dir)
    raw["data"]["sparse_features"][0]["min_count"] = min_count
    return ExperimentConfig.model_validate(raw)


def test_fitted_once_on_the_training_files_then_reused(
    raw_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="towerrec.trainer.features")
    config = _config(raw_root, tmp_path / "run")
    fitted = run_features(config, single_process_env())
    path = features_path(tmp_path / "run")
    assert fitted is not None and path.is_file()
    assert set(fitted.features) == FITTED
    train = sorted(str(p) for p in (raw_root / "train").glob("*.parquet"))
    assert fitted.fitted_on == train  # never the evaluation files
    assert FittedFeatures.load(path) == fitted
    assert "fitted features: 5 features on 2 training file(s)" in caplog.text
    written = path.stat().st_mtime_ns

    caplog.clear()
    again = run_features(config, single_process_env())
    assert again == fitted and path.stat().st_mtime_ns == written  # read, not refitted
    assert f"fitted features: reused {path} (5 features)" in caplog.text
    assert load_run_features(tmp_path / "run", config.data) == fitted


def test_no_fitted_feature_no_file(raw_root: Path, tmp_path: Path) -> None:
    raw = raw_config(raw_root)
    raw["run_dir"] = str(tmp_path / "run")
    raw["data"]["sparse_features"] = raw["data"]["sparse_features"][1:4]
    raw["data"]["tables"] = raw["data"]["tables"][1:4]
    raw["data"]["dense_features"] = []
    config = ExperimentConfig.model_validate(raw)
    assert run_features(config, single_process_env()) is None
    assert load_run_features(tmp_path / "run", config.data) is None
    assert not (tmp_path / "run").exists()


def test_a_file_fitted_for_another_config_is_named(raw_root: Path, tmp_path: Path) -> None:
    run_features(_config(raw_root, tmp_path / "run"), single_process_env())
    path = features_path(tmp_path / "run")
    changed = _config(raw_root, tmp_path / "run", min_count=3)
    pattern = rf"{path}: feature 'user' was fitted for .*min_count.*remove {path} to refit.*new run_dir"
    with pytest.raises(FeaturesFileError, match=pattern):
        run_features(changed, single_process_env())
    with pytest.raises(FeaturesFileError, match=pattern):
        load_run_features(tmp_path / "run", changed.data)
    path.write_text("{not json")
    with pytest.raises(FeaturesFileError, match=rf"{path}: not valid JSON"):
        load_run_features(tmp_path / "run", changed.data)


def test_missing_file_is_named_where_the_run_needs_it(raw_root: Path, tmp_path: Path) -> None:
    config = _config(raw_root, tmp_path / "run")
    with pytest.raises(FeaturesFileError, match=rf"{features_path(tmp_path / 'run')} is missing: features "):
        load_run_features(tmp_path / "run", config.data)


def _two_ranks(rank: int, world_size: int, root: str) -> dict:
    import torch
    import torch.distributed as dist
    from towerrec.trainer.distributed import DistEnv, RankFailure

    env = DistEnv(rank, world_size, rank, world_size, torch.device("cpu"), "gloo", dist.group.WORLD)
    # Rank 1 is given a run_dir that does not exist: it must neither read nor create it.
    run_dir = Path(root) / ("run" if rank == 0 else "rank1-never-created")
    fitted = run_features(_config(Path(root), run_dir), env)
    out: dict = {"features": fitted.to_json(), "source": fitted.source}
    try:
        run_features(_config(Path(root), run_dir, min_count=3), env)
    except (FeaturesFileError, RankFailure) as e:
        out["error"] = (type(e).__name__, str(e))
    out["rank1_dir"] = (Path(root) / "rank1-never-created").exists()
    return out


def test_two_ranks_rank0_fits_the_others_receive_it(raw_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.symlink_to(raw_root)
    results = run_on_ranks(_two_ranks, 2, args=(str(root),), timeout_s=180)
    assert [status for status, _ in results] == ["ok", "ok"], results
    (_, first), (_, second) = results
    path = features_path(root / "run")
    assert first["features"] == second["features"] == FittedFeatures.load(path).to_json()
    assert first["source"] is None and "broadcast by rank 0" in second["source"]
    assert not second["rank1_dir"]
    # The second call's config disagrees with the file: rank 0's error, on both ranks.
    assert first["error"][0] == "FeaturesFileError" and "feature 'user' was fitted for" in first["error"][1]
    assert second["error"][0] == "RankFailure"
    assert second["error"][1].startswith("rank 0 could not prepare the fitted features")
    assert "FeaturesFileError" in second["error"][1] and "feature 'user'" in second["error"][1]
