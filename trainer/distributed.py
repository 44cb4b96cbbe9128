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
from typing import Iterator, TypeVar

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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Join the job torch.distributed.run started (or a one-process group when run directly).

    NCCL and the local CUDA device when CUDA is available, gloo on CPU otherwise.
    """
    if "RANK" not in os.environ:  # plain `python -m towerrec.trainer.main`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
        backend=backend,
        cpu_group=cpu_group,
    )


_OK, _EXHAUSTED, _FAILED = 0, 1, 2


class RankFailure(RuntimeError):
    """Raised on every rank when some rank's input failed; names the ranks and their errors."""


def lockstep(batches: Iterator[T], group: dist.ProcessGroup | None) -> Iterator[T]:
    """Yield from ``batches`` only while every rank has a batch.

    Before each batch the ranks all-reduce a status flag (one int on the gloo group). A rank whose
    loader raised (bad data) makes every rank raise :class:`RankFailure` with its message, instead
    of leaving the others blocked in the next embedding all-to-all until the collective timeout.
    Ranks that run out of batches at different steps are a bug in the split and also fail loudly.
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
        flags = torch.tensor([status == _EXHAUSTED, status == _FAILED], dtype=torch.int64)
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
