"""The module the train pipeline drives: embeddings + multi-task network + loss, built from config.

Example::

    module = build_train_module(config, device=torch.device("meta"))
    loss, out = module(batch)        # what TrainPipelineSparseDist expects of a model
    out.logits["click"]              # [B] logits
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from towerrec.data.batch import Batch
from towerrec.data.config import DataConfig
from towerrec.modules.builders import TABLE_DATA_TYPES, build_embedding_collection, build_network
from towerrec.modules.interaction import CrossShape
from towerrec.modules.loss import MultiTaskLoss, TaskLossSpec
from towerrec.modules.multitask import MultiTaskModel, pooled_embedding_width
from towerrec.trainer.config import ExperimentConfig

# training.precision -> the dense network's autocast dtype (None: float32, no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


class StepOutput(NamedTuple):
    """Per-step results kept for logging and metrics (all detached)."""

    loss: torch.Tensor
    task_losses: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    example_weights: dict[str, torch.Tensor]


class LossHead(nn.Module):
    """Loss and detached step outputs from the logits.

    A module of its own so that TorchRec's pipeline tracer treats it as an fx leaf: the tracer
    follows ``TrainModule.forward`` only to find the sharded tables' inputs, and cannot iterate
    over the label and logit dicts.

    ``shared_parameters``: returns GradNorm's W (the network's ``last_shared_parameters``), asked
    for at each call: sharding replaces the meta-device parameters, and a stored list would keep
    the old ones (a registered reference would put them in the state dict twice).
    """

    def __init__(
        self, loss: MultiTaskLoss, shared_parameters: Callable[[], list[nn.Parameter]] | None = None
    ) -> None:
        super().__init__()
        self.loss = loss
        self.shared_parameters = shared_parameters

    def forward(
        self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], weights: torch.Tensor
    ) -> tuple[torch.Tensor, StepOutput]:
        shared = self.shared_parameters() if self.shared_parameters is not None else []
        total, task_losses = self.loss(logits, labels, weights, shared)
        example_weights = self.loss.example_weights(labels, weights)
        detached = {task: logit.detach() for task, logit in logits.items()}
        return total, StepOutput(total.detach(), task_losses, detached, labels, example_weights)


class TrainModule(nn.Module):
    """``forward(batch) -> (loss, StepOutput)``; the embedding collection is ``model.ebc``."""

    def __init__(self, model: MultiTaskModel, loss: MultiTaskLoss) -> None:
        super().__init__()
        self.model = model
        shared = None
        if loss.weighting == "gradnorm":
            shared = getattr(model.network, "last_shared_parameters", None)
            if shared is None:
                raise ValueError(
                    f"gradnorm weighting needs a layer shared by every task; "
                    f"{type(model.network).__name__} has none"
                )
        self.head = LossHead(loss, shared)

    @property
    def loss(self) -> MultiTaskLoss:
        return self.head.loss

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        return self.head(self.model(batch.sparse, batch.dense), batch.labels, batch.weights)


def embedding_bag_configs(data: DataConfig) -> list[EmbeddingBagConfig]:
    """One TorchRec table config per configured table (the cross codebook too), listing the
    features that read it."""
    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    return [
        EmbeddingBagConfig(
            name=table.name,
            num_embeddings=table.num_embeddings,
            embedding_dim=table.embedding_dim,
            feature_names=data.table_features(table.name),
            pooling=pooling[table.pooling],
            data_type=TABLE_DATA_TYPES[table.data_type],
        )
        for table in data.tables
    ]


def loss_specs(data: DataConfig) -> list[TaskLossSpec]:
    return [
        TaskLossSpec(
            name=t.name,
            weight=t.loss_weight,
            weight_decay=t.loss_weight_decay,
            pos_weight=t.pos_weight,
            sample_space=t.sample_space,
        )
        for t in data.tasks
    ]


def build_train_module(config: ExperimentConfig, device: torch.device) -> TrainModule:
    """Embedding tables on ``device`` (``meta`` until DistributedModelParallel shards them); the
    dense network autocast as ``training.precision`` says."""
    data = config.data
    ebc = build_embedding_collection(embedding_bag_configs(data), device)
    num_dense = len(data.dense_features)
    task_names = [t.name for t in data.tasks]
    cross_features = data.cross.feature_names if data.cross is not None else []
    in_features = pooled_embedding_width(ebc, exclude=cross_features) + num_dense
    network = build_network(config.model, in_features, task_names, cross_shape(data))
    autocast_dtype = AUTOCAST_DTYPES[config.training.precision]
    model = MultiTaskModel(ebc, num_dense, network, cross_features, autocast_dtype)
    loss = MultiTaskLoss(loss_specs(data), config.loss.weighting, config.loss.gradnorm_alpha)
    return TrainModule(model, loss)


def cross_shape(data: DataConfig) -> CrossShape | None:
    """Layout of the codebook vectors the loader's cross features produce (None without ``data.cross``)."""
    if data.cross is None:
        return None
    dim = data.table(data.cross.table).embedding_dim
    return CrossShape(len(data.cross.pairs), data.cross.num_hashes, dim)
