"""The job's sharding plan: planned once on rank 0 for the job's real topology, shared with
every rank (or read from ``sharding.plan_file``).

Rank 0 runs :func:`~towerrec.trainer.planning.planner.plan_config`, the path of ``towerrec
plan``, with ``sharding.planner`` (``fast`` by default, or ``torchrec``) on the model built on the
meta device, and broadcasts the plan as its JSON form; every rank rebuilds the same
``ShardingPlan`` from it. A config that fits no device fails on every rank with the planner's
message, before any table is allocated.

Example::

    plan = plan_sharding(module, config, env)
    write_json(run_dir / "sharding_plan.json", plan_to_dict(plan))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torchrec.distributed.types import ShardingPlan
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.distributed import DistEnv
from towerrec.trainer.planning.plan_file import load_plan_file, plan_from_dict, plan_to_dict
from towerrec.trainer.planning.planner import PlanningError, plan_config, sharders
from towerrec.trainer.planning.topology import GB, TopologySpec

__all__ = ["PlanningError", "host_memory_bytes", "job_topology", "plan_sharding", "sharders"]

logger = logging.getLogger(__name__)


def host_memory_bytes() -> int:
    """This host's memory: physical memory, or the cgroup's limit when lower (a container)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


def job_topology(world_size: int, local_world_size: int, device_type: str) -> TopologySpec:
    """The topology of this job as ``towerrec plan`` describes one: its ranks, and per rank the
    host's memory divided among the host's ranks (and the GPU's memory on CUDA).

    Example::

        job_topology(2, 2, "cpu").describe()   # 1 node(s) x 2 cpu ranks (2 ranks), 11.7 GB ...

    Raises:
        PlanningError: a world size that is not a whole number of equal nodes.
    """
    if world_size % local_world_size:
        raise PlanningError(
            f"world size {world_size} is not a multiple of the ranks per node ({local_world_size}); "
            "the planner needs nodes of equal size"
        )
    ddr_gb = round(host_memory_bytes() / local_world_size / GB, 1)
    fields: dict[str, Any] = dict(
        nodes=world_size // local_world_size,
        devices_per_node=local_world_size,
        device=device_type,
        ddr_gb=ddr_gb,
    )
    if device_type == "cuda":
        fields["hbm_gb"] = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB
    return TopologySpec(**fields)


def plan_sharding(module: nn.Module, config: ExperimentConfig, env: DistEnv) -> ShardingPlan:
    """The plan every rank shards ``module`` (built on the meta device, sparse optimizer applied)
    with: ``sharding.plan_file``'s when set, else the one rank 0 plans and broadcasts.

    Raises:
        PlanningError: on every rank, with the planner's message (a table that fits no device:
            its bytes with optimizer state, the largest device, the remedies).
        PlanFileError: a plan file that does not match the model or the job.
    """
    if config.sharding.plan_file:
        return load_plan_file(
            config.sharding.plan_file, module, env.world_size, env.local_world_size, env.device.type
        )
    planner = config.sharding.planner
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if env.is_main:
        try:
            payload[0] = _plan_on_this_rank(module, config, env)
        except Exception as e:  # noqa: BLE001 - sent to every rank, then raised on every rank
            failure = e
            payload[0] = {"error": str(e) if isinstance(e, PlanningError) else f"{type(e).__name__}: {e}"}
    # One broadcast on the gloo group: the other ranks wait here, and fail with rank 0's error.
    dist.broadcast_object_list(payload, src=0, group=env.cpu_group)
    shared = payload[0]
    if "error" in shared:
        raise PlanningError(f"sharding.planner {planner}: {shared['error']}") from failure
    if env.is_main:
        logger.info(
            "sharding plan: %s planner on rank 0 in %.2f s for %s; shared with %d ranks",
            planner,
            shared["seconds"],
            shared["topology"],
            env.world_size,
        )
    return plan_from_dict(
        shared["plan"],
        module,
        env.world_size,
        env.local_world_size,
        env.device.type,
        where=f"the {planner} planner's plan",
    )


def _plan_on_this_rank(module: nn.Module, config: ExperimentConfig, env: DistEnv) -> dict[str, Any]:
    """``{"plan", "seconds", "topology"}``, or ``{"error"}`` when no placement fits."""
    spec = job_topology(env.world_size, env.local_world_size, env.device.type)
    result = plan_config(config, spec, planner=config.sharding.planner, module=module)
    if not result.fits or result.sharding_plan is None:
        return {"error": f"no placement of the tables fits {spec.describe()}: {result.error}"}
    return {
        "plan": plan_to_dict(result.sharding_plan),
        "seconds": result.seconds,
        "topology": spec.describe(),
    }
