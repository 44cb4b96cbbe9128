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
    """A :class:`Batch` as two flat buffers, for the hop from a DataLoader worker to the trainer.

    Every tensor a worker sends costs its own shared-memory segment (about 0.5 ms each here), so a
    batch travels as one int64 buffer (sparse values, then key-major lengths) and one float32
    buffer (dense row-major, labels task by task, weights); :meth:`unpack` makes views of them.

    Example::

        packed = PackedBatch.pack(values, lengths, dense, labels, weights, keys, tasks)
        batch = packed.unpack()   # Batch; no copy but the int32 lengths
    """

    ints: torch.Tensor  # int64 [num_values + K*B]
    floats: torch.Tensor  # float32 [B*D + T*B + B]
    keys: tuple[str, ...]
    tasks: tuple[str, ...]
    batch_size: int
    num_dense: int

    @staticmethod
    def pack(
        values: np.ndarray,
        lengths: np.ndarray,
        dense: np.ndarray,
        labels: np.ndarray,
        weights: np.ndarray,
        keys: tuple[str, ...],
        tasks: tuple[str, ...],
    ) -> "PackedBatch":
        """``lengths`` [K, B], ``dense`` [B, D], ``labels`` [T, B] (rows in ``tasks`` order)."""
        ints = np.concatenate([values.astype(np.int64, copy=False), lengths.reshape(-1)])
        floats = np.concatenate([dense.reshape(-1), labels.reshape(-1), weights]).astype(
            np.float32, copy=False
        )
        return PackedBatch(
            torch.from_numpy(ints), torch.from_numpy(floats), keys, tasks, len(weights), dense.shape[1]
        )

    def pin_memory(self) -> "PackedBatch":  # called by DataLoader(pin_memory=True) on CUDA hosts
        return PackedBatch(
            self.ints.pin_memory(),
            self.floats.pin_memory(),
            self.keys,
            self.tasks,
            self.batch_size,
            self.num_dense,
        )

    def unpack(self) -> Batch:
        size, num_dense, num_lengths = self.batch_size, self.num_dense, len(self.keys) * self.batch_size
        num_values = self.ints.numel() - num_lengths
        dense_end = size * num_dense
        labels_end = dense_end + len(self.tasks) * size
        labels = self.floats[dense_end:labels_end].view(len(self.tasks), size)
        return Batch(
            dense=self.floats[:dense_end].view(size, num_dense),
            sparse=KeyedJaggedTensor(
                keys=list(self.keys),
                values=self.ints[:num_values],
                lengths=self.ints[num_values:].to(torch.int32),
                stride=size,
            ),
            labels={task: labels[i] for i, task in enumerate(self.tasks)},
            weights=self.floats[labels_end:],
        )
