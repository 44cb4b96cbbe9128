"""The real `torchx` CLI with the component: --help, kubernetes and slurm dryruns, a local 2x1 launch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from launch_helpers import REPO, free_port, script

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
                 "config overrides KEY=VALUE", "trainer.main"]:  # fmt: skip
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
    assert "-m trainer.main --config configs/demo.yaml --set training.batch_size=4096" in flat
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
    assert "-m trainer.main --config configs/demo.yaml --set training.batch_size=4096" in request


STANDIN = textwrap.dedent(
    """\
    # stand-in for trainer.main: checks the torchrun environment with one gloo all-reduce
    import os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    print(f"STANDIN rank={dist.get_rank()} world={dist.get_world_size()} sum={int(t.item())} "
          f"args={' '.join(sys.argv[1:])}", flush=True)
    dist.destroy_process_group()
    """
)


def test_local_two_nodes_on_one_machine(tmp_path):
    """2 nodes x 1 process via local_cwd: two torchrun agents meet at localhost:<free port>.

    Runs a stand-in trainer.main from a scratch working directory (local_cwd runs there).
    """
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("")
    (tmp_path / "trainer" / "main.py").write_text(STANDIN)
    result = run(
        "run", "-s", "local_cwd", str(REPO / COMPONENT), "--config", "c.yaml",
        "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_port", str(free_port()),
        "--", "training.seed=3",
        cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for rank in (0, 1):
        assert f"STANDIN rank={rank} world=2 sum=2 args=--config c.yaml --set training.seed=3" in output
