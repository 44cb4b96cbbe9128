"""MLP, Gate, Tower."""

import pytest
import torch
import torch.nn as nn
from towerrec.modules.gate import Gate
from towerrec.modules.mlp import MLP
from towerrec.modules.tower import Tower


def test_mlp_layer_order_and_width():
    mlp = MLP(6, [5, 3], activation="gelu", norm="layer", dropout=0.1)
    kinds = [type(m) for m in mlp.layers]
    assert kinds == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Dropout] * 2
    assert mlp.out_features == 3
    assert mlp(torch.randn(4, 6)).shape == (4, 3)


def test_mlp_batchnorm_and_identity():
    assert [type(m) for m in MLP(6, [5], norm="batch").layers] == [nn.Linear, nn.ReLU, nn.BatchNorm1d]
    ident = MLP(6, [])
    x = torch.randn(2, 6)
    assert ident.out_features == 6 and torch.equal(ident(x), x)
    with pytest.raises(ValueError):
        MLP(6, [5], norm="group")
    with pytest.raises(ValueError):
        MLP(6, [5], activation="tanhh")


def test_tower_gives_one_logit_per_row():
    tower = Tower(8, hidden=[4])
    assert tower(torch.randn(5, 8)).shape == (5,)
    assert tower(torch.randn(1, 8)).shape == (1,)


def test_gate_weights_are_a_distribution_over_candidates():
    torch.manual_seed(0)
    gate = Gate(4, 3)
    sel = torch.randn(6, 4)
    cands = [torch.randn(6, 5) for _ in range(3)]
    out, w = gate(sel, cands, return_weights=True)
    assert w.shape == (6, 3) and out.shape == (6, 5)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(6))
    assert (w > 0).all() and (w < 1).all()  # a size-1-axis softmax would give all ones
    expected = sum(w[:, i : i + 1] * cands[i] for i in range(3))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gate(sel, torch.stack(cands)), out)  # stacked: [n, B, d]
    torch.testing.assert_close(gate.weights(sel), w)


def test_gate_single_candidate_is_pass_through():
    gate = Gate(4, 1)
    sel, cand = torch.randn(3, 4), torch.randn(3, 5)
    out, w = gate(sel, [cand], return_weights=True)
    assert w.shape == (3, 1)
    torch.testing.assert_close(w, torch.ones(3, 1))
    torch.testing.assert_close(out, cand)


def test_gate_rejects_wrong_candidate_count():
    gate = Gate(4, 3)
    with pytest.raises(ValueError):
        gate(torch.randn(2, 4), [torch.randn(2, 5)] * 2)
    with pytest.raises(AssertionError, match="candidate count"):  # no silent broadcast of a size-1 axis
        gate(torch.randn(2, 4), torch.randn(1, 2, 5))
    with pytest.raises(AssertionError, match="candidate count"):
        gate(torch.randn(2, 4), torch.randn(2, 2, 5))
