"""Placing sharding options on ranks: ``GreedyPerfPartitioner``'s rules on arrays, and the
objective a placement is judged by.

Options become arrays (per shard: time, HBM, DDR, and time per phase) and a placement is one
mutable state (per rank: time, free HBM, free DDR, and time per phase), so the search can place,
undo and compare thousands of moves cheaply. Placement follows TorchRec's partitioner: uniform
options (data-parallel, row-wise) on every rank, per-device options shard by shard on the least
loaded rank with room, per-host options on the least loaded host.

The objective is TorchRec's estimated step time (its critical path: every communication group
-- module x sharding type x direction -- and every compute direction lasts as long as its
slowest rank), then its ``NoopPerfModel`` rating (the slowest rank's total, the default
planner's own objective), then the spread of the ranks.

Example::

    phases = Phases()
    arrays = [OptionArrays.of(o, phases) for o in options]
    placer = Placer(storage_constraint, len(phases.rows))
    state = placer.fresh()
    ranks = placer.place(state, arrays[0])   # None when it does not fit
    objective(state)                         # (step ms, slowest rank ms, spread)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torchrec.distributed.planner.types import PartitionByType, ShardingOption, Topology
from torchrec.distributed.types import ShardingType

# how an option is placed (TorchRec's partition_by): on every rank, per device, rows per host, per host
UNIFORM, DEVICE, HOST_ROWS, HOST_DEVICE = 0, 1, 2, 3


_PERF_COLUMNS = ("fwd_compute", "bwd_compute", "prefetch_compute", "fwd_comms", "bwd_comms")
_PREFETCH = 2  # phase row of prefetch: in the rank totals, not on TorchRec's critical path


class Phases:
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
class OptionArrays:
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
    def of(cls, option: ShardingOption, phases: Phases) -> "OptionArrays":
        by = option.partition_by
        if by == PartitionByType.UNIFORM.value:
            kind = UNIFORM
        elif by == PartitionByType.DEVICE.value:
            kind = DEVICE
        elif by == PartitionByType.HOST.value:
            kind = HOST_ROWS if option.sharding_type == ShardingType.TABLE_ROW_WISE.value else HOST_DEVICE
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
class PlacementState:
    """A placement in progress: what every rank has left and carries."""

    perf: np.ndarray  # per rank: estimated time (TorchRec's Perf.total summed)
    hbm: np.ndarray  # per rank: free
    ddr: np.ndarray  # per rank: free
    phase: np.ndarray  # [phase row, rank]: time per phase

    def copy(self) -> "PlacementState":
        return PlacementState(self.perf.copy(), self.hbm.copy(), self.ddr.copy(), self.phase.copy())


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
        self.initial = PlacementState(
            np.array([d.perf.total for d in devices], dtype=np.float64),
            np.array([d.storage.hbm for d in devices], dtype=np.float64),
            np.array([d.storage.ddr for d in devices], dtype=np.float64),
            np.zeros((num_phases, self.world_size), dtype=np.float64),
        )

    def fresh(self) -> PlacementState:
        return self.initial.copy()

    # Every place_* returns the ranks (state updated) or None (state unchanged).

    def place(self, st: PlacementState, o: OptionArrays) -> np.ndarray | None:
        if o.kind == UNIFORM:
            return self._uniform(st, o, np.arange(self.world_size))
        if o.kind == DEVICE:
            return self._device(st, o, None)
        order = np.argsort(
            st.perf[: self.num_hosts * self.host_size].reshape(self.num_hosts, self.host_size).sum(axis=1),
            kind="stable",
        )
        for host in order:
            members = np.arange(host * self.host_size, (host + 1) * self.host_size)
            if o.total_hbm > st.hbm[members].sum() or o.total_ddr > st.ddr[members].sum():
                continue
            if o.kind == HOST_ROWS:
                ranks = self._uniform(st, o, members)
            else:
                ranks = self._device(st, o, members)
            if ranks is not None:
                return ranks
        return None

    def _uniform(self, st: PlacementState, o: OptionArrays, members: np.ndarray) -> np.ndarray | None:
        if len(o.perf) != len(members):
            return None
        if (o.hbm > st.hbm[members]).any() or (o.ddr > st.ddr[members]).any():
            return None
        st.perf[members] += o.perf
        st.hbm[members] -= o.hbm
        st.ddr[members] -= o.ddr
        st.phase[o.rows[:, None], members[None, :]] += o.vals.T
        return members

    def _device(self, st: PlacementState, o: OptionArrays, members: np.ndarray | None) -> np.ndarray | None:
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
    def remove(st: PlacementState, o: OptionArrays, ranks: np.ndarray, upto: int | None = None) -> None:
        n = len(o.perf) if upto is None else upto
        np.subtract.at(st.perf, ranks, o.perf[:n])
        np.add.at(st.hbm, ranks, o.hbm[:n])
        np.add.at(st.ddr, ranks, o.ddr[:n])
        np.subtract.at(st.phase, (o.rows[:, None], ranks[None, :]), o.vals[:n].T)

    @staticmethod
    def add(st: PlacementState, o: OptionArrays, ranks: np.ndarray) -> None:
        np.add.at(st.perf, ranks, o.perf)
        np.subtract.at(st.hbm, ranks, o.hbm)
        np.subtract.at(st.ddr, ranks, o.ddr)
        np.add.at(st.phase, (o.rows[:, None], ranks[None, :]), o.vals.T)


Key = tuple[float, float, float]  # (step ms, slowest rank ms, spread): compared in this order


def objective(st: PlacementState) -> Key:
    """TorchRec's critical path (each phase lasts as long as its slowest rank: the estimated
    step), then its ``NoopPerfModel`` rating (the slowest rank: the default planner's
    objective), then the spread of the ranks."""
    peaks = st.phase.max(axis=1)
    critical = float(peaks.sum() - peaks[_PREFETCH])
    return (round(critical, 9), round(float(st.perf.max()), 9), float(np.dot(st.perf, st.perf)))


def better(a: Key, b: Key) -> bool:
    """``a`` shortens the step, or keeps it and lowers the slowest rank, or keeps both and
    narrows the spread noticeably."""
    if a[0] != b[0]:
        return a[0] < b[0]
    if a[1] != b[1]:
        return a[1] < b[1]
    return a[2] < b[2] * (1 - 1e-7)


def place_at(st: PlacementState, o: OptionArrays, ranks: np.ndarray) -> bool:
    """Place ``o`` on the given ``ranks`` if they have room (a swap's half); True when placed."""
    if (o.hbm > st.hbm[ranks]).any() or (o.ddr > st.ddr[ranks]).any():
        return False
    Placer.add(st, o, ranks)
    return True
