"""Ranks of real TorchX jobs killed or stopped at chosen moments: a fast subset of the cases of
``python -m benchmarks.faults`` (which runs all of them), with its harness.

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


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def uninterrupted(synth_data: Path, work: Path) -> dict:
    """The final metrics of the same job (1 node x 2 ranks) without a fault."""
    outcome = faults.run_case(faults.reference(nnodes=1), synth_data / "config.yaml", work)
    assert outcome.returncode == 0 and outcome.metrics is not None, outcome.log[-4000:]
    return outcome.metrics


def run(name: str, synth_data: Path, work: Path, baseline: dict | None) -> faults.Outcome:
    outcome = faults.run_case(faults.BY_NAME[name], synth_data / "config.yaml", work)
    problems = outcome.problems(baseline)
    assert not problems, "; ".join(problems) + "\n" + outcome.log[-6000:]
    return outcome


def test_rank_killed_inside_a_checkpoint_write_resumes_from_the_previous_checkpoint(
    synth_data, work, uninterrupted
) -> None:
    """The issue's 0-of-3 case: step-00000008.tmp holds rank 1's shard when it is killed; the
    restarted ranks start (no Connection refused, no hang), drop the .tmp and resume step 4."""
    outcome = run("checkpoint_write", synth_data, work, uninterrupted)
    assert outcome.resumed == ["step-00000004"]
    assert outcome.metrics == uninterrupted
    assert not list((work / "checkpoint_write" / "checkpoints").glob("*.tmp"))


def test_rank_killed_on_another_node_recovers(synth_data, work) -> None:
    """2 nodes x 1 rank (two torchrun agents, c10d rendezvous on localhost): node 1's rank dies,
    both agents restart their ranks, which resume step 4 and finish. (Its metrics equal a
    2-node uninterrupted run's: ``python -m benchmarks.faults``; 2 nodes plan other placements.)"""
    outcome = run("two_nodes", synth_data, work, None)
    assert outcome.returncode == 0 and outcome.resumed == ["step-00000004"]


def test_a_stopped_rank_is_named_by_the_others_within_the_collective_timeout(synth_data, work) -> None:
    """SIGSTOP (no restarts): rank 0 gives up after training.collective_timeout_s (20 s) and
    says rank 1 is not responding; torchrun then SIGKILLs the stopped rank."""
    outcome = run("stuck_rank", synth_data, work, None)
    assert outcome.returncode not in (0, None)
    assert outcome.error_after_fault_s is not None and outcome.error_after_fault_s <= 30
