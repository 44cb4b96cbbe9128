"""MultiTaskModel: real EBC end to end, meta-device construction, pipeline traceability."""

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.train_pipeline.tracing import Tracer
from towerrec.modules.builders import build_embedding_collection
from towerrec.modules.loss import MultiTaskLoss, TaskLossSpec
from towerrec.modules.multitask import MultiTaskModel
from towerrec.modules.ple import PLE

TABLES = [
    EmbeddingBagConfig(name="user", num_embeddings=20, embedding_dim=4, feature_names=["user_id"]),
    EmbeddingBagConfig(
        name="item", num_embeddings=30, embedding_dim=3, feature_names=["item_id", "item_hist"]
    ),
]
POOLED = 4 + 3 * 2
NUM_DENSE = 2
TASKS = ["click", "cvr"]


def _model(device=None, num_dense=NUM_DENSE, in_features=POOLED + NUM_DENSE):
    torch.manual_seed(0)
    ebc = build_embedding_collection(TABLES, device=device)
    net = PLE(in_features, TASKS, num_levels=2, experts_per_task=[1, 2], expert_hidden=[8], tower_hidden=[4])
    return MultiTaskModel(ebc, num_dense, net)


def _kjt():
    # B = 3; item_hist is multi-hot with one empty row.
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id", "item_hist"],
        values=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 2, 0, 2]),
    )


def test_end_to_end_forward_backward():
    model = _model()
    assert model.in_features == POOLED + NUM_DENSE
    logits = model(_kjt(), torch.randn(3, NUM_DENSE))
    assert list(logits) == TASKS and all(v.shape == (3,) for v in logits.values())
    labels = {"click": torch.tensor([1.0, 0.0, 1.0]), "cvr": torch.tensor([1.0, 0.0, 0.0])}
    loss_fn = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", sample_space="click")])
    total, _ = loss_fn(logits, labels, torch.ones(3))
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_dense_features():
    model = _model(num_dense=0, in_features=POOLED)
    assert model(_kjt(), torch.empty(3, 0))["cvr"].shape == (3,)


def test_meta_device_construction():
    model = _model(device=torch.device("meta"))
    assert model.in_features == POOLED + NUM_DENSE
    assert all(p.is_meta for p in model.ebc.parameters())
    assert not any(p.is_meta for p in model.network.parameters())
    with pytest.raises(ValueError, match="input features"):
        _model(device=torch.device("meta"), in_features=POOLED)  # forgot the dense features


def test_pipeline_tracer_sees_ebc_fed_straight_from_the_argument():
    # Mirrors TrainPipelineSparseDist._rewrite_model, with the EBC standing in for its sharded form.
    model = _model()
    graph = Tracer(leaf_modules=["ebc", "network"]).trace(model)
    (call,) = [n for n in graph.nodes if n.op == "call_module" and n.target == "ebc"]
    assert len(call.args) == 1 and call.args[0].op == "placeholder" and call.args[0].target == "sparse"
