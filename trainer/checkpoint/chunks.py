"""Tables in a checkpoint as row chunks: saved and read back one chunk at a time, never as a
second copy of a whole table.

Why: DCP writes one item per local shard and clones a shard whose storage is larger than the
shard before ``torch.save`` (``filesystem._SerialCpuLoader``); fbgemm keeps all tables of a
kernel in one buffer, so every table shard is such a view and its save held a full second copy.
Reading is bounded by the stored items: DCP ``torch.load``\\ s a whole item before copying the
part it needs. :func:`chunked_state` therefore presents every tensor larger than
:data:`CHUNK_BYTES` (the manager passes ``checkpoint.chunk_mb``) as a ShardedTensor whose shards
are row blocks of at most that size at their global offsets (views, no copy): each clone on save
and each item on load is one chunk. The
stored layout is still DCP's (chunks of one global tensor), so ``dcp.load`` reshards it onto any
plan; checkpoints written before (one item per shard) load unchanged, bounded by their items.

:class:`SavedRows` reads row blocks of a saved tensor straight from the files, without a
process group: the row-wise optimizer state's resharding and the table-by-table export use it.

Example::

    dcp.save(chunked_state({"model": model.state_dict()}), checkpoint_id=step_dir, ...)
    saved = SavedRows(step_dir)
    for first_row, rows in saved.iter_rows("model.model.ebc.embedding_bags.user.weight"):
        ...   # rows: [n, dim], about a chunk per column shard it was saved in
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from towerrec.trainer.checkpoint.layout import CheckpointError

# The largest stored item of a table (``checkpoint.chunk_mb``): a save holds up to three chunks at
# once (DCP's clone, torch.save's buffer, the next clone), a load two (the item read, its tensor).
CHUNK_BYTES = 8 * 2**20


def row_ranges(rows: int, row_bytes: int, max_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` cutting ``rows`` rows of ``row_bytes`` each into blocks of at
    most ``max_bytes`` (at least one row each; one empty block for zero rows)."""
    step = max(1, max_bytes // max(row_bytes, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]


def _row_bytes(sizes: Any, dtype: torch.dtype) -> int:
    return math.prod(sizes[1:]) * dtype.itemsize


def row_chunked(value: ShardedTensor, max_bytes: int = CHUNK_BYTES) -> ShardedTensor:
    """``value`` with each shard cut into row blocks of at most ``max_bytes`` (views of its
    local shards); ``value`` itself when no shard is larger. Every rank computes the same global
    layout from the shards' metadata: no communication."""
    metadata = value.metadata()
    dtype = metadata.tensor_properties.dtype
    if all(math.prod(s.shard_sizes) * dtype.itemsize <= max_bytes for s in metadata.shards_metadata):
        return value
    local = {tuple(s.metadata.shard_offsets): s.tensor for s in value.local_shards()}
    chunks: list[ShardMetadata] = []
    local_chunks: list[Shard] = []
    for shard in metadata.shards_metadata:
        first, rest = shard.shard_offsets[0], list(shard.shard_offsets[1:])
        tensor = local.get(tuple(shard.shard_offsets))
        for a, b in row_ranges(shard.shard_sizes[0], _row_bytes(shard.shard_sizes, dtype), max_bytes):
            chunk = ShardMetadata([first + a, *rest], [b - a, *shard.shard_sizes[1:]], shard.placement)
            chunks.append(chunk)
            if tensor is not None:
                local_chunks.append(Shard(tensor.narrow(0, a, b - a), chunk))
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local_chunks,
        ShardedTensorMetadata(chunks, metadata.size, metadata.tensor_properties),
        process_group=value._process_group,
    )


def spread_rows(value: torch.Tensor, max_bytes: int = CHUNK_BYTES) -> torch.Tensor | ShardedTensor:
    """A tensor every rank holds whole (a data-parallel table, its optimizer state) as a
    ShardedTensor of row blocks, block i written by rank ``i % world size``; ``value`` itself
    when it is small, 0-d, or no process group is initialised."""
    if value.dim() == 0 or value.nbytes <= max_bytes or not dist.is_initialized():
        return value
    world, rank = dist.get_world_size(), dist.get_rank()
    chunks, local_chunks = [], []
    for i, (a, b) in enumerate(row_ranges(value.size(0), _row_bytes(value.size(), value.dtype), max_bytes)):
        chunk = ShardMetadata(
            [a, *[0] * (value.dim() - 1)], [b - a, *value.size()[1:]], f"rank:{i % world}/cpu"
        )
        chunks.append(chunk)
        if i % world == rank:
            local_chunks.append(Shard(value.narrow(0, a, b - a), chunk))
    properties = TensorProperties.create_from_tensor(value)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local_chunks, ShardedTensorMetadata(chunks, value.size(), properties)
    )


def chunked_state(state: dict[str, Any], max_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """A state dict for ``dcp.save`` with every tensor larger than ``max_bytes`` in row chunks
    (nested dicts followed; other values as they are)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = chunked_state(value, max_bytes)
        elif isinstance(value, ShardedTensor):
            out[key] = row_chunked(value, max_bytes)
        elif isinstance(value, torch.Tensor) and value.device.type == "cpu":
            out[key] = spread_rows(value, max_bytes)
        else:
            out[key] = value
    return out


class _IntoBuffer(DefaultLoadPlanner):
    """Reads go into one buffer, at the read item's offsets within it."""

    def __init__(self, buffer: torch.Tensor) -> None:
        super().__init__()
        self.buffer = buffer

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return self.transform_tensor(read_item, self.buffer)  # the item's part of the buffer


class SavedRows:
    """Row blocks of the tensors of one DCP checkpoint directory, read from its files in this
    process alone (no ``dcp.load``, no process group).

    A block never spans the start of a stored chunk, so reading it ``torch.load``\\ s at most the
    chunks it overlaps (one per column shard): memory stays at about two chunks per block.
    """

    def __init__(self, step_dir: str | Path, metadata: Metadata | None = None) -> None:
        self.step_dir = Path(step_dir)
        self._reader = FileSystemReader(str(step_dir))
        self.metadata = metadata if metadata is not None else self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def tensor(self, fqn: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(fqn)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {self.step_dir} has no tensor {fqn}")
        return md

    def blocks(self, fqn: str, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
        """Row ranges covering rows ``[start, stop)`` of ``fqn`` (default: all), cut where a stored
        chunk starts."""
        md = self.tensor(fqn)
        stop = md.size[0] if stop is None else stop
        cuts = sorted({c.offsets[0] for c in md.chunks if start < c.offsets[0] < stop} | {start, stop})
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def read(self, fqn: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of saved tensor ``fqn``, every column, as a new tensor."""
        md = self.tensor(fqn)
        shape = torch.Size([stop - start, *md.size[1:]])
        buffer = torch.empty(shape, dtype=md.properties.dtype)
        wanted = ChunkStorageMetadata(torch.Size([start, *[0] * (len(shape) - 1)]), shape)
        items = create_read_items_for_chunk_list(fqn, md, [wanted])
        self._reader.read_data(LoadPlan(items), _IntoBuffer(buffer)).wait()
        return buffer

    def iter_rows(
        self, fqn: str, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` for each of :meth:`blocks`, read one at a time."""
        for a, b in self.blocks(fqn, start, stop):
            yield a, self.read(fqn, a, b)
