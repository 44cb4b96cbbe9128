"""The unit the train pipeline moves between devices: one fixed-size batch of examples.

Example::

    batch = next(iter(loader))
    batch.sparse["user_id"].lengths()    # [B]
    batch.dense.shape                    # (B, num_dense)
    batch.labels["click"]                # [B] float32 in {0, 1}
    batch.real_rows                      # rows with weight 1; the rest is padding
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """Dense features, sparse ids, per-task labels and per-row weights of ``B`` rows.

    Every batch has exactly ``B`` rows; padding rows (weight 0) have no ids, zero dense
    features and zero labels, so losses and metrics weighted by ``weights`` ignore them.

    Example::

        batch = batch.to(torch.device("cuda"), non_blocking=True)
        loss = (bce(logits, batch.labels["click"]) * batch.weights).sum()
    """

    dense: torch.Tensor  # [B, D] float32, D may be 0
    sparse: KeyedJaggedTensor  # key-major; keys in config order
    labels: dict[str, torch.Tensor]  # task name -> [B] float32
    weights: torch.Tensor  # [B] float32, 1 for real rows, 0 for padding

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            labels={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.labels.items()},
            weights=self.weights.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        for label in self.labels.values():
            label.record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            weights=self.weights.pin_memory(),
        )

    def __len__(self) -> int:
        return self.weights.numel()

    @property
    def num_rows(self) -> int:
        """``B``, padding included."""
        return self.weights.numel()

    @property
    def real_rows(self) -> int:
        """Rows that come from the data (weight 1)."""
        return int(self.weights.count_nonzero())


@dataclass
class PackedBatch:
    """A :class:`Batch` in two flat buffers, for the hop from a DataLoader worker to the trainer:
    one int64 buffer (the sparse values, then the key-major int32 lengths in the same bytes,
    padded to a whole word) and one float32 buffer (dense row-major, labels task by task,
    weights). A worker sends numpy buffers, pickled as two byte strings through its pipe: a
    torch tensor would cost a shared-memory segment and a file descriptor hand-over each (about
    0.5 ms, and several context switches, per tensor). :meth:`unpack` makes views: no copy, and
    the lengths stay int32 (KeyedJaggedTensor takes them as they are).

    Example::

        packed = PackedBatch(ints, floats, keys, tasks, batch_size=1024, num_dense=4, num_values=9000)
        batch = packed.unpack()         # Batch of views of the two buffers
    """

    ints: torch.Tensor | np.ndarray  # int64 [num_values + ceil(K*B / 2)]: values, int32 lengths
    floats: torch.Tensor | np.ndarray  # float32 [B*D + T*B + B]
    keys: tuple[str, ...]
    tasks: tuple[str, ...]
    batch_size: int
    num_dense: int
    num_values: int

    def pin_memory(self) -> "PackedBatch":  # called by DataLoader(pin_memory=True) on CUDA hosts
        return PackedBatch(
            torch.as_tensor(self.ints).pin_memory(),
            torch.as_tensor(self.floats).pin_memory(),
            self.keys,
            self.tasks,
            self.batch_size,
            self.num_dense,
            self.num_values,
        )

    def unpack(self) -> Batch:
        """The :class:`Batch` of views of the buffers (numpy buffers become torch without a copy)."""
        size, num_dense, num_values = self.batch_size, self.num_dense, self.num_values
        ints, floats = torch.as_tensor(self.ints), torch.as_tensor(self.floats)
        dense_end = size * num_dense
        labels_end = dense_end + len(self.tasks) * size
        labels = floats[dense_end:labels_end].view(len(self.tasks), size)
        return Batch(
            dense=floats[:dense_end].view(size, num_dense),
            sparse=KeyedJaggedTensor(
                keys=list(self.keys),
                values=ints[:num_values],
                lengths=ints[num_values:].view(torch.int32)[: len(self.keys) * size],
                stride=size,
            ),
            labels=dict(zip(self.tasks, labels.unbind(0), strict=True)),
            weights=floats[labels_end:],
        )
