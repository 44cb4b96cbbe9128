"""Non-finite losses and gradients (trainer.nonfinite) on real Parquet data whose dense feature
holds an inf: every rank stops naming the step, the tasks and the batch's rows, or the step is
skipped with no update at all, counted (also across a resume) up to a limit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dist_utils import run_on_ranks
from test_checkpoint import _assert_same_state

BATCH = 512
COMMON = [f"training.batch_size={BATCH}", "training.num_workers=0", "training.log_interval=1"]


def _poisoned_copy(train: Path, target: Path, rows: list[int]) -> list[tuple[str, int]]:
    """The train files of ``train`` in ``target``, ``price`` set to inf at the global ``rows``
    (files in sorted order, rows in order); returns each new file's (path, rows)."""
    target.mkdir()
    sizes, start = [], 0
    for path in sorted(train.glob("*.parquet")):
        table = pq.read_table(path)
        price = table.column("price").to_numpy().copy()
        for row in rows:
            if start <= row < start + table.num_rows:
                price[row - start] = np.inf
        column = table.schema.get_field_index("price")
        table = table.set_column(column, "price", pa.array(price, table.schema.field("price").type))
        pq.write_table(table, target / path.name, row_group_size=2048)
        sizes.append((str(target / path.name), table.num_rows))
        start += table.num_rows
    return sizes


def _rows_of(sizes: list[tuple[str, int]], lo: int, hi: int) -> str:
    """How a message names the global rows [lo, hi): ``path rows [a, b)`` per file."""
    parts, start = [], 0
    for path, n in sizes:
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            parts.append(f"{path} rows [{a - start}, {b - start})")
        start += n
    return ", ".join(parts)


def _fit(rank: int, world_size: int, config_path: str, runs: list[tuple[str, list[str]]]) -> list[Any]:
    """Fit each ``(run_dir, overrides)`` in turn; per run the error text or this rank's state."""
    from test_checkpoint import _snapshot
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.nonfinite import NonFiniteError
    from towerrec.trainer.train import Trainer

    env = init_distributed()
    out: list[Any] = []
    for run_dir, overrides in runs:
        trainer = Trainer(load_config(config_path, [f"run_dir={run_dir}", *COMMON, *overrides]), env)
        try:
            trainer.fit()
            out.append({"step": trainer.step, "state": _snapshot(trainer)})
        except NonFiniteError as e:
            out.append(f"NonFiniteError: {e}")
    return out


def test_an_inf_on_one_rank_stops_every_rank_naming_the_step_tasks_and_rows(
    synth_data: Path, tmp_path: Path
) -> None:
    # 16,000 rows: rank 1 reads [8000, 16000); its batch 3 (global step 4) holds row 9543.
    sizes = _poisoned_copy(synth_data / "train", tmp_path / "train", [8000 + 3 * BATCH + 7])
    runs = [(str(tmp_path / "run"), [f"data.train={tmp_path / 'train'}"])]
    results = run_on_ranks(_fit, 2, args=(str(synth_data / "config.yaml"), runs), timeout_s=180)
    rows = _rows_of(sizes, 8000 + 3 * BATCH, 8000 + 4 * BATCH)
    for status, [message] in results:
        assert status == "ok", message
        assert message.startswith(
            "NonFiniteError: non-finite loss at step 4 (epoch 0, batch 3) on 1 of 2 ranks"
        )
        assert f"rank 1: loss nan (tasks: click nan, conversion nan); batch rows: {rows}" in message
        assert "part-00002.parquet rows [1536, 2048)" in rows  # the file and rows, worked out by hand
        assert "rank 0:" not in message and "training.nonfinite: skip would skip" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing saved from a diverged model


def test_skip_mode_leaves_every_state_untouched_and_counts_skips_across_a_resume(
    synth_data: Path, tmp_path: Path
) -> None:
    # Step 4: rank 1's batch 3 (a step whose loss is checked without a following fetch: the last
    # of the run); step 6: rank 0's batch 5 (checked in lockstep's all-reduce).
    sizes = _poisoned_copy(synth_data / "train", tmp_path / "train", [8000 + 3 * BATCH + 7, 5 * BATCH + 1])
    data = [f"data.train={tmp_path / 'train'}", "training.nonfinite=skip"]
    runs = [
        (str(tmp_path / "before"), [*data, "training.max_steps=3"]),
        (str(tmp_path / "skip"), [*data, "training.max_steps=4"]),
        # Resumes "skip" at step 4 with its skipped step restored: step 6 is the second skip.
        (str(tmp_path / "skip"), [*data, "training.max_steps=8", "training.nonfinite_max_skips=1"]),
    ]
    results = run_on_ranks(_fit, 2, args=(str(synth_data / "config.yaml"), runs), timeout_s=300)
    for status, value in results:
        assert status == "ok", value
        before, skipped, limit = value
        assert (before["step"], skipped["step"]) == (3, 4)
        # No update at step 4: tables, dense network and every optimizer state as after step 3.
        _assert_same_state(before["state"], skipped["state"], "step 4 skipped")
        assert limit.startswith("NonFiniteError: 2 steps skipped for non-finite values, more than ")
        assert "training.nonfinite_max_skips=1 (steps [4, 6]); the last, step 6: non-finite loss" in limit
        assert (
            f"rank 0: loss nan (tasks: click nan, conversion nan); batch rows: {_rows_of(sizes, 2560, 3072)}"
            in limit
        )

    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    [skip] = [x for x in records if x["phase"] == "skip"]
    assert (skip["step"], skip["skipped_steps"]) == (4, 1)
    assert (
        f"rank 1: loss nan (tasks: click nan, conversion nan); batch rows: {_rows_of(sizes, 9536, 10048)}"
        in (skip["reason"])
    )
    assert [x["step"] for x in records if x["phase"] == "train"] == [1, 2, 3, 4, 5]  # 6: the error
    step_4 = [x for x in records if x["phase"] == "train" and x["step"] == 4]
    assert step_4[0]["loss"] is None  # the skipped step's nan is not averaged into the log
    meta = json.loads((tmp_path / "skip" / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert meta["nonfinite"] == {"skipped_steps": [4]}


def _guard(mode: str) -> Any:
    from towerrec.trainer.distributed import DistEnv
    from towerrec.trainer.nonfinite import NonFiniteGuard

    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo", None)  # type: ignore[arg-type]
    guard = NonFiniteGuard(mode, 3, env, lambda batch: f"a.parquet rows [{batch * 8}, {batch * 8 + 8})")
    guard.begin(step=9, epoch=1, batch=2)
    return guard


def _layer_with_gradient(value: float) -> dict[str, torch.nn.Parameter]:
    layer = torch.nn.Linear(4, 2)
    layer(torch.full((3, 4), value)).sum().backward()  # weight gradient: sums of the inputs
    return dict(layer.named_parameters())


def test_a_non_finite_gradient_after_a_finite_loss_stops_or_skips_the_dense_update() -> None:
    from towerrec.trainer.model import StepOutput
    from towerrec.trainer.nonfinite import NonFiniteError

    finite_loss = StepOutput(torch.tensor(0.7), {"click": torch.tensor(0.7)}, {}, {}, {})
    for mode in ("stop", "skip"):
        guard = _guard(mode)
        guard.observe(finite_loss)
        assert guard.backward_allowed()
        assert guard.update_allowed(_layer_with_gradient(1.0))  # finite: the update runs
        guard.observe(finite_loss)
        assert guard.backward_allowed()
        parameters = _layer_with_gradient(float("inf"))
        if mode == "stop":
            # Queued on the device, not read before the update: the run stops at the next vote
            # or settle() (the end of the stretch), naming the step it happened at.
            assert guard.update_allowed(parameters)
            guard.observe(finite_loss)
            assert guard.vote()  # read now: every later vote says yes too, until decided
            with pytest.raises(NonFiniteError) as error:
                guard.settle()
            message = str(error.value)
            assert message.startswith("non-finite gradient at step 11 (epoch 1, batch 3) with a finite loss:")
            assert (
                "1 of 2 dense parameters (weight)" in message and "rank 0: a.parquet rows [24, 32)" in message
            )
        else:
            assert not guard.update_allowed(parameters)
            [(step, reason)] = guard.take_skips()
            assert (
                step == 11
                and reason.startswith("non-finite gradient at step 11")
                and guard.skipped_steps == [11]
            )


def test_stop_mode_names_the_first_non_finite_loss_not_the_steps_after_it() -> None:
    """The checks are read late: by then the steps after the bad one are non-finite too (their
    model took its update); the message names the first, with its tasks and rows."""
    from towerrec.trainer.model import StepOutput
    from towerrec.trainer.nonfinite import NonFiniteError

    guard = _guard("stop")
    assert not guard.synchronous and _guard("skip").synchronous  # skip blocks lockstep
    for loss in (0.5, float("nan"), float("nan")):
        value = torch.tensor(loss)
        guard.observe(StepOutput(value, {"click": value, "cvr": torch.tensor(0.25)}, {}, {}, {}))
        assert guard.backward_allowed()
        assert guard.update_allowed(_layer_with_gradient(float("nan") if loss != loss else 1.0))
    assert guard.vote() and guard.vote()
    with pytest.raises(NonFiniteError) as error:
        guard.decide(1, 1)
    assert str(error.value).startswith(
        "non-finite loss at step 11 (epoch 1, batch 3) on 1 of 1 ranks:\n"
        "  rank 0: loss nan (tasks: click nan, cvr 0.25); batch rows: a.parquet rows [24, 32)\n"
        "training.nonfinite: skip would skip such steps instead"
    )


def test_stop_mode_settles_quietly_when_every_step_was_finite() -> None:
    from towerrec.trainer.model import StepOutput

    guard = _guard("stop")
    for _ in range(3):
        guard.observe(StepOutput(torch.tensor(0.7), {"click": torch.tensor(0.7)}, {}, {}, {}))
        assert guard.backward_allowed() and guard.update_allowed(_layer_with_gradient(1.0))
    assert not guard.vote()
    guard.settle()  # no error
    assert guard.take_skips() == [] and guard.skipped_steps == []


def test_gradients_sharing_a_storage_are_checked_once_each_and_nothing_else() -> None:
    """On CPU the guard checks one flat run per storage the gradients tile (DDP's buckets, a
    data-parallel table's flat weight): every gradient value, and no value between them."""
    from towerrec.trainer.nonfinite import _all_finite, _contiguous_runs

    flat = torch.zeros(12)
    a, b, c = flat[0:3], flat[3:6].view(3, 1), flat[7:10]  # 6 and 10..11 are nobody's
    separate = torch.ones(2, 2)
    overlapping = flat[2:5]
    runs = _contiguous_runs([c, separate, a, b])
    assert sorted(r.numel() for r in runs) == [3, 4, 6]
    flat[6] = flat[11] = float("nan")  # outside every gradient
    assert bool(_all_finite([c, separate, a, b]))
    flat[8] = float("inf")
    assert not bool(_all_finite([c, separate, a, b]))
    flat[8] = 0.0
    assert [r.numel() for r in _contiguous_runs([a, overlapping])] == [3, 3]  # checked on its own
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, float("nan")], (4,))
    assert not bool(_all_finite([a, sparse])) and bool(_all_finite([a, separate]))
