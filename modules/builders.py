"""Config -> module builders (one small function per model type)."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from modules.config import ModelConfig, PLEConfig
from modules.ple import PLE


def build_ple(config: PLEConfig, in_features: int, task_names: Sequence[str]) -> PLE:
    """PLE (or CGC when ``num_levels == 1``) from its config.

    Example::

        build_ple(PLEConfig(type="ple", num_levels=1), in_features=32, task_names=["click"])
    """
    experts = config.experts_per_task
    return PLE(
        in_features,
        task_names,
        num_levels=config.num_levels,
        experts_per_task=experts if isinstance(experts, int) else list(experts),
        shared_experts=config.shared_experts,
        expert_hidden=list(config.expert_hidden),
        tower_hidden=list(config.tower_hidden),
        activation=config.mlp.activation,
        norm=config.mlp.norm,
        dropout=config.mlp.dropout,
    )


# model.type -> builder(config, in_features, task_names); new model types register here.
NETWORK_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"ple": build_ple}


def build_network(config: ModelConfig, in_features: int, task_names: List[str]) -> nn.Module:
    """The dense multi-task network for ``config.type``: ``[B, in_features] -> {task: logit [B]}``.

    Example::

        net = build_network(PLEConfig(type="ple"), in_features=40, task_names=["click", "cvr"])
    """
    builder = NETWORK_BUILDERS.get(config.type)
    if builder is None:
        raise ValueError(f"unknown model.type {config.type!r}; known: {sorted(NETWORK_BUILDERS)}")
    return builder(config, in_features, task_names)


def build_embedding_collection(
    tables: List[EmbeddingBagConfig], device: Optional[torch.device] = None
) -> EmbeddingBagCollection:
    """An EBC over ``tables``; pass ``torch.device("meta")`` to defer allocation to sharding.

    Example::

        ebc = build_embedding_collection(
            [EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"])],
            device=torch.device("meta"))
    """
    return EmbeddingBagCollection(tables=tables, device=device)
