"""Embeddings + dense features -> multi-task network."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, KeyedTensor


def pooled_embedding_width(ebc: EmbeddingBagCollection) -> int:
    """Width of ``ebc(kjt).values()``: Σ over tables of ``embedding_dim × #features``.

    Read from the configs, not by running the EBC, so it works on ``meta`` tensors.
    """
    return sum(c.embedding_dim * len(c.feature_names) for c in ebc.embedding_bag_configs())


class MultiTaskModel(nn.Module):
    """``network(concat(pooled embeddings of every sparse feature, dense features))``.

    Dense features enter as-is: the data owner (``data/``) normalises them; no projection or
    normalisation happens here. Pooled embeddings come in the EBC's feature order (tables in
    order, then each table's ``feature_names``), then the dense columns. That order holds after
    sharding too: a sharded collection returns its features grouped by sharding type, in an
    order that depends on the plan, so they are regrouped by name (the network's input columns
    must not change when a checkpoint is resumed under another plan or exported unsharded).

    Args:
        ebc (EmbeddingBagCollection): the (possibly ``meta``-device, later sharded) tables.
        num_dense (int): number of dense features D.
        network (nn.Module): maps ``[B, in_features]`` to ``{task: logit [B]}``; if it has an
            ``in_features`` attribute it must equal ``self.in_features``.

    Example::

        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t", num_embeddings=100, embedding_dim=8, feature_names=["user", "item"])],
            device=torch.device("meta"))
        model = MultiTaskModel(ebc, num_dense=3, network=PLE(8 * 2 + 3, ["click"]))
        logits = model(kjt, dense)   # {"click": [B]} (after DistributedModelParallel)
    """

    def __init__(self, ebc: EmbeddingBagCollection, num_dense: int, network: nn.Module) -> None:
        super().__init__()
        if num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {num_dense}")
        self.ebc = ebc
        self.network = network
        self.num_dense = num_dense
        self.in_features = pooled_embedding_width(ebc) + num_dense
        self.pooled_order = [name for c in ebc.embedding_bag_configs() for name in c.feature_names]
        expected = getattr(network, "in_features", None)
        if expected is not None and expected != self.in_features:
            raise ValueError(
                f"network expects {expected} input features but embeddings + dense give {self.in_features}"
            )

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``sparse`` KJT keyed by feature, ``dense [B, D]`` -> ``{task: logit [B]}``."""
        # The EBC must read the `sparse` argument untouched: TorchRec's train pipeline
        # fx-traces this forward and only pipelines a sharded module fed straight from the batch.
        pooled = KeyedTensor.regroup([self.ebc(sparse)], [self.pooled_order])[0]
        x = torch.cat([pooled, dense], dim=1) if self.num_dense > 0 else pooled
        return self.network(x)
