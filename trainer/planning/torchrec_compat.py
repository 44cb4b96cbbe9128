"""The TorchRec internals the planner needs, in one place.

The fast planner and the report reuse TorchRec's own rules and estimates so their numbers equal
the default planner's; some of those rules are private in TorchRec (``_``-prefixed functions
and attributes, a tuple read by position). Every such use goes through a function here, named
for what it gives, so a TorchRec upgrade breaks one module, and
``tests/trainer/test_torchrec_compat.py`` says which function to update: it checks each
internal still exists with the signature used here and still behaves so on a tiny input.

Written against TorchRec 1.8.

Example::

    fields = param_constraints(constraints, "user")
    fields.min_partition, fields.device_group       # by name, not by tuple position
    critical_path_ms(result.best_plan)               # TorchRec's estimated step
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator, _extract_constraints_for_param
from torchrec.distributed.planner.shard_estimators import _calculate_shard_io_sizes, _get_optimizer_multipler
from torchrec.distributed.planner.stats import _calculate_critical_path
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption, Storage

TORCHREC_VERSION = "1.8"  # the version these wrappers were written against


class ParamConstraintFields(NamedTuple):
    """What TorchRec's enumerator reads from a table's ``ParameterConstraints`` (its defaults
    when the table has none), in the order of ``_extract_constraints_for_param``'s tuple."""

    input_lengths: list[float]  # pooling factor per feature
    min_partition: int | None  # column-wise shard width
    cache_params: Any
    enforce_hbm: bool | None
    stochastic_rounding: bool | None
    bounds_check_mode: Any
    feature_names: list[str] | None
    output_dtype: Any
    device_group: str | None
    key_value_params: Any


def param_constraints(
    constraints: dict[str, ParameterConstraints] | None, name: str
) -> ParamConstraintFields:
    """``enumerators._extract_constraints_for_param``: the constraint fields TorchRec's
    enumerator builds a table's ``ShardingOption`` from, with its defaults (pooling factor 1.0)
    and deep copies, named instead of read by tuple position.

    Example::

        param_constraints({"user": ParameterConstraints(min_partition=32)}, "user").min_partition  # 32
    """
    return ParamConstraintFields(*_extract_constraints_for_param(constraints, name))


def allowed_sharding_types(
    enumerator: EmbeddingEnumerator, name: str, sharding_types: list[str], sharder_key: str
) -> list[str]:
    """``EmbeddingEnumerator._filter_sharding_types``: the sharder's sharding types less those
    the table's constraints exclude, so the fast planner offers what the default planner does.

    Example::

        allowed_sharding_types(enumerator, "user", ["table_wise", "row_wise"], "EmbeddingBagCollection")
    """
    return enumerator._filter_sharding_types(name, sharding_types, sharder_key)


def allowed_compute_kernels(
    enumerator: EmbeddingEnumerator, name: str, compute_kernels: list[str], sharding_type: str
) -> list[str]:
    """``EmbeddingEnumerator._filter_compute_kernels``: the sharder's kernels for a sharding type
    less those the constraints exclude or TorchRec guards (e.g. key-value kernels).

    Example::

        allowed_compute_kernels(enumerator, "user", ["fused", "dense"], "table_wise")  # ["fused"]
    """
    return enumerator._filter_compute_kernels(name, compute_kernels, sharding_type)


def num_buckets(enumerator: EmbeddingEnumerator, name: str, module: torch.nn.Module) -> int | None:
    """``EmbeddingEnumerator._get_num_buckets``: the bucket count of a managed-collision table
    (its row-wise shards follow bucket boundaries), None for a plain table.

    Example::

        num_buckets(enumerator, "user", ebc)  # None
    """
    return enumerator._get_num_buckets(name, module)


def optimizer_class(param: Any) -> type | None:
    """The in-backward optimizer attached to a table: the ``_optimizer_classes`` attribute that
    torch's ``_apply_optimizer_in_backward`` sets and TorchRec's storage estimator reads; None
    without one.

    Example::

        optimizer_class(ebc.embedding_bags["user"].weight)  # RowWiseAdagrad
    """
    return getattr(param, "_optimizer_classes", [None])[0]


def optimizer_multiplier(param: Any) -> float:
    """``shard_estimators._get_optimizer_multipler``: optimizer state per weight byte as TorchRec's
    storage estimator counts it (row-wise Adagrad ``1/dim``, Adam 2, SGD 0, others 1).

    Example::

        optimizer_multiplier(weight)  # 1/64 for a dim-64 table under rowwise_adagrad
    """
    return float(_get_optimizer_multipler(optimizer_class(param), param.shape))


def shard_io_sizes(
    *,
    sharding_type: str,
    batch_sizes: list[int],
    world_size: int,
    local_world_size: int,
    input_lengths: list[float],
    emb_dim: int,
    shard_sizes: list[list[int]],
    input_data_type_size: float,
    output_data_type_size: float,
    num_poolings: list[float],
    is_pooled: bool,
) -> tuple[list[int], list[int]]:
    """``shard_estimators._calculate_shard_io_sizes``: input (ids) and output (embeddings) bytes
    per shard and step, as TorchRec's stats count them for the report.

    Example::

        inputs, outputs = shard_io_sizes(sharding_type="table_wise", batch_sizes=[512], ...)
    """
    return _calculate_shard_io_sizes(
        sharding_type=sharding_type,
        batch_sizes=batch_sizes,
        world_size=world_size,
        local_world_size=local_world_size,
        input_lengths=input_lengths,
        emb_dim=emb_dim,
        shard_sizes=shard_sizes,
        input_data_type_size=input_data_type_size,
        output_data_type_size=output_data_type_size,
        num_poolings=num_poolings,
        is_pooled=is_pooled,
    )


def critical_path_ms(plan: list[ShardingOption]) -> float:
    """``stats._calculate_critical_path(plan).total()``: TorchRec's estimated step, ms (ranks
    synchronise after each communication group and compute direction).

    Example::

        critical_path_ms(result.best_plan)  # 3.2
    """
    return float(_calculate_critical_path(plan).total())


def reserved_storage(reservation: HeuristicalStorageReservation) -> dict[str, Storage | None]:
    """What ``HeuristicalStorageReservation.reserve`` kept per device for dense parameters
    (``_dense_storage``) and input batches (``_kjt_storage``); None before ``reserve``.

    Example::

        reserved_storage(reservation)  # {"dense": Storage(...), "kjt": Storage(...)}
    """
    return {"dense": reservation._dense_storage, "kjt": reservation._kjt_storage}


def planner_best_plan(planner: EmbeddingShardingPlanner) -> list[ShardingOption] | None:
    """The default planner's chosen ``ShardingOption`` list (``_best_plan``) after ``plan``:
    ``plan`` returns only the ``ShardingPlan``, without the estimates the report needs.

    Example::

        planner.plan(module, sharders); planner_best_plan(planner)
    """
    return planner._best_plan


def planner_counts(planner: EmbeddingShardingPlanner) -> dict[str, int]:
    """Proposals tried and plans that fit (``_num_proposals``, ``_num_plans``) in the default
    planner's last ``plan`` call.

    Example::

        planner_counts(planner)  # {"proposals": 120, "plans": 98}
    """
    return {"proposals": planner._num_proposals, "plans": planner._num_plans}
