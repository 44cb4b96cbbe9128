"""Ranks of real TorchX jobs killed or stopped at chosen moments: a fast subset of the cases of
``python -m benchmarks.faults`` (which runs all of them), with its harness: one case per
mechanism (docs/FAULTS.md says which cases run where).

Each job: 2 ranks, 16 steps, a checkpoint every 4, under ``--max_restarts 1``; the rank pauses
at the fault point and the harness signals it there (a marker file, never a sleep).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from launch_helpers import REPO

sys.path.insert(0, str(REPO))  # benchmarks.faults: the cases and the harness
from benchmarks import faults  # noqa: E402

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(not faults.processes.SUPPORTED, reason="the harness finds a job's processes in /proc"),
]
# Rank 0's line once the job's ranks have met and planned (the torchx CLI's local launch trains).
TRAINS = "training 1 epochs x 16 steps per rank, batch 512 per rank, 2 ranks"


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_job: faults.Outcome) -> dict:
    """The final metrics of the same job (1 node x 2 ranks) without a fault."""
    outcome = uninterrupted_job
    assert outcome.returncode == 0 and outcome.metrics is not None, outcome.log[-4000:]
    return outcome.metrics


def run(name: str, synth_data: Path, work: Path, baseline: dict | None) -> faults.Outcome:
    outcome = faults.run_case(faults.BY_NAME[name], synth_data / "config.yaml", work)
    problems = outcome.problems(baseline)
    assert not problems, "; ".join(problems) + "\n" + outcome.log[-6000:]
    return outcome


def test_rank_killed_inside_a_checkpoint_write_resumes_from_the_previous_checkpoint(
    synth_data, faults_work, uninterrupted
) -> None:
    """The issue's 0-of-3 case: step-00000008.tmp holds rank 1's shard when it is killed; the
    restarted ranks start (no Connection refused, no hang), drop the .tmp and resume step 4."""
    outcome = run("checkpoint_write", synth_data, faults_work, uninterrupted)
    assert outcome.resumed == ["step-00000004"]
    assert outcome.metrics == uninterrupted
    assert not list((faults_work / "checkpoint_write" / "checkpoints").glob("*.tmp"))


def test_rank_killed_on_another_node_recovers(synth_data, faults_work) -> None:
    """2 nodes x 1 rank (two torchrun agents launched by the torchx CLI, c10d rendezvous at
    localhost:<free port>): the ranks meet and train; node 1's rank dies, both agents restart
    their ranks, which resume step 4 and finish. (Its metrics equal a 2-node uninterrupted run's:
    ``python -m benchmarks.faults``; 2 nodes plan other placements.) Also the torchx CLI's local
    2-node launch test (test_launch_torchx_cli.py)."""
    outcome = run("two_nodes", synth_data, faults_work, None)
    assert outcome.returncode == 0 and outcome.resumed == ["step-00000004"]
    assert TRAINS in outcome.log
    assert outcome.metrics is not None and set(outcome.metrics) == {"click", "conversion"}


def test_a_stopped_rank_is_named_by_the_others_within_the_collective_timeout(synth_data, faults_work) -> None:
    """SIGSTOP (no restarts): rank 0 gives up after training.collective_timeout_s (20 s) and
    says rank 1 is not responding; torchrun then SIGKILLs the stopped rank."""
    outcome = run("stuck_rank", synth_data, faults_work, None)
    assert outcome.returncode not in (0, None)
    assert outcome.error_after_fault_s is not None and outcome.error_after_fault_s <= 30
