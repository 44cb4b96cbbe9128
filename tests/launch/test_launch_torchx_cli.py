"""The real `torchx` CLI with the component: --help, kubernetes and slurm dryruns, a local 1x2 launch.

The local launches are jobs of ``benchmarks.faults`` (its harness runs this same ``torchx run -s
local_cwd`` command line), shared to launch each once: 1 node x 2 processes is the fault cases'
uninterrupted reference (fixture ``uninterrupted_job``); 2 nodes x 1 process on one machine is
``tests/launch/test_faults.py::test_rank_killed_on_another_node_recovers``, which trains the same
way and kills a rank on the way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import REPO, script

COMPONENT = "launch/components.py:train"


def run(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 120):
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    full_env.update(env or {})
    return subprocess.run(
        [str(script("torchx")), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_component_help():
    result = run("run", "-s", "local_cwd", COMPONENT, "--help")
    assert result.returncode == 0, result.stderr
    for text in ["--config", "--nproc_per_node", "--nnodes", "--rdzv_port", "--max_restarts",
                 "config overrides KEY=VALUE", "towerrec.trainer.main"]:  # fmt: skip
        assert text in result.stdout, text


def test_kubernetes_dryrun():
    pytest.importorskip("kubernetes", reason="torchx's kubernetes scheduler needs `kubernetes`")
    result = run(
        "run", "--dryrun", "--workspace", "", "-s", "kubernetes", "-cfg", "queue=default",
        COMPONENT, "--image", "reg/towerrec:1", "--config", "configs/demo.yaml",
        "--nnodes", "2", "--nproc_per_node", "4", "--gpu", "4", "--max_retries", "1",
        "--", "training.batch_size=4096",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    request = result.stdout.split("=== SCHEDULER REQUEST ===", 1)[1]
    assert "kind: Job" in request and "queue: default" in request
    assert request.count("image: reg/towerrec:1") == 2
    flat = " ".join(request.split())  # YAML folds the long command
    assert "python -m torch.distributed.run --nnodes 2 --nproc_per_node 4" in flat
    assert "-m towerrec.trainer.main --config configs/demo.yaml --set training.batch_size=4096" in flat
    assert "nvidia.com/gpu: '4'" in request


def test_slurm_dryrun():
    result = run(
        "run", "--dryrun", "-s", "slurm", "-cfg", "partition=train,time=1:00:00",
        COMPONENT, "--config", "configs/demo.yaml", "--nnodes", "2", "--nproc_per_node", "4",
        "--", "training.batch_size=4096",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    request = result.stdout.split("=== SCHEDULER REQUEST ===", 1)[1]
    assert "sbatch --parsable" in request
    assert request.count("--partition=train --time=1:00:00") == 2
    assert "python -m torch.distributed.run --nnodes 2 --nproc_per_node 4" in request
    assert "-m towerrec.trainer.main --config configs/demo.yaml --set training.batch_size=4096" in request


@pytest.mark.multiprocess  # the fixture's job (conftest.py finds no starter in benchmarks.faults)
def test_local_one_node_two_processes_trains(uninterrupted_job):
    """The real trainer, 1 node x 2 processes, launched by the torchx CLI on local_cwd."""
    script("torchx")  # skips without the console script, as the other launches here
    outcome = uninterrupted_job
    assert outcome.returncode == 0, outcome.log[-4000:]
    assert "training 1 epochs x 16 steps per rank, batch 512 per rank, 2 ranks" in outcome.log
    assert outcome.metrics is not None and set(outcome.metrics) == {"click", "conversion"}
