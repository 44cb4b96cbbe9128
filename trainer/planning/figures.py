"""What a plan means, in numbers: the figures behind report.md, report.json and the charts.

Every number comes from TorchRec's estimates on the planned shards: storage per shard from its
``EmbeddingStorageEstimator`` (weights, optimizer state, input/output buffers), time per shard
from its default perf estimator (forward/backward compute and communication, ms), the step
time as its critical path (ranks synchronise after each phase), the slowest rank as its
``NoopPerfModel`` rating. They cover the sparse part of a step (embedding lookups and their
communication), not the dense layers. The renderers are in
:mod:`~towerrec.trainer.planning.render`.

Example::

    figures = compute_figures(result, config_name="billion_scale")
    figures.summary.est_step_time_ms, figures.ranks[0].hbm_used_pct
    json.dumps(figures.to_json())   # report.json
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Any

from torchrec.distributed.planner.constants import BIGINT_DTYPE
from torchrec.distributed.planner.shard_estimators import get_num_poolings
from torchrec.distributed.planner.stats import IMBALANCE_STAT_MEASURE
from torchrec.distributed.planner.types import ShardingOption
from towerrec.trainer.planning import torchrec_compat as compat
from towerrec.trainer.planning.enumeration import table_bytes
from towerrec.trainer.planning.plan_file import CPU_SHARDING_TYPES
from towerrec.trainer.planning.planner import PlanResult, cpu_note
from towerrec.trainer.planning.topology import TopologySpec

MB = 1024**2
PERF_FIELDS = ("fwd_compute", "bwd_compute", "fwd_comms", "bwd_comms", "input_dist_comms", "prefetch_compute")
SCOPE = (
    "TorchRec's estimates for the sparse part of a step (embedding lookups, their optimizer "
    "update and communication); dense layers are not included."
)


@dataclass
class Summary:
    """The headline: what was planned, whether it fits, the estimated step and peaks.

    The fields from ``tables`` on are known only when the tables were placed; report.json has
    the first four of them (as null) when they were not, and none of the others.
    """

    config: str
    topology: str
    fits: bool
    error: str | None
    planner: str
    planning_seconds: float
    world_size: int
    compute_device: str
    batch_size_per_rank: int | None
    global_batch_size: int
    sparse_optimizer: str | None
    storage_reserve: float | None
    sharding_types_offered: list[str]
    note: str | None
    scope: str
    tables: int | None = None
    peak_device_memory_pct: float | None = None
    peak_device_memory_rank: int | None = None
    peak_host_memory_pct: float | None = None
    peak_host_memory_rank: int | None = None
    est_step_time_ms: float | None = None
    est_samples_per_s: int | None = None
    slowest_rank: int | None = None
    slowest_rank_ms: float | None = None
    sharding_types_used: dict[str, int] | None = None
    compute_kernels_used: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.tables is None:  # not placed: report.json names only the headline figures
            for key in _PLACED_ONLY:
                del out[key]
        return out


_PLACED_ONLY = (
    "tables",
    "peak_device_memory_rank",
    "peak_host_memory_pct",
    "peak_host_memory_rank",
    "slowest_rank_ms",
    "sharding_types_used",
    "compute_kernels_used",
)


@dataclass
class RankFigures:
    """One rank: capacities, what its shards and TorchRec's reservation use, estimated time."""

    rank: int
    node: int
    hbm_capacity: int
    ddr_capacity: int
    hbm_available: int  # after the storage reservation
    ddr_available: int
    hbm_embeddings: int = 0
    ddr_embeddings: int = 0
    hbm_dense_and_inputs: int = 0  # TorchRec's reservation for dense parameters and input batches
    ddr_dense_and_inputs: int = 0
    fwd_compute_ms: float = 0.0  # one field per PERF_FIELDS entry
    bwd_compute_ms: float = 0.0
    fwd_comms_ms: float = 0.0
    bwd_comms_ms: float = 0.0
    input_dist_comms_ms: float = 0.0
    prefetch_compute_ms: float = 0.0
    total_ms: float = 0.0
    input_mb: float = 0.0
    output_mb: float = 0.0
    shards: int = 0
    hbm_used: int = 0
    hbm_used_pct: float | None = None
    ddr_used: int = 0
    ddr_used_pct: float | None = None

    def phase_ms(self, field: str) -> float:
        """Time of one of :data:`PERF_FIELDS`, ms."""
        return getattr(self, f"{field}_ms")

    def used(self, tier: str) -> tuple[int, float | None]:
        """(bytes used, % of capacity) on ``tier`` (``hbm`` or ``ddr``)."""
        return getattr(self, f"{tier}_used"), getattr(self, f"{tier}_used_pct")


@dataclass
class TableFigures:
    """One table: its shape, where it went and what it costs (all shards)."""

    table: str
    module: str
    rows: int
    dim: int
    features: int
    pooling_factor: float
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    shards: int
    weights_bytes: int
    optimizer_bytes: int
    bytes_with_optimizer: int
    hbm_bytes: int
    ddr_bytes: int
    time_ms: float
    largest_shard_ms: float


@dataclass
class Phase:
    """One synchronised phase of the step and the rank that makes it last."""

    phase: str  # e.g. "fwd comms table_wise", "bwd compute"
    module: str
    slowest_rank: int
    ms: float


@dataclass
class CriticalPath:
    """TorchRec's critical path by phase, slowest first."""

    comms_ms: float
    compute_ms: float
    total_ms: float
    phases: list[Phase]


@dataclass
class PlanFigures:
    """Everything the report says; ``ranks`` and what follows only when the tables were placed."""

    summary: Summary
    topology: TopologySpec  # resolved
    planner_stats: dict[str, Any]  # the planner's own counters (they differ by planner)
    ranks: list[RankFigures] | None = None
    tables: list[TableFigures] | None = None
    critical_path: CriticalPath | None = None
    imbalance: dict[str, dict[str, float]] | None = None  # distribution -> measure -> value

    @property
    def placed(self) -> bool:
        return self.ranks is not None

    def to_json(self) -> dict[str, Any]:
        """report.json."""
        out: dict[str, Any] = {
            "summary": self.summary.to_json(),
            "topology": self.topology.model_dump(mode="json"),
            "planner_stats": self.planner_stats,
        }
        if self.placed:
            assert self.tables is not None and self.critical_path is not None
            out.update(
                ranks=[asdict(r) for r in self.ranks or []],
                tables=[asdict(t) for t in self.tables],
                critical_path=asdict(self.critical_path),
                imbalance=self.imbalance,
            )
        return out


@dataclass
class CompareRow:
    """One topology / batch size of a what-if comparison (a row of compare.json)."""

    topology: str
    world_size: int
    batch_size_per_rank: int | None
    fits: bool
    peak_device_memory_pct: float | None
    est_step_time_ms: float | None
    est_samples_per_s: int | None
    slowest_rank_ms: float | None
    planning_seconds: float
    error: str | None

    @classmethod
    def of(cls, figures: PlanFigures) -> "CompareRow":
        s = figures.summary
        return cls(
            topology=s.topology,
            world_size=s.world_size,
            batch_size_per_rank=s.batch_size_per_rank,
            fits=s.fits,
            peak_device_memory_pct=s.peak_device_memory_pct,
            est_step_time_ms=s.est_step_time_ms,
            est_samples_per_s=s.est_samples_per_s,
            slowest_rank_ms=s.slowest_rank_ms,
            planning_seconds=s.planning_seconds,
            error=s.error,
        )


# ------------------------------------------------------------------------------------ figures


def compute_figures(result: PlanResult, config_name: str) -> PlanFigures:
    """The report's numbers (``report.json`` is their :meth:`PlanFigures.to_json`)."""
    spec = result.spec
    ws = spec.world_size
    summary = Summary(
        config=config_name,
        topology=spec.label,
        fits=result.fits,
        error=result.error,
        planner=result.planner,
        planning_seconds=round(result.seconds, 2),
        world_size=ws,
        compute_device=spec.device,
        batch_size_per_rank=spec.batch_size,
        global_batch_size=(spec.batch_size or 0) * ws,
        sparse_optimizer=spec.sparse_optimizer,
        storage_reserve=spec.storage_reserve,
        sharding_types_offered=_offered(result),
        note=cpu_note(spec),
        scope=SCOPE,
    )
    figures = PlanFigures(summary=summary, topology=spec, planner_stats=result.stats)
    if not result.fits or not result.best_plan:
        return figures

    plan = result.best_plan
    device_tier = "hbm" if spec.device == "cuda" else "ddr"
    ranks = _empty_ranks(result)
    tables = []
    for so in sorted(plan, key=lambda o: o.fqn):
        inputs, outputs = _io_sizes(so, result)
        shard_ranks = [int(s.rank) for s in so.shards]  # type: ignore[arg-type]
        for shard, rank, i_bytes, o_bytes in zip(so.shards, shard_ranks, inputs, outputs, strict=True):
            row = ranks[rank]
            row.hbm_embeddings += shard.storage.hbm
            row.ddr_embeddings += shard.storage.ddr
            for f in PERF_FIELDS:
                setattr(row, f"{f}_ms", row.phase_ms(f) + getattr(shard.perf, f))
            row.total_ms += shard.perf.total
            row.input_mb += i_bytes / MB
            row.output_mb += o_bytes / MB
            row.shards += 1
        tables.append(_table_figures(so, shard_ranks))

    for row in ranks:
        for tier in ("hbm", "ddr"):
            used = getattr(row, f"{tier}_embeddings") + getattr(row, f"{tier}_dense_and_inputs")
            capacity = getattr(row, f"{tier}_capacity")
            setattr(row, f"{tier}_used", used)
            setattr(row, f"{tier}_used_pct", round(100 * used / capacity, 2) if capacity else None)
    peak_device = max(ranks, key=lambda x: x.used(device_tier)[1] or 0)
    peak_host = max(ranks, key=lambda x: x.ddr_used_pct or 0)
    slowest = max(ranks, key=lambda x: x.total_ms)
    step_ms = compat.critical_path_ms(plan)
    summary.tables = len(plan)
    summary.peak_device_memory_pct = peak_device.used(device_tier)[1]
    summary.peak_device_memory_rank = peak_device.rank
    summary.peak_host_memory_pct = peak_host.ddr_used_pct
    summary.peak_host_memory_rank = peak_host.rank
    summary.est_step_time_ms = round(step_ms, 4)
    summary.est_samples_per_s = round(summary.global_batch_size / (step_ms / 1000)) if step_ms > 0 else None
    summary.slowest_rank = slowest.rank
    summary.slowest_rank_ms = round(slowest.total_ms, 4)
    summary.sharding_types_used = dict(Counter(t.sharding_type for t in tables).most_common())
    summary.compute_kernels_used = dict(Counter(t.compute_kernel for t in tables).most_common())
    for row in ranks:  # rounded after the peaks are found, before the imbalance measures
        for f in fields(row):
            if f.name.endswith("_ms") or f.name.endswith("_mb"):
                setattr(row, f.name, round(getattr(row, f.name), 4))
    figures.ranks = ranks
    figures.tables = tables
    figures.critical_path = _critical_path(plan)
    figures.imbalance = _imbalance(ranks, device_tier)
    return figures


def _empty_ranks(result: PlanResult) -> list[RankFigures]:
    """Per rank: capacities, what the reservation left, and the reservation (same on every rank)."""
    spec, topology, available = result.spec, result.topology, result.storage_constraint
    assert available is not None
    dense = result.reservation.get("dense")
    kjt = result.reservation.get("kjt")
    ranks = []
    for r in range(spec.world_size):
        cap = topology.devices[r].storage
        avail = available.devices[r].storage
        ranks.append(
            RankFigures(
                rank=r,
                node=r // spec.devices_per_node,
                hbm_capacity=cap.hbm,
                ddr_capacity=cap.ddr,
                hbm_available=avail.hbm,
                ddr_available=avail.ddr,
                hbm_dense_and_inputs=(dense.hbm if dense else 0) + (kjt.hbm if kjt else 0),
                ddr_dense_and_inputs=(dense.ddr if dense else 0) + (kjt.ddr if kjt else 0),
            )
        )
    return ranks


def _table_figures(so: ShardingOption, shard_ranks: list[int]) -> TableFigures:
    rows, dim = so.tensor.shape
    weights = rows * dim * so.tensor.element_size()
    with_state = table_bytes(so.tensor)
    return TableFigures(
        table=so.name,
        module=so.path,
        rows=rows,
        dim=dim,
        features=so.num_inputs,
        pooling_factor=round(sum(so.input_lengths) / max(len(so.input_lengths), 1), 3),
        sharding_type=so.sharding_type,
        compute_kernel=so.compute_kernel,
        ranks=sorted(set(shard_ranks)),
        shards=len(so.shards),
        weights_bytes=weights,
        optimizer_bytes=with_state - weights,
        bytes_with_optimizer=with_state,
        hbm_bytes=sum(s.storage.hbm for s in so.shards),
        ddr_bytes=sum(s.storage.ddr for s in so.shards),
        time_ms=sum(s.perf.total for s in so.shards),
        largest_shard_ms=max(s.perf.total for s in so.shards),
    )


def _offered(result: PlanResult) -> list[str]:
    if result.spec.device == "cpu":
        return list(CPU_SHARDING_TYPES)
    return ["data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise"]


def _io_sizes(so: ShardingOption, result: PlanResult) -> tuple[list[int], list[int]]:
    """Input (ids) and output (pooled embeddings) bytes per shard and step, as TorchRec's stats."""
    constraints = result.constraints
    c = constraints.get(so.name) if constraints else None
    batch_sizes = c.batch_sizes if c and c.batch_sizes else [so.batch_size] * so.num_inputs
    return compat.shard_io_sizes(
        sharding_type=so.sharding_type,
        batch_sizes=batch_sizes,
        world_size=result.topology.world_size,
        local_world_size=result.topology.local_world_size,
        input_lengths=so.input_lengths,
        emb_dim=so.tensor.shape[1],
        shard_sizes=[s.size for s in so.shards],
        input_data_type_size=BIGINT_DTYPE,
        output_data_type_size=so.tensor.element_size(),
        num_poolings=get_num_poolings(constraints, so),
        is_pooled=so.is_pooled,
    )


def _critical_path(plan: list[ShardingOption]) -> CriticalPath:
    """TorchRec's critical path, by phase: ranks synchronise after each phase; communication
    per (module, sharding type, direction) is the slowest rank's, compute per direction too."""
    comms: dict[tuple[str, str, str], dict[int, float]] = defaultdict(lambda: defaultdict(float))
    comp: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for so in plan:
        for shard in so.shards:
            rank = int(shard.rank)  # type: ignore[arg-type]
            comms[(so.path, so.sharding_type, "fwd")][rank] += shard.perf.fwd_comms
            comms[(so.path, so.sharding_type, "bwd")][rank] += shard.perf.bwd_comms
            comp["fwd"][rank] += shard.perf.fwd_compute
            comp["bwd"][rank] += shard.perf.bwd_compute
    phases = []
    for (module, sharding_type, direction), per_rank in comms.items():
        rank, ms = max(per_rank.items(), key=lambda kv: kv[1])
        phases.append(Phase(f"{direction} comms {sharding_type}", module, rank, ms))
    for direction, per_rank in comp.items():
        rank, ms = max(per_rank.items(), key=lambda kv: kv[1])
        phases.append(Phase(f"{direction} compute", "", rank, ms))
    phases.sort(key=lambda p: -p.ms)
    comms_ms = sum(p.ms for p in phases if "comms" in p.phase)
    comp_ms = sum(p.ms for p in phases if "compute" in p.phase)
    for p in phases:
        p.ms = round(p.ms, 4)
    return CriticalPath(
        comms_ms=round(comms_ms, 4),
        compute_ms=round(comp_ms, 4),
        total_ms=round(comms_ms + comp_ms, 4),
        phases=phases,
    )


def _imbalance(ranks: list[RankFigures], device_tier: str) -> dict[str, dict[str, float]]:
    """Per distribution (time, device memory, host memory): max/mean and TorchRec's measures
    (0 = balanced, 1 = everything on one rank)."""
    out = {}
    for name, key in (
        ("time", "total_ms"),
        ("device_memory", f"{device_tier}_embeddings"),
        ("host_memory", "ddr_embeddings"),
    ):
        if name == "host_memory" and device_tier == "ddr":
            continue
        values = [float(getattr(r, key)) for r in ranks]
        total = sum(values)
        if total <= 0:
            continue
        normalized = [v / total for v in values]
        measures = {"max_over_mean": round(max(values) / (total / len(values)), 4)}
        for label, (measure, kwargs) in IMBALANCE_STAT_MEASURE.items():
            measures[label.lower().replace(" ", "_")] = round(measure(normalized, **kwargs), 4)
        out[name] = measures
    return out
