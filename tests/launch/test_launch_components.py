"""launch/components.py:train: the AppDef, and what the local, kubernetes and slurm schedulers make of it."""

from __future__ import annotations

import shlex

import pytest
from torchx import specs
from torchx.runner import get_runner
from torchx.specs.file_linter import get_fn_docstring, validate
from towerrec.launch.components import train

OVERRIDES = ("training.batch_size=4096", "model.tower_hidden=[64, 32]")


def role_of(app: specs.AppDef) -> specs.Role:
    assert len(app.roles) == 1
    return app.roles[0]


def torchrun_cmd(command: str) -> list[str]:
    """The argv of the ``bash -c`` command (with ``${VAR}`` left as text)."""
    return shlex.split(command)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def trainer_argv(argv: list[str]) -> list[str]:
    return argv[argv.index("towerrec.trainer.main") + 1 :]


# ----------------------------------------------------------------------------------- the AppDef


def test_single_node_appdef():
    app = train(*OVERRIDES, config="configs/demo.yaml", nproc_per_node=2)
    role = role_of(app)
    assert app.name == "towerrec-train"
    assert (role.num_replicas, role.min_replicas) == (1, 1)
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    argv = torchrun_cmd(role.args[1])
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert option(argv, "--nnodes") == "1"
    assert option(argv, "--nproc_per_node") == "2"
    assert option(argv, "--rdzv_backend") == "c10d"
    # one node: torchrun picks a free port itself
    assert option(argv, "--rdzv_endpoint") == "localhost:0"
    assert option(argv, "--rdzv_id") == specs.macros.app_id
    assert option(argv, "--max_restarts") == "0"
    assert argv[argv.index("towerrec.trainer.main") - 1] == "-m"
    assert trainer_argv(argv) == [
        "--config", "configs/demo.yaml",
        "--set", "training.batch_size=4096",
        "--set", "model.tower_hidden=[64, 32]",
    ]  # fmt: skip
    assert role.resource == specs.Resource(cpu=4, gpu=0, memMB=8192)
    assert role.max_retries == 0
    assert role.env["LOGLEVEL"] == "WARNING"
    # The ranks size their threads from training.threads; torchrun must not default them apart.
    assert role.env["OMP_NUM_THREADS"] == "1"


def test_multi_node_appdef_uses_rank0_host_and_port():
    env = {"OMP_NUM_THREADS": "2"}
    app = train(
        config="c.yaml", nnodes=2, nproc_per_node=1, rdzv_port=29517, max_restarts=3,
        max_retries=1, cpu=8, gpu=1, memMB=1000, image="reg/towerrec:1", env=env, name="exp1",
    )  # fmt: skip
    role = role_of(app)
    assert app.name == "exp1"
    assert (role.num_replicas, role.min_replicas) == (2, 2)
    argv = torchrun_cmd(role.args[1])
    assert option(argv, "--nnodes") == "2"
    assert option(argv, "--nproc_per_node") == "1"
    assert option(argv, "--rdzv_endpoint") == f"$${{{specs.macros.rank0_env}:=localhost}}:29517"
    assert option(argv, "--max_restarts") == "3"
    assert trainer_argv(argv) == ["--config", "c.yaml"]
    assert role.port_map == {"c10d": 29517}
    assert role.resource == specs.Resource(cpu=8, gpu=1, memMB=1000)
    assert role.max_retries == 1
    assert role.image == "reg/towerrec:1"
    assert role.env["OMP_NUM_THREADS"] == "2"
    assert env == {"OMP_NUM_THREADS": "2"}  # the caller's dict is not modified


def test_named_resource_takes_precedence():
    role = role_of(train(config="c.yaml", h="aws_p3.2xlarge", cpu=1, memMB=1))
    assert role.resource == specs.named_resources["aws_p3.2xlarge"]


def test_overrides_are_checked_and_a_leading_set_is_accepted():
    argv = torchrun_cmd(role_of(train("--set", "a.b=1", "c=2", config="c.yaml")).args[1])
    assert trainer_argv(argv) == ["--config", "c.yaml", "--set", "a.b=1", "--set", "c=2"]
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        train("training.batch_size", config="c.yaml")
    with pytest.raises(ValueError, match="nnodes"):
        train(config="c.yaml", nnodes=0)


def test_component_is_valid_and_every_argument_documented():
    import towerrec.launch.components as module

    assert validate(module.__file__, "train") == []  # the torchx component linter
    _, args_help = get_fn_docstring(train)
    for name in ["overrides", "config", "nnodes", "nproc_per_node", "image", "max_restarts"]:
        assert "(required)" not in args_help[name] and len(args_help[name]) > 15, name


# ----------------------------------------------------------------------- scheduler requests


def test_local_request_fills_rank0_host_with_localhost(tmp_path):
    app = train(*OVERRIDES, config="c.yaml", nnodes=2, nproc_per_node=1, rdzv_port=29517)
    with get_runner() as runner:
        request = runner.dryrun(app, "local_cwd", cfg={"log_dir": str(tmp_path)}).request
    replicas = request.role_params["trainer"]
    assert len(replicas) == 2
    for replica in replicas:
        assert replica.args[:2] == ["bash", "-c"]
        assert "--rdzv_endpoint ${TORCHX_RANK0_HOST:=localhost}:29517" in replica.args[2]
        assert "$$" not in replica.args[2] and "${app_id}" not in replica.args[2]
        assert replica.env["TORCHX_RANK0_HOST"] == "localhost"
        assert trainer_argv(torchrun_cmd(replica.args[2]))[-2:] == ["--set", OVERRIDES[1]]


def test_dollar_in_an_override_survives_macro_substitution(tmp_path):
    app = train("paths.x=$HOME/a", config="c.yaml")
    with get_runner() as runner:
        request = runner.dryrun(app, "local_cwd", cfg={"log_dir": str(tmp_path)}).request
    command = request.role_params["trainer"][0].args[2]
    assert trainer_argv(torchrun_cmd(command)) == ["--config", "c.yaml", "--set", "paths.x=$HOME/a"]


def test_kubernetes_request():
    pytest.importorskip("kubernetes", reason="torchx's kubernetes scheduler needs `kubernetes`")
    app = train(
        *OVERRIDES, config="configs/demo.yaml", nnodes=2, nproc_per_node=4, cpu=16, gpu=4,
        memMB=64000, max_restarts=1, max_retries=2, image="reg/towerrec:1", rdzv_port=29600,
    )  # fmt: skip
    with get_runner() as runner, pytest.warns(UserWarning, match="Volcano"):  # retries caveat
        info = runner.dryrun(app, "kubernetes", cfg={"queue": "default"})
    job = info.request.resource
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    spec = job["spec"]
    assert spec["queue"] == "default" and spec["schedulerName"] == "volcano"
    assert spec["maxRetry"] == 2
    tasks = spec["tasks"]
    assert [t["name"] for t in tasks] == ["trainer-0", "trainer-1"]
    hosts = []
    for task in tasks:
        assert task["maxRetry"] == 2 and task["minAvailable"] == 1
        container = task["template"].spec.containers[0]
        assert container.image == "reg/towerrec:1"
        assert container.command[:2] == ["bash", "-c"]
        argv = torchrun_cmd(container.command[2])
        assert argv[:3] == ["python", "-m", "torch.distributed.run"]
        assert (option(argv, "--nnodes"), option(argv, "--nproc_per_node")) == ("2", "4")
        assert option(argv, "--max_restarts") == "1"
        assert option(argv, "--rdzv_id") == job["metadata"]["name"]
        assert argv[argv.index("towerrec.trainer.main") - 1] == "-m"
        assert trainer_argv(argv) == [
            "--config", "configs/demo.yaml", "--set", OVERRIDES[0], "--set", OVERRIDES[1]
        ]  # fmt: skip
        hosts.append(option(argv, "--rdzv_endpoint"))
        resources = container.resources
        assert resources.limits == {"cpu": "16000m", "memory": "64000M", "nvidia.com/gpu": "4"}
        assert resources.requests["nvidia.com/gpu"] == "4"
        assert [p.container_port for p in container.ports] == [29600]
    # the first pod hosts the rendezvous, the others find it through Volcano's host variable
    assert hosts == ["${TORCHX_RANK0_HOST:=localhost}:29600", "${VC_TRAINER_0_HOSTS:=localhost}:29600"]
    assert "queue: default" in str(info)  # the printable request is YAML


def test_kubernetes_needs_a_queue():
    pytest.importorskip("kubernetes", reason="torchx's kubernetes scheduler needs `kubernetes`")
    with get_runner() as runner, pytest.raises(specs.InvalidRunConfigException, match="queue"):
        runner.dryrun(train(config="c.yaml"), "kubernetes", cfg={})


def test_slurm_request():
    app = train(
        *OVERRIDES, config="configs/demo.yaml", nnodes=2, nproc_per_node=4, cpu=16, gpu=4,
        memMB=64000, max_restarts=1, max_retries=2, rdzv_port=29600,
    )  # fmt: skip
    with get_runner() as runner:
        info = runner.dryrun(app, "slurm", cfg={"partition": "train", "time": "1:00:00"})
    request = info.request
    assert request.cmd[:2] == ["sbatch", "--parsable"]
    assert request.max_retries == 2
    assert list(request.replicas) == ["trainer-0", "trainer-1"]
    for replica in request.replicas.values():
        assert replica.sbatch_opts["partition"] == "train"
        assert replica.sbatch_opts["time"] == "1:00:00"
        assert replica.sbatch_opts["cpus-per-task"] == "16"
        assert replica.sbatch_opts["gpus-per-task"] == "4"
        assert replica.sbatch_opts.get("mem") in ("64000", None)  # None on tiny-memory partitions
        assert replica.entrypoint == "bash" and replica.args[0] == "-c"
        argv = torchrun_cmd(replica.args[1])
        assert argv[:3] == ["python", "-m", "torch.distributed.run"]
        assert (option(argv, "--nnodes"), option(argv, "--nproc_per_node")) == ("2", "4")
        assert option(argv, "--rdzv_endpoint") == "${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29600"
        assert option(argv, "--max_restarts") == "1"
        assert trainer_argv(argv)[-4:] == ["--set", OVERRIDES[0], "--set", OVERRIDES[1]]
    script = request.materialize()
    assert script.count("#SBATCH --job-name=trainer-") == 2 and "#SBATCH hetjob" in script
    assert "export TORCHX_MAX_RETRIES=2" in script
    assert "--rdzv_id '\"$SLURM_JOB_ID\"'" in script  # the app id macro becomes the job id
