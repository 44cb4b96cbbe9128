"""Per-task AUC, NE and logloss over a whole evaluation pass, with ``torchrec.metrics``.

Example::

    metrics = TaskMetrics(["click", "conversion"], env, batch_size=1024, max_examples=10**6)
    for out in outputs:
        metrics.update(out.logits, out.labels, out.example_weights)   # or update_probabilities(...)
    metrics.compute()  # {"click": {"auc": 0.74, "ne": 0.91, "logloss": 0.45,
                       #            "examples": 40000.0, "positives": 8100.0}, ...}

``logloss`` is the mean binary cross-entropy in nats; ``ne`` is it divided by the entropy of the
labels' mean (normalised entropy, lower is better, 1 = predicting the base rate).

Each task is weighted by its example weights (row weight times the task's sample-space mask),
so padding rows and rows outside a task's sample space do not count.

Every state lives on the rank's device (``env.device``): an update only queues device work, with
no copy to the host and no wait for the batch's forward; :meth:`TaskMetrics.compute` reads them.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.ne import NEMetric
from towerrec.trainer.distributed import DistEnv


class TaskMetrics:
    """Exact metrics over up to ``max_examples`` examples per task, gathered over all ranks.

    AUC needs every prediction, so its window is sized to the evaluation set
    (``max_examples`` across ranks) and kept on the device; NE and logloss keep running sums.
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
        self.device = env.device
        self._auc = AUCMetric(**common).to(self.device)
        self._ne = NEMetric(**common, include_logloss=True).to(self.device)
        self._group = env.cpu_group
        # Weighted example and positive counts per task, so a report shows what it was computed on.
        self._counts = torch.zeros(len(tasks), 2, dtype=torch.float64, device=self.device)

    def update(
        self,
        logits: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        weights: dict[str, torch.Tensor],
    ) -> None:
        self.update_probabilities({t: torch.sigmoid(logits[t].float()) for t in self.tasks}, labels, weights)

    def update_probabilities(
        self,
        predictions: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        weights: dict[str, torch.Tensor],
    ) -> None:
        """:meth:`update` for a model that outputs probabilities (an exported artifact). Inputs
        elsewhere than the metrics' device are copied there (no copy when already there)."""
        predictions = {t: self._here(predictions[t]) for t in self.tasks}
        labels = {t: self._here(labels[t]) for t in self.tasks}
        weights = {t: self._here(weights[t]) for t in self.tasks}
        for metric in (self._auc, self._ne):
            metric.update(predictions=predictions, labels=labels, weights=weights)
        w = torch.stack([weights[t].double().sum() for t in self.tasks])
        positives = torch.stack([(weights[t] * labels[t]).double().sum() for t in self.tasks])
        self._counts += torch.stack([w, positives], dim=1)

    def _here(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.device, torch.float32, non_blocking=True)

    def compute(self) -> dict[str, dict[str, float]]:
        """Collective: every rank must call it. Returns ``{task: {auc, ne, logloss, examples,
        positives}}`` (examples and positives: weighted counts over all ranks)."""
        values = {**self._auc.compute(), **self._ne.compute()}
        counts = self._counts.to("cpu", copy=True)  # the all-reduce below sums in place, on gloo
        if dist.is_initialized():
            dist.all_reduce(counts, group=self._group)
        result: dict[str, dict[str, float]] = {}
        for i, task in enumerate(self.tasks):
            result[task] = {
                "auc": _pick(values, f"auc-{task}|window_auc"),
                "ne": _pick(values, f"ne-{task}|lifetime_ne"),
                # torchrec's logloss is in bits (log2); report nats, like the training loss.
                "logloss": _pick(values, f"ne-{task}|lifetime_logloss") * math.log(2),
                "examples": float(counts[i, 0]),
                "positives": float(counts[i, 1]),
            }
        return result

    def reset(self) -> None:
        self._auc.reset()
        self._ne.reset()
        self._counts.zero_()


def _pick(values: dict[str, torch.Tensor], key: str) -> float:
    if key not in values:
        raise KeyError(f"torchrec metric {key!r} missing; got {sorted(values)}")
    return float(values[key].reshape(-1)[0])
