"""Data-parallel tables get the configured table optimizer, not the dense one: a table learns the
same whether TorchRec replicates it (dense kernel + DDP) or shards it (fused TBE update)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dist_utils import run_on_ranks


def _fill_tables(model) -> None:
    """The same values in every table whatever its placement (init depends on placement)."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for key, value in model.state_dict().items():
            if "embedding_bags" not in key:
                continue
            if isinstance(value, ShardedTensor):
                pieces = [(s.metadata.shard_offsets, s.tensor) for s in value.local_shards()]
            else:
                pieces = [((0, 0), value)]
            for (r, c), tensor in pieces:
                rows = torch.arange(r, r + tensor.shape[0]).view(-1, 1).double()
                cols = torch.arange(c, c + tensor.shape[1]).view(1, -1).double()
                tensor.copy_(torch.sin(rows * 16 + cols) * 0.05)


def _device_table_update(rank: int, world_size: int, config_path: str, root: str, sparse: str) -> dict:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    env = init_distributed()
    updates = {}
    for placement in ("data_parallel", "table_wise"):
        overrides = [
            f"run_dir={root}/{placement}",
            "training.batch_size=512",
            "training.max_steps=3",
            "training.num_workers=0",
            f"training.sparse_optimizer.type={sparse}",
            "training.sparse_optimizer.lr=0.5",
            "checkpoint.enabled=false",
            f"sharding.constraints.device.sharding_types=[{placement}]",
        ]
        trainer = Trainer(load_config(config_path, overrides), env)
        _fill_tables(trainer.model)
        weight = trainer.model.state_dict()["model.ebc.embedding_bags.device.weight"]
        if isinstance(weight, ShardedTensor):
            weight = weight.local_shards()[0].tensor if weight.local_shards() else None
        before = None if weight is None else weight.detach().clone()
        trainer.fit()
        updates[placement] = None if weight is None else (weight.detach() - before).numpy()
        if placement == "data_parallel":
            assert trainer.table_optimizer is not None
            assert "model.ebc.embedding_bags.device.weight" not in trainer.dense_optimizer.params
    return updates


@pytest.mark.parametrize("sparse, tolerance", [("sgd", 1e-9), ("rowwise_adagrad", 1e-5)])
def test_replicated_and_sharded_tables_take_the_same_steps(
    synth_data: Path, tmp_path: Path, sparse: str, tolerance: float
) -> None:
    results = run_on_ranks(
        _device_table_update, 2, args=(str(synth_data / "config.yaml"), str(tmp_path), sparse)
    )
    for status, value in results:
        assert status == "ok", value
    replicated = results[0][1]["data_parallel"]
    sharded = next(v["table_wise"] for _, v in results if v["table_wise"] is not None)
    assert np.abs(replicated).max() > 1e-4  # the table did learn
    # Same update up to float rounding (the two kernels sum the gradients in another order).
    assert np.abs(replicated - sharded).max() <= tolerance * max(1.0, np.abs(replicated).max())
