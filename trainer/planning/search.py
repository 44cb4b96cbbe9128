"""The fast planner's search: TorchRec's estimators and placement rules, a much smaller search.

TorchRec's ``EmbeddingShardingPlanner`` enumerates every sharding type x compute kernel for every
table, estimates every shard of every option (64 estimates for one row-wise option on 64 ranks),
deep-copies the search space, then partitions thousands of proposals. The fast planner keeps what
decides the result and drops the rest: fewer options, estimated once per shape
(:mod:`~towerrec.trainer.planning.enumeration`), placed on arrays by the partitioner's rules
(:mod:`~towerrec.trainer.planning.placement`), and here:

**Few proposals, then local search.** Start proposals as TorchRec's proposers make them (each
table at its fastest option by largest shard, by sum of shards, and one proposal per sharding
type), placed by a vectorised copy of ``GreedyPerfPartitioner``'s rules; if none fits, TorchRec's
greedy storage relief (move the table using most memory to its next option). Then, from the best
few placements, repeatedly take the slowest rank and try every option and placement of the
tables on it and swaps with tables on the least loaded ranks, keeping the move that best lowers
the objective (:func:`~towerrec.trainer.planning.placement.objective`), until none does or the
time budget ends. One-shard column-wise options cost what table-wise ones do but join another
communication group, so they stay. The result is a list of TorchRec ``ShardingOption`` with
ranks, turned into a plan by TorchRec's ``to_sharding_plan``.

Example::

    tables, options, enumeration, _ = enumerate_options(
        module, sharders(), topology, reserved, 4096, constraints
    )
    result = fast_plan(tables, options, reserved, enumeration, time_budget_s=20)
    result.plan, result.search.step   # ShardingOptions with ranks; the estimated step, ms
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torchrec.distributed.planner.types import Shard, ShardingOption, Storage, Topology
from torchrec.distributed.types import ShardingType
from towerrec.trainer.planning.enumeration import TYPE_ORDER, EnumerationStats, TableEntry
from towerrec.trainer.planning.placement import (
    DEVICE,
    HOST_ROWS,
    UNIFORM,
    Key,
    OptionArrays,
    Phases,
    PlacementState,
    Placer,
    better,
    objective,
    place_at,
)

DEFAULT_TIME_BUDGET_S = 20.0
LOCAL_SEARCH_STARTS = 3  # local search runs from the best few start placements
# a uniform start "all X": tables without an X option take the equivalent one
_UNIFORM_FALLBACK = {
    ShardingType.TABLE_WISE.value: ["table_wise", "column_wise", "table_column_wise"],
    ShardingType.COLUMN_WISE.value: ["column_wise", "table_wise"],
    ShardingType.TABLE_COLUMN_WISE.value: ["table_column_wise", "column_wise", "table_wise"],
}


class NoPlanError(RuntimeError):
    """No placement fits; ``lower_bound`` is the least storage the tables need (hbm, ddr)."""

    def __init__(self, message: str, lower_bound: Storage | None = None) -> None:
        super().__init__(message)
        self.lower_bound = lower_bound


@dataclass
class SearchStats:
    """What the search tried and where it ended."""

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
    """The fast planner's plan (``ShardingOption`` with ranks) and how it was found."""

    plan: list[ShardingOption]
    rating: float
    enumeration: EnumerationStats
    search: SearchStats
    extra: dict[str, Any] = field(default_factory=dict)


class _Search:
    """The tables' options in array form, placed by one ``Placer``."""

    def __init__(
        self, fqns: list[str], options: dict[str, list[ShardingOption]], storage_constraint: Topology
    ) -> None:
        self.fqns = fqns
        self.phases = Phases()
        self.opts = [[OptionArrays.of(o, self.phases) for o in options[f]] for f in fqns]
        self.placer = Placer(storage_constraint, len(self.phases.rows))

    def partition(
        self, choice: list[int], order: str = "storage"
    ) -> tuple[PlacementState, list[np.ndarray]] | tuple[None, int]:
        """All tables placed: uniform options first, then the others largest first, by storage
        (``GreedyPerfPartitioner``'s default) or by time (its ``SortBy.PERF``, longest
        processing time first); (state, ranks) or (None, the table that found no room)."""
        st = self.placer.fresh()
        ranks: list[np.ndarray | None] = [None] * len(self.fqns)
        chosen = [self.opts[i][choice[i]] for i in range(len(self.fqns))]
        uniform = [i for i, o in enumerate(chosen) if o.kind == UNIFORM]
        others = [i for i, o in enumerate(chosen) if o.kind != UNIFORM]
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


def _swappable(o: OptionArrays) -> bool:
    return (o.kind == DEVICE and len(o.perf) == 1) or o.kind == HOST_ROWS


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
    for sharding_type in sorted(types, key=TYPE_ORDER.index):
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

    placed: list[tuple[Key, str, list[int], PlacementState, list[np.ndarray]]] = []
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
            placed.append((objective(st), f"{label}, placed by {order}", choice, st, ranks))
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
                        (objective(st), f"greedy storage relief, placed by {order}", list(choice), st, ranks)
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
    stats.step = objective(st)[0]
    stats.seconds = time.perf_counter() - start_time
    return FastResult(plan=plan, rating=stats.rating, enumeration=enumeration, search=stats)


def _local_search(
    search: _Search,
    placer: Placer,
    st: PlacementState,
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
        spread = np.array([search.opts[i][choice[i]].kind == UNIFORM for i in on_it], dtype=bool)
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
                new_key = objective(st)
                if better(new_key, key) and (best_move is None or new_key < best_move[0]):
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
                if place_at(st, oi, ranks[j]):
                    if place_at(st, oj, ranks[i]):
                        new_key = objective(st)
                        if better(new_key, key) and (best_move is None or new_key < best_move[0]):
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
