"""Process-group setup and the lockstep guard that keeps every rank's input in agreement.

Example::

    env = init_distributed(timeout_s=600)
    for batch in lockstep(iter(loader), env.cpu_group):
        ...  # every rank gets a batch here, or every rank stops / raises together
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Protocol, Sequence, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    # gloo group for small host-side agreements (the data guard, object gathers); the default
    # group when the backend is already gloo.
    cpu_group: dist.ProcessGroup
    # Every collective of the job gives up after this (training.collective_timeout_s); pass it
    # to dist.new_group too, whose own default is 30 minutes.
    timeout: timedelta = timedelta(seconds=600)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Join the job torch.distributed.run started (or a one-process group when run directly).

    NCCL and the local CUDA device when CUDA is available, gloo on CPU otherwise. ``timeout_s``
    bounds joining (the store connection and every rank's arrival) and every collective after.
    """
    if "RANK" not in os.environ:  # plain `python -m towerrec.trainer.main`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    warn_shared_agent_store()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
        backend=backend,
        cpu_group=cpu_group,
        timeout=timeout,
    )


def warn_shared_agent_store() -> None:
    """Warn when torchrun may restart these ranks on the TCPStore its agent keeps across restarts.

    torchrun (c10d rendezvous) lends the ranks its own store unless the agent runs with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``; that store outlives a restart, so the restarted
    ranks find the previous round's keys (pytorch/pytorch#135712): the gloo addresses of killed
    ranks (``connectFullMesh failed ... Connection refused``) or barrier counts already past
    (a silent hang). ``launch/components.py`` sets the variable.
    """
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0":
        logger.warning(
            "torchrun shares its rendezvous TCPStore with the ranks and may restart them: a "
            "restarted job can then fail in init_process_group (Connection refused) or hang on the "
            "previous round's keys; start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(launch/components.py does)"
        )


_OK, _EXHAUSTED, _FAILED = 0, 1, 2


class RankFailure(RuntimeError):
    """Raised on every rank when some rank's input failed; names the ranks and their errors."""


class StepVote(Protocol):
    """A yes/no question every rank answers before each batch, carried by lockstep's all-reduce
    (no collective of its own): a stop request (``trainer.preemption``), a non-finite loss
    (``trainer.nonfinite``)."""

    def vote(self) -> bool:
        """This rank's answer now."""
        ...

    def decide(self, yes: int, world: int) -> bool:
        """Called on every rank with the number of ranks that answered yes (> 0); True ends the
        iteration on every rank before this batch. May raise (on every rank alike)."""
        ...


def lockstep(
    batches: Iterator[T], group: dist.ProcessGroup | None, votes: Sequence[StepVote] = ()
) -> Iterator[T]:
    """Yield from ``batches`` only while every rank has a batch.

    Before each batch the ranks all-reduce a status flag (one int on the gloo group). A rank whose
    loader raised (bad data) makes every rank raise :class:`RankFailure` with its message, instead
    of leaving the others blocked in the next embedding all-to-all until the collective timeout.
    Ranks that run out of batches at different steps are a bug in the split and also fail loudly.
    ``votes``: more flags in the same all-reduce (:class:`StepVote`), decided in this order.
    """
    step = 0
    while True:
        error: BaseException | None = None
        try:
            batch = next(batches)
            status = _OK
        except StopIteration:
            status = _EXHAUSTED
        except Exception as e:  # noqa: BLE001 - forwarded to every rank below
            error, status = e, _FAILED
        own = [status == _EXHAUSTED, status == _FAILED, *(v.vote() for v in votes)]
        flags = torch.tensor(own, dtype=torch.int64)
        if group is not None and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
        world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        exhausted, failed = int(flags[0]), int(flags[1])
        if failed:
            messages = _gather_errors(error, group)
            if error is not None and world == 1:
                raise error
            raise RankFailure(
                f"input failed on {failed} of {world} ranks at step {step}:\n" + "\n".join(messages)
            ) from error
        for vote, yes in zip(votes, flags[2:].tolist(), strict=True):
            if yes and vote.decide(yes, world):
                return
        if exhausted == world:
            return
        if exhausted:
            raise RankFailure(
                f"{exhausted} of {world} ranks ran out of batches at step {step} while the others "
                "still had data; every rank must take the same number of steps"
            )
        yield batch
        step += 1


def describe_error(error: BaseException) -> str:
    """``Type: message``; for a DataLoader worker's error, the worker's own last line, not the
    wrapper ("Caught X in DataLoader worker process 0. Original Traceback ...")."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]  # "data.parquet.DataError: <message>"
        kind, _, message = last.partition(": ")
        return f"{kind.rsplit('.', 1)[-1]}: {message}"
    return f"{type(error).__name__}: {text}"


def _gather_errors(error: BaseException | None, group: dist.ProcessGroup | None) -> list[str]:
    mine = describe_error(error) if error is not None else None
    if group is None or not dist.is_initialized():
        return [f"rank 0: {mine}"]
    gathered: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    return [f"rank {r}: {m}" for r, m in enumerate(gathered) if m is not None]
