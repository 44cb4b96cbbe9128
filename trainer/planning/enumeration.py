"""The fast planner's options: per table, the sharding options TorchRec would offer, fewer of
them, estimated once per shape.

1. **Fewer options, by table size.** Compute kernels: ``fused`` (``dense`` for data-parallel);
   ``fused_uvm_caching`` (HBM cache, table in host memory) only for tables of at least
   ``CACHE_MIN_FRACTION`` of a device or when the tables need more than ``PRESSURE`` of the
   cluster's device memory; ``fused_uvm`` only in a second pass when nothing fits. After the
   estimates, per table: options whose largest shard fits no device are dropped; data-parallel
   stays only while its per-rank time is below the smallest per-shard time of the other options;
   an option is dropped when another is no slower (largest shard and sum of shards) and no
   larger (in total and per shard, unless the other's shards are small).
2. **Estimates once per shape.** TorchRec's perf and storage estimators run on one option per
   (table shape, features, optimizer, constraints) and per distinct shard size (a row-wise
   option on 64 ranks has at most two); tables and shards of the same shape share the result.
   The estimators are TorchRec's own (``EmbeddingPerfEstimatorFactory`` default estimator and
   ``EmbeddingStorageEstimator``), so the numbers equal the default planner's.

Example::

    tables, options, stats, too_large = enumerate_options(
        module, sharders(), topology, storage_constraint, batch_size=4096, constraints=constraints
    )
    options[tables[0].fqn][0].sharding_type   # the table's fastest option by largest shard
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator, get_partition_by_type
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    Shard,
    ShardingOption,
    Storage,
    Topology,
)
from torchrec.distributed.planner.utils import build_sharder_data_map, sharder_name
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets
from torchrec.distributed.types import ModuleSharder, ShardingType
from towerrec.trainer.planning import torchrec_compat as compat

CACHE_MIN_FRACTION = 0.05  # a table of >= 5% of a device may use the HBM-cache kernel
PRESSURE = 0.5  # ... and every table may when the tables need > 50% of all device memory
SMALL_SHARD_FRACTION = 0.1  # shards below 10% of a device are "small" for dominance

TYPE_ORDER = [  # TorchRec's order of sharding types: ties between options, start proposals
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.DATA_PARALLEL.value,
    ShardingType.GRID_SHARD.value,
]


@dataclass
class TableEntry:
    """One shardable table and what its options are built from."""

    name: str
    path: str
    module: nn.Module
    param: Any
    sharder_key: str
    kernels_by_type: dict[str, list[str]]
    constraints: compat.ParamConstraintFields
    num_buckets: int | None
    is_pooled: bool = True
    signature: tuple = ()
    bytes_with_optimizer: int = 0

    @property
    def fqn(self) -> str:
        return f"{self.path}.{self.name}"


@dataclass
class EnumerationStats:
    """What enumeration built and estimated, beside what TorchRec's enumerator would have."""

    tables: int = 0
    signatures: int = 0
    options_torchrec: int = 0  # what TorchRec's enumerator would build
    options_estimated: int = 0
    options_kept: int = 0
    shard_estimates: int = 0  # estimator calls (per distinct shard)
    shard_estimates_torchrec: int = 0
    seconds: float = 0.0


def collect_tables(
    module: nn.Module,
    sharders: list[ModuleSharder[nn.Module]],
    topology: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints] | None,
) -> list[TableEntry]:
    """The shardable tables with the sharding types and kernels TorchRec would offer them
    (its enumerator's own filters: device, constraints, guarded kernels)."""
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints)
    sharder_map = {sharder_name(s.module_type): s for s in sharders}
    device = topology.compute_device
    tables: list[TableEntry] = []
    queue: list[tuple[str, nn.Module]] = [("", module)]
    while queue:
        path, child = queue.pop(0)
        key = sharder_name(type(child))
        sharder = sharder_map.get(key)
        if sharder is None:
            for n, m in child.named_children():
                queue.append((f"{path}.{n}" if path else n, m))
            continue
        for name, param in sharder.shardable_parameters(child).items():
            fields = compat.param_constraints(constraints, name)
            if fields.device_group and fields.device_group != device:
                continue
            kernels_by_type: dict[str, list[str]] = {}
            for sharding_type in compat.allowed_sharding_types(
                enumerator, name, sharder.sharding_types(device), key
            ):
                kernels = compat.allowed_compute_kernels(
                    enumerator, name, sharder.compute_kernels(sharding_type, device), sharding_type
                )
                if kernels:
                    kernels_by_type[sharding_type] = kernels
            if not kernels_by_type:
                raise RuntimeError(
                    f"table {name!r}: no sharding type and compute kernel left on {device} after "
                    "the constraints"
                )
            tables.append(
                TableEntry(
                    name=name,
                    path=path,
                    module=child,
                    param=param,
                    sharder_key=key,
                    kernels_by_type=kernels_by_type,
                    constraints=fields,
                    num_buckets=compat.num_buckets(enumerator, name, child),
                    is_pooled=ShardingOption.module_pooled(child, path),
                )
            )
    return tables


def table_bytes(param: Any) -> int:
    """Weights plus optimizer state, as TorchRec's storage estimator counts the state."""
    weights = param.numel() * param.element_size()
    return int(weights * (1 + compat.optimizer_multiplier(param)))


def _signature(t: TableEntry, constraints: dict[str, ParameterConstraints] | None) -> tuple:
    c = constraints.get(t.name) if constraints else None
    constraint_part = (
        (
            tuple(c.num_poolings or ()),
            tuple(c.batch_sizes or ()),
            c.is_weighted,
            c.use_virtual_table,
            repr(c.key_value_params),
        )
        if c
        else None
    )

    def plain(x: Any) -> Any:
        if isinstance(x, list):
            return tuple(x)
        return x if x is None or isinstance(x, (int, float, bool, str)) else repr(x)

    # feature names do not change estimates
    fields = tuple(plain(x) for name, x in t.constraints._asdict().items() if name != "feature_names")
    return (
        t.path,
        t.is_pooled,
        tuple(t.param.shape),
        t.param.dtype,
        compat.optimizer_class(t.param),
        tuple(sorted((k, tuple(v)) for k, v in t.kernels_by_type.items())),
        fields,
        t.num_buckets,
        constraint_part,
    )


def _new_option(
    t: TableEntry, sharding_type: str, kernel: str, shards: list[Shard], batch_size: int
) -> ShardingOption:
    c = t.constraints
    return ShardingOption(
        name=t.name,
        tensor=t.param,
        module=(t.path, t.module),
        input_lengths=c.input_lengths,
        batch_size=batch_size,
        compute_kernel=kernel,
        sharding_type=sharding_type,
        partition_by=get_partition_by_type(sharding_type),
        shards=shards,
        cache_params=c.cache_params,
        enforce_hbm=c.enforce_hbm,
        stochastic_rounding=c.stochastic_rounding,
        bounds_check_mode=c.bounds_check_mode,
        is_pooled=t.is_pooled,
        feature_names=c.feature_names,
        output_dtype=c.output_dtype,
        key_value_params=c.key_value_params,
    )


def _candidate_kernels(
    t: TableEntry, kernels: list[str], device_cap: int, pressure: bool, all_kernels: bool
) -> list[str]:
    if all_kernels:
        return kernels
    keep = {EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value}
    if pressure or t.bytes_with_optimizer >= CACHE_MIN_FRACTION * device_cap:
        keep.add(EmbeddingComputeKernel.FUSED_UVM_CACHING.value)
    narrowed = [k for k in kernels if k in keep]
    return narrowed or kernels  # the user constrained to kernels we would skip: theirs win


@dataclass
class TooLarge:
    """A table none of whose options fits even an empty device."""

    table: TableEntry
    smallest_shard: Storage  # per device, in its smallest option
    smallest_option: str  # e.g. "row_wise/fused, 16 shards"


def enumerate_options(
    module: nn.Module,
    sharders: list[ModuleSharder[nn.Module]],
    topology: Topology,
    storage_constraint: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints] | None,
    *,
    narrow: bool = True,
    all_kernels: bool = False,
    estimate_perf: bool = True,
) -> tuple[list[TableEntry], dict[str, list[ShardingOption]], EnumerationStats, list[TooLarge]]:
    """Options per table fqn, estimated by TorchRec's estimators once per shape and distinct
    shard size, narrowed by table size (``narrow``; ``all_kernels`` keeps every kernel), and the
    tables that fit no device in any option TorchRec offers them (storage of every option is
    estimated for that check; perf only for the options kept)."""
    start = time.perf_counter()
    stats = EnumerationStats()
    tables = collect_tables(module, sharders, topology, batch_size, constraints)
    stats.tables = len(tables)
    device = topology.compute_device
    tier = "hbm" if device in ("cuda", "mtia") else "ddr"
    caps = [getattr(d.storage, tier) for d in storage_constraint.devices]
    device_cap = max(caps)
    largest = largest_device(storage_constraint)
    for t in tables:
        t.bytes_with_optimizer = table_bytes(t.param)
        t.signature = _signature(t, constraints)
    pressure = sum(t.bytes_with_optimizer for t in tables) > PRESSURE * sum(caps)

    sharder_map = {sharder_name(s.module_type): s for s in sharders}
    sharder_data_map = build_sharder_data_map(sharder_map)

    # Shard layout per (signature, sharding type); one reduced option per (signature, type,
    # kernel) holding one shard per distinct shard size, estimated once.
    layouts: dict[tuple, tuple[list[list[int]], list[list[int]]]] = {}
    reduced: dict[tuple, ShardingOption] = {}
    wanted: dict[str, list[tuple[str, str]]] = {}
    for t in tables:
        pairs = []
        for sharding_type, kernels in t.kernels_by_type.items():
            layout_key = (t.signature, sharding_type)
            if layout_key not in layouts:
                layouts[layout_key] = calculate_shard_sizes_and_offsets(
                    tensor=t.param,
                    world_size=topology.world_size,
                    local_world_size=topology.intra_group_size,
                    sharding_type=sharding_type,
                    col_wise_shard_dim=t.constraints.min_partition,
                    num_buckets=t.num_buckets,
                )
            sizes, offsets = layouts[layout_key]
            stats.options_torchrec += len(kernels)
            stats.shard_estimates_torchrec += len(kernels) * len(sizes)
            candidates = _candidate_kernels(t, kernels, device_cap, pressure, all_kernels or not narrow)
            pairs += [(sharding_type, kernel) for kernel in candidates]
            for kernel in kernels:
                key = (t.signature, sharding_type, kernel)
                if key in reduced:
                    continue
                unique: dict[tuple, list[int]] = {}
                for size, offset in zip(sizes, offsets, strict=True):
                    unique.setdefault(tuple(size), offset)
                reduced[key] = _new_option(
                    t,
                    sharding_type,
                    kernel,
                    [Shard(size=list(size), offset=list(offset)) for size, offset in unique.items()],
                    batch_size,
                )
        wanted[t.fqn] = pairs
    stats.signatures = len({t.signature for t in tables})

    storage_estimator = EmbeddingStorageEstimator(topology=topology, constraints=constraints)
    storage_estimator.estimate(list(reduced.values()), sharder_data_map=sharder_data_map)
    too_large = _too_large(tables, reduced, largest)

    needed = {(t.signature, st, k) for t in tables for st, k in wanted[t.fqn]}
    to_estimate = [reduced[key] for key in reduced if key in needed]
    stats.options_estimated = len(to_estimate)
    stats.shard_estimates = sum(len(o.shards) for o in to_estimate)
    if estimate_perf:
        perf_estimator = EmbeddingPerfEstimatorFactory.create(
            DEFAULT_PERF_ESTIMATOR, topology=topology, constraints=constraints
        )
        perf_estimator.estimate(to_estimate, sharder_data_map=sharder_data_map)
    estimates = {
        key: {tuple(s.size): (s.perf, s.storage) for s in option.shards} for key, option in reduced.items()
    }
    weighted = {key: option.is_weighted for key, option in reduced.items()}

    options: dict[str, list[ShardingOption]] = {}
    for t in tables:
        built = []
        for sharding_type, kernel in wanted[t.fqn]:
            key = (t.signature, sharding_type, kernel)
            sizes, offsets = layouts[(t.signature, sharding_type)]
            by_size = estimates[key]
            shards = []
            for size, offset in zip(sizes, offsets, strict=True):
                perf, storage = by_size[tuple(size)]
                shards.append(Shard(size=list(size), offset=list(offset), perf=perf, storage=storage))
            option = _new_option(t, sharding_type, kernel, shards, batch_size)
            option.is_weighted = weighted[key]
            built.append(option)
        options[t.fqn] = _narrow(built, storage_constraint, tier) if narrow and estimate_perf else built
        stats.options_kept += len(options[t.fqn])
    stats.seconds = time.perf_counter() - start
    return tables, options, stats, too_large


def _too_large(
    tables: list[TableEntry], reduced: dict[tuple, ShardingOption], largest: Storage
) -> list[TooLarge]:
    out = []
    by_signature: dict[tuple, list[ShardingOption]] = {}
    for (signature, _type, _kernel), option in reduced.items():
        by_signature.setdefault(signature, []).append(option)
    verdict: dict[tuple, TooLarge | None] = {}
    for t in tables:
        if t.signature not in verdict:
            opts = by_signature[t.signature]
            if any(_fits_somewhere(o, largest) for o in opts):
                verdict[t.signature] = None
            else:

                def need(o: ShardingOption) -> tuple[int, int]:
                    worst = max(o.shards, key=lambda s: (s.storage.hbm, s.storage.ddr)).storage
                    over = max(worst.hbm - largest.hbm, 0) + max(worst.ddr - largest.ddr, 0)
                    return (over, worst.hbm + worst.ddr)

                best = min(opts, key=need)
                worst = max(best.shards, key=lambda s: (s.storage.hbm, s.storage.ddr)).storage
                verdict[t.signature] = TooLarge(t, worst, f"{best.sharding_type}/{best.compute_kernel}")
        if verdict[t.signature] is not None:
            v = verdict[t.signature]
            out.append(TooLarge(t, v.smallest_shard, v.smallest_option))
    return out


def _fits_somewhere(option: ShardingOption, largest: Storage) -> bool:
    return all(s.storage.hbm <= largest.hbm and s.storage.ddr <= largest.ddr for s in option.shards)


def largest_device(storage_constraint: Topology) -> Storage:
    return Storage(
        hbm=max(d.storage.hbm for d in storage_constraint.devices),
        ddr=max(d.storage.ddr for d in storage_constraint.devices),
    )


def _narrow(options: list[ShardingOption], storage_constraint: Topology, tier: str) -> list[ShardingOption]:
    largest = largest_device(storage_constraint)
    small = SMALL_SHARD_FRACTION * getattr(largest, tier)
    fitting = [o for o in options if _fits_somewhere(o, largest)]
    if not fitting:
        return options  # the caller reports the table that fits nowhere
    summary = [_Summary.of(o) for o in fitting]
    non_dp = [s for s in summary if s.option.sharding_type != ShardingType.DATA_PARALLEL.value]
    if non_dp:
        cheapest_lump = min(s.max_perf for s in non_dp)
        summary = [
            s
            for s in summary
            if s.option.sharding_type != ShardingType.DATA_PARALLEL.value or s.max_perf <= cheapest_lump
        ]
    kept = [s for s in summary if not any(other.dominates(s, small) for other in summary if other is not s)]
    kept.sort(key=lambda s: (s.max_perf, s.sum_perf, TYPE_ORDER.index(s.option.sharding_type)))
    return [s.option for s in kept]


@dataclass
class _Summary:
    option: ShardingOption
    max_perf: float
    sum_perf: float
    total: Storage
    max_hbm: int
    max_ddr: int

    @classmethod
    def of(cls, o: ShardingOption) -> "_Summary":
        perfs = [s.perf.total for s in o.shards]
        return cls(
            o,
            max(perfs),
            sum(perfs),
            o.total_storage,
            max(s.storage.hbm for s in o.shards),
            max(s.storage.ddr for s in o.shards),
        )

    def dominates(self, other: "_Summary", small: float) -> bool:
        """No slower, no larger (per shard too, unless this one's shards are small), and
        strictly better somewhere."""
        no_worse = (
            self.max_perf <= other.max_perf
            and self.sum_perf <= other.sum_perf
            and self.total.hbm <= other.total.hbm
            and self.total.ddr <= other.total.ddr
            and (self.max_hbm <= other.max_hbm or self.max_hbm <= small)
            and (self.max_ddr <= other.max_ddr or self.max_ddr <= small)
        )
        if not no_worse:
            return False
        # Equal options stay: a one-shard column-wise option costs what table-wise does, but
        # TorchRec runs (and its critical path counts) each sharding type's communication
        # separately, so which group a table joins matters.
        return (
            self.max_perf < other.max_perf
            or self.sum_perf < other.sum_perf
            or self.total.hbm < other.total.hbm
            or self.total.ddr < other.total.ddr
        )
