from __future__ import annotations

import sys
from pathlib import Path

import pytest
from launch_helpers import REPO, valid_config  # noqa: F401  (fixture)

sys.path.insert(0, str(REPO))  # benchmarks.faults: the fault cases and their harness
from benchmarks import faults  # noqa: E402


@pytest.fixture(scope="session")
def faults_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the jobs of ``benchmarks.faults`` run: a run directory and a log per case."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def uninterrupted_job(synth_data: Path, faults_work: Path) -> faults.Outcome:
    """``torchx run -s local_cwd launch/components.py:train``, 1 node x 2 ranks, no fault: the
    reference run of the fault cases (the metrics a recovered job must end with) and the local
    launch test of the torchx CLI. One job for both: a launch costs more than its 16 steps."""
    return faults.run_case(faults.reference(nnodes=1), synth_data / "config.yaml", faults_work)
