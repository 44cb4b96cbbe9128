"""Config -> module builders (one small function per model type)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from towerrec.modules.config import (
    CGCConfig,
    DTNConfig,
    MLPConfig,
    MMoEConfig,
    ModelConfig,
    PLEConfig,
    SharedBottomConfig,
    SingleTaskConfig,
    reads_cross,
)
from towerrec.modules.dtn import DTN
from towerrec.modules.interaction import CrossShape
from towerrec.modules.mmoe import MMoE
from towerrec.modules.ple import PLE
from towerrec.modules.shared_bottom import SharedBottom
from towerrec.modules.single_task import SingleTask


def _mlp_kwargs(mlp: MLPConfig) -> Dict[str, Any]:
    return {"activation": mlp.activation, "norm": mlp.norm, "dropout": mlp.dropout}


def build_ple(config: Union[PLEConfig, CGCConfig], in_features: int, task_names: Sequence[str]) -> PLE:
    """PLE (or CGC when ``num_levels == 1`` or ``type: cgc``) from its config.

    Example::

        build_ple(PLEConfig(type="ple", num_levels=1), in_features=32, task_names=["click"])
        build_ple(CGCConfig(type="cgc"), in_features=32, task_names=["click"])  # one level
    """
    experts = config.experts_per_task
    return PLE(
        in_features,
        task_names,
        num_levels=getattr(config, "num_levels", 1),
        experts_per_task=experts if isinstance(experts, int) else list(experts),
        shared_experts=config.shared_experts,
        expert_hidden=list(config.expert_hidden),
        tower_hidden=list(config.tower_hidden),
        activation=config.mlp.activation,
        norm=config.mlp.norm,
        dropout=config.mlp.dropout,
    )


def build_mmoe(config: MMoEConfig, in_features: int, task_names: Sequence[str]) -> MMoE:
    """MMoE from its config.

    Example::

        build_mmoe(MMoEConfig(type="mmoe", num_experts=8), 32, ["click", "conversion"])
    """
    return MMoE(
        in_features,
        task_names,
        num_experts=config.num_experts,
        expert_hidden=list(config.expert_hidden),
        tower_hidden=list(config.tower_hidden),
        **_mlp_kwargs(config.mlp),
    )


def build_shared_bottom(
    config: SharedBottomConfig, in_features: int, task_names: Sequence[str]
) -> SharedBottom:
    """Shared-Bottom from its config.

    Example::

        build_shared_bottom(SharedBottomConfig(type="shared_bottom"), 32, ["click", "conversion"])
    """
    return SharedBottom(
        in_features,
        task_names,
        bottom_hidden=list(config.bottom_hidden),
        tower_hidden=list(config.tower_hidden),
        **_mlp_kwargs(config.mlp),
    )


def build_single_task(config: SingleTaskConfig, in_features: int, task_names: Sequence[str]) -> SingleTask:
    """Single-task baseline from its config.

    Example::

        build_single_task(SingleTaskConfig(type="single_task", hidden=[64]), 32, ["income"])
    """
    return SingleTask(
        in_features,
        task_names,
        hidden=list(config.hidden),
        tower_hidden=list(config.tower_hidden),
        **_mlp_kwargs(config.mlp),
    )


def build_dtn(
    config: DTNConfig, in_features: int, task_names: Sequence[str], cross: Optional[CrossShape] = None
) -> DTN:
    """DTN from its config; raises ``ValueError`` if ``dependencies`` names an unknown task, or if
    ``memonet`` is a method and ``cross`` (the codebook layout) is missing.

    Example::

        build_dtn(DTNConfig(type="dtn", dependencies={"conversion": "click"}), 32, ["click", "conversion"])
    """
    mlp_kw = _mlp_kwargs(config.mlp)
    options: Dict[str, Dict[str, Any]] = {
        "gdcn": {"num_layers": config.gdcn_layers, "rank": config.gdcn_rank},
        "masknet": {
            "num_blocks": config.masknet_blocks,
            "block_width": config.masknet_block_width,
            "hidden": list(config.masknet_hidden),
            "mask_width": config.masknet_mask_width,
            **mlp_kw,
        },
        "dcnv2": {"num_layers": config.dcn_layers},
        "mlp": {"hidden": list(config.interaction_mlp_hidden), **mlp_kw},
    }
    return DTN(
        in_features,
        task_names,
        methods=list(config.methods),
        module_width=config.module_width,
        instances_per_method=config.instances_per_method,
        method_options=options,
        gate_selector=config.gate_selector,
        dependencies=dict(config.dependencies),
        tsn_detach=config.tsn_detach,
        combine=config.combine,
        tower_hidden=list(config.tower_hidden),
        **mlp_kw,
        cross=cross,
    )


# model.type -> builder(config, in_features, task_names); new model types register here.
NETWORK_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "ple": build_ple,
    "cgc": build_ple,
    "mmoe": build_mmoe,
    "shared_bottom": build_shared_bottom,
    "single_task": build_single_task,
    "dtn": build_dtn,
}


def build_network(
    config: ModelConfig, in_features: int, task_names: List[str], cross: Optional[CrossShape] = None
) -> nn.Module:
    """The dense multi-task network for ``config.type``: ``[B, in_features] -> {task: logit [B]}``
    (networks that :func:`reads_cross` also take the codebook vectors, laid out as ``cross``).

    Example::

        net = build_network(PLEConfig(type="ple"), in_features=40, task_names=["click", "cvr"])
    """
    builder = NETWORK_BUILDERS.get(config.type)
    if builder is None:
        raise ValueError(f"unknown model.type {config.type!r}; known: {sorted(NETWORK_BUILDERS)}")
    if reads_cross(config) != (cross is not None):
        raise ValueError(
            "the cross codebook (data.cross) is read only by model.type dtn with the memonet method: "
            + ("set data.cross" if cross is None else f"remove data.cross for model.type {config.type!r}")
        )
    return (
        builder(config, in_features, task_names, cross=cross)
        if cross is not None
        else builder(config, in_features, task_names)
    )


# tables[].data_type -> TorchRec's table precision (weights and fused optimizer update).
TABLE_DATA_TYPES: Dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16}


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
