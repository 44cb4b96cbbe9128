"""Ctrl-C and SIGTERM to a running ``towerrec train``: the ranks stop at a step boundary and save
(``trainer.preemption``), the command exits 130 / 143, and no process of the job is left.

Both signals take one path (``launch.commands.train.StopSignals``, then ``stop``): a real job is
stopped by Ctrl-C, and both signals are checked against ``StopSignals`` in this process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch_helpers import REPO, script
from towerrec.launch import cli, processes
from towerrec.launch.commands.train import Stopped, StopSignals

pytestmark = pytest.mark.skipif(not processes.SUPPORTED, reason="finds the job's processes in /proc")


def train_until_step(config: Path, run_dir: Path, log: Path, step: int) -> tuple[subprocess.Popen, set[int]]:
    """``towerrec train`` (2 ranks, 250 steps) until rank 0 logs ``train step STEP``; the command
    and the sessions of its job (agent, ranks) seen so far."""
    cmd = [
        str(script("towerrec")), "train", "--config", str(config), "--nproc_per_node", "2",
        "--set", f"run_dir={run_dir}", "--set", "training.batch_size=32", "--set", "training.log_interval=5",
        "--set", "checkpoint.interval=1000",
    ]  # fmt: skip
    with open(log, "wb") as out:
        job = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sessions: set[int] = set()
    deadline = time.monotonic() + 240
    while f"train step {step} " not in log.read_text(errors="replace"):
        assert job.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no training step within 240 s"
        sessions |= processes.job_sessions(job.pid)
        time.sleep(0.1)
    return job, sessions | processes.job_sessions(job.pid)


# SIGTERM (143) takes the same path as SIGINT: test_sigint_and_sigterm_both_stop_the_job below.
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130)])
def test_stopping_towerrec_train_saves_and_leaves_no_rank_behind(synth_data, tmp_path, sig, status) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job, sessions = train_until_step(synth_data / "config.yaml", run_dir, log, step=10)
    assert len(sessions) == 3, sessions  # the torchrun agent's and one per rank
    ranks = {p.pid for p in processes.alive_in(sessions) if "towerrec.trainer.main" in p.command}
    os.kill(job.pid, sig)  # Ctrl-C in a terminal reaches only the command: the job runs in its own sessions
    try:
        job.wait(timeout=120)
    finally:
        left = processes.alive_in(sessions)
        processes.signal_all(left, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert job.returncode == status, output[-4000:]
    assert not left, f"left running: {[(p.pid, p.command[:80]) for p in left]}"
    assert ranks and not ranks & {p.pid for p in processes.all_processes()}
    assert f"towerrec train: {sig.name}: stopping" in output
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved and int(saved[-1].removeprefix("step-")) >= 10, saved  # the ranks' preemption save


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_both_stop_the_job(sig, status) -> None:
    """While a job runs, either signal stops it (``towerrec train`` then exits 128 + its number),
    a second one asks to kill the job at once, and the handlers before come back after."""
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals() as signals:
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises in this thread as soon as the signal arrives
        assert stopped.value.signum == sig and 128 + stopped.value.signum == status
        assert not signals.hurry()
        os.kill(os.getpid(), sig)  # again: no exception, the stop hurries
        assert signals.hurry() and signals.received == [sig, sig]
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before


def test_train_restarts_on_a_fresh_store_and_outwaits_the_preemption_grace(valid_config, capsys) -> None:
    argv = ["train", "--config", str(valid_config), "--max_restarts", "2"]
    assert cli.main([*argv, "--set", "checkpoint.preemption_grace_s=50", "--dryrun"]) == 0
    out = capsys.readouterr().out
    assert "--max_restarts 2" in out
    assert "--shutdown_timeout 60" in out  # torchrun waits for the ranks' preemption save (50 s + 10)
    assert "'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'" in out  # a restart never sees the last round's keys
