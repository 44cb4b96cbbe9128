"""The fast planner: TorchRec's estimators and placement rules, a much smaller search.

TorchRec's ``EmbeddingShardingPlanner`` enumerates every sharding type x compute kernel for every
table, estimates every shard of every option (64 estimates for one row-wise option on 64 ranks),
deep-copies the search space, then partitions thousands of proposals. This planner keeps what
decides the result and drops the rest:

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
3. **Few proposals, then local search.** Start proposals as TorchRec's proposers make them
   (each table at its fastest option by largest shard, by sum of shards, and one proposal per
   sharding type), placed by a vectorised copy of ``GreedyPerfPartitioner``'s rules; if none
   fits, TorchRec's greedy storage relief (move the table using most memory to its next option).
   Then, from the best few placements, repeatedly take the slowest rank and try every option
   and placement of the tables on it and swaps with tables on the least loaded ranks, keeping
   the move that best lowers the objective, until none does or the time budget ends.

The objective is TorchRec's estimated step time (its critical path: every communication group
-- module x sharding type x direction -- and every compute direction lasts as long as its
slowest rank), then its ``NoopPerfModel`` rating (the slowest rank's total, the default
planner's own objective), then the spread of the ranks. One-shard column-wise options cost what
table-wise ones do but join another communication group, so they stay. The result is a list of
TorchRec ``ShardingOption`` with ranks, turned into a plan by TorchRec's ``to_sharding_plan``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import (
    EmbeddingEnumerator,
    _extract_constraints_for_param,
    get_partition_by_type,
)
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    PartitionByType,
    Shard,
    ShardingOption,
    Storage,
    Topology,
)
from torchrec.distributed.planner.utils import build_sharder_data_map, sharder_name
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets
from torchrec.distributed.types import ModuleSharder, ShardingType

logger = logging.getLogger(__name__)

CACHE_MIN_FRACTION = 0.05  # a table of >= 5% of a device may use the HBM-cache kernel
PRESSURE = 0.5  # ... and every table may when the tables need > 50% of all device memory
SMALL_SHARD_FRACTION = 0.1  # shards below 10% of a device are "small" for dominance
DEFAULT_TIME_BUDGET_S = 20.0
LOCAL_SEARCH_STARTS = 3  # local search runs from the best few start placements
# a uniform start "all X": tables without an X option take the equivalent one
_UNIFORM_FALLBACK = {
    ShardingType.TABLE_WISE.value: ["table_wise", "column_wise", "table_column_wise"],
    ShardingType.COLUMN_WISE.value: ["column_wise", "table_wise"],
    ShardingType.TABLE_COLUMN_WISE.value: ["table_column_wise", "column_wise", "table_wise"],
}

_TYPE_ORDER = [
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.DATA_PARALLEL.value,
    ShardingType.GRID_SHARD.value,
]


class NoPlanError(RuntimeError):
    """No placement fits; ``lower_bound`` is the least storage the tables need (hbm, ddr)."""

    def __init__(self, message: str, lower_bound: Storage | None = None) -> None:
        super().__init__(message)
        self.lower_bound = lower_bound


@dataclass
class TableEntry:
    """One shardable table and what its options are built from."""

    name: str
    path: str
    module: nn.Module
    param: Any
    sharder_key: str
    kernels_by_type: dict[str, list[str]]
    extracted: tuple
    num_buckets: int | None
    is_pooled: bool = True
    signature: tuple = ()
    bytes_with_optimizer: int = 0

    @property
    def fqn(self) -> str:
        return f"{self.path}.{self.name}"


@dataclass
class EnumerationStats:
    tables: int = 0
    signatures: int = 0
    options_torchrec: int = 0  # what TorchRec's enumerator would build
    options_estimated: int = 0
    options_kept: int = 0
    shard_estimates: int = 0  # estimator calls (per distinct shard)
    shard_estimates_torchrec: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------- enumeration


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
            extracted = _extract_constraints_for_param(constraints, name)
            device_group = extracted[8]
            if device_group and device_group != device:
                continue
            kernels_by_type: dict[str, list[str]] = {}
            for sharding_type in enumerator._filter_sharding_types(name, sharder.sharding_types(device), key):
                kernels = enumerator._filter_compute_kernels(
                    name, sharder.compute_kernels(sharding_type, device), sharding_type
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
                    extracted=extracted,
                    num_buckets=enumerator._get_num_buckets(name, child),
                    is_pooled=ShardingOption.module_pooled(child, path),
                )
            )
    return tables


def optimizer_multiplier(param: Any) -> float:
    """Optimizer state per parameter byte, as TorchRec's storage estimator counts it."""
    from torchrec.distributed.planner.shard_estimators import _get_optimizer_multipler

    optimizer_class = getattr(param, "_optimizer_classes", [None])[0]
    return float(_get_optimizer_multipler(optimizer_class, param.shape))


def table_bytes(param: Any) -> int:
    """Weights plus optimizer state."""
    weights = param.numel() * param.element_size()
    return int(weights * (1 + optimizer_multiplier(param)))


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

    # feature names (index 6) do not change estimates
    extracted = tuple(plain(x) for i, x in enumerate(t.extracted) if i != 6)
    return (
        t.path,
        t.is_pooled,
        tuple(t.param.shape),
        t.param.dtype,
        getattr(t.param, "_optimizer_classes", [None])[0],
        tuple(sorted((k, tuple(v)) for k, v in t.kernels_by_type.items())),
        extracted,
        t.num_buckets,
        constraint_part,
    )


def _new_option(
    t: TableEntry, sharding_type: str, kernel: str, shards: list[Shard], batch_size: int
) -> ShardingOption:
    (
        input_lengths,
        _col_dim,
        cache_params,
        enforce_hbm,
        stochastic_rounding,
        bounds_check_mode,
        feature_names,
        output_dtype,
        _device_group,
        key_value_params,
    ) = t.extracted
    return ShardingOption(
        name=t.name,
        tensor=t.param,
        module=(t.path, t.module),
        input_lengths=input_lengths,
        batch_size=batch_size,
        compute_kernel=kernel,
        sharding_type=sharding_type,
        partition_by=get_partition_by_type(sharding_type),
        shards=shards,
        cache_params=cache_params,
        enforce_hbm=enforce_hbm,
        stochastic_rounding=stochastic_rounding,
        bounds_check_mode=bounds_check_mode,
        is_pooled=t.is_pooled,
        feature_names=feature_names,
        output_dtype=output_dtype,
        key_value_params=key_value_params,
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
                    col_wise_shard_dim=t.extracted[1],
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
    kept.sort(key=lambda s: (s.max_perf, s.sum_perf, _TYPE_ORDER.index(s.option.sharding_type)))
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


# --------------------------------------------------------------------------------- placement

_UNIFORM, _DEVICE, _HOST_ROWS, _HOST_DEVICE = 0, 1, 2, 3


_PERF_COLUMNS = ("fwd_compute", "bwd_compute", "prefetch_compute", "fwd_comms", "bwd_comms")
_PREFETCH = 2  # phase row of prefetch: in the rank totals, not on TorchRec's critical path


class _Phases:
    """Rows of the phase matrix: fwd/bwd compute and prefetch, then one row per (module,
    sharding type, direction) of communication, as TorchRec's critical path groups them."""

    def __init__(self) -> None:
        self.rows: dict[tuple, int] = {("fwd_compute",): 0, ("bwd_compute",): 1, ("prefetch",): 2}

    def of(self, option: ShardingOption) -> list[int]:
        out = [0, 1, 2]
        for direction in ("fwd", "bwd"):
            key = (option.path, option.sharding_type, direction)
            out.append(self.rows.setdefault(key, len(self.rows)))
        return out


@dataclass
class _Opt:
    """An option in array form: per-shard perf total, HBM and DDR, and per-shard perf by phase."""

    option: ShardingOption
    kind: int
    perf: np.ndarray
    hbm: np.ndarray
    ddr: np.ndarray
    rows: np.ndarray  # the 5 phase rows this option's shards add to
    vals: np.ndarray  # [shard, 5]: fwd/bwd compute, prefetch, fwd/bwd comms
    total_hbm: float
    total_ddr: float
    total_perf: float

    @classmethod
    def of(cls, option: ShardingOption, phases: _Phases) -> "_Opt":
        by = option.partition_by
        if by == PartitionByType.UNIFORM.value:
            kind = _UNIFORM
        elif by == PartitionByType.DEVICE.value:
            kind = _DEVICE
        elif by == PartitionByType.HOST.value:
            kind = _HOST_ROWS if option.sharding_type == ShardingType.TABLE_ROW_WISE.value else _HOST_DEVICE
        else:
            raise NotImplementedError(f"fast planner: partition_by {by!r} ({option.sharding_type})")
        perf = np.array([s.perf.total for s in option.shards], dtype=np.float64)
        hbm = np.array([s.storage.hbm for s in option.shards], dtype=np.float64)
        ddr = np.array([s.storage.ddr for s in option.shards], dtype=np.float64)
        vals = np.array(
            [[getattr(s.perf, c) for c in _PERF_COLUMNS] for s in option.shards], dtype=np.float64
        )
        rows = np.array(phases.of(option), dtype=np.int64)
        return cls(
            option, kind, perf, hbm, ddr, rows, vals, float(hbm.sum()), float(ddr.sum()), float(perf.sum())
        )


@dataclass
class _State:
    perf: np.ndarray  # per rank: estimated time (TorchRec's Perf.total summed)
    hbm: np.ndarray  # per rank: free
    ddr: np.ndarray  # per rank: free
    phase: np.ndarray  # [phase row, rank]: time per phase

    def copy(self) -> "_State":
        return _State(self.perf.copy(), self.hbm.copy(), self.ddr.copy(), self.phase.copy())


class Placer:
    """``GreedyPerfPartitioner``'s placement rules on arrays (one state, undoable moves)."""

    def __init__(self, storage_constraint: Topology, num_phases: int) -> None:
        devices = storage_constraint.devices
        self.world_size = len(devices)
        self.local = storage_constraint.local_world_size
        self.host_size = storage_constraint.intra_group_size
        self.num_hosts = self.world_size // self.host_size
        ranks = np.arange(self.world_size)
        # ties between equally loaded devices: local rank first (spreads host memory), then rank
        self.tie = (ranks % self.local) * self.world_size + ranks
        self.host_tie = (ranks % self.host_size) * self.world_size + ranks
        self.initial = _State(
            np.array([d.perf.total for d in devices], dtype=np.float64),
            np.array([d.storage.hbm for d in devices], dtype=np.float64),
            np.array([d.storage.ddr for d in devices], dtype=np.float64),
            np.zeros((num_phases, self.world_size), dtype=np.float64),
        )

    def fresh(self) -> _State:
        return self.initial.copy()

    # Every place_* returns the ranks (state updated) or None (state unchanged).

    def place(self, st: _State, o: _Opt) -> np.ndarray | None:
        if o.kind == _UNIFORM:
            return self._uniform(st, o, np.arange(self.world_size))
        if o.kind == _DEVICE:
            return self._device(st, o, None)
        order = np.argsort(
            st.perf[: self.num_hosts * self.host_size].reshape(self.num_hosts, self.host_size).sum(axis=1),
            kind="stable",
        )
        for host in order:
            members = np.arange(host * self.host_size, (host + 1) * self.host_size)
            if o.total_hbm > st.hbm[members].sum() or o.total_ddr > st.ddr[members].sum():
                continue
            if o.kind == _HOST_ROWS:
                ranks = self._uniform(st, o, members)
            else:
                ranks = self._device(st, o, members)
            if ranks is not None:
                return ranks
        return None

    def _uniform(self, st: _State, o: _Opt, members: np.ndarray) -> np.ndarray | None:
        if len(o.perf) != len(members):
            return None
        if (o.hbm > st.hbm[members]).any() or (o.ddr > st.ddr[members]).any():
            return None
        st.perf[members] += o.perf
        st.hbm[members] -= o.hbm
        st.ddr[members] -= o.ddr
        st.phase[o.rows[:, None], members[None, :]] += o.vals.T
        return members

    def _device(self, st: _State, o: _Opt, members: np.ndarray | None) -> np.ndarray | None:
        ranks = np.empty(len(o.perf), dtype=np.int64)
        tie = self.tie if members is None else self.host_tie
        for i in range(len(o.perf)):
            if members is None:
                fits = (st.hbm >= o.hbm[i]) & (st.ddr >= o.ddr[i])
                load = np.where(fits, st.perf, np.inf)
                best = load.min()
                if best == np.inf:
                    Placer.remove(st, o, ranks[:i], upto=i)
                    return None
                candidates = np.flatnonzero(load == best)
            else:
                fits = (st.hbm[members] >= o.hbm[i]) & (st.ddr[members] >= o.ddr[i])
                load = np.where(fits, st.perf[members], np.inf)
                best = load.min()
                if best == np.inf:
                    Placer.remove(st, o, ranks[:i], upto=i)
                    return None
                candidates = members[np.flatnonzero(load == best)]
            rank = candidates[np.argmin(tie[candidates])]
            ranks[i] = rank
            st.perf[rank] += o.perf[i]
            st.hbm[rank] -= o.hbm[i]
            st.ddr[rank] -= o.ddr[i]
            st.phase[o.rows, rank] += o.vals[i]
        return ranks

    @staticmethod
    def remove(st: _State, o: _Opt, ranks: np.ndarray, upto: int | None = None) -> None:
        n = len(o.perf) if upto is None else upto
        np.subtract.at(st.perf, ranks, o.perf[:n])
        np.add.at(st.hbm, ranks, o.hbm[:n])
        np.add.at(st.ddr, ranks, o.ddr[:n])
        np.subtract.at(st.phase, (o.rows[:, None], ranks[None, :]), o.vals[:n].T)

    @staticmethod
    def add(st: _State, o: _Opt, ranks: np.ndarray) -> None:
        np.add.at(st.perf, ranks, o.perf)
        np.subtract.at(st.hbm, ranks, o.hbm)
        np.subtract.at(st.ddr, ranks, o.ddr)
        np.add.at(st.phase, (o.rows[:, None], ranks[None, :]), o.vals.T)


Key = tuple[float, float, float]


def _objective(st: _State) -> Key:
    """TorchRec's critical path (each phase lasts as long as its slowest rank: the estimated
    step), then its ``NoopPerfModel`` rating (the slowest rank: the default planner's
    objective), then the spread of the ranks."""
    peaks = st.phase.max(axis=1)
    critical = float(peaks.sum() - peaks[_PREFETCH])
    return (round(critical, 9), round(float(st.perf.max()), 9), float(np.dot(st.perf, st.perf)))


def _better(a: Key, b: Key) -> bool:
    """``a`` shortens the step, or keeps it and lowers the slowest rank, or keeps both and
    narrows the spread noticeably."""
    if a[0] != b[0]:
        return a[0] < b[0]
    if a[1] != b[1]:
        return a[1] < b[1]
    return a[2] < b[2] * (1 - 1e-7)


# ------------------------------------------------------------------------------------ search


@dataclass
class SearchStats:
    proposals: int = 0
    placed: int = 0
    relief_steps: int = 0
    moves: int = 0
    candidates: int = 0
    start: str = ""
    start_step: float = 0.0  # critical path of the best start placement
    step: float = 0.0  # critical path of the result
    rating: float = 0.0
    seconds: float = 0.0
    timed_out: bool = False


@dataclass
class FastResult:
    plan: list[ShardingOption]
    rating: float
    enumeration: EnumerationStats
    search: SearchStats
    extra: dict[str, Any] = field(default_factory=dict)


class _Search:
    def __init__(
        self, fqns: list[str], options: dict[str, list[ShardingOption]], storage_constraint: Topology
    ) -> None:
        self.fqns = fqns
        self.phases = _Phases()
        self.opts = [[_Opt.of(o, self.phases) for o in options[f]] for f in fqns]
        self.placer = Placer(storage_constraint, len(self.phases.rows))

    def partition(
        self, choice: list[int], order: str = "storage"
    ) -> tuple[_State, list[np.ndarray]] | tuple[None, int]:
        """All tables placed: uniform options first, then the others largest first, by storage
        (``GreedyPerfPartitioner``'s default) or by time (its ``SortBy.PERF``, longest
        processing time first); (state, ranks) or (None, the table that found no room)."""
        st = self.placer.fresh()
        ranks: list[np.ndarray | None] = [None] * len(self.fqns)
        chosen = [self.opts[i][choice[i]] for i in range(len(self.fqns))]
        uniform = [i for i, o in enumerate(chosen) if o.kind == _UNIFORM]
        others = [i for i, o in enumerate(chosen) if o.kind != _UNIFORM]
        if order == "storage":
            others.sort(key=lambda i: (chosen[i].total_hbm, chosen[i].total_ddr), reverse=True)
        else:
            others.sort(key=lambda i: (chosen[i].total_perf, chosen[i].total_hbm), reverse=True)
        for i in uniform + others:
            placed = self.placer.place(st, chosen[i])
            if placed is None:
                return None, i
            ranks[i] = placed
        return st, ranks  # type: ignore[return-value]

    def storage_key(self, i: int, k: int) -> tuple[float, float, float, float]:
        o = self.opts[i][k]
        return (float(o.hbm.max()), o.total_hbm, float(o.ddr.max()), o.total_ddr)


def _swappable(o: _Opt) -> bool:
    return (o.kind == _DEVICE and len(o.perf) == 1) or o.kind == _HOST_ROWS


def _place_at(st: _State, o: _Opt, ranks: np.ndarray) -> bool:
    if (o.hbm > st.hbm[ranks]).any() or (o.ddr > st.ddr[ranks]).any():
        return False
    Placer.add(st, o, ranks)
    return True


def fast_plan(
    tables: list[TableEntry],
    options: dict[str, list[ShardingOption]],
    storage_constraint: Topology,
    enumeration: EnumerationStats,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    max_relief_steps: int | None = None,
) -> FastResult:
    """Place every table; raises :class:`NoPlanError` when no start proposal nor greedy storage
    relief fits."""
    start_time = time.perf_counter()
    deadline = start_time + time_budget_s
    stats = SearchStats()
    fqns = [t.fqn for t in tables]
    search = _Search(fqns, options, storage_constraint)
    placer = search.placer
    n = len(fqns)

    def by(key) -> list[int]:
        return [min(range(len(search.opts[i])), key=lambda k: key(search.opts[i][k])) for i in range(n)]

    # TorchRec's proposers' first proposals: greedy by largest shard, by sum, one per type
    starts: list[tuple[str, list[int]]] = [
        ("fastest largest shard", [0] * n),  # options are sorted by largest shard, then sum
        ("fastest sum of shards", by(lambda o: (o.total_perf, float(o.perf.max())))),
    ]
    types = {o.option.sharding_type for opts in search.opts for o in opts}
    for sharding_type in sorted(types, key=_TYPE_ORDER.index):
        choice = []
        for i in range(n):
            ks = [
                k
                for wanted in _UNIFORM_FALLBACK.get(sharding_type, [sharding_type])
                for k, o in enumerate(search.opts[i])
                if o.option.sharding_type == wanted
            ]
            choice.append(ks[0] if ks else 0)
        starts.append((f"{sharding_type} where offered", choice))

    placed: list[tuple[Key, str, list[int], _State, list[np.ndarray]]] = []
    seen = set()
    for label, choice in starts:
        if tuple(choice) in seen:
            continue
        seen.add(tuple(choice))
        for order in ("storage", "perf"):
            stats.proposals += 1
            st, ranks = search.partition(choice, order)
            if st is None:
                continue
            stats.placed += 1
            placed.append((_objective(st), f"{label}, placed by {order}", choice, st, ranks))
    placed.sort(key=lambda p: p[0])
    best = placed[0] if placed else None

    if best is None:  # TorchRec's GreedyProposer: move the table using most memory to its next option
        choice = list(starts[0][1])
        limit = max_relief_steps if max_relief_steps is not None else sum(len(o) - 1 for o in search.opts)
        while stats.relief_steps < limit and time.perf_counter() < deadline and best is None:
            movable = [i for i in range(n) if choice[i] + 1 < len(search.opts[i])]
            if not movable:
                break
            i = max(movable, key=lambda j: search.storage_key(j, choice[j]))
            choice[i] += 1
            stats.relief_steps += 1
            for order in ("storage", "perf"):
                stats.proposals += 1
                st, ranks = search.partition(choice, order)
                if st is not None:
                    stats.placed += 1
                    placed.append(
                        (_objective(st), f"greedy storage relief, placed by {order}", list(choice), st, ranks)
                    )
            placed.sort(key=lambda p: p[0])
            best = placed[0] if placed else None
    if best is None:
        raise NoPlanError(_no_plan_message(search, storage_constraint), _lower_bound(search))

    # local search from the best few starts (different basins), sharing the time left
    stats.start_step = best[0][0]
    outcome = None
    runs, keys = [], set()
    for entry in placed:  # the best few distinct start placements
        if entry[0] not in keys and len(runs) < LOCAL_SEARCH_STARTS:
            keys.add(entry[0])
            runs.append(entry)
    for run, (key, label, choice, st, ranks) in enumerate(runs):
        share = (deadline - time.perf_counter()) / (len(runs) - run)
        choice, ranks = list(choice), list(ranks)
        key = _local_search(search, placer, st, choice, ranks, key, time.perf_counter() + share, stats)
        if outcome is None or key < outcome[0]:
            outcome = (key, label, choice, st, ranks)
    assert outcome is not None
    _, stats.start, choice, st, ranks = outcome

    plan = []
    for i in range(n):
        option = search.opts[i][choice[i]].option
        option.shards = [
            Shard(size=s.size, offset=s.offset, storage=s.storage, perf=s.perf, rank=int(r))
            for s, r in zip(option.shards, ranks[i], strict=True)
        ]
        plan.append(option)
    stats.rating = float(st.perf.max())
    stats.step = _objective(st)[0]
    stats.seconds = time.perf_counter() - start_time
    return FastResult(plan=plan, rating=stats.rating, enumeration=enumeration, search=stats)


def _local_search(
    search: _Search,
    placer: Placer,
    st: _State,
    choice: list[int],
    ranks: list[np.ndarray],
    key: Key,
    deadline: float,
    stats: SearchStats,
    tables_per_step: int = 32,
) -> Key:
    """Lower the slowest rank: per step, every option and placement of the tables on it, and
    swaps of them with tables on the least loaded ranks; the best move is kept (in place)."""
    n, ws = len(choice), placer.world_size
    # contribution of every table to every rank, to find the tables on a rank
    load = np.zeros((n, ws))
    for i in range(n):
        np.add.at(load[i], ranks[i], search.opts[i][choice[i]].perf)

    while time.perf_counter() < deadline:
        slowest = int(np.argmax(st.perf))
        on_it = np.flatnonzero(load[:, slowest] > 0)
        on_it = on_it[np.argsort(-load[on_it, slowest], kind="stable")]
        # tables on every rank (row-wise, data-parallel) rarely move: fewer of them per step
        spread = np.array([search.opts[i][choice[i]].kind == _UNIFORM for i in on_it], dtype=bool)
        on_it = np.concatenate([on_it[~spread][:tables_per_step], on_it[spread][: tables_per_step // 2]])
        best_move: tuple | None = None
        for i in on_it:
            current = search.opts[i][choice[i]]
            Placer.remove(st, current, ranks[i])
            for k, o in enumerate(search.opts[i]):  # re-place, or change option
                placed = placer.place(st, o)
                stats.candidates += 1
                if placed is None:
                    continue
                new_key = _objective(st)
                if _better(new_key, key) and (best_move is None or new_key < best_move[0]):
                    best_move = (new_key, "move", int(i), k, placed.copy())
                Placer.remove(st, o, placed)
            Placer.add(st, current, ranks[i])

        # swaps: a table on the slowest rank with a lighter one on a lightly loaded rank/host
        light = np.argsort(st.perf, kind="stable")[: max(8, ws // 8)]
        partners = np.flatnonzero((load[:, light] > 0).any(axis=1))
        for i in on_it:
            oi = search.opts[i][choice[i]]
            if not _swappable(oi):
                continue
            for j in partners:
                oj = search.opts[j][choice[j]]
                if (
                    j == i
                    or oj.kind != oi.kind
                    or len(ranks[j]) != len(ranks[i])
                    or oj.total_perf >= oi.total_perf
                    or np.array_equal(ranks[j], ranks[i])
                ):
                    continue
                stats.candidates += 1
                Placer.remove(st, oi, ranks[i])
                Placer.remove(st, oj, ranks[j])
                if _place_at(st, oi, ranks[j]):
                    if _place_at(st, oj, ranks[i]):
                        new_key = _objective(st)
                        if _better(new_key, key) and (best_move is None or new_key < best_move[0]):
                            best_move = (new_key, "swap", int(i), int(j), None)
                        Placer.remove(st, oj, ranks[i])
                    Placer.remove(st, oi, ranks[j])
                Placer.add(st, oj, ranks[j])
                Placer.add(st, oi, ranks[i])

        if best_move is None:
            return key
        key, kind, i, other, placed = best_move
        if kind == "move":
            Placer.remove(st, search.opts[i][choice[i]], ranks[i])
            Placer.add(st, search.opts[i][other], placed)
            choice[i], ranks[i] = other, placed
            load[i] = 0
            np.add.at(load[i], placed, search.opts[i][other].perf)
        else:
            j = other
            oi, oj = search.opts[i][choice[i]], search.opts[j][choice[j]]
            Placer.remove(st, oi, ranks[i])
            Placer.remove(st, oj, ranks[j])
            Placer.add(st, oi, ranks[j])
            Placer.add(st, oj, ranks[i])
            ranks[i], ranks[j] = ranks[j], ranks[i]
            load[i], load[j] = 0, 0
            np.add.at(load[i], ranks[i], oi.perf)
            np.add.at(load[j], ranks[j], oj.perf)
        stats.moves += 1
    stats.timed_out = True
    return key


def _lower_bound(search: _Search) -> Storage:
    hbm = sum(min(o.total_hbm for o in opts) for opts in search.opts)
    ddr = sum(min(o.total_ddr for o in opts) for opts in search.opts)
    return Storage(hbm=int(hbm), ddr=int(ddr))


def _no_plan_message(search: _Search, storage_constraint: Topology) -> str:
    need = _lower_bound(search)
    gb = 1024**3
    tiers = [("hbm", "device memory (HBM)"), ("ddr", "host memory")]
    if storage_constraint.compute_device == "cpu":
        tiers = [("ddr", "host memory")]
    parts, short = [], False
    for tier, name in tiers:
        have = sum(getattr(d.storage, tier) for d in storage_constraint.devices)
        per_device = max(getattr(d.storage, tier) for d in storage_constraint.devices)
        needed = getattr(need, tier)
        short = short or needed > have
        parts.append(
            f"{needed / gb:,.1f} GB of {name} at least (every table in its smallest option) of "
            f"{have / gb:,.1f} GB left after the reservation ({per_device / gb:,.1f} GB per device)"
        )
    if short:
        return (
            "no placement fits: the tables need "
            + "; ".join(parts)
            + "; remedies: more devices, "
            + ("host-memory caching, " if storage_constraint.compute_device == "cuda" else "")
            + "smaller tables or a smaller storage_reserve"
        )
    return (
        "no placement fits: the tables need " + "; ".join(parts) + ", but their shards do not pack into "
        "the devices; remedies: more or larger devices, or narrower shards (sharding.constraints."
        "<table>: {sharding_types: [column_wise], min_partition: ...})"
    )
