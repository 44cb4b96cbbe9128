"""training.precision: bf16 autocasts the dense network only; parameters, gradients, logits and
loss stay float32; the config names the key; TorchRec's pipeline tracer still finds the tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from config_utils import write_config
from torchrec import KeyedJaggedTensor
from torchrec.distributed.train_pipeline.tracing import Tracer
from towerrec.data.batch import Batch
from towerrec.trainer.config import ConfigError, ExperimentConfig, load_config
from towerrec.trainer.model import TrainModule, build_train_module, embedding_bag_configs

PLE = {"type": "ple", "experts_per_task": [1, 2]}
DTN = {"type": "dtn", "methods": ["gdcn", "masknet", "memonet"], "module_width": 8, "masknet_hidden": [8]}
CROSS_DATA = {
    "tables": [
        {"name": "user", "num_embeddings": 100, "embedding_dim": 8},
        {"name": "codebook", "num_embeddings": 1000, "embedding_dim": 4},
    ],
    "sparse_features": [{"name": "user_id", "table": "user"}, {"name": "city", "table": "user"}],
    "cross": {"table": "codebook", "fields": ["user_id", "city"]},
}
ROWS = 16


def _config(tmp_path: Path, precision: str | None, dtn: bool = False) -> ExperimentConfig:
    path = write_config(tmp_path, DTN, CROSS_DATA) if dtn else write_config(tmp_path, PLE)
    return load_config(path, [f"training.precision={precision}"] if precision else [])


def _module(config: ExperimentConfig) -> TrainModule:
    torch.manual_seed(0)
    return build_train_module(config, torch.device("cpu"))


def _batch(config: ExperimentConfig) -> Batch:
    gen = torch.Generator().manual_seed(0)
    tables = embedding_bag_configs(config.data)
    keys = [name for t in tables for name in t.feature_names]
    ids = [
        torch.randint(0, t.num_embeddings, (ROWS,), generator=gen) for t in tables for _ in t.feature_names
    ]
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(ids), lengths=torch.ones(ROWS * len(keys), dtype=torch.int32)
    )
    labels = {t.name: torch.randint(0, 2, (ROWS,), generator=gen).float() for t in config.data.tasks}
    dense = torch.randn(ROWS, len(config.data.dense_features), generator=gen)
    return Batch(dense=dense, sparse=sparse, labels=labels, weights=torch.ones(ROWS))


def _linear_output_dtypes(module: nn.Module) -> list[torch.dtype]:
    """Records the output dtype of every ``nn.Linear`` of the dense network at each forward."""
    seen: list[torch.dtype] = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_config_default_accepts_bf16_and_names_the_key_of_a_bad_value(tmp_path: Path) -> None:
    assert _config(tmp_path, None).training.precision == "fp32"
    assert _config(tmp_path, "bf16").training.precision == "bf16"
    with pytest.raises(ConfigError, match=r"training\.precision: Input should be 'fp32' or 'bf16'"):
        _config(tmp_path, "fp16")


@pytest.mark.parametrize("dtn", [False, True], ids=["ple", "dtn_with_cross_codebook"])
def test_bf16_runs_the_network_matmuls_in_bf16_and_keeps_logits_loss_grads_fp32(
    tmp_path: Path, dtn: bool
) -> None:
    config = _config(tmp_path, "bf16", dtn)
    module = _module(config)
    seen = _linear_output_dtypes(module.model.network)
    loss, out = module(_batch(config))
    assert seen and set(seen) == {torch.bfloat16}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(v.dtype == torch.float32 for v in out.logits.values())
    loss.backward()
    dense = list(module.model.network.named_parameters())
    assert all(p.dtype == torch.float32 for _, p in dense)
    with_grad = [(name, p.grad) for name, p in dense if p.grad is not None]
    assert with_grad and all(g.dtype == torch.float32 and torch.isfinite(g).all() for _, g in with_grad)
    assert not torch.is_autocast_enabled("cpu")  # the tables and the loss run outside it


def test_fp32_default_has_no_autocast_and_bf16_logits_stay_close(tmp_path: Path) -> None:
    config = _config(tmp_path, None)
    module = _module(config)
    seen = _linear_output_dtypes(module.model.network)
    batch = _batch(config)
    _, fp32 = module(batch)
    assert seen and set(seen) == {torch.float32}
    module.model.autocast_dtype = torch.bfloat16  # same weights, autocast on
    _, bf16 = module(batch)
    for task, logits in fp32.logits.items():
        assert logits.dtype == torch.float32
        assert torch.allclose(bf16.logits[task], logits, atol=0.05), task  # bf16 keeps 8 mantissa bits


def test_pipeline_tracer_still_sees_the_tables_fed_from_the_batch(tmp_path: Path) -> None:
    # Mirrors TrainPipelineSparseDist._rewrite_model (the sharded EBC, the network and the loss
    # head are its leaves): the inputs are proxies there, which autocast must leave alone.
    module = _module(_config(tmp_path, "bf16", dtn=True))
    graph = Tracer(leaf_modules=["model.ebc", "model.network", "head"]).trace(module)
    (call,) = [n for n in graph.nodes if n.op == "call_module" and n.target == "model.ebc"]
    assert call.args[0].op == "call_function" and call.args[0].args[0].op == "placeholder"
