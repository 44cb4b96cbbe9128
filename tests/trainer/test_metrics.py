"""TaskMetrics over two gloo ranks equals AUC, logloss and NE computed by hand on all examples."""

from __future__ import annotations

import math

import torch
from dist_utils import run_on_ranks


def make_rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    labels = (torch.rand(3, 64, generator=g) < 0.3).float()
    logits = 1.5 * labels + torch.randn(3, 64, generator=g)
    weights = torch.ones(3, 64)
    weights[-1, -20:] = 0  # padding rows of the last batch
    return logits, labels, weights


def _metrics_on_rank(rank: int, world_size: int) -> dict:
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.metrics import TaskMetrics

    env = init_distributed()
    metrics = TaskMetrics(["click", "cvr"], env, batch_size=64, max_examples=3 * 64 * world_size)
    logits, labels, weights = make_rank_data(rank)
    for step in range(3):
        # cvr's sample space: only clicked rows count (weight = row weight x click label)
        click = labels[step]
        metrics.update(
            {"click": logits[step], "cvr": -logits[step]},
            {"click": click, "cvr": 1 - click},
            {"click": weights[step], "cvr": weights[step] * (torch.arange(64) % 2).float()},
        )
    return metrics.compute()


def reference(task: str) -> dict[str, float]:
    parts = [make_rank_data(r) for r in range(2)]
    logits = torch.cat([p[0].reshape(-1) for p in parts])
    labels = torch.cat([p[1].reshape(-1) for p in parts])
    weights = torch.cat([p[2].reshape(-1) for p in parts])
    if task == "cvr":
        logits, labels = -logits, 1 - labels
        weights = weights * (torch.arange(64).repeat(6) % 2).float()
    keep = weights > 0
    logits, labels = logits[keep].double(), labels[keep].double()
    pos, neg = logits[labels == 1], logits[labels == 0]
    auc = ((pos[:, None] > neg[None, :]).double().mean()).item()
    logloss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    p = labels.mean().item()
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return {
        "auc": auc,
        "logloss": logloss,
        "ne": logloss / entropy,
        "examples": float(keep.sum()),
        "positives": float(labels.sum()),
    }


def test_metrics_match_hand_computation_over_all_ranks() -> None:
    results = run_on_ranks(_metrics_on_rank, 2)
    for status, value in results:
        assert status == "ok", value
    assert results[0][1] == results[1][1]  # every rank reports the same numbers
    for task in ("click", "cvr"):
        got, want = results[0][1][task], reference(task)
        for name in ("auc", "logloss", "ne", "examples", "positives"):
            assert math.isclose(got[name], want[name], rel_tol=1e-5), (task, name, got, want)


def test_probabilities_give_the_same_metrics_as_logits_in_a_group_of_one() -> None:
    """``update_probabilities`` (an exported artifact's outputs) is ``update`` after the sigmoid."""
    from towerrec.trainer.evaluate import single_process_env
    from towerrec.trainer.metrics import TaskMetrics

    logits, labels, weights = make_rank_data(0)
    by_logits, by_probabilities = (TaskMetrics(["t"], single_process_env(), 64, 3 * 64) for _ in range(2))
    for step in range(3):
        by_logits.update({"t": logits[step]}, {"t": labels[step]}, {"t": weights[step]})
        by_probabilities.update_probabilities(
            {"t": torch.sigmoid(logits[step])}, {"t": labels[step]}, {"t": weights[step]}
        )
    got, want = by_probabilities.compute()["t"], by_logits.compute()["t"]
    assert got == want and 0.7 < got["auc"] < 1.0 and got["examples"] == 3 * 64 - 20


def test_updates_stay_on_the_device_and_only_compute_reads_them() -> None:
    """On the meta device any read of a value (``.cpu()``, ``.item()``, ``bool()``) raises: the
    updates of an evaluation pass queue device work only; compute() is where values are read."""
    import pytest
    from towerrec.trainer.distributed import DistEnv
    from towerrec.trainer.metrics import TaskMetrics

    env = DistEnv(0, 1, 0, 1, torch.device("meta"), "gloo", None)  # type: ignore[arg-type]
    metrics = TaskMetrics(["click", "cvr"], env, batch_size=64, max_examples=3 * 64)
    for _ in range(5):  # past the AUC window: its trimming does not read values either
        values = torch.empty(64, device="meta")
        batch = {"click": values, "cvr": values}
        metrics.update(batch, batch, batch)
    with pytest.raises(NotImplementedError, match="meta tensor"):
        metrics.compute()
