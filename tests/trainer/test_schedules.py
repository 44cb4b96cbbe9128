"""Learning-rate schedules and gradient clipping: the lr sequences against hand computations, the
fused table optimizer really taking the scheduled lr, clipping bounding a real run's dense update,
and one clear error per bad ``training.lr_schedule``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_on_ranks
from towerrec.trainer.config import ConfigError, LRScheduleConfig, load_config
from towerrec.trainer.schedules import LRSchedule

SMALL = ["training.batch_size=512", "training.num_workers=0", "checkpoint.enabled=false"]


def _lr_sequence(cfg: LRScheduleConfig, steps_per_epoch: int, epochs: int, decay_length: int) -> dict:
    """The lrs each step uses, per optimizer, for two optimizers of base lr 0.5 and 1e-3."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizers = {"a": torch.optim.SGD([params[0]], lr=0.1), "b": torch.optim.Adam([params[1]], lr=0.1)}
    schedule = LRSchedule(cfg, {"a": (optimizers["a"], 0.5), "b": (optimizers["b"], 1e-3)}, decay_length)
    seen: dict[str, list[float]] = {"a": [], "b": []}
    for epoch in range(epochs):
        schedule.set_epoch(epoch)
        for _ in range(steps_per_epoch):
            for name, lr in schedule.lrs().items():
                seen[name].append(lr)
            for optimizer in optimizers.values():
                optimizer.step()
            schedule.step()
    return seen


C1, C2, C3 = (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (LRScheduleConfig(), [1.0] * 6),
        (LRScheduleConfig(warmup_steps=4), [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]),
        # steps after the warmup: 0, 0, 0, 1, 2, 3 -> gamma ** (t // 2)
        (
            LRScheduleConfig(warmup_steps=2, decay="step", step_size=2, gamma=0.5),
            [0.5, 1.0, 1.0, 1.0, 0.5, 0.5],
        ),
        (LRScheduleConfig(decay="exponential", gamma=0.9), [1.0, 0.9, 0.81, 0.729, 0.6561, 0.59049]),
        # cosine over 4 steps after a warmup of 1, down to 0.2, then flat
        (
            LRScheduleConfig(warmup_steps=1, decay="cosine", min_lr_ratio=0.2, decay_length=4),
            [1.0, 1.0, 0.2 + 0.8 * C1, 0.2 + 0.8 * C2, 0.2 + 0.8 * C3, 0.2],
        ),
        # by epoch (3 steps each): the warmup counts steps, the decay epochs
        (
            LRScheduleConfig(warmup_steps=2, decay="step", by="epoch", step_size=1, gamma=0.5),
            [0.5, 1.0, 1.0, 0.5, 0.5, 0.5],
        ),
    ],
    ids=["constant", "warmup", "step", "exponential", "cosine", "by-epoch"],
)
def test_lr_sequence_of_each_decay_matches_the_hand_computation(
    cfg: LRScheduleConfig, expected: list[float]
) -> None:
    seen = _lr_sequence(cfg, steps_per_epoch=3, epochs=2, decay_length=100)
    assert seen["a"] == pytest.approx([0.5 * m for m in expected], rel=1e-12)
    assert seen["b"] == pytest.approx([1e-3 * m for m in expected], rel=1e-12)


def test_cosine_spans_the_planned_run_by_default() -> None:
    from towerrec.trainer.schedules import default_decay_length

    cfg = LRScheduleConfig(warmup_steps=2, decay="cosine")
    length = default_decay_length(cfg, epochs=2, steps_per_epoch=5)
    assert length == 8
    seen = _lr_sequence(cfg, steps_per_epoch=5, epochs=2, decay_length=length)["a"]
    assert seen[:3] == [0.25, 0.5, 0.5]
    assert seen[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)) / 2, rel=1e-12)
    epochs = default_decay_length(LRScheduleConfig(decay="cosine", by="epoch"), 10, 5)
    assert epochs == 10


def test_a_restored_schedule_continues_the_same_lrs() -> None:
    cfg = LRScheduleConfig(warmup_steps=3, decay="cosine", decay_length=10, by="step")
    full = _lr_sequence(cfg, steps_per_epoch=4, epochs=3, decay_length=10)["a"]

    param = torch.nn.Parameter(torch.zeros(1))
    first = torch.optim.SGD([param], lr=0.5)
    schedule = LRSchedule(cfg, {"a": (first, 0.5)}, 10)
    for _ in range(6):  # epoch 0 and half of epoch 1
        first.step()
        schedule.step()
    saved = json.loads(json.dumps(schedule.state_dict()))  # as meta.json keeps it

    second = torch.optim.SGD([param], lr=0.5)
    resumed = LRSchedule(cfg, {"a": (second, 0.5)}, 10)
    resumed.load_state_dict(saved)
    resumed.set_epoch(1)
    lrs = []
    for _ in range(6):
        lrs.append(resumed.lrs()["a"])
        second.step()
        resumed.step()
    assert lrs == full[6:]  # bitwise

    # An optimizer the saved run did not have (data-parallel tables after a new plan) joins at
    # the others' step.
    joined = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    with_tables = LRSchedule(cfg, {"a": (torch.optim.SGD([param], lr=0.5), 0.5), "tables": (joined, 0.5)}, 10)
    with_tables.load_state_dict(saved)
    with_tables.set_epoch(1)
    assert with_tables.lrs() == {"a": full[6], "tables": full[6]}

    # A checkpoint without the schedule's state (saved before schedules) continues at its step.
    third = torch.optim.SGD([param], lr=0.5)
    sought = LRSchedule(cfg, {"a": (third, 0.5)}, 10)
    sought.seek(6, 1)
    assert sought.lrs()["a"] == full[6]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["training.lr_schedule.decay=step", "training.lr_schedule.gamma=0.5"],
            "step_size is required by decay: step",
        ),
        (["training.lr_schedule.decay=exponential"], "gamma is required by decay: exponential"),
        (
            [
                "training.lr_schedule.decay=exponential",
                "training.lr_schedule.gamma=0.9",
                "training.lr_schedule.min_lr_ratio=0.1",
            ],
            "min_lr_ratio is not read by decay: exponential",
        ),
        (["training.lr_schedule.step_size=3"], "step_size is not read by decay: constant"),
        (["training.lr_schedule.decay=linear"], "training.lr_schedule.decay: Input should be"),
        (
            ["training.lr_schedule.gamma=1.5", "training.lr_schedule.decay=exponential"],
            "training.lr_schedule.gamma: Input should be less than or equal to 1",
        ),
        (["training.lr_schedule.warmup=3"], "training.lr_schedule.warmup: unknown key"),
        (["training.grad_clip.max_norm=0"], "training.grad_clip.max_norm: Input should be greater than 0"),
    ],
)
def test_bad_schedule_or_clipping_gives_one_clear_error(
    synth_data: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(synth_data / "config.yaml", ["run_dir=unused", *overrides])
    assert message in str(info.value)
    if "required" in message or "not read" in message:
        assert f"training.lr_schedule: {message}" in str(info.value)


# ---- the fused table optimizer takes the scheduled lr ----------------------------------------------


def _fused_table_updates(rank: int, world_size: int) -> dict:
    """A real sharded EBC (fused SGD, lr 0.5) stepped as TrainPipelineSparseDist does (zero_grad,
    forward, backward with the fused update, step), then the schedule; the loss is the sum of the
    pooled embeddings, so each row's gradient is its id count and its update -lr * count."""
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=8, feature_names=["f"])],
        device=torch.device("meta"),
    )
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.5})
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    topology = Topology(world_size=world_size, compute_device="cpu")
    constraints = {"t": ParameterConstraints(sharding_types=["table_wise"])}  # fused, not replicated
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        ebc, [EmbeddingBagCollectionSharder()], dist.group.WORLD
    )
    model = DistributedModelParallel(ebc, device=torch.device("cpu"), env=env, plan=plan)
    fused = model.fused_optimizer
    cfg = LRScheduleConfig(warmup_steps=2, decay="step", step_size=1, gamma=0.5)
    schedule = LRSchedule(cfg, {"sparse": (fused, 0.5)}, decay_length=1)
    ids = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([1, 1, 3]), lengths=torch.tensor([2, 1])
    )  # row 1 twice, row 3 once
    weight = model.state_dict()["embedding_bags.t.weight"]
    local = weight.local_shards()[0].tensor if hasattr(weight, "local_shards") else weight
    updates, lrs = [], []
    for _ in range(5):
        before = local.detach().clone()
        lrs.append(schedule.lrs()["sparse"])
        fused.zero_grad()
        model(ids).values().sum().backward()
        fused.step()
        schedule.step()
        updates.append((local.detach() - before).numpy())
    placement = plan.plan[""]["t"].sharding_type
    return {"updates": updates, "lrs": lrs, "placement": placement}


def test_the_fused_table_optimizer_takes_the_scheduled_lr() -> None:
    [(status, value)] = run_on_ranks(_fused_table_updates, 1)
    assert status == "ok", value
    assert value["placement"] == "table_wise"
    assert value["lrs"] == [0.25, 0.5, 0.5, 0.25, 0.125]  # 0.5 x [1/2, 1, 1, 1/2, 1/4]
    counts = np.zeros((8, 1))
    counts[1], counts[3] = 2, 1
    for lr, update in zip(value["lrs"], value["updates"], strict=True):
        np.testing.assert_allclose(update, -lr * counts * np.ones((1, 4)), rtol=1e-6, atol=1e-7)


# ---- gradient clipping on a real run --------------------------------------------------------------


def _one_step_updates(rank: int, world_size: int, config_path: str, root: str) -> dict:
    """The update norm of the dense parameters and of the data-parallel table after one SGD step
    (dense lr 1.0, table lr 0.5), with and without clipping to 1e-5."""
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    env = init_distributed()
    norms = {}
    for name, clip in (("clipped", "1e-5"), ("free", "null")):
        overrides = [
            f"run_dir={root}/{name}",
            *SMALL,
            "training.max_steps=1",
            "training.dense_optimizer.type=sgd",
            "training.dense_optimizer.lr=1.0",
            "training.sparse_optimizer.type=sgd",
            "training.sparse_optimizer.lr=0.5",
            f"training.grad_clip.max_norm={clip}",
            "sharding.constraints.device.sharding_types=[data_parallel]",
        ]
        trainer = Trainer(load_config(config_path, overrides), env)
        groups = {"dense": trainer.dense_optimizer.params, "table": trainer.table_optimizer.params}
        before = {g: {k: p.detach().clone() for k, p in ps.items()} for g, ps in groups.items()}
        trainer.fit()
        norms[name] = {
            g: float(
                torch.linalg.vector_norm(
                    torch.stack([(p.detach() - before[g][k]).norm() for k, p in ps.items()])
                )
            )
            for g, ps in groups.items()
        }
    return norms


def test_clipping_bounds_the_dense_and_replicated_table_updates(synth_data: Path, tmp_path: Path) -> None:
    results = run_on_ranks(_one_step_updates, 2, args=(str(synth_data / "config.yaml"), str(tmp_path)))
    for status, value in results:
        assert status == "ok", value
    assert results[0][1] == results[1][1]  # DDP: the same gradients, norms and updates on each rank
    norms = results[0][1]
    # lr x max_norm: the gradients were scaled down to that norm (up to its 1e-6 guard)
    assert 0.99 * 1e-5 <= norms["clipped"]["dense"] <= 1.0 * 1e-5 * (1 + 1e-4)
    assert 0.99 * 0.5e-5 <= norms["clipped"]["table"] <= 0.5 * 1e-5 * (1 + 1e-4)
    assert norms["free"]["dense"] > 10 * 1e-5 and norms["free"]["table"] > 10 * 0.5e-5


def test_a_schedule_and_clipping_round_trip_through_the_resolved_config(
    synth_data: Path, tmp_path: Path
) -> None:
    from towerrec.trainer.config import dump_config

    overrides = [
        "run_dir=unused",
        "training.lr_schedule.decay=step",
        "training.lr_schedule.step_size=2",
        "training.lr_schedule.gamma=0.5",
        "training.grad_clip.max_norm=1.0",
    ]
    config = load_config(synth_data / "config.yaml", overrides)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))  # every key, the unread ones null or default
    assert load_config(again) == config
