"""Learned task weights (loss.weighting) in the real trainer: GradNorm on 2 gloo ranks keeps its
weights identical on both, checkpoints them, resumes them exactly, and export leaves them out;
the config check names the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dist_utils import run_on_ranks

SMALL = ["training.batch_size=512", "training.num_workers=0", "training.log_interval=2"]
# 16,000 train rows / 2 ranks / 512 = 16 steps per epoch.


def _gradnorm_runs(rank: int, world_size: int, config_path: str, root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    env = init_distributed()
    common = [*SMALL, "loss.weighting=gradnorm", "checkpoint.interval=3"]

    def fit(name: str, max_steps: int) -> Any:
        config = load_config(
            config_path, [f"run_dir={root}/{name}", f"training.max_steps={max_steps}", *common]
        )
        trainer = Trainer(config, env)
        trainer.fit()
        return trainer

    a = fit("a", 10)
    fit("b", 4)
    b = fit("b", 10)
    loss = a.loss

    def gathered(value: Any) -> list[list[float]]:
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, value.detach().tolist())
        return out

    return {
        "weights": gathered(loss.gradnorm_weights),
        "initial": gathered(loss.initial_losses),
        "resumed_weights": b.loss.gradnorm_weights.detach().tolist(),
        "resumed_initial": b.loss.initial_losses.detach().tolist(),
        "reported": loss.task_weights(),
        "keys": [k for k in a.model.state_dict() if ".loss." in k],
    }


def test_gradnorm_on_two_ranks_same_weights_checkpointed_resumed_and_not_exported(
    synth_data: Path, tmp_path: Path
) -> None:
    import json

    import torch
    from towerrec.trainer.checkpoint import load_model_state
    from towerrec.trainer.config import load_config
    from towerrec.trainer.export import build_inference_model
    from towerrec.trainer.model import build_train_module

    results = run_on_ranks(
        _gradnorm_runs, 2, args=(str(synth_data / "config.yaml"), str(tmp_path)), timeout_s=300
    )
    for status, value in results:
        assert status == "ok", value
    value = results[0][1]
    weights, initial = value["weights"], value["initial"]
    assert weights[0] == weights[1] and initial[0] == initial[1]  # bitwise, both ranks
    assert all(x > 0 for x in initial[0])
    assert weights[0] != [1.0, 1.0]  # they moved
    # The stopped (step 4) and resumed run equals the uninterrupted one.
    assert value["resumed_weights"] == weights[0] and value["resumed_initial"] == initial[0]
    assert sorted(k.rsplit(".", 1)[-1] for k in value["keys"]) == ["gradnorm_weights", "initial_losses"]
    reported = value["reported"]
    assert sum(reported.values()) == pytest.approx(2.0)

    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["phase"] == "train"]
    assert [x["step"] for x in train] == [2, 4, 6, 8, 10]
    assert train[-1]["task_weights"] == reported
    assert train[0]["task_weights"] != train[-1]["task_weights"]

    # The checkpoint holds the weights; export's inference model does not.
    run_a = [f"run_dir={tmp_path / 'a'}", "loss.weighting=gradnorm"]
    config = load_config(synth_data / "config.yaml", run_a)
    module = build_train_module(config, torch.device("cpu"))
    load_model_state(tmp_path / "a", None, module)
    assert module.loss.gradnorm_weights.tolist() == weights[0]
    assert module.loss.initial_losses.tolist() == initial[0]
    inference = build_inference_model(module, config, "none")
    assert not [k for k in inference.state_dict() if "loss" in k or "gradnorm" in k]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.weighting=gradnorm", "model={type: single_task}"], "loss.weighting: gradnorm"),
        (["loss.weighting=uncertainty", "data.tasks.1.loss_weight=0.5"], "data.tasks.1.loss_weight"),
        (["loss.weighting=gradnorm", "data.tasks.0.loss_weight_decay=0.9"], "data.tasks.0.loss_weight_decay"),
        (["loss.weighting=dwa"], "loss.weighting"),
        (["loss.gradnorm_alpha=-1"], "loss.gradnorm_alpha"),
    ],
)
def test_bad_weighting_config_names_the_key(synth_data: Path, overrides: list[str], message: str) -> None:
    from towerrec.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(synth_data / "config.yaml", overrides)


@pytest.mark.parametrize(("weighting", "keys"), [("uncertainty", ["log_vars"]), ("fixed", [])])
def test_learned_weights_are_dense_parameters_of_the_train_module(
    synth_data: Path, weighting: str, keys: list[str]
) -> None:
    import torch
    from towerrec.trainer.config import load_config
    from towerrec.trainer.model import build_train_module
    from towerrec.trainer.optimizers import apply_sparse_optimizer, dense_optimizer

    config = load_config(synth_data / "config.yaml", [f"loss.weighting={weighting}"])
    module = build_train_module(config, torch.device("cpu"))
    apply_sparse_optimizer(module, config.training.sparse_optimizer)
    assert [k for k in module.state_dict() if k.startswith("head.")] == [f"head.loss.{k}" for k in keys]
    trained = dense_optimizer(module, config.training.dense_optimizer).params
    assert [k for k in trained if k.startswith("head.")] == [f"head.loss.{k}" for k in keys]
