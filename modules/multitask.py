"""Embeddings + dense features -> multi-task network."""

from __future__ import annotations

from typing import Collection, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, KeyedTensor


def pooled_embedding_width(ebc: EmbeddingBagCollection, exclude: Collection[str] = ()) -> int:
    """Width of ``ebc(kjt).values()`` without the features ``exclude``: Σ over features of their
    table's ``embedding_dim``.

    Read from the configs, not by running the EBC, so it works on ``meta`` tensors.
    """
    configs = ebc.embedding_bag_configs()
    return sum(c.embedding_dim for c in configs for name in c.feature_names if name not in exclude)


def autocast_forward(
    network: nn.Module, inputs: Sequence[torch.Tensor], dtype: Optional[torch.dtype]
) -> Dict[str, torch.Tensor]:
    """``network(*inputs)``, under ``torch.autocast(dtype)`` on the inputs' device unless ``dtype``
    is None, with the logits returned in float32.

    Autocast, not ``.to(dtype)``: the parameters, their gradients and the optimizer states stay
    float32, only the matmuls (and the ops autocast lists) run in ``dtype``: faster on GPUs and
    on CPUs with AMX, not on every CPU (``python -m benchmarks.experts --precision fp32 bf16``
    measures it). The logits go back to float32 so the loss, its gradient and the metrics are
    computed as without autocast.
    """
    if dtype is None:
        return network(*inputs)
    with torch.autocast(inputs[0].device.type, dtype=dtype):
        logits = network(*inputs)
    return {task: logit.float() for task, logit in logits.items()}


class MultiTaskModel(nn.Module):
    """``network(concat(pooled embeddings of every sparse feature, dense features))``.

    Dense features enter as-is: the data owner (``data/``) normalises them; no projection or
    normalisation happens here. Pooled embeddings come in the EBC's feature order (tables in
    order, then each table's ``feature_names``), then the dense columns. That order holds after
    sharding too: a sharded collection returns its features grouped by sharding type, in an
    order that depends on the plan, so they are regrouped by name (the network's input columns
    must not change when a checkpoint is resumed under another plan or exported unsharded).

    Cross features (``cross_features``, the hashed pair ids of DTN's codebook) are kept out of x:
    their pooled codewords go, in the given order, as a second input ``network(x, cross)``.

    Args:
        ebc (EmbeddingBagCollection): the (possibly ``meta``-device, later sharded) tables.
        num_dense (int): number of dense features D.
        network (nn.Module): maps ``[B, in_features]`` to ``{task: logit [B]}``; if it has an
            ``in_features`` attribute it must equal ``self.in_features``.
        cross_features (Sequence[str]): features whose vectors form the network's ``cross`` input.
        autocast_dtype (Optional[torch.dtype]): run the network (not the tables) under
            ``torch.autocast`` in this dtype, logits back in float32 (:func:`autocast_forward`);
            None: float32 throughout.

    Example::

        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t", num_embeddings=100, embedding_dim=8, feature_names=["user", "item"])],
            device=torch.device("meta"))
        model = MultiTaskModel(ebc, num_dense=3, network=PLE(8 * 2 + 3, ["click"]))
        logits = model(kjt, dense)   # {"click": [B]} (after DistributedModelParallel)
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        num_dense: int,
        network: nn.Module,
        cross_features: Sequence[str] = (),
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {num_dense}")
        self.ebc = ebc
        self.network = network
        self.num_dense = num_dense
        self.autocast_dtype = autocast_dtype
        self.cross_order: List[str] = list(cross_features)
        all_features = [name for c in ebc.embedding_bag_configs() for name in c.feature_names]
        unknown = sorted(set(self.cross_order) - set(all_features))
        if unknown:
            raise ValueError(f"cross_features {unknown} are not features of the embedding collection")
        self.pooled_order = [name for name in all_features if name not in set(self.cross_order)]
        self.in_features = pooled_embedding_width(ebc, exclude=self.cross_order) + num_dense
        expected = getattr(network, "in_features", None)
        if expected is not None and expected != self.in_features:
            raise ValueError(
                f"network expects {expected} input features but embeddings + dense give {self.in_features}"
            )

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``sparse`` KJT keyed by feature, ``dense [B, D]`` -> ``{task: logit [B]}``."""
        # The EBC must read the `sparse` argument untouched: TorchRec's train pipeline
        # fx-traces this forward and only pipelines a sharded module fed straight from the batch.
        if not self.cross_order:
            pooled = KeyedTensor.regroup([self.ebc(sparse)], [self.pooled_order])[0]
            return self._network([self._with_dense(pooled, dense)])
        pooled, cross = KeyedTensor.regroup([self.ebc(sparse)], [self.pooled_order, self.cross_order])
        return self._network([self._with_dense(pooled, dense), cross])

    def _network(self, inputs: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        # While TorchRec's pipeline fx-traces this forward the inputs are proxies, with no device
        # to autocast on and logits that cannot be iterated; the trace only looks for the EBC.
        if not isinstance(inputs[0], torch.Tensor):
            return self.network(*inputs)
        return autocast_forward(self.network, inputs, self.autocast_dtype)

    def _with_dense(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([pooled, dense], dim=1) if self.num_dense > 0 else pooled
