"""Sharding plans: TorchRec's planner on the real topology, config constraints, a JSON form.

Example::

    plan = plan_sharding(module, config, env)
    write_json(run_dir / "sharding_plan.json", plan_to_dict(plan))
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.distributed import DistEnv
from towerrec.trainer.planning.plan_file import CPU_SHARDING_TYPES, load_plan_file

CPU_COMPUTE_KERNELS = ("dense", "fused")  # host-memory (UVM) kernels need CUDA


def sharders() -> list[ModuleSharder[nn.Module]]:
    # The fused optimizer comes from apply_optimizer_in_backward on the tables' parameters.
    return [EmbeddingBagCollectionSharder()]


def table_constraints(config: ExperimentConfig, compute_device: str) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints: the config's, narrowed to what the device can run.

    Raises:
        ValueError: a table constrained to sharding types that ``compute_device`` cannot run.
    """
    constraints: dict[str, ParameterConstraints] = {}
    for table in config.data.tables:
        wanted = config.sharding.constraints.get(table.name)
        types = list(wanted.sharding_types) if wanted and wanted.sharding_types else None
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


def plan_sharding(module: nn.Module, config: ExperimentConfig, env: DistEnv) -> ShardingPlan:
    """Plan on rank 0 for the job's real topology and share the plan with every rank; with
    ``sharding.plan_file`` set, every rank loads that plan instead (checked against the job)."""
    if config.sharding.plan_file:

        return load_plan_file(
            config.sharding.plan_file, module, env.world_size, env.local_world_size, env.device.type
        )
    # Through TorchRec's factory (as it asks): default device capacities and bandwidths.
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=env.world_size, local_world_size=env.local_world_size),
        kernel_config=KernelConfig(compute_device=env.device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=config.training.batch_size,
        constraints=table_constraints(config, env.device.type),
        storage_reservation=HeuristicalStorageReservation(percentage=config.sharding.storage_reserve),
        debug=False,
    )
    return planner.collective_plan(module, sharders(), env.cpu_group)
