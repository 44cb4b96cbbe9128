"""MultiTaskLoss: sample spaces, pos_weight, padding rows, empty spaces, epoch decay."""

import pytest
import torch
import torch.nn.functional as F
from towerrec.modules.loss import MultiTaskLoss, TaskLossSpec

B = 8


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = {t: torch.randn(B, generator=g, requires_grad=True) for t in ("click", "cvr")}
    labels = {
        "click": torch.tensor([1, 0, 1, 0, 1, 1, 0, 0.0]),
        "cvr": torch.tensor([1, 1, 0, 0, 1, 0, 1, 0.0]),
    }
    return logits, labels, torch.ones(B)


def _bce(logit, label, **kw):
    return F.binary_cross_entropy_with_logits(logit, label, **kw)


def test_plain_mean_bce_and_detached_task_losses():
    logits, labels, w = _batch()
    loss = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", weight=0.5)])
    total, per_task = loss(logits, labels, w)
    click, cvr = _bce(logits["click"], labels["click"]), _bce(logits["cvr"], labels["cvr"])
    torch.testing.assert_close(per_task["click"], click.detach())
    torch.testing.assert_close(total, click + 0.5 * cvr)
    assert not per_task["cvr"].requires_grad and total.requires_grad


def test_sample_space_masks_loss_and_gradient():
    loss_fn = MultiTaskLoss([TaskLossSpec("click", weight=0.0), TaskLossSpec("cvr", sample_space="click")])
    logits, labels, w = _batch()
    total, per_task = loss_fn(logits, labels, w)
    inside = labels["click"] == 1
    torch.testing.assert_close(per_task["cvr"], _bce(logits["cvr"][inside], labels["cvr"][inside]).detach())
    total.backward()
    assert (logits["cvr"].grad[~inside] == 0).all() and (logits["cvr"].grad[inside] != 0).all()

    # Changing anything outside the space changes neither loss nor gradient.
    logits2, labels2, _ = _batch()
    with torch.no_grad():
        logits2["cvr"][~inside] += 10.0
    labels2["cvr"][~inside] = 1 - labels2["cvr"][~inside]
    total2, _ = loss_fn(logits2, labels2, w)
    total2.backward()
    torch.testing.assert_close(total2, total)
    torch.testing.assert_close(logits2["cvr"].grad, logits["cvr"].grad)

    ew = loss_fn.example_weights(labels, w)
    torch.testing.assert_close(ew["cvr"], inside.float())
    torch.testing.assert_close(ew["click"], w)


def test_pos_weight():
    logits, labels, w = _batch()
    _, plain = MultiTaskLoss([TaskLossSpec("click")])(logits, labels, w)
    _, weighted = MultiTaskLoss([TaskLossSpec("click", pos_weight=3.0)])(logits, labels, w)
    expected = _bce(logits["click"], labels["click"], pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(weighted["click"], expected.detach())
    assert weighted["click"] > plain["click"]


def test_padding_rows_are_ignored():
    loss_fn = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", sample_space="click")])
    logits, labels, w = _batch()
    total, _ = loss_fn(logits, labels, w)
    pad = 3  # garbage rows that look like clicked positives, but with row weight 0
    padded_logits = {t: torch.cat([v, torch.full((pad,), 5.0)]) for t, v in logits.items()}
    padded_labels = {t: torch.cat([v, torch.ones(pad)]) for t, v in labels.items()}
    padded_total, _ = loss_fn(padded_logits, padded_labels, torch.cat([w, torch.zeros(pad)]))
    torch.testing.assert_close(padded_total, total)


def test_empty_sample_space_is_zero_not_nan():
    loss_fn = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", sample_space="click")])
    logits, labels, w = _batch()
    labels["click"] = torch.zeros(B, dtype=torch.long)  # integer labels are accepted too
    total, per_task = loss_fn(logits, labels, w)
    assert per_task["cvr"].item() == 0.0 and torch.isfinite(total)
    total.backward()
    assert (logits["cvr"].grad == 0).all() and torch.isfinite(logits["click"].grad).all()
    # All rows padding: still 0 and a working graph.
    total, _ = loss_fn(logits, labels, torch.zeros(B))
    assert total.item() == 0.0 and total.requires_grad


def test_epoch_decay_of_task_weights():
    loss_fn = MultiTaskLoss([TaskLossSpec("click", weight=2.0, weight_decay=0.5), TaskLossSpec("cvr")])
    logits, labels, w = _batch()
    _, per_task = loss_fn(logits, labels, w)
    for epoch, omega in [(0, 2.0), (1, 1.0), (2, 0.5)]:
        loss_fn.set_epoch(epoch)
        total, _ = loss_fn(logits, labels, w)
        assert loss_fn.task_weights() == {"click": omega, "cvr": 1.0}
        torch.testing.assert_close(total.detach(), omega * per_task["click"] + per_task["cvr"])


def test_invalid_specs():
    with pytest.raises(ValueError):
        MultiTaskLoss([TaskLossSpec("cvr", sample_space="click")])
    with pytest.raises(ValueError):
        MultiTaskLoss([TaskLossSpec("a"), TaskLossSpec("a")])
