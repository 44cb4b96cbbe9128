"""The optimizers: the tables' fused one, the data-parallel tables' one and the dense network's.

One home for the optimizer maps (which torch/TorchRec class a config names, and what fbgemm calls
its state), used by the trainer, the planner and checkpoints.

Example::

    apply_sparse_optimizer(module, config.training.sparse_optimizer)   # before sharding
    dense = clip_gradients(dense_optimizer(dmp, config.training.dense_optimizer), max_norm=1.0)
"""

from __future__ import annotations

from typing import Any, Collection

import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from towerrec.trainer.config import DenseOptimizerConfig, SparseOptimizerConfig
from towerrec.trainer.model import TrainModule

# The data-parallel tables' torch optimizers name their state otherwise than fbgemm; checkpoints
# use fbgemm's names (trainer/checkpoint/sparse_state.py).
TORCH_STATE_NAMES: dict[str, dict[str, str]] = {
    "rowwise_adagrad": {"sum": "momentum1"},
    "adagrad": {"sum": "momentum1"},
    "sgd": {},
}


def _sparse_optimizer_class(cfg: SparseOptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    classes: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
        "rowwise_adagrad": (RowWiseAdagrad, {"lr": cfg.lr, "eps": cfg.eps}),
        "adagrad": (torch.optim.Adagrad, {"lr": cfg.lr, "eps": cfg.eps}),
        "sgd": (torch.optim.SGD, {"lr": cfg.lr}),
    }
    return classes[cfg.type]


def apply_sparse_optimizer(module: TrainModule, cfg: SparseOptimizerConfig) -> None:
    """Fuse the table optimizer into the backward pass (TorchRec's fused TBE update)."""
    optimizer_class, kwargs = _sparse_optimizer_class(cfg)
    apply_optimizer_in_backward(optimizer_class, module.model.ebc.parameters(), kwargs)


def replicated_tables(plan: dict[str, dict[str, Any]]) -> list[str]:
    """Parameter keys of the data-parallel tables in ``plan_to_dict(plan)``."""
    return [
        f"{module_path}.embedding_bags.{table}.weight"
        for module_path, tables in plan.items()
        for table, placement in tables.items()
        if placement["sharding_type"] == "data_parallel"
    ]


def replicated_table_optimizer(
    model: torch.nn.Module, keys: list[str], cfg: SparseOptimizerConfig
) -> KeyedOptimizerWrapper | None:
    """The sparse optimizer for the data-parallel tables (None without any).

    TorchRec runs those tables with its dense kernel, which ignores the optimizer fused by
    ``apply_optimizer_in_backward``: left alone they would be updated by the dense optimizer. Here
    they get the configured table optimizer, stepped after backward on the DDP-averaged gradient
    (TorchRec divides a sharded table's gradient by the world size too), so a table learns the
    same way, and has the same optimizer state, whatever its placement.
    """
    if not keys:
        return None
    params = dict(model.named_parameters())
    optimizer_class, kwargs = _sparse_optimizer_class(cfg)
    return KeyedOptimizerWrapper({k: params[k] for k in keys}, lambda p: optimizer_class(p, **kwargs))


def dense_optimizer(
    model: torch.nn.Module, cfg: DenseOptimizerConfig, exclude: Collection[str] = ()
) -> KeyedOptimizerWrapper:
    """The dense network's optimizer: every parameter without a fused optimizer, but ``exclude``."""
    params = {k: p for k, p in in_backward_optimizer_filter(model.named_parameters()) if k not in exclude}
    # Adam's fused kernel (CPU and CUDA): one pass over each parameter instead of about ten ops; on
    # CPU the step of the Census PLE's 30 tensors took 0.32 ms fused and 0.99 ms as torch's
    # default for CPU, DTN's 66 tensors 1.9 and 12.0 ms (2 threads).
    factories = {
        "adam": lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True),
        "adamw": lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        "sgd": lambda p: torch.optim.SGD(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
    }
    return KeyedOptimizerWrapper(params, factories[cfg.type])


def clip_gradients(optimizer: KeyedOptimizer, max_norm: float | None) -> KeyedOptimizer:
    """``optimizer`` clipping its parameters' gradients to global L2 norm ``max_norm`` inside its
    ``step`` (TorchRec's GradientClippingOptimizer; ``torch.nn.utils.clip_grad_norm_``, no host
    sync); unchanged when ``max_norm`` is None.

    Only for optimizers stepped after backward on whole gradients: the dense network's (DDP has
    all-reduced them, so every rank computes the same norm) and the data-parallel tables'. The
    sharded tables' fused update happens inside backward and cannot be clipped.

    Example::

        dense = clip_gradients(dense_optimizer(dmp, cfg), max_norm=1.0)
    """
    if max_norm is None:
        return optimizer
    return GradientClippingOptimizer(optimizer, clipping=GradientClipping.NORM, max_gradient=max_norm)
