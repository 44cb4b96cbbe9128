"""Sharded checkpoints on real gloo ranks: exact resume, resharding to 1 and 4 ranks with other
plans, loading into a plain module, and one clear error per bad checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dist_utils import run_on_ranks
from job_helpers import signal_tree, torchrun_job

SMALL = ["training.batch_size=512", "training.num_workers=0", "training.log_interval=1"]
# 16,000 train rows / 2 ranks / 512 = 16 steps per epoch.


def _local(value: Any) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """(global offsets, numpy copy) of every piece of a tensor this rank holds."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [
            (tuple(s.metadata.shard_offsets), s.tensor.detach().numpy().copy()) for s in value.local_shards()
        ]
    return [((0,) * value.dim(), value.detach().numpy().copy())]


def _snapshot(trainer: Any) -> dict[str, Any]:
    """Everything a run's future depends on, as this rank holds it."""
    out: dict[str, Any] = {f"model/{k}": _local(v) for k, v in trainer.model.state_dict().items()}
    optimizers = {"fused": trainer.model.fused_optimizer, "dense": trainer.dense_optimizer}
    if trainer.table_optimizer is not None:
        optimizers["table"] = trainer.table_optimizer
    for name, optimizer in optimizers.items():
        for key, states in optimizer.state_dict()["state"].items():
            for state, value in states.items():
                out[f"{name}/{key}/{state}"] = _local(value)
    return out


def _assert_same_state(a: dict[str, Any], b: dict[str, Any], label: str) -> None:
    r"""Two :func:`_snapshot`\ s hold the same keys and bitwise equal pieces."""
    assert a.keys() == b.keys(), label
    for key in a:
        for (offset_a, x), (offset_b, y) in zip(a[key], b[key], strict=True):
            assert offset_a == offset_b and np.array_equal(x, y), f"{label}: {key} differs"


# Warmup over 4 steps, then cosine down to 0.1 over the rest of 2 epochs (32 - 4 steps).
SCHEDULE = [
    "training.lr_schedule.warmup_steps=4",
    "training.lr_schedule.decay=cosine",
    "training.lr_schedule.min_lr_ratio=0.1",
]


def _uninterrupted_and_resumed(rank: int, world_size: int, config_path: str, root: str) -> dict:
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    env = init_distributed()
    common = [
        *SMALL,
        "training.epochs=2",
        "training.eval_interval=8",
        "training.shuffle_buffer=600",  # shuffled within a worker: the skip replays the shuffle
        "model.mlp.dropout=0.1",  # draws from the torch RNG every step: restored per rank
        *SCHEDULE,  # another lr at every step, restored from the checkpoint
        "checkpoint.interval=3",
        "sharding.constraints.device.sharding_types=[data_parallel]",  # the table optimizer too
        "sharding.constraints.user.sharding_types=[column_wise]",
    ]

    def fit(name: str, max_steps: int) -> tuple[Any, Any]:
        config = load_config(
            config_path, [f"run_dir={root}/{name}", f"training.max_steps={max_steps}", *common]
        )
        trainer = Trainer(config, env)
        resumed = trainer.resumed
        final = trainer.fit()
        return trainer, final, resumed

    a, final_a, _ = fit("a", 20)
    _, _, _ = fit("b", 7)
    b, final_b, resumed = fit("b", 20)
    return {
        "a": _snapshot(a),
        "b": _snapshot(b),
        "final": (final_a, final_b),
        "resumed": (resumed.step, resumed.epoch, resumed.batch, resumed.exact),
        "steps": (a.step, b.step),
    }


def test_stopped_and_resumed_run_equals_the_uninterrupted_one_bitwise(
    synth_data: Path, tmp_path: Path
) -> None:
    results = run_on_ranks(
        _uninterrupted_and_resumed, 2, args=(str(synth_data / "config.yaml"), str(tmp_path)), timeout_s=300
    )
    for status, value in results:
        assert status == "ok", value
    for rank, (_, value) in enumerate(results):
        assert value["steps"] == (20, 20)
        assert value["resumed"] == (7, 0, 7, True)  # step 7 = batch 7 of epoch 0; same layout
        final_a, final_b = value["final"]
        assert final_a == final_b and final_a["click"]["examples"] == 4000
        a, b = value["a"], value["b"]
        assert a.keys() == b.keys() and any(k.startswith("table/") for k in a)
        for key in a:
            for (offset_a, x), (offset_b, y) in zip(a[key], b[key], strict=True):
                assert offset_a == offset_b and np.array_equal(x, y), f"rank {rank}: {key} differs"

    # The resumed run's records continue the interrupted ones: the same losses at every step,
    # the same evaluations (the stopped run also evaluated when it stopped, at step 7).
    def records(run: str) -> list[dict]:
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k not in ("samples_per_s", "input_wait")} for x in lines]

    stop_eval = [x for x in records("b") if x["phase"] == "eval" and x["step"] == 7]
    assert len(stop_eval) == 1
    assert records("a") == [x for x in records("b") if x not in stop_eval]
    assert [x["step"] for x in records("b") if x["phase"] == "train"] == list(range(1, 21))
    # The lrs each step used (logged at every step): 1e-3 (dense) and 0.05 (tables) x the schedule.
    train = [x for x in records("b") if x["phase"] == "train"]
    for x in train:
        s = x["step"] - 1
        factor = (s + 1) / 4 if s < 4 else 0.1 + 0.9 * (1 + np.cos(np.pi * (s - 4) / 28)) / 2
        assert x["lr_dense"] == pytest.approx(1e-3 * factor, rel=1e-12)
        assert x["lr_sparse"] == pytest.approx(0.05 * factor, rel=1e-12)
    assert len({x["lr_dense"] for x in train}) == 20 - 1  # steps 4 and 5 both at the peak
    checkpoints = tmp_path / "b" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000020"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000018", "step-00000020"]
    meta = json.loads((checkpoints / "step-00000020" / "meta.json").read_text())
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"], meta["world_size"]) == (20, 1, 4, 2)
    assert meta["plan"]["model.ebc"]["device"]["sharding_type"] == "data_parallel"
    assert meta["tables"]["user"]["num_embeddings"] == 100_000
    assert meta["data_position"] == {"epoch": 1, "batch": 4, "batches_per_worker": [4]}


# ---- resharding -------------------------------------------------------------------------------

SOURCE_PLAN = [  # 2 ranks: every CPU placement, tables split in 4 and 2 column shards
    "sharding.constraints.user.sharding_types=[table_wise]",
    "sharding.constraints.item.sharding_types=[column_wise]",
    "sharding.constraints.item.min_partition=4",
    "sharding.constraints.category.sharding_types=[data_parallel]",
    "sharding.constraints.city.sharding_types=[column_wise]",
    "sharding.constraints.city.min_partition=8",
    "sharding.constraints.device.sharding_types=[data_parallel]",
    # ~10 KB row chunks (trainer.checkpoint.chunks): every table and its state saved in several
    # items, the data-parallel category's spread over both ranks; the resumes below reshard them.
    "checkpoint.chunk_mb=0.01",
]


def _train(rank: int, world_size: int, config_path: str, run_dir: str, overrides: list[str]) -> dict:
    """Train; return this rank's pieces of the model's tensors after the final save."""
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    config = load_config(config_path, [f"run_dir={run_dir}", *SMALL, *overrides])
    trainer = Trainer(config, init_distributed())
    trainer.fit()
    return {key: _local(value) for key, value in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def source_ranks(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A 2-rank run of 4 steps with its checkpoint at step 4, and each rank's model pieces."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    results = run_on_ranks(
        _train,
        2,
        args=(str(synth_data / "config.yaml"), str(run_dir), ["training.max_steps=4", *SOURCE_PLAN]),
    )
    assert all(status == "ok" for status, _ in results), results
    return run_dir, [value for _, value in results]


@pytest.fixture
def source_run(source_ranks: tuple[Path, list[dict]]) -> Path:
    return source_ranks[0]


def _copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source / "checkpoints", target / "checkpoints")
    return target


def _read_sparse_state(step_dir: Path) -> dict[str, dict[str, Any]]:
    """Every table's saved optimizer state, whole, in this process: row-wise state as
    ``[column shards, rows]`` (shard order: meta.json ``tables.<t>.column_groups``), point-wise
    state as ``[rows, dim]``."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from towerrec.trainer.checkpoint import read_meta, verify_files

    metadata = verify_files(step_dir)
    meta = read_meta(step_dir)
    state: dict[str, dict[str, Any]] = {}
    for key, md in metadata.state_dict_metadata.items():
        parts = key.split(".")
        if parts[:2] == ["optim", "sparse"] and isinstance(md, TensorStorageMetadata):
            state.setdefault(parts[2], {})[".".join(parts[3:])] = torch.empty(
                md.size, dtype=md.properties.dtype
            )
    dcp.load({"optim": {"sparse": state}}, checkpoint_id=str(step_dir), no_dist=True)
    for table, states in state.items():
        rows = meta.tables[table].num_embeddings
        for name, value in states.items():
            if value.dim() == 1:
                states[name] = value.view(-1, rows)
    return state


def _resume_and_compare(
    rank: int, world_size: int, config_path: str, run_dir: str, overrides: list[str], expect: dict[str, str]
) -> dict[str, Any]:
    """Resume ``run_dir`` under another plan; compare every local piece of every table and of its
    optimizer state with the checkpoint, read back whole in this process; train 2 more steps."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from towerrec.trainer.checkpoint import find_checkpoint, load_model_state, read_meta
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.model import build_train_module
    from towerrec.trainer.planning.plan_file import plan_to_dict
    from towerrec.trainer.train import Trainer

    config = load_config(
        config_path,
        [f"run_dir={run_dir}", *SMALL, "training.max_steps=6", "checkpoint.resume=required", *overrides],
    )
    trainer = Trainer(config, init_distributed())
    step_dir = find_checkpoint(run_dir, 4)
    saved = build_train_module(config, torch.device("cpu"))
    load_model_state(run_dir, 4, saved)
    weights = saved.state_dict()
    groups = {t: m.column_groups for t, m in read_meta(step_dir).tables.items()}
    raw = {t: s["momentum1"].numpy() for t, s in _read_sparse_state(step_dir).items()}  # [groups, rows]
    plan = plan_to_dict(trainer.model.plan)["model.ebc"]
    report: dict[str, Any] = {"placement": {t: p["sharding_type"] for t, p in plan.items()}, "weights": {}}
    for key, value in trainer.model.state_dict().items():
        if "embedding_bags" in key:
            table, full = key.split(".")[-2], weights[key].numpy()
            for (r, c), piece in _local(value):
                assert np.array_equal(piece, full[r : r + piece.shape[0], c : c + piece.shape[1]]), key
                report["weights"][table] = True
    # Row-wise momentum of each local piece: column shards merged -> the width-weighted mean of
    # the saved shards ("mean"; all saved shards of a table have one width), split or kept ->
    # the saved shard's values ("same").
    momentum: dict[str, list[np.ndarray]] = {}
    for key, states in trainer.model.fused_optimizer.state_dict()["state"].items():
        table = key.split(".")[-2]
        for value in states.values():
            assert isinstance(value, ShardedTensor)
            momentum[table] = [s.tensor.numpy() for s in value.local_shards()]
    if trainer.table_optimizer is not None:
        for key, states in trainer.table_optimizer.state_dict()["state"].items():
            momentum[key.split(".")[-2]] = [states["sum"].view(-1).numpy()]
    report["momentum"] = {}
    for table, pieces in momentum.items():
        if expect[table] == "mean":  # several saved shards, with different values
            assert len(raw[table]) > 1 and not np.array_equal(raw[table][0], raw[table][1]), table
            want = raw[table].mean(axis=0)
        else:
            assert len(raw[table]) == 1, table
            want = raw[table][0]
        report["momentum"][table] = [float(np.abs(p - want).max()) for p in pieces]
        report["momentum_nonzero"] = report.get("momentum_nonzero", True) and bool(want.any())
    report["groups"] = groups
    report["resumed"] = (
        trainer.resumed.step,
        trainer.resumed.epoch,
        trainer.resumed.batch,
        trainer.resumed.exact,
    )
    # The model predicts as it did under the old plan: the same evaluation as at the save.
    report["eval"] = trainer.evaluate(0)
    report["steps"] = trainer.fit() and trainer.step
    return report


def _check_reshard(results: list, expect_placement: dict[str, str], resumed: tuple, saved_eval: dict) -> None:
    for status, value in results:
        assert status == "ok", value
        assert value["resumed"] == resumed
        for task, metrics in saved_eval.items():
            for name in ("auc", "logloss"):  # float32 sums in another order: rounding only
                assert value["eval"][task][name] == pytest.approx(metrics[name], abs=1e-5), (task, name)
    seen_weights: set[str] = set()
    seen_momentum: set[str] = set()
    for _, report in results:
        assert report["placement"] == expect_placement
        assert report["steps"] == 6  # trained on from step 4
        assert report["momentum_nonzero"]
        seen_weights |= set(report["weights"])
        for table, diffs in report["momentum"].items():
            assert max(diffs) <= 1e-6, (table, diffs)  # mean of float32 shards: rounding only
            seen_momentum.add(table)
    assert seen_weights == seen_momentum == set(expect_placement)


def _assert_row_chunks(step_dir: Path) -> None:
    """SOURCE_PLAN's checkpoint.chunk_mb: the tables and their state went to disk in ~10 KB
    row chunks, the data-parallel category's written by both ranks."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step_dir)).read_metadata()
    tensors = metadata.state_dict_metadata
    chunk = int(0.01 * 2**20)
    user = tensors["model.model.ebc.embedding_bags.user.weight"].chunks  # 100,000 x 16 fp32
    assert len(user) == math.ceil(100_000 / (chunk // 64)) and max(c.sizes[0] for c in user) == chunk // 64
    momentum = tensors["optim.sparse.item.momentum1"].chunks  # 50,000 rows x 4 column shards
    assert len(momentum) == 4 * math.ceil(50_000 / (chunk // 4))
    category = [index for index in metadata.storage_data if index.fqn.endswith("category.weight")]
    files = {metadata.storage_data[index].relative_path for index in category}
    assert files == {"__0_0.distcp", "__1_0.distcp"}


def test_two_rank_checkpoint_resumes_on_one_rank_with_another_plan(
    synth_data: Path, source_run: Path, tmp_path: Path
) -> None:
    meta = json.loads((source_run / "checkpoints" / "step-00000004" / "meta.json").read_text())
    placed = {t: m["sharding_type"] for t, m in meta["tables"].items()}
    assert placed == {
        "user": "table_wise",
        "item": "column_wise",
        "category": "data_parallel",
        "city": "column_wise",
        "device": "data_parallel",
    }
    assert (
        len(meta["tables"]["item"]["column_groups"]) == 4
        and len(meta["tables"]["city"]["column_groups"]) == 2
    )
    _assert_row_chunks(source_run / "checkpoints" / "step-00000004")
    plan = [  # every table changes placement
        "sharding.constraints.user.sharding_types=[column_wise]",  # TW -> CW: 1 shard split in 2
        "sharding.constraints.user.min_partition=8",
        "sharding.constraints.item.sharding_types=[data_parallel]",  # CW (4 shards) -> DP
        "sharding.constraints.category.sharding_types=[table_wise]",  # DP -> TW
        "sharding.constraints.city.sharding_types=[data_parallel]",  # CW (2 shards) -> DP
        "sharding.constraints.device.sharding_types=[column_wise]",  # DP -> CW
        "sharding.constraints.device.min_partition=8",
    ]
    expect = {"user": "same", "item": "mean", "category": "same", "city": "mean", "device": "same"}
    run_dir = _copy_run(source_run, tmp_path / "one")
    results = run_on_ranks(
        _resume_and_compare, 1, args=(str(synth_data / "config.yaml"), str(run_dir), plan, expect)
    )
    _check_reshard(
        results,
        {
            "user": "column_wise",
            "item": "data_parallel",
            "category": "table_wise",
            "city": "data_parallel",
            "device": "column_wise",
        },
        # Another world size: step 4 was batch 4 of 16 per rank; on one rank an epoch has 32
        # batches, so the run continues at the same fraction of epoch 0: batch 8.
        resumed=(4, 0, 8, False),
        saved_eval=meta["eval_metrics"],
    )


def test_two_rank_checkpoint_resumes_on_four_ranks_with_another_plan(
    synth_data: Path, source_run: Path, tmp_path: Path
) -> None:
    plan = [
        "sharding.constraints.user.sharding_types=[data_parallel]",  # TW -> DP
        "sharding.constraints.item.sharding_types=[table_wise]",  # CW (4 shards) -> TW
        "sharding.constraints.category.sharding_types=[column_wise]",  # DP -> CW (2 shards)
        "sharding.constraints.category.min_partition=8",
        "sharding.constraints.city.sharding_types=[table_wise]",  # CW (2 shards) -> TW
        "sharding.constraints.device.sharding_types=[table_wise]",  # DP -> TW
    ]
    expect = {"user": "same", "item": "mean", "category": "same", "city": "mean", "device": "same"}
    meta = json.loads((source_run / "checkpoints" / "step-00000004" / "meta.json").read_text())
    run_dir = _copy_run(source_run, tmp_path / "four")
    results = run_on_ranks(
        _resume_and_compare,
        4,
        args=(str(synth_data / "config.yaml"), str(run_dir), plan, expect),
        timeout_s=240,
    )
    _check_reshard(
        results,
        {
            "user": "data_parallel",
            "item": "table_wise",
            "category": "column_wise",
            "city": "table_wise",
            "device": "table_wise",
        },
        resumed=(4, 0, 2, False),  # 4 of 16 batches per rank on 2 ranks -> 2 of 8 on 4 ranks
        saved_eval=meta["eval_metrics"],
    )


# ---- reading a checkpoint in one process; bad checkpoints -----------------------------------


def _plain_module(synth_data: Path, *overrides: str) -> Any:
    import torch
    from towerrec.trainer.config import load_config
    from towerrec.trainer.model import build_train_module

    config = load_config(synth_data / "config.yaml", ["run_dir=unused", *overrides])
    return build_train_module(config, torch.device("cpu"))


def test_load_model_state_gives_every_ranks_trained_weights_in_one_process(
    synth_data: Path, source_ranks: tuple[Path, list[dict]]
) -> None:
    from towerrec.trainer.checkpoint import load_model_state

    run_dir, ranks = source_ranks
    module = _plain_module(synth_data)
    meta = load_model_state(run_dir, None, module)  # the latest: step 4
    assert (meta.step, meta.epoch, meta.batch_in_epoch, meta.world_size) == (4, 0, 4, 2)
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    assert set(state) == set(ranks[0]) == set(ranks[1])  # DistributedModelParallel's keys
    for pieces in ranks:
        for key, local in pieces.items():
            for offsets, piece in local:
                where = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape, strict=True))
                assert np.array_equal(state[key][where], piece), key


def test_missing_damaged_or_foreign_checkpoints_give_one_clear_error(
    synth_data: Path, source_run: Path, tmp_path: Path
) -> None:
    from towerrec.trainer.checkpoint import CheckpointError, load_model_state

    def error(run_dir: Path, step: int | None = None, module: Any = None) -> str:
        with pytest.raises(CheckpointError) as info:
            load_model_state(run_dir, step, module if module is not None else _plain_module(synth_data))
        return str(info.value)

    assert "no checkpoints (" in error(tmp_path / "nowhere") and "checkpoints does not exist" in error(
        tmp_path
    )
    assert "step-00000003 does not exist; complete checkpoint steps: [4]" in error(source_run, 3)

    def damaged(name: str) -> tuple[Path, Path]:
        run_dir = _copy_run(source_run, tmp_path / name)
        return run_dir, run_dir / "checkpoints" / "step-00000004"

    run_dir, step_dir = damaged("truncated")
    data = step_dir / "__1_0.distcp"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    assert f"__1_0.distcp is truncated: {size // 2} bytes, expected at least {size}" in error(run_dir)

    run_dir, step_dir = damaged("corrupted")  # same size, other bytes: its CRC32 in meta.json tells
    with open(step_dir / "__0_0.distcp", "r+b") as f:
        f.seek((step_dir / "__0_0.distcp").stat().st_size // 2)
        f.write(b"\xff" * 64)
    assert "is damaged:\n  __0_0.distcp is corrupted: CRC32 " in error(run_dir)

    run_dir, step_dir = damaged("missing-file")
    (step_dir / "__0_0.distcp").unlink()
    assert "is damaged:\n  __0_0.distcp is missing" in error(run_dir)

    run_dir, step_dir = damaged("no-meta")
    (step_dir / "meta.json").unlink()
    assert "is incomplete: meta.json is missing" in error(run_dir)

    run_dir, step_dir = damaged("no-index")
    (step_dir / ".metadata").write_bytes(b"\x80\x04")  # cut short
    assert ".metadata is unreadable (truncated?)" in error(run_dir)

    run_dir, step_dir = damaged("dangling")
    shutil.rmtree(step_dir)
    assert "latest names step-00000004, which does not exist" in error(run_dir)

    # Another model: other rows, another dim, another network. One message lists it all.
    other = _plain_module(
        synth_data,
        "data.tables.0.num_embeddings=5000",
        "data.tables.1.embedding_dim=8",
        "model.expert_hidden=[32]",
    )
    message = error(source_run, module=other)
    assert "does not match this model" in message
    for line in [
        "table 'user': num_embeddings 100000 in the checkpoint, 5000 in the config",
        "table 'item': embedding_dim 16 in the checkpoint, 8 in the config",
        "model tensor model.ebc.embedding_bags.user.weight: shape [100000, 16] in the checkpoint, [5000, 16]",
        "model tensor model.network.levels.0.experts.linears.0.weight.shared: shape [1, 64, 100] in the "
        "checkpoint, [1, 32, 84] in the model",
    ]:
        assert line in message, message
    # Nothing above changed the checkpoint.
    assert load_model_state(source_run, None, _plain_module(synth_data)).step == 4


def _resume_errors(rank: int, world_size: int, config_path: str, runs: dict[str, str]) -> dict[str, str]:
    from towerrec.trainer.checkpoint import CheckpointError
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    env = init_distributed()
    messages = {}
    for name, (run_dir, overrides) in runs.items():
        config = load_config(config_path, [f"run_dir={run_dir}", *SMALL, *overrides])
        try:
            Trainer(config, env)
            messages[name] = "no error"
        except CheckpointError as e:
            messages[name] = str(e)
    return messages


def test_resume_settings_and_a_foreign_checkpoint_stop_the_run(
    synth_data: Path, source_run: Path, tmp_path: Path
) -> None:
    runs = {
        "required": (str(tmp_path / "empty"), ["checkpoint.resume=required"]),
        "never": (str(source_run), ["checkpoint.resume=never"]),
        "tables": (str(source_run), ["data.tables.4.num_embeddings=20"]),
        "optimizer": (str(source_run), ["training.sparse_optimizer.type=adagrad"]),
    }
    [(status, messages)] = run_on_ranks(_resume_errors, 1, args=(str(synth_data / "config.yaml"), runs))
    assert status == "ok", messages
    assert "checkpoint.resume is required but there is no checkpoint to resume" in messages["required"]
    assert "holds checkpoints (latest: step-00000004) and checkpoint.resume is never" in messages["never"]
    assert "table 'device': num_embeddings 10 in the checkpoint, 20 in the config" in messages["tables"]
    assert (
        "training.sparse_optimizer.type: rowwise_adagrad in the checkpoint, adagrad" in messages["optimizer"]
    )


# ---- a save killed in the middle ---------------------------------------------------------------


def test_a_save_killed_midway_leaves_latest_and_its_checkpoint_intact(
    synth_data: Path, tmp_path: Path
) -> None:
    """With ``keep_last: 1`` too: retention deletes the previous checkpoint only once the new one
    is complete and ``latest`` names it."""
    from paused_save_main import PAUSED
    from towerrec.trainer.checkpoint import load_model_state

    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "training.batch_size=512",
        "training.max_steps=9",
        "checkpoint.interval=3",
    ]
    log = tmp_path / "killed.log"
    # Both ranks sleep inside the save of step 6, after writing their data, before DCP's index.
    pause = [str(Path(__file__).with_name("paused_save_main.py")), "6", "120"]
    proc = torchrun_job(synth_data / "config.yaml", [*overrides, "checkpoint.keep_last=1"], log, script=pause)
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count(f"{PAUSED} 6") < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the save of step 6 never started"
            time.sleep(0.2)
    finally:
        signal_tree(proc.pid)  # torchrun, both ranks and their loader workers, mid-save
        proc.wait()
    checkpoints = run_dir / "checkpoints"
    partial = checkpoints / "step-00000006.tmp"
    assert (checkpoints / "latest").read_text().strip() == "step-00000003"
    assert not (checkpoints / "step-00000006").exists()
    assert (partial / "__0_0.distcp").is_file() and (partial / "__1_0.distcp").is_file()
    assert not (partial / ".metadata").exists()
    assert load_model_state(run_dir, None, _plain_module(synth_data)).step == 3

    # Restarted in the same run directory, the run resumes from step 3 and finishes.
    log = tmp_path / "resumed.log"
    proc = torchrun_job(synth_data / "config.yaml", overrides + ["checkpoint.keep_last=2"], log)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "step-00000006.tmp, left by an interrupted save" in text
    assert "resumed from" in text and "step 3, epoch 0, batch 3" in text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000006", "step-00000009"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000009"


def test_a_save_that_hits_the_file_size_limit_stops_the_run_and_keeps_latest(
    synth_data: Path, tmp_path: Path
) -> None:
    """``ulimit -f`` (RLIMIT_FSIZE) below a checkpoint's size: the save fails with EFBIG on every
    rank; the run stops with a message naming the failed save and the intact ``latest``, which
    a later run resumes from."""
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *SMALL, "checkpoint.interval=4", "checkpoint.keep_last=1"]
    config = synth_data / "config.yaml"
    first = torchrun_job(config, [*overrides, "training.max_steps=4"], tmp_path / "first.log")
    assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-3000:]
    checkpoints = run_dir / "checkpoints"
    saved = checkpoints / "step-00000004"
    assert (checkpoints / "latest").read_text().strip() == saved.name
    shard_bytes = max(f.stat().st_size for f in saved.iterdir())

    log = tmp_path / "limited.log"
    limited = torchrun_job(config, [*overrides, "training.max_steps=8"], log, max_file_bytes=shard_bytes // 2)
    assert limited.wait(timeout=240) != 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "saving checkpoint step-00000008 failed" in text, text[-3000:]
    assert "the latest complete checkpoint (step-00000004) is unchanged" in text
    # The cause as the writer saw it: EFBIG from a plain write, or torch's zip writer noticing its
    # own short write ("unexpected pos"), depending on which file reaches the limit first.
    assert "File too large" in text or "unexpected pos" in text, text[-3000:]
    assert (checkpoints / "latest").read_text().strip() == saved.name
    assert not (checkpoints / "step-00000008").exists()
    from towerrec.trainer.checkpoint import load_model_state

    assert load_model_state(run_dir, None, _plain_module(synth_data)).step == 4  # still loads

    again = torchrun_job(config, [*overrides, "training.max_steps=8"], tmp_path / "again.log")
    assert again.wait(timeout=240) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert "step 4, epoch 0, batch 4" in (tmp_path / "again.log").read_text()
    assert (checkpoints / "latest").read_text().strip() == "step-00000008"
