"""Evaluate a saved run without training: one process, unsharded, on CPU.

Example::

    result = evaluate_run("runs/demo", ["runs/demo-data/test/*.parquet"], step=None)  # best, else latest
    result["click"]["auc"]

    evaluator = RunEvaluator("runs/demo", step=400)        # loads the weights once
    evaluator.evaluate(files)                              # {task: {auc, ne, logloss, ...}}
    evaluator.evaluate(files, permute_feature="user_id")   # one field's bags permuted

The module is ``build_train_module(config)`` with checkpoint ``step``'s weights
(``load_model_state``, whatever world size and plan wrote it; step None: the ``best`` checkpoint
of early stopping when the run has one, else the latest, as ``choose_checkpoint`` says), the
config is ``RUN_DIR/config.yaml`` (the resolved config the trainer wrote), the fitted feature
statistics ``RUN_DIR/features.json`` (``trainer.features``; never refitted here), and the metrics are
``TaskMetrics``, exactly as the trainer computes them (the same AUC window, the same
sample-space weights), in a group of one.
Run it in a process without a multi-rank process group: ``TaskMetrics`` would reduce over it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from towerrec.data.config import resolve_paths
from towerrec.data.parquet import ParquetDataset, make_dataloader, report_nulls
from towerrec.trainer.checkpoint import CheckpointMeta, choose_checkpoint, load_model_state, read_meta
from towerrec.trainer.config import ConfigError, ExperimentConfig, load_config
from towerrec.trainer.distributed import DistEnv, set_threads, size_threads
from towerrec.trainer.features import load_run_features
from towerrec.trainer.metrics import TaskMetrics
from towerrec.trainer.model import TrainModule, build_train_module

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]


def single_process_env() -> DistEnv:
    """A group of one without a process group: ``TaskMetrics`` then neither gathers nor reduces."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"evaluating a saved run needs a single process; this one is rank {dist.get_rank()} of "
            f"{dist.get_world_size()} (use the trainer's evaluation for sharded models)"
        )
    return DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo", cpu_group=None)  # type: ignore[arg-type]


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """``RUN_DIR/config.yaml``, the resolved config the trainer wrote.

    Raises:
        FileNotFoundError: the run directory or its config.yaml does not exist.
    """
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"run directory {run_dir} has no config.yaml (not a towerrec run?)")
    try:
        return load_config(path)
    except ConfigError as e:
        raise ConfigError(f"{path} (the run's resolved config): {e}") from None


def trained_epoch(meta: CheckpointMeta) -> int:
    """The 0-based epoch the checkpoint's last step belongs to (the ``epoch`` of metrics.jsonl):
    a checkpoint at an epoch boundary records the next epoch with batch 0."""
    return meta.epoch - 1 if meta.batch_in_epoch == 0 and meta.epoch > 0 else meta.epoch


class RunEvaluator:
    """A saved run's model, loaded once, evaluated on any labelled Parquet files any number of times.

    Example::

        evaluator = RunEvaluator("runs/demo", step=None, batch_size=4096)
        evaluator.evaluate(["runs/demo-data/eval"])["click"]["auc"]
        evaluator.source()   # {"run_dir", "step", "epoch", "checkpoint": {..., "chosen": "best"}}

    Raises:
        FileNotFoundError: no run directory or config.yaml.
        CheckpointError: no such checkpoint (naming the steps that exist), or one that does not load;
            ``FeaturesFileError``: RUN_DIR/features.json missing (the config needs it) or not fitted
            for the config.
    """

    def __init__(
        self,
        run_dir: str | Path,
        step: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = load_run_config(run_dir)
        self.features = load_run_features(run_dir, self.config.data)  # what training read through
        # One process and its loader workers on this machine's cores, sized as training sizes a rank.
        set_threads(size_threads(self.config.training.threads, 1, num_workers), announce=False)
        self.module: TrainModule = build_train_module(self.config, torch.device("cpu"))
        step_dir, self.chosen = choose_checkpoint(run_dir, step)  # chosen: best, latest or --step
        # By step: `latest` and `best` may move meanwhile.
        self.meta = load_model_state(run_dir, read_meta(step_dir).step, self.module)
        self.module.eval()
        self.batch_size = batch_size or self.config.training.batch_size
        self.num_workers = num_workers
        self.tasks = [t.name for t in self.config.data.tasks]
        self.env = single_process_env()

    @property
    def sparse_fields(self) -> list[str]:
        """The configured sparse features (not derived cross features): what can be permuted."""
        return self.config.data.sparse_feature_names

    def source(self) -> dict[str, Any]:
        """Where the weights came from, for reports."""
        return {
            "run_dir": str(self.run_dir),  # as given: reports carry no path of this machine
            "step": self.meta.step,
            "epoch": trained_epoch(self.meta),
            "checkpoint": {
                "path": str(self.meta.path),
                "epoch": self.meta.epoch,
                "batch_in_epoch": self.meta.batch_in_epoch,
                "chosen": self.chosen,
            },
        }

    def dataset(self, files: list[str], permute_feature: str | None = None) -> ParquetDataset:
        # The training seed: the permutation of a field is then the same in every evaluation.
        return ParquetDataset(
            files,
            self.config.data,
            self.batch_size,
            labels=True,
            seed=self.config.training.seed,
            permute_feature=permute_feature,
            features=self.features,
        )

    def evaluate(self, files: list[str], permute_feature: str | None = None) -> Metrics:
        """One pass over ``files`` (resolved Parquet files); ``{task: {auc, ne, logloss, examples,
        positives}}``."""
        return self.evaluate_dataset(self.dataset(files, permute_feature))

    def evaluate_dataset(self, dataset: ParquetDataset) -> Metrics:
        """One pass over a dataset built by :meth:`dataset` (or its ``with_permutation``)."""
        max_examples = dataset.steps_per_epoch() * self.batch_size
        metrics = TaskMetrics(self.tasks, self.env, self.batch_size, max_examples)
        batches = make_dataloader(dataset, self.num_workers) if self.num_workers else dataset
        with torch.no_grad():
            for batch in batches:
                _, out = self.module(batch)
                metrics.update(out.logits, out.labels, out.example_weights)
        report_nulls(dataset, f"evaluation of {len(dataset.files)} files")
        return metrics.compute()


def evaluate_run(
    run_dir: str | Path,
    data: list[str],
    step: int | None = None,
    batch_size: int | None = None,
    permute_feature: str | None = None,
) -> Metrics:
    """Metrics per task of checkpoint ``step`` (None: the best, else the latest) of ``run_dir`` on
    ``data`` (files, directories or globs).

    Example::

        evaluate_run("runs/census", ["runs/census/test"], step=1200)["income"]["auc"]
    """
    files = resolve_paths(list(data), "--data")
    return RunEvaluator(run_dir, step, batch_size).evaluate(files, permute_feature)


def evaluation_report(evaluator: RunEvaluator, files: list[str], metrics: Metrics) -> dict[str, Any]:
    """What ``towerrec evaluate`` prints and writes: the checkpoint, the data and the metrics."""
    return {**evaluator.source(), "data": files, "batch_size": evaluator.batch_size, "metrics": metrics}
