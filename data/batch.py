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
