"""plan.json: a plan ``towerrec plan`` writes and the trainer obeys (``sharding.plan_file``).

Format (``towerrec-shard-plan/1``)::

    {"format": "towerrec-shard-plan/1",
     "world_size": 16, "local_world_size": 8, "compute_device": "cuda",
     "topology": {...}, "planner": "fast", "config": "configs/billion_scale.yaml",
     "plan": {"model.ebc": {"user": {"sharding_type": "row_wise", "compute_kernel": "fused",
                                     "ranks": [0, 1, ...],
                                     "shards": [{"offsets": [0, 0], "sizes": [62500000, 128],
                                                 "placement": "rank:0/cuda:0"}, ...]}}}}

``plan`` has the form of a run's ``sharding_plan.json`` (``plan_to_dict`` below), so a
run that loads the file writes the same placement back; a bare ``sharding_plan.json`` loads too.

Example::

    plan = load_plan_file("docs/plans/billion-2x8/plan.json", module, world_size=16,
                          local_world_size=8, device_type="cuda")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch.nn as nn
from torchrec.distributed.sharding_plan import placement
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
)
from towerrec.trainer.planning.topology import TopologySpec

logger = logging.getLogger(__name__)

FORMAT = "towerrec-shard-plan/1"

# What TorchRec can run on CPU (gloo): row-wise variants need CUDA (NCCL).
CPU_SHARDING_TYPES = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
)


class PlanFileError(ValueError):
    """The plan file does not match the job; the message names the file and the mismatch."""


def plan_to_dict(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """``{module path: {table: {sharding_type, compute_kernel, ranks, shards}}}``, JSON-ready."""
    out: dict[str, dict[str, Any]] = {}
    for module_path, module_plan in plan.plan.items():
        tables: dict[str, Any] = {}
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if ps.sharding_spec is not None:
                for shard in ps.sharding_spec.shards:
                    shards.append(
                        {
                            "offsets": list(shard.shard_offsets),
                            "sizes": list(shard.shard_sizes),
                            "placement": str(shard.placement),
                        }
                    )
            tables[table] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else None,
                "shards": shards,
            }
        out[module_path] = tables
    return out


def write_plan_file(
    path: Path, plan: ShardingPlan, spec: TopologySpec, planner: str, meta: dict[str, Any]
) -> None:
    """``plan``, made by ``planner`` for ``spec``, with ``meta`` (config name, tables, ...)."""
    payload = {
        "format": FORMAT,
        "world_size": spec.world_size,
        "local_world_size": spec.devices_per_node,
        "compute_device": spec.device,
        "batch_size_per_rank": spec.batch_size,
        "planner": planner,
        **meta,
        "topology": spec.model_dump(mode="json"),
        "plan": plan_to_dict(plan),
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")


def read_plan_file(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(metadata, plan dict); a bare ``sharding_plan.json`` has no metadata."""
    path = Path(path)
    if not path.is_file():
        raise PlanFileError(f"sharding.plan_file: {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanFileError(f"sharding.plan_file {path}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise PlanFileError(f"sharding.plan_file {path}: expected a JSON object")
    if "format" in raw:
        if raw["format"] != FORMAT:
            raise PlanFileError(
                f"sharding.plan_file {path}: format {raw['format']!r}; this trainer reads {FORMAT!r}"
            )
        meta = {k: v for k, v in raw.items() if k != "plan"}
        return meta, raw.get("plan") or {}
    return {}, raw


def load_plan_file(
    path: str | Path, module: nn.Module, world_size: int, local_world_size: int, device_type: str
) -> ShardingPlan:
    """The ``ShardingPlan`` in ``path``, checked against the model's tables and the job.

    Raises:
        PlanFileError: naming the file and what does not match (world size, device, a missing
            or unknown table, a shape, a rank, a sharding type the device cannot run).
    """
    where = f"sharding.plan_file {path}"
    meta, plan = read_plan_file(path)
    if meta:
        if meta.get("world_size") != world_size:
            raise PlanFileError(
                f"{where}: made for world size {meta.get('world_size')}; this job has {world_size} ranks "
                f"(plan again with towerrec plan --topology for {world_size} ranks)"
            )
        if meta.get("compute_device") != device_type:
            raise PlanFileError(
                f"{where}: made for {meta.get('compute_device')} devices; this job runs on {device_type}"
            )
    sharding_plan = plan_from_dict(plan, module, world_size, local_world_size, device_type, where)
    logger.info(
        "sharding plan from %s (%s planner, %s)",
        path,
        meta.get("planner", "?"),
        (meta.get("topology") or {}).get("name") or f"world size {meta.get('world_size', world_size)}",
    )
    return sharding_plan


def plan_from_dict(
    plan: dict[str, dict[str, Any]],
    module: nn.Module,
    world_size: int,
    local_world_size: int,
    device_type: str,
    where: str = "sharding plan",
) -> ShardingPlan:
    """The ``ShardingPlan`` of a :func:`plan_to_dict` form, checked against the model's tables
    and the job (a plan file's, or the one rank 0 planned and broadcast).

    Example::

        plan = plan_from_dict(plan_to_dict(planned), module, 2, 2, "cpu")

    Raises:
        PlanFileError: ``where`` and what does not match (a missing or unknown table, a shape,
            a rank, a sharding type the device cannot run).
    """
    tables = _model_tables(module)
    planned = {(m, t) for m, ts in plan.items() for t in ts}
    for module_path, names in tables.items():
        for name in names:
            if (module_path, name) not in planned:
                raise PlanFileError(
                    f"{where}: table {name!r} of the model ({module_path}) is not in the plan; was it "
                    "made for another config? plan again with towerrec plan"
                )
    out: dict[str, EmbeddingModuleShardingPlan] = {}
    for module_path, entries in plan.items():
        if module_path not in tables:
            raise PlanFileError(
                f"{where}: module {module_path!r} is not an embedding collection of the model"
            )
        module_plan = EmbeddingModuleShardingPlan()
        for name, entry in entries.items():
            if name not in tables[module_path]:
                raise PlanFileError(
                    f"{where}: table {name!r} is not in the model; its tables: {sorted(tables[module_path])}"
                )
            shape = tables[module_path][name]
            module_plan[name] = _parameter_sharding(
                f"{where}: table {name!r}", entry, shape, world_size, local_world_size, device_type
            )
            if device_type == "cpu" and module_plan[name].sharding_type not in CPU_SHARDING_TYPES:
                raise PlanFileError(
                    f"{where}: table {name!r} is {module_plan[name].sharding_type}, which does not run on "
                    f"CPU; CPU runs {list(CPU_SHARDING_TYPES)}"
                )
        out[module_path] = module_plan
    return ShardingPlan(out)  # type: ignore[arg-type]


def _model_tables(module: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """{module path: {table: (rows, dim)}} for every embedding bag collection."""
    from torchrec import EmbeddingBagCollection

    tables: dict[str, dict[str, tuple[int, int]]] = {}
    for path, child in module.named_modules():
        if isinstance(child, EmbeddingBagCollection):
            tables[path] = {
                c.name: (c.num_embeddings, c.embedding_dim) for c in child.embedding_bag_configs()
            }
    return tables


def _parameter_sharding(
    where: str,
    entry: dict[str, Any],
    shape: tuple[int, int],
    world_size: int,
    local_size: int,
    device_type: str,
) -> ParameterSharding:
    try:
        sharding_type = ShardingType(entry["sharding_type"]).value
        compute_kernel = str(entry["compute_kernel"])
        ranks = [int(r) for r in entry["ranks"]]
        shards = entry.get("shards") or []
    except (KeyError, TypeError, ValueError) as e:
        raise PlanFileError(f"{where}: malformed entry ({type(e).__name__}: {e})") from None
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise PlanFileError(f"{where}: ranks {bad} are outside this job's {world_size} ranks")
    if sharding_type == ShardingType.DATA_PARALLEL.value:
        return ParameterSharding(sharding_type=sharding_type, compute_kernel=compute_kernel, ranks=ranks)
    if len(shards) != len(ranks):
        raise PlanFileError(f"{where}: {len(shards)} shards for {len(ranks)} ranks")
    metadata = []
    area = 0
    for shard, rank in zip(shards, ranks, strict=True):
        offsets, sizes = [int(x) for x in shard["offsets"]], [int(x) for x in shard["sizes"]]
        if any(o < 0 or o + s > limit for o, s, limit in zip(offsets, sizes, shape, strict=True)):
            raise PlanFileError(
                f"{where}: shard at {offsets} of size {sizes} is outside the table ({shape[0]} x {shape[1]})"
            )
        area += sizes[0] * sizes[1]
        metadata.append(
            ShardMetadata(
                shard_offsets=offsets, shard_sizes=sizes, placement=placement(device_type, rank, local_size)
            )
        )
    if area != shape[0] * shape[1]:
        raise PlanFileError(
            f"{where}: its shards cover {area:,} of the table's {shape[0]:,} x {shape[1]} = "
            f"{shape[0] * shape[1]:,} weights; was the plan made for another table size?"
        )
    return ParameterSharding(
        sharding_type=sharding_type,
        compute_kernel=compute_kernel,
        ranks=ranks,
        sharding_spec=EnumerableShardingSpec(metadata),
    )
