"""Embedding table construction: the table precision of ``tables[].data_type``."""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from towerrec.modules.builders import TABLE_DATA_TYPES, build_embedding_collection


def _collection(data_type: str, device: torch.device | None = None):
    table = EmbeddingBagConfig(
        name="t",
        num_embeddings=1000,
        embedding_dim=8,
        feature_names=["f"],
        data_type=TABLE_DATA_TYPES[data_type],
    )
    return build_embedding_collection([table], device)


def test_fp16_table_stores_half_precision_weights_and_pools() -> None:
    fp32, fp16 = _collection("fp32"), _collection("fp16")
    w32, w16 = fp32.embedding_bags["t"].weight, fp16.embedding_bags["t"].weight
    assert (w32.dtype, w16.dtype) == (torch.float32, torch.float16)
    assert w16.numel() * w16.element_size() * 2 == w32.numel() * w32.element_size()
    assert _collection("fp16", torch.device("meta")).embedding_bags["t"].weight.dtype == torch.float16
    ids = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1])
    )
    with torch.no_grad():
        fp16.embedding_bags["t"].weight.copy_(w32)
    pooled32, pooled16 = fp32(ids)["f"], fp16(ids)["f"]
    assert pooled16.shape == (2, 8)
    assert torch.allclose(pooled16.float(), pooled32, atol=1e-2)
