"""Plan an experiment's tables onto a topology: the model built on the meta device, the fast
planner or TorchRec's default one, the same topology, constraints and storage reservation.

The one planning path: ``towerrec plan`` calls :func:`plan_config` for the topologies it is
given, the trainer (``trainer.sharding.plan_sharding``) on rank 0 for the job's own topology.

Example::

    result = plan_config(config, parse_topologies("8x8xA100-80GB")[0], planner="fast")
    result.fits, result.rating_ms, result.sharding_plan
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.perf_models import NoopPerfModel
from torchrec.distributed.planner.planners import to_sharding_plan
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    PlannerError,
    ShardingOption,
    Storage,
    Topology,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from towerrec.trainer.config import ExperimentConfig, SparseOptimizerConfig, replica_update_fails
from towerrec.trainer.model import build_train_module
from towerrec.trainer.optimizers import apply_sparse_optimizer
from towerrec.trainer.planning import torchrec_compat as compat
from towerrec.trainer.planning.enumeration import TooLarge, enumerate_options, largest_device
from towerrec.trainer.planning.plan_file import CPU_SHARDING_TYPES
from towerrec.trainer.planning.search import DEFAULT_TIME_BUDGET_S, NoPlanError, fast_plan
from towerrec.trainer.planning.topology import GB, TopologySpec

logger = logging.getLogger(__name__)

PlannerName = Literal["fast", "torchrec"]
CPU_COMPUTE_KERNELS = ("dense", "fused")  # host-memory (UVM) kernels need CUDA
ALL_SHARDING_TYPES = tuple(t.value for t in ShardingType)


def sharders() -> list[ModuleSharder[nn.Module]]:
    """The sharders every plan is made for and ``DistributedModelParallel`` shards with."""
    # The fused optimizer comes from apply_optimizer_in_backward on the tables' parameters.
    return [EmbeddingBagCollectionSharder()]


def table_constraints(
    config: ExperimentConfig, compute_device: str, sparse_optimizer: str | None = None
) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints: the config's, narrowed to what the device can run and, for
    an fp16 table under an Adagrad optimizer, to sharded placements (see
    :func:`~towerrec.trainer.config.replica_update_fails`).

    Example::

        table_constraints(config, "cpu")["user"].sharding_types   # ["table_wise", ...]

    Raises:
        ValueError: a table constrained to sharding types that ``compute_device`` cannot run.
    """
    optimizer = sparse_optimizer or config.training.sparse_optimizer.type
    constraints: dict[str, ParameterConstraints] = {}
    for table in config.data.tables:
        wanted = config.sharding.constraints.get(table.name)
        types = list(wanted.sharding_types) if wanted and wanted.sharding_types else None
        if replica_update_fails(table.data_type, optimizer):
            types = [t for t in (types or ALL_SHARDING_TYPES) if t != ShardingType.DATA_PARALLEL.value]
            if not types:  # only reachable with a topology's own sparse_optimizer
                raise ValueError(
                    f"sharding.constraints.{table.name}.sharding_types: [data_parallel] only, but table "
                    f"{table.name!r} is fp16 and {optimizer} cannot update an fp16 replica; allow a "
                    "sharded type or set its data_type: fp32"
                )
        if compute_device == "cpu":
            allowed = [t for t in (types or CPU_SHARDING_TYPES) if t in CPU_SHARDING_TYPES]
            if not allowed:
                raise ValueError(
                    f"sharding.constraints.{table.name}.sharding_types: {types} cannot run on CPU; "
                    f"CPU supports {list(CPU_SHARDING_TYPES)}"
                )
            types = allowed
        num_features = len(config.data.table_features(table.name))
        pooling = wanted.pooling_factor if wanted and wanted.pooling_factor else 1.0
        kwargs: dict[str, Any] = {"sharding_types": types, "pooling_factors": [pooling] * num_features}
        if wanted and wanted.compute_kernels:
            kernels = list(wanted.compute_kernels)
            if compute_device == "cpu":
                kernels = [k for k in kernels if k in CPU_COMPUTE_KERNELS]
                if not kernels:
                    raise ValueError(
                        f"sharding.constraints.{table.name}.compute_kernels: {wanted.compute_kernels} "
                        f"cannot run on CPU; CPU supports {list(CPU_COMPUTE_KERNELS)}"
                    )
            kwargs["compute_kernels"] = kernels
        if wanted and wanted.min_partition:
            kwargs["min_partition"] = wanted.min_partition
        constraints[table.name] = ParameterConstraints(**kwargs)
    return constraints


class PlanningError(ValueError):
    """The config cannot be planned for this topology as asked (e.g. a constraint the device
    cannot run); the message names the key."""


class TableTooLargeError(PlanningError):
    """A table that fits on no device, whatever its sharding."""


@dataclass
class PlanResult:
    """One planning run: the placement (or why there is none) and what it was made from."""

    spec: TopologySpec  # resolved: batch size, reserve and optimizer filled in
    planner: PlannerName
    fits: bool
    error: str | None
    topology: Topology
    storage_constraint: Topology | None  # capacities after the storage reservation
    reservation: dict[str, Storage | None]  # per device: dense, kjt
    constraints: dict[str, ParameterConstraints]
    best_plan: list[ShardingOption] | None
    sharding_plan: ShardingPlan | None
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    too_large: list[TooLarge] = field(default_factory=list)

    @property
    def rating_ms(self) -> float | None:
        """TorchRec's ``NoopPerfModel`` rating: the slowest rank's estimated time (the default
        planner's objective)."""
        if not self.best_plan:
            return None
        return NoopPerfModel(self.topology).rate(self.best_plan)


def build_module(config: ExperimentConfig, sparse_optimizer: str) -> torch.nn.Module:
    """The real train module on the meta device, with the sparse optimizer attached to the
    tables (its state then counts in TorchRec's storage estimates)."""
    module = build_train_module(config, torch.device("meta"))
    apply_sparse_optimizer(module, SparseOptimizerConfig(type=sparse_optimizer))  # type: ignore[arg-type]
    return module


def plan_config(
    config: ExperimentConfig,
    spec: TopologySpec,
    planner: PlannerName = "fast",
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    torchrec_timeout_s: int | None = None,
    module: torch.nn.Module | None = None,
) -> PlanResult:
    """Plan ``config``'s tables for ``spec``.

    A placement that does not fit gives ``fits=False`` and ``error``; a table that fits on no
    device raises :class:`TableTooLargeError`.

    Raises:
        PlanningError: a constraint the topology's device cannot run (names the key).
        TableTooLargeError: naming the table, its bytes with optimizer state, the largest device
            and the remedies.
    """
    start = time.perf_counter()
    spec = spec.resolved(
        batch_size=config.training.batch_size,
        storage_reserve=config.sharding.storage_reserve,
        sparse_optimizer=config.training.sparse_optimizer.type,
    )
    assert spec.batch_size is not None and spec.storage_reserve is not None and spec.sparse_optimizer
    try:
        constraints = table_constraints(config, spec.device, spec.sparse_optimizer)
    except ValueError as e:
        raise PlanningError(str(e)) from None
    module = module if module is not None else build_module(config, spec.sparse_optimizer)
    topology = spec.to_torchrec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchRec's note on this reservation
        reservation = HeuristicalStorageReservation(percentage=spec.storage_reserve)
    base = dict(
        spec=spec,
        planner=planner,
        topology=topology,
        constraints=constraints,
    )
    try:
        storage_constraint = reservation.reserve(
            topology=topology,
            batch_size=spec.batch_size,
            module=module,
            sharders=sharders(),
            constraints=constraints,
        )
    except PlannerError as e:
        return PlanResult(
            **base,
            fits=False,
            error=f"the storage reserve leaves no device memory for the tables: {e}",
            storage_constraint=None,
            reservation={},
            best_plan=None,
            sharding_plan=None,
            seconds=time.perf_counter() - start,
        )
    reserved = compat.reserved_storage(reservation)
    base.update(storage_constraint=storage_constraint, reservation=reserved)

    tables, options, enumeration, too_large = enumerate_options(
        module,
        sharders(),
        topology,
        storage_constraint,
        spec.batch_size,
        constraints,
        estimate_perf=planner == "fast",
    )
    if too_large:
        raise TableTooLargeError(too_large_message(too_large, spec, storage_constraint, topology))

    stats: dict[str, Any] = {"tables": len(tables)}
    if planner == "fast":
        try:
            result = fast_plan(tables, options, storage_constraint, enumeration, time_budget_s)
        except NoPlanError:  # second pass: every compute kernel (e.g. fused_uvm)
            tables, options, enumeration, _ = enumerate_options(
                module,
                sharders(),
                topology,
                storage_constraint,
                spec.batch_size,
                constraints,
                all_kernels=True,
            )
            try:
                result = fast_plan(tables, options, storage_constraint, enumeration, time_budget_s)
            except NoPlanError as e:
                return PlanResult(
                    **base,
                    fits=False,
                    error=str(e),
                    best_plan=None,
                    sharding_plan=None,
                    seconds=time.perf_counter() - start,
                    stats={**stats, "enumeration": vars(enumeration)},
                )
        best_plan = result.plan
        stats.update(enumeration=vars(result.enumeration), search=vars(result.search))
    else:
        torchrec = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=spec.batch_size,
            constraints=constraints,
            storage_reservation=_quiet_reservation(spec.storage_reserve),
            stats=NoopEmbeddingStats(),
            debug=False,
            timeout_seconds=torchrec_timeout_s,
        )
        try:
            torchrec.plan(module, sharders())
        except PlannerError as e:
            return PlanResult(
                **base,
                fits=False,
                error=_first_lines(str(e)),
                best_plan=None,
                sharding_plan=None,
                seconds=time.perf_counter() - start,
                stats={**stats, **compat.planner_counts(torchrec)},
            )
        best_plan = compat.planner_best_plan(torchrec)
        stats.update(compat.planner_counts(torchrec))
    assert best_plan is not None
    return PlanResult(
        **base,
        fits=True,
        error=None,
        best_plan=best_plan,
        sharding_plan=to_sharding_plan(best_plan, topology),
        seconds=time.perf_counter() - start,
        stats=stats,
    )


def failed_result(
    config: ExperimentConfig, spec: TopologySpec, planner: PlannerName, error: str, seconds: float
) -> PlanResult:
    """A result that records why there is no plan (e.g. a table too large for any device)."""
    spec = spec.resolved(
        batch_size=config.training.batch_size,
        storage_reserve=config.sharding.storage_reserve,
        sparse_optimizer=config.training.sparse_optimizer.type,
    )
    return PlanResult(
        spec=spec,
        planner=planner,
        fits=False,
        error=error,
        topology=spec.to_torchrec(),
        storage_constraint=None,
        reservation={},
        constraints={},
        best_plan=None,
        sharding_plan=None,
        seconds=seconds,
    )


def _quiet_reservation(percentage: float) -> HeuristicalStorageReservation:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return HeuristicalStorageReservation(percentage=percentage)


def _first_lines(text: str, n: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[:n])


def cpu_note(spec: TopologySpec) -> str | None:
    if spec.device != "cpu":
        return None
    return (
        "CPU topology: TorchRec runs only " + ", ".join(CPU_SHARDING_TYPES) + " on CPU (gloo), "
        "with the fused (or, for data-parallel, dense) kernel; row-wise and table-row-wise "
        "sharding and host-memory caching need CUDA, so they were not offered. TorchRec applies "
        "storage_reserve to device (HBM) memory only: on CPU only its dense-parameter and input "
        "reservations are kept free."
    )


def too_large_message(
    too_large: list[TooLarge], spec: TopologySpec, storage_constraint: Topology, topology: Topology
) -> str:
    """One message: each table, its bytes with optimizer state, the largest device, remedies."""
    largest = largest_device(storage_constraint)
    raw = largest_device(topology)
    device_tier = "HBM" if spec.device == "cuda" else "host memory"
    cap_now = largest.hbm if spec.device == "cuda" else largest.ddr
    cap_raw = raw.hbm if spec.device == "cuda" else raw.ddr
    lines = []
    for item in too_large:
        t = item.table
        rows, dim = t.param.shape
        weights = rows * dim * t.param.element_size()
        state = t.bytes_with_optimizer - weights
        shard = item.smallest_shard
        shard_mem = shard.hbm if spec.device == "cuda" else shard.ddr
        lines.append(
            f"table {t.name!r} ({rows:,} x {dim}) fits on no device: {_gb(t.bytes_with_optimizer)} with "
            f"its {spec.sparse_optimizer} state ({_gb(weights)} weights + {_gb(state)} optimizer); its "
            f"smallest sharding ({item.smallest_option}) needs {_gb(shard_mem)} of {device_tier} on one "
            f"device"
            + (f" and {_gb(shard.ddr)} of host memory" if spec.device == "cuda" and shard.ddr else "")
        )
    per_device_host = f", {_gb(largest.ddr)} of host memory" if spec.device == "cuda" else ""
    lines.append(
        f"largest device: {_gb(cap_now)} of {device_tier} for embeddings ({_gb(cap_raw)} less the "
        f"{spec.storage_reserve:.0%} reserve and dense/input buffers){per_device_host}; "
        f"{spec.world_size} devices"
    )
    name = too_large[0].table.name
    remedies = [
        "more devices or more memory per device"
        + (" (row-wise shards a table over every device)" if spec.device == "cuda" else ""),
        f"column-wise sharding into narrower shards: sharding.constraints.{name}: "
        "{sharding_types: [column_wise], min_partition: 32}",
        f"a smaller embedding_dim (data.tables[{name}].embedding_dim) or fewer rows (id_mode: hash)",
        "host-memory caching (compute kernel fused_uvm_caching: the table in host memory, a cache "
        "in HBM)" + ("; CUDA only" if spec.device == "cpu" else ""),
    ]
    if spec.sparse_optimizer == "adagrad":
        remedies.append("sparse optimizer rowwise_adagrad (one float per row instead of per weight)")
    return "\n".join(lines) + "\nremedies: " + "; ".join(remedies)


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB" if n >= GB / 10 else f"{n / 1024**2:,.1f} MB"
