"""TorchX component that launches the towerrec trainer (``python -m towerrec.trainer.main``) under torchrun.

One machine, 2 processes (``local_cwd`` runs in the current directory; ``image`` is ignored)::

    torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml \\
        --nproc_per_node 2 -- training.batch_size=4096 training.epochs=2

Two nodes x 1 process on one machine (two torchrun agents meeting at localhost:RDZV_PORT)::

    torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml \\
        --nnodes 2 --nproc_per_node 1 --rdzv_port 29511

Kubernetes (Volcano job; ``queue`` is a required scheduler option, ``--workspace ""`` skips
building a docker image from the current directory, the config path is inside the image)::

    torchx run --workspace "" -s kubernetes -cfg queue=default,namespace=default \\
        launch/components.py:train --image REGISTRY/towerrec:TAG --config configs/demo.yaml \\
        --nnodes 2 --nproc_per_node 8 --gpu 8 --cpu 32 --memMB 240000 --max_retries 2

Slurm (one heterogeneous-job group per node; runs in the submit directory, ``image`` is ignored)::

    torchx run -s slurm -cfg partition=train,time=4:00:00 launch/components.py:train \\
        --config configs/demo.yaml --nnodes 2 --nproc_per_node 8 --gpu 8 --cpu 32 --memMB 240000

Add ``--dryrun`` right after ``torchx run`` to print the scheduler request without submitting.
Component defaults (e.g. the image) can be set once in ``.torchxconfig``::

    [component:launch/components.py:train]
    image = REGISTRY/towerrec:TAG
"""

import shlex

# No `from __future__ import annotations`: torchx reads the signature's real types to parse args.
from typing import Dict, Iterable, List, Optional

import torchx.specs as specs
from torchx.specs import macros

DEFAULT_IMAGE = "towerrec:latest"
ROLE_NAME = "trainer"
TRAINER_MODULE = "towerrec.trainer.main"


class _Raw(str):
    """An argument spliced into the ``bash -c`` command unquoted (it holds a ``${VAR}`` to expand)."""


def _bash_join(args: Iterable[str]) -> str:
    return " ".join(a if isinstance(a, _Raw) else shlex.quote(a) for a in args)


def _escape_macros(s: str) -> str:
    # TorchX fills macros with string.Template; a literal "$" from the user must be written "$$".
    return s.replace("$", "$$")


def trainer_args(config: str, overrides: Iterable[str]) -> List[str]:
    """``--config CONFIG --set K=V ...``: the arguments given to ``towerrec.trainer.main``.

    Each override is ``KEY=VALUE`` (a literal ``--set`` before one is accepted and dropped).
    """
    args = ["--config", config]
    for override in overrides:
        if override == "--set":
            continue
        key, sep, _ = override.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ValueError(f"override {override!r}: expected KEY=VALUE, e.g. training.batch_size=4096")
        args += ["--set", override]
    return args


def train(
    *overrides: str,
    config: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = DEFAULT_IMAGE,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    max_restarts: int = 0,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    shutdown_timeout: int = 30,
    env: Optional[Dict[str, str]] = None,
    name: str = "towerrec-train",
) -> specs.AppDef:
    """Trains a towerrec model: nnodes x nproc_per_node ranks of ``python -m towerrec.trainer.main``.

    Every node runs one ``python -m torch.distributed.run`` agent (c10d rendezvous) that starts
    nproc_per_node ranks of ``towerrec.trainer.main --config CONFIG --set KEY=VALUE ...``. Config overrides
    go after ``--`` at the end, e.g.
    ``torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml
    --nproc_per_node 2 -- training.batch_size=4096 training.epochs=2``.
    The config path is resolved in the job's working directory (the current directory for
    local_cwd and slurm, the image's WORKDIR for kubernetes).

    Args:
        overrides: config overrides KEY=VALUE (after ``--``), each passed as ``--set KEY=VALUE``
        config: experiment YAML file, relative to the job's working directory
        nnodes: number of nodes (hosts); one torchrun agent per node
        nproc_per_node: trainer processes (ranks) per node; at most the GPUs per node on GPU hosts
        image: container image (kubernetes); ignored by local_cwd and slurm
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a registered TorchX named resource; takes precedence over cpu, gpu and memMB
        max_restarts: in-place restarts of all ranks by torchrun after a rank fails (killed, OOM,
            an error); each restart resumes from RUN_DIR/checkpoints/latest, the newest complete
            checkpoint (``checkpoint.resume: auto``, the default), not from step 0
        max_retries: scheduler-level retries of the whole job (Volcano maxRetry, slurm requeue);
            a retry resumes the same way when RUN_DIR is on storage every node shares
        rdzv_port: c10d rendezvous port on the first node when nnodes > 1 (with one node a free
            port is chosen)
        shutdown_timeout: seconds torchrun waits for the ranks after it forwards the job's SIGTERM
            to them, before it SIGKILLs them; keep it above ``checkpoint.preemption_grace_s`` so a
            preempted job finishes its checkpoint (after a rank fails, torchrun waits 30 s)
        env: extra environment variables for every node, e.g. LOGLEVEL=INFO,NCCL_DEBUG=INFO
            (threads per rank: the config's training.threads, not OMP_NUM_THREADS)
        name: job name
    """
    # Written as an AppDef rather than via torchx.components.dist.ddp (whose command this mirrors:
    # bash -c so the rank-0 host variable is expanded on the node, c10d rendezvous, app id as
    # rendezvous id, --tee 3) because ddp cannot express what this needs: it hard-codes the
    # `torchrun` console script (we run `python -m torch.distributed.run`, so the interpreter
    # that has torch is used, whatever is on PATH), has no torchrun --max-restarts, treats
    # 0 cpu/memMB as "use a default" and mutates the caller's env dict.
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes ({nnodes}) and nproc_per_node ({nproc_per_node}) must be >= 1")
    if max_restarts < 0 or max_retries < 0:
        raise ValueError("max_restarts and max_retries must be >= 0")
    if not 0 < rdzv_port < 65536:
        raise ValueError(f"rdzv_port {rdzv_port} is not a TCP port")
    if shutdown_timeout < 1:
        raise ValueError(f"shutdown_timeout must be >= 1 s, got {shutdown_timeout}")

    if nnodes == 1:
        # All ranks sit under one agent: port 0 lets it take any free port, so concurrent
        # single-node jobs on one machine never collide.
        rdzv_endpoint = _Raw("localhost:0")
    else:
        # Each scheduler names the variable holding the first node's host (local: localhost,
        # kubernetes: VC_TRAINER_0_HOSTS, slurm: SLURM_JOB_NODELIST_HET_GROUP_0); on the first
        # node itself it may be unset, hence the localhost fallback. "$$" escapes the macro "$".
        rdzv_endpoint = _Raw(f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}")

    cmd = [
        "python", "-m", "torch.distributed.run",
        "--nnodes", str(nnodes),
        "--nproc_per_node", str(nproc_per_node),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", rdzv_endpoint,
        "--rdzv_id", _Raw(macros.app_id),
        "--max_restarts", str(max_restarts),
        "--shutdown_timeout", str(shutdown_timeout),
        "--tee", "3",
        "--role", "",
        "-m", TRAINER_MODULE,
    ] + [_escape_macros(a) for a in trainer_args(config, overrides)]  # fmt: skip

    role_env = {
        "LOGLEVEL": "WARNING",  # torchrun's own logging; the trainer logs at INFO
        # The ranks get a new TCPStore each restart (rank 0 hosts it) instead of the agent's,
        # which outlives restarts with the previous round's keys: the gloo addresses of killed
        # ranks ("connectFullMesh failed ... Connection refused") and barrier counts already
        # past (a silent hang). pytorch/pytorch#135712.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        # Each rank sizes its threads itself from training.threads (the cores it may use, its
        # node's ranks, its loader workers) before it builds anything. torchrun defaults this to 1
        # for several ranks only, and says so; set for any count, every rank and the processes it
        # starts (loader workers, which inherit it) begin alike, at one thread per library pool.
        "OMP_NUM_THREADS": "1",
    }
    role_env.update(env or {})

    resource = specs.resource(h=h) if h else specs.Resource(cpu=cpu, gpu=gpu, memMB=memMB)
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name=ROLE_NAME,
                image=image,
                entrypoint="bash",
                args=["-c", _bash_join(cmd)],
                num_replicas=nnodes,
                min_replicas=nnodes,
                resource=resource,
                env=role_env,
                port_map={"c10d": rdzv_port},
                max_retries=max_retries,
                retry_policy=specs.RetryPolicy.APPLICATION,
            )
        ],
    )
