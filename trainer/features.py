"""A run's fitted feature statistics (``data.features``) through its lifecycle: fitted once on
the training files, stored as ``RUN_DIR/features.json``, reused on resume and read by
evaluate, importance and export (which copies them into the artifact's schema for predict).

Example::

    fitted = run_features(config, env)               # Trainer.__init__, on every rank
    ParquetDataset(files, config.data, 1024, features=fitted)
    fitted = load_run_features("runs/census", config.data)   # evaluate, export: never refit

``run_features``: None when no feature of the config needs fitting. Otherwise rank 0 alone
touches the run directory: it reads ``RUN_DIR/features.json`` when it exists (a resumed run, or
a new one in the same run_dir) and ``FittedFeatures.check`` accepts it, else it fits on the
training files (``data.train`` only, never eval or test) and writes the file atomically; then it
broadcasts the statistics as JSON over ``env.cpu_group``. The other ranks neither read nor write
the file, so the nodes of a multi-node job need not share RUN_DIR for it. They wait in that
broadcast, which gives up after ``training.collective_timeout_s``: fitting (one pass over the
training files' fitted columns; rank 0 logs how long it took) must finish within it, or fit
beforehand (``FittedFeatures.fit(...).save(RUN_DIR/features.json)``) and let the run reuse it.

A features.json fitted for another config (a changed ``min_count``, column, table size,
transforms before ``standardize``, ...) is a :class:`FeaturesFileError` naming the file and the
feature: the model's ids would silently mean something else. Remove the file to refit, or use a
new run_dir.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from towerrec.data.config import DataConfig, resolve_paths
from towerrec.data.features import FEATURES_FILE, FittedFeatures
from towerrec.trainer.checkpoint import CheckpointError, latest_checkpoint
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.distributed import DistEnv, RankFailure, describe_error

logger = logging.getLogger(__name__)


class FeaturesFileError(CheckpointError):
    """``RUN_DIR/features.json`` is missing, unreadable or fitted for another config: run state
    that does not match, as a checkpoint that does not fit the model (the same exit status)."""


def features_path(run_dir: str | Path) -> Path:
    """``RUN_DIR/features.json``."""
    return Path(run_dir) / FEATURES_FILE


def _refit_hint(path: Path) -> str:
    return f"remove {path} to refit on data.train, or use a new run_dir"


def load_checked(path: Path, data: DataConfig) -> FittedFeatures:
    """``path`` loaded and checked against ``data``.

    Raises:
        FeaturesFileError: not valid, or fitted for another config (naming file and feature).
    """
    try:
        fitted = FittedFeatures.load(path)
        fitted.check(data)
    except ValueError as e:
        raise FeaturesFileError(f"{e}; {_refit_hint(path)}") from None
    return fitted


def load_run_features(run_dir: str | Path, data: DataConfig) -> FittedFeatures | None:
    """The fitted statistics of a trained run for ``data`` (its config's data section); None
    when no feature needs them. Never fits: evaluate, importance and export read what training
    used.

    Example::

        load_run_features("runs/census", load_run_config("runs/census").data)

    Raises:
        FeaturesFileError: RUN_DIR/features.json is missing while the config needs it, invalid,
            or fitted for another config.
    """
    if not FittedFeatures.needs_fit(data):
        return None
    path = features_path(run_dir)
    if not path.is_file():
        needed = [f.name for f in data.sparse_features if f.needs_fit]
        needed += [f.name for f in data.dense_feature_configs if f.needs_fit]
        raise FeaturesFileError(
            f"{path} is missing: features {needed} of the run's config use statistics fitted on its "
            "training files, which `towerrec train` writes there; restore the file or retrain"
        )
    return load_checked(path, data)


def run_features(config: ExperimentConfig, env: DistEnv) -> FittedFeatures | None:
    """The run's fitted statistics on every rank (module docstring); call on every rank at the
    same point (a collective on ``env.cpu_group`` with several ranks).

    Raises:
        FeaturesFileError: on rank 0, a features.json that does not fit the config.
        DataError: on rank 0, bad training data while fitting (naming file, column, row).
        RankFailure: on the other ranks, whatever rank 0 raised, with its message.
    """
    if not FittedFeatures.needs_fit(config.data):
        return None
    path = features_path(config.run_dir)
    outcome: FittedFeatures | Exception | None = None
    if env.is_main:
        try:
            outcome = _reuse_or_fit(config, path)
        except Exception as e:  # noqa: BLE001 - the other ranks must hear of it, then re-raised
            outcome = e
    if env.world_size > 1:
        message: list[Any] = [_message(outcome) if env.is_main else None]
        dist.broadcast_object_list(message, src=0, group=env.cpu_group)
        if not env.is_main:
            outcome = _received(message[0], path)
    if isinstance(outcome, Exception):
        raise outcome
    assert outcome is not None
    return outcome


def _message(outcome: FittedFeatures | Exception | None) -> dict[str, Any]:
    if isinstance(outcome, FittedFeatures):
        return {"features": outcome.to_json()}
    return {"error": describe_error(outcome) if outcome is not None else "no outcome"}


def _received(message: dict[str, Any], path: Path) -> FittedFeatures | Exception:
    if "error" in message:
        return RankFailure(f"rank 0 could not prepare the fitted features ({path}): {message['error']}")
    return FittedFeatures.from_json(message["features"], f"{path} (broadcast by rank 0)")


def _reuse_or_fit(config: ExperimentConfig, path: Path) -> FittedFeatures:
    """Rank 0: ``path`` if it exists (checked), else fitted on ``data.train`` and saved there."""
    files = resolve_paths(config.data.train, "data.train")
    if path.is_file():
        fitted = load_checked(path, config.data)
        if fitted.fitted_on != files:
            logger.warning(
                "%s was fitted on %d file(s), data.train now resolves to %d other or renamed "
                "file(s): reusing it (the model was trained with its ids); %s",
                path,
                len(fitted.fitted_on),
                len(files),
                _refit_hint(path),
            )
        logger.info("fitted features: reused %s (%d features)", path, len(fitted.features))
        return fitted
    if latest_checkpoint(config.run_dir) is not None:
        logger.warning(
            "%s is missing but the run has checkpoints: fitting anew; a resumed model reads ids "
            "and inputs through these statistics, which differ from its training's if the data "
            "changed",
            path,
        )
    start = time.perf_counter()
    fitted = FittedFeatures.fit(files, config.data, seed=config.training.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fitted.save(path)
    logger.info(
        "fitted features: %d features on %d training file(s) in %.1f s; wrote %s",
        len(fitted.features),
        len(files),
        time.perf_counter() - start,
        path,
    )
    return fitted
