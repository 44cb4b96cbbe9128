"""Preemption (trainer.preemption): a real SIGTERM, during training, an evaluation or a save, makes
every rank stop at the same step and save; the next run resumes and ends bitwise equal to an
uninterrupted run. Sent to one rank process directly, and to a whole torch.distributed.run job."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from dist_utils import run_on_ranks
from job_helpers import signal_tree, torchrun_job
from test_checkpoint import _assert_same_state

# 16,000 train rows / 2 ranks / 256 = 32 steps per epoch; 8 eval batches per rank. Saves at 4, 8
# and 12, evaluations at 6 and 12; shuffling and dropout make the RNG and data position matter.
COMMON = [
    "training.batch_size=256",
    "training.num_workers=0",
    "training.log_interval=1",
    "training.max_steps=12",
    "training.eval_interval=6",
    "training.shuffle_buffer=600",
    "model.mlp.dropout=0.1",
    "checkpoint.interval=4",
    "checkpoint.keep_last=5",
]


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _during_forward(step: int) -> Callable[[Any], None]:
    """Rank 0 gets SIGTERM during the forward of training step ``step``, before that step fetches
    the batch after next (whose all-reduce then carries the stop vote)."""

    def hook(trainer: Any) -> None:
        original = trainer.nonfinite.observe

        def observe_then_signal(out: Any) -> None:
            original(out)
            if trainer.step == step - 1:  # counted once the step is done
                _sigterm_self()

        trainer.nonfinite.observe = observe_then_signal

    return hook


def _during_evaluation(step: int) -> Callable[[Any], None]:
    """Rank 0 gets SIGTERM at the first batch of the evaluation at ``step``."""

    def hook(trainer: Any) -> None:
        original = trainer.metrics.update

        def update_then_signal(*args: Any) -> None:
            original(*args)
            if trainer.step == step and not trainer.stop.requested:
                _sigterm_self()

        trainer.metrics.update = update_then_signal

    return hook


def _during_save(step: int) -> Callable[[Any], None]:
    """Rank 0 gets SIGTERM while DCP writes its data of the save of ``step``."""

    def hook(trainer: Any) -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from towerrec.trainer.checkpoint import step_dir_name

        original = FileSystemWriter.write_data

        def write_then_signal(self: Any, plan: Any, planner: Any) -> Any:
            if Path(self.path).name == f"{step_dir_name(step)}.tmp":
                _sigterm_self()
            return original(self, plan, planner)

        FileSystemWriter.write_data = write_then_signal

    return hook


SCENARIOS = {"training": _during_forward(1), "evaluation": _during_evaluation(6), "save": _during_save(4)}


def _preempted_and_resumed(rank: int, world_size: int, config_path: str, root: str) -> dict:
    from test_checkpoint import _snapshot
    from torch.distributed.checkpoint import FileSystemWriter
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.preemption import Preempted, StopRequest
    from towerrec.trainer.train import Trainer

    env = init_distributed()
    write_data = FileSystemWriter.write_data

    def fit(name: str, hook: Callable[[Any], None] | None = None) -> tuple[Any, Any, str | None]:
        config = load_config(config_path, [f"run_dir={root}/{name}", *COMMON])
        with StopRequest.on_sigterm() as stop:
            trainer = Trainer(config, env, stop)
            if hook is not None and rank == 0:
                hook(trainer)
            try:
                return trainer, trainer.fit(), None
            except Preempted as e:
                return trainer, None, str(e)
            finally:
                FileSystemWriter.write_data = write_data

    reference, final, _ = fit("uninterrupted")
    out: dict[str, Any] = {"uninterrupted": (_snapshot(reference), final)}
    for name, hook in SCENARIOS.items():
        stopped, _, message = fit(name, hook)
        latest = Path(root, name, "checkpoints", "latest").read_text().strip()
        meta = json.loads(Path(root, name, "checkpoints", latest, "meta.json").read_text())
        resumed, final, again = fit(name)
        out[name] = {
            "stopped": (stopped.step, message, latest, meta["eval_pending"], meta["batch_in_epoch"]),
            "resumed": (resumed.resumed.step, resumed.step, again),
            "state": (_snapshot(resumed), final),
        }
    return out


def test_sigterm_during_training_evaluation_or_a_save_stops_every_rank_and_resumes_bitwise(
    synth_data: Path, tmp_path: Path
) -> None:
    results = run_on_ranks(
        _preempted_and_resumed, 2, args=(str(synth_data / "config.yaml"), str(tmp_path)), timeout_s=400
    )
    for status, value in results:
        assert status == "ok", value
    # (step every rank stopped at, checkpoint latest names, its eval_pending)
    expected = {
        # The signal in step 1's forward rides step 1's fetch; lockstep decides it one batch later,
        # in step 2's fetch (its all-reduce is in flight during a step), and steps 2 and 3, already
        # in the pipeline, still run.
        "training": (3, "step-00000003", False),
        "evaluation": (6, "step-00000006", True),  # the evaluation at 6 is run by the resumed run
        "save": (4, "step-00000004", False),  # the save completes; no second save of step 4
    }
    for rank, (_, value) in enumerate(results):
        reference, reference_final = value["uninterrupted"]
        for name, (step, latest, pending) in expected.items():
            got = value[name]
            stopped_at, message, saved, eval_pending, batch = got["stopped"]
            assert (stopped_at, saved, eval_pending, batch) == (step, latest, pending, step), (rank, name)
            signal_name = "SIGTERM" if rank == 0 else "a signal to another rank"  # only rank 0 got it
            assert f"stopped at step {step} on {signal_name}" in message, message
            assert ("exists" in message) == (name == "save"), message
            assert got["resumed"] == (step, 12, None)
            state, final = got["state"]
            assert final == reference_final, (rank, name)
            _assert_same_state(reference, state, f"rank {rank}, {name}")

    def records(run: str) -> list[dict]:
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k not in ("samples_per_s", "input_wait")} for x in lines]

    for name, (step, _, pending) in expected.items():
        preempted = [x for x in records(name) if x["phase"] == "preempted"]
        assert preempted == [
            {"phase": "preempted", "step": step, "epoch": 0, "signal": "SIGTERM", "eval_pending": pending}
        ]
        assert [x for x in records(name) if x["phase"] != "preempted"] == records("uninterrupted"), name
    # The resumed run wrote the evaluation it ran first into the checkpoint it resumed from.
    meta = json.loads((tmp_path / "evaluation/checkpoints/step-00000006/meta.json").read_text())
    evaluation_6 = [x for x in records("uninterrupted") if x["phase"] == "eval" and x["step"] == 6]
    assert (
        not meta["eval_pending"] and meta["eval_metrics"]["click"]["auc"] == evaluation_6[0]["click"]["auc"]
    )


def test_sigterm_to_a_torchrun_job_checkpoints_every_rank_at_one_step_and_the_next_launch_resumes(
    synth_data: Path, tmp_path: Path
) -> None:
    """SIGTERM to every process of the job, as Slurm sends it (torchrun forwards its own to the
    ranks too, DataLoader workers leave it to their rank); rank 0 waits after step 5 until it has
    the signal (tests/trainer/preempt_main.py). Its vote rides step 6's fetch, lockstep decides it
    one batch later, in step 7's, and the two batches in the pipeline still train: every rank
    stops after step 8."""
    run_dir, marker = tmp_path / "run", tmp_path / "at-step-5"
    overrides = [f"run_dir={run_dir}", "training.batch_size=512", "training.max_steps=12"]
    overrides += ["training.log_interval=1", "checkpoint.interval=0"]
    script = [str(Path(__file__).with_name("preempt_main.py")), "5", str(marker)]
    log = tmp_path / "preempted.log"
    proc = torchrun_job(synth_data / "config.yaml", overrides, log, script=script)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "rank 0 never reached step 5"
            time.sleep(0.1)
        signal_tree(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 1  # torchrun's own status after a SIGTERM
    finally:
        signal_tree(proc.pid)
    text = log.read_text()
    for rank in (0, 1):
        assert f"[rank {rank}] SIGTERM received: stopping every rank at the next step boundary" in text
        assert f"[rank {rank}] preempted: stopped at step 8 on SIGTERM" in text, text[-3000:]
        assert f"[rank {rank}] preempted:" in text and "exit status 143" in text
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000008"
    meta = json.loads((checkpoints / "step-00000008" / "meta.json").read_text())
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (8, 0, 8)
    assert meta["data_position"]["batches_per_worker"] == [8]

    log = tmp_path / "resumed.log"
    again = torchrun_job(synth_data / "config.yaml", overrides, log)
    assert again.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text() and "step 8, epoch 0, batch 8" in log.read_text()
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in train if x["phase"] == "train"] == list(range(1, 13))
    assert (checkpoints / "latest").read_text().strip() == "step-00000012"
