"""Per-task AUC, NE and logloss over a whole evaluation pass, with ``torchrec.metrics``.

Example::

    metrics = TaskMetrics(["click", "conversion"], env, batch_size=1024, max_examples=10**6)
    for out in outputs:
        metrics.update(out.logits, out.labels, out.example_weights)
    metrics.compute()  # {"click": {"auc": 0.74, "ne": 0.91, "logloss": 0.45}, ...}

``logloss`` is the mean binary cross-entropy in nats; ``ne`` is it divided by the entropy of the
labels' mean (normalised entropy, lower is better, 1 = predicting the base rate).

Each task is weighted by its example weights (row weight times the task's sample-space mask),
so padding rows and rows outside a task's sample space do not count.
"""

from __future__ import annotations

import math

import torch
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.ne import NEMetric

from trainer.distributed import DistEnv


class TaskMetrics:
    """Exact metrics over up to ``max_examples`` examples per task, gathered over all ranks.

    AUC needs every prediction, so its window is sized to the evaluation set
    (``max_examples`` across ranks); NE and logloss keep running sums.
    """

    def __init__(self, tasks: list[str], env: DistEnv, batch_size: int, max_examples: int) -> None:
        self.tasks = tasks
        infos = [RecTaskInfo(name=t, label_name=t, prediction_name=t, weight_name=t) for t in tasks]
        window = max(max_examples, batch_size * env.world_size)
        common = dict(
            world_size=env.world_size,
            my_rank=env.rank,
            batch_size=batch_size,
            tasks=infos,
            compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
            window_size=window,
            process_group=env.cpu_group,
            compute_on_all_ranks=True,  # every rank logs and returns the same numbers
        )
        self._auc = AUCMetric(**common)
        self._ne = NEMetric(**common, include_logloss=True)

    def update(
        self,
        logits: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        weights: dict[str, torch.Tensor],
    ) -> None:
        predictions = {t: torch.sigmoid(logits[t].float()).cpu() for t in self.tasks}
        labels = {t: labels[t].float().cpu() for t in self.tasks}
        weights = {t: weights[t].float().cpu() for t in self.tasks}
        for metric in (self._auc, self._ne):
            metric.update(predictions=predictions, labels=labels, weights=weights)

    def compute(self) -> dict[str, dict[str, float]]:
        """Collective: every rank must call it. Returns ``{task: {auc, ne, logloss}}``."""
        values = {**self._auc.compute(), **self._ne.compute()}
        result: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            result[task] = {
                "auc": _pick(values, f"auc-{task}|window_auc"),
                "ne": _pick(values, f"ne-{task}|lifetime_ne"),
                # torchrec's logloss is in bits (log2); report nats, like the training loss.
                "logloss": _pick(values, f"ne-{task}|lifetime_logloss") * math.log(2),
            }
        return result

    def reset(self) -> None:
        self._auc.reset()
        self._ne.reset()


def _pick(values: dict[str, torch.Tensor], key: str) -> float:
    if key not in values:
        raise KeyError(f"torchrec metric {key!r} missing; got {sorted(values)}")
    return float(values[key].reshape(-1)[0])
