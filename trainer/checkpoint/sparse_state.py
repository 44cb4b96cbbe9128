"""The tables' optimizer state in a checkpoint: saved under fbgemm's names whatever the
placement, and loaded into another placement (resharding row-wise state across column shards).

Example::

    state = sparse_state(model.fused_optimizer, table_optimizer, "rowwise_adagrad")  # to save
    targets = sparse_targets(meta, metadata, fused_state, table_state, "rowwise_adagrad", plan, dims)
    dcp.load({..., "optim": {"sparse": targets.state}}, ...)   # point-wise state
    targets.fill(SavedRows(step_dir, metadata))   # row-wise state, block by block from the files

Point-wise state (adagrad) has the table's shape, so DCP reshards it like the weights. Row-wise
state (rowwise_adagrad's ``momentum1``) has one value per row *per column shard*: ``[rows * n]``
with column shard j (by column offset) at ``[j*rows, (j+1)*rows)``, as TorchRec stores it;
meta.json keeps the shards' column ranges. A row's value for a column range is the width-weighted
mean of the saved shards' values over that range: exact when shards merge (a shard accumulates
mean(g^2) over its columns), the best estimate when one splits. :meth:`SparseTargets.fill` reads
the saved rows one stored chunk at a time (``chunks.SavedRows``) and accumulates them into the
local pieces: no saved shard is held whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from towerrec.trainer.checkpoint.chunks import SavedRows
from towerrec.trainer.checkpoint.layout import CheckpointError
from towerrec.trainer.checkpoint.meta import CheckpointMeta
from towerrec.trainer.optimizers import TORCH_STATE_NAMES


@dataclass
class RowwiseFill:
    """One local piece of a row-wise state: ``target`` <- the width-weighted sum of the saved
    ranges ``[start, start + target.numel())`` of ``fqn``, one ``(start, weight)`` per term."""

    fqn: str
    target: torch.Tensor
    terms: list[tuple[int, float]]


def table_placements(plan: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{table: placement}`` of the model's one EmbeddingBagCollection in ``plan_to_dict`` form."""
    return next(iter(plan.values()), {}) if plan else {}


def column_groups(placement: dict[str, Any] | None, dim: int) -> list[list[int]]:
    """``[[column offset, width], ...]`` of a table's column shards in TorchRec's order (by
    offset); one group for a table whose shards all span every column (data-parallel,
    table-wise, row-wise)."""
    shards = (placement or {}).get("shards") or []
    if not shards or all(s["sizes"][1] == dim for s in shards):
        return [[0, dim]]
    if any(s["offsets"][0] != 0 for s in shards):
        raise CheckpointError(
            f"sharding type {placement['sharding_type']} (row and column shards) is not supported "  # type: ignore[index]
            "for row-wise optimizer state"
        )
    return sorted([s["offsets"][1], s["sizes"][1]] for s in shards)


def sparse_state(fused_optimizer: Any, table_optimizer: Any | None, kind: str) -> dict[str, dict[str, Any]]:
    """``{table: {fbgemm state name: tensor}}`` of the tables this rank holds: the sharded tables'
    fused state as it is, the data-parallel tables' torch optimizer state renamed (TorchRec issue
    2394) and, row-wise, flattened like fbgemm's."""
    out: dict[str, dict[str, Any]] = {}
    for fqn, states in fused_optimizer.state_dict()["state"].items():
        table = fqn.split(".")[-2]
        for key, value in states.items():
            out.setdefault(table, {})[key.removeprefix(f"{table}.")] = value
    if table_optimizer is not None:
        for fqn, states in table_optimizer.state_dict()["state"].items():
            table = fqn.split(".")[-2]
            for name, canonical in TORCH_STATE_NAMES[kind].items():
                value = states[name]
                out.setdefault(table, {})[canonical] = value.view(-1) if kind == "rowwise_adagrad" else value
    return out


@dataclass
class SparseTargets:
    """Where the saved table optimizer state goes in this placement: ``state``, point-wise state
    as ordinary DCP targets; ``fills``, the row-wise pieces :meth:`fill` reads from the files."""

    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    fills: list[RowwiseFill] = field(default_factory=list)

    def fill(self, saved: SavedRows) -> None:
        """Read the row-wise pieces, one stored chunk at a time; after or instead of ``dcp.load``."""
        for piece in self.fills:
            n = piece.target.numel()
            copy = len(piece.terms) == 1 and piece.terms[0][1] == 1.0
            if not copy:
                piece.target.zero_()
            for start, weight in piece.terms:
                for first, rows in saved.iter_rows(piece.fqn, start, start + n):
                    where = piece.target.narrow(0, first - start, rows.numel())
                    if copy:
                        where.copy_(rows)
                    else:  # w * box rounded, then summed: the mean of the saved shards
                        where.add_(rows.mul_(weight))


def sparse_targets(
    meta: CheckpointMeta,
    metadata: Metadata,
    fused_state: dict[str, Any],
    table_state: dict[str, Any] | None,
    kind: str,
    plan: dict[str, dict[str, Any]],
    dims: dict[str, tuple[int, int]],
) -> SparseTargets:
    """The :class:`SparseTargets` of this rank's optimizer state dicts (``fused_state`` of the
    sharded tables, ``table_state`` of the data-parallel ones) under ``plan``; ``dims``:
    ``{table: (rows, dim)}``."""
    placements = table_placements(plan)
    targets: list[tuple[str, str, Any, list[list[int]]]] = []  # table, name, tensor, new groups
    for fqn, states in fused_state["state"].items():
        table = fqn.split(".")[-2]
        groups = column_groups(placements.get(table), dims[table][1])
        for key, value in states.items():
            targets.append((table, key.removeprefix(f"{table}."), value, groups))
    if table_state is not None:
        for fqn, states in table_state["state"].items():
            table = fqn.split(".")[-2]
            for name, canonical in TORCH_STATE_NAMES[kind].items():
                value = states[name].view(-1) if kind == "rowwise_adagrad" else states[name]
                targets.append((table, canonical, value, [[0, dims[table][1]]]))
    out = SparseTargets()
    for table, name, target, groups in targets:
        fqn = f"optim.sparse.{table}.{name}"
        md = metadata.state_dict_metadata.get(fqn)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {meta.path} has no optimizer state {fqn}")
        if len(md.size) == 2:  # point-wise: DCP reshards it like the table
            out.state.setdefault(table, {})[name] = target
            continue
        rows = dims[table][0]
        old_groups = meta.tables[table].column_groups
        if isinstance(target, ShardedTensor):
            pieces = []
            for shard in target.local_shards():
                offset = shard.metadata.shard_offsets[0]
                g = offset // rows if len(groups) > 1 else 0
                pieces.append((shard.tensor, offset - g * rows, groups[g]))
        else:
            pieces = [(target, 0, groups[0])]
        for tensor, first_row, (c0, width) in pieces:
            terms = []
            for j, (o, d) in enumerate(old_groups):
                overlap = min(c0 + width, o + d) - max(c0, o)
                if overlap > 0:
                    start = j * rows + first_row if len(old_groups) > 1 else first_row
                    terms.append((start, overlap / width))
            out.fills.append(RowwiseFill(fqn, tensor, terms))
    return out
