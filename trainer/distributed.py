"""Process-group setup and the lockstep guard that keeps every rank's input in agreement.

Example::

    env = init_distributed(timeout_s=600)
    for batch in lockstep(iter(loader), env.cpu_group):
        ...  # every rank gets a batch here, or every rank stops / raises together
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, Iterable, Iterator, Protocol, Sequence, TypeVar

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


@dataclass(frozen=True)
class ThreadPlan:
    """How one rank shares the cores of its machine (:func:`size_threads`).

    ``cores``: the cores this process may run on; ``intra_op``/``interop``: torch's thread pools;
    ``workers``: DataLoader worker processes (one core each: torch gives them one thread, they
    decode without Arrow threads); ``arrow``: Arrow's CPU pool, which decodes Parquet in the rank
    (ahead of the training loop, which converts each chunk itself: no core of its own).
    """

    cores: int
    local_world_size: int
    workers: int
    intra_op: int
    interop: int
    arrow: int
    requested: int | str = "auto"

    @property
    def busy(self) -> int:
        """Threads and processes of this node's ranks that compute at once."""
        return self.local_world_size * (self.intra_op + self.workers)

    def oversubscription(self) -> str | None:
        """Why ``local ranks x (intra-op threads + workers)`` exceeds the cores, or None."""
        if self.busy <= self.cores:
            return None
        return (
            f"{self.local_world_size} local rank(s) x ({self.intra_op} intra-op threads + "
            f"{self.workers} loader workers) = {self.busy} busy on {self.cores} cores: they take turns on "
            "the cores and training slows down, most when another process is busy"
        )

    def describe(self) -> str:
        """The start line: what was chosen, and whether it fits the cores."""
        fits = (
            f"{self.busy} busy on {self.cores} cores"
            if self.busy <= self.cores
            else f"{self.busy} busy on {self.cores} cores: more than the cores"
        )
        return (
            f"threads: {self.cores} cores available, {self.local_world_size} local rank(s), each "
            f"{self.intra_op} intra-op + {self.interop} inter-op torch threads, {self.workers} loader "
            f"workers, {self.arrow} Arrow decode threads (training.threads: {self.requested}; {fits})"
        )


def available_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity (taskset, a cgroup cpuset, Slurm's
    binding), capped by a cgroup CPU quota (a Kubernetes CPU limit), rounded down, at least 1.
    ``os.cpu_count()`` counts the machine's cores, which a container may not have.

    Example::

        available_cores()   # 2 under `taskset -c 0,1`, whatever the machine has
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup)
    return max(1, min(cores, int(quota))) if quota is not None else cores


def _cgroup_cpu_quota(root: str) -> float | None:
    """CPUs the cgroup's CFS quota allows (v2 ``cpu.max``: ``QUOTA PERIOD``; v1
    ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``); None: no limit, or no cgroup file."""
    v2 = _read_fields(os.path.join(root, "cpu.max"))
    if v2 is None:
        quota, period = (
            _read_fields(os.path.join(root, "cpu", f)) for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        )
        v2 = quota + period if quota is not None and period is not None else None
    if v2 is None or len(v2) != 2 or not all(f.isdigit() for f in v2):  # "max" / "-1": no limit
        return None
    quota, period = int(v2[0]), int(v2[1])
    return quota / period if quota > 0 and period > 0 else None


def _read_fields(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return None


def size_threads(
    requested: int | str, local_world_size: int, workers: int, cores: int | None = None
) -> ThreadPlan:
    """The threads of one rank so that ``local ranks x (intra-op threads + loader workers)`` fits
    the cores: ``requested`` ``"auto"`` gives ``max(1, cores // local_world_size - workers)``
    intra-op threads, an int exactly that many (:meth:`ThreadPlan.oversubscription` says when it
    does not fit). Each worker process takes a core of the share; with ``num_workers`` 0 the
    training loop converts the batches itself between steps, and Arrow's decoding threads (the
    rank's cores the torch threads leave, at least 1; workers decode single-threaded) read ahead
    while they wait. Under ``auto``, ``trainer.cpu_share.ThreadGovernor`` gives threads back when
    other processes busy the same cores (OpenMP threads that must wait for a busy core stall every
    step: two 2-thread jobs on 2 cores fell from ~57,000 to ~1,500 samples/s each).
    ``cores``: default :func:`available_cores`.

    Example::

        size_threads("auto", local_world_size=1, workers=1, cores=8).intra_op   # 7
        size_threads("auto", local_world_size=1, workers=0, cores=8).intra_op   # 8
        size_threads("auto", local_world_size=2, workers=0, cores=8).intra_op   # 4
    """
    cores = available_cores() if cores is None else cores
    share = max(1, cores // max(1, local_world_size))
    intra = max(1, share - workers) if requested == "auto" else int(requested)
    if intra < 1:
        raise ValueError(f"training.threads: {requested}; expected auto or an integer >= 1")
    return ThreadPlan(
        cores=cores,
        local_world_size=local_world_size,
        workers=workers,
        intra_op=intra,
        interop=intra,  # torch's inter-op pool is idle in this loop; no larger than the intra-op share
        arrow=max(1, share - intra),
        requested=requested,
    )


def set_threads(plan: ThreadPlan, announce: bool = True) -> None:
    """Apply ``plan`` to this process (before the model is built): torch's intra-op (OpenMP,
    MKL) and inter-op pools and Arrow's CPU pool. ``announce``: log it (rank 0), and warn when
    it oversubscribes. An ``OMP_NUM_THREADS`` in the environment (torchrun sets 1 for several
    ranks) only sized the pools until now: ``training.threads`` decides."""
    import pyarrow as pa

    torch.set_num_threads(plan.intra_op)
    if torch.get_num_interop_threads() != plan.interop:
        try:
            torch.set_num_interop_threads(plan.interop)
        except RuntimeError:  # set once per process, before the pool's first use: keep that one
            pass
    pa.set_cpu_count(plan.arrow)
    if announce:
        logger.info(plan.describe())
        warning = plan.oversubscription()
        # Only a count the config asked for: auto's choice is the best that fits (the start line
        # says when even 1 thread beside the workers does not).
        if warning is not None and plan.requested != "auto":
            logger.warning(
                "training.threads: %s: %s; use auto or at most %d",
                plan.requested,
                warning,
                max(1, plan.cores // plan.local_world_size - plan.workers),
            )


_OK, _EXHAUSTED, _FAILED = 0, 1, 2

# Batches whose all-reduce is in flight while the caller trains on the one yielded before them.
LOCKSTEP_DEPTH = 1


class RankFailure(RuntimeError):
    """Raised on every rank when some rank's input failed; names the ranks and their errors."""


class StepVote(Protocol):
    """A yes/no question every rank answers for each batch, carried by lockstep's all-reduce
    (no collective of its own): a stop request (``trainer.preemption``), a non-finite loss
    (``trainer.nonfinite``).

    :func:`lockstep` asks :meth:`vote` when it posts a batch's all-reduce and calls
    :meth:`decide` when it waits for it, ``depth`` batches later: on every rank at the same batch.
    A vote whose answer must be decided in the fetch that asks it sets ``synchronous = True``
    (``NonFiniteGuard`` in ``skip`` mode): lockstep then blocks on each all-reduce (depth 0).
    """

    def vote(self) -> bool:
        """This rank's answer now."""
        ...

    def decide(self, yes: int, world: int) -> bool:
        """Called on every rank with the number of ranks that answered yes (> 0); True ends the
        iteration on every rank before this batch. May raise (on every rank alike)."""
        ...


@dataclass
class _Round(Generic[T]):
    """One batch's all-reduce: this rank's batch (None unless it has one) and the flags, summed
    over the ranks once ``work`` is waited."""

    batch: T | None
    flags: torch.Tensor | list[int]  # a list when there is no group to sum over
    work: dist.Work | None

    def wait(self) -> list[int]:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.flags if isinstance(self.flags, list) else self.flags.tolist()


class _Source(Generic[T]):
    """``batches`` and this rank's status. After the loader raised or ran out, every later round
    reports that again without calling it: the other ranks still post those rounds."""

    def __init__(self, batches: Iterator[T]) -> None:
        self.batches = batches
        self.status = _OK
        self.error: BaseException | None = None
        self.failed_at = -1  # the round whose fetch raised
        self.fetched = 0

    def next(self) -> tuple[int, T | None]:
        index, self.fetched = self.fetched, self.fetched + 1
        if self.status != _OK:
            return self.status, None
        try:
            return _OK, next(self.batches)
        except StopIteration:
            self.status = _EXHAUSTED
        except Exception as e:  # noqa: BLE001 - forwarded to every rank by lockstep
            self.status, self.error, self.failed_at = _FAILED, e, index
        return self.status, None


def lockstep(
    batches: Iterator[T],
    group: dist.ProcessGroup | None,
    votes: Sequence[StepVote] = (),
    depth: int = LOCKSTEP_DEPTH,
) -> Iterator[T]:
    """Yield from ``batches`` only while every rank has a batch.

    For each batch the ranks all-reduce a status flag (one int on the gloo group). It is posted
    without waiting (``async_op``) when the batch is fetched, ``depth`` batches ahead of the one
    yielded, and waited for only when that batch is about to be yielded: gloo's threads run it
    while the caller trains on the batches before, so no step blocks on it unless another rank's
    loader is slower. A rank whose loader raised (bad data) makes every rank raise
    :class:`RankFailure` with its message at that batch, instead of leaving the others blocked in
    the next embedding all-to-all until the collective timeout. Ranks that run out of batches at
    different steps are a bug in the split and also fail loudly. ``votes``: more flags in the same
    all-reduce (:class:`StepVote`), asked when it is posted and decided, in this order, when it is
    waited. ``depth`` 0: fetch, all-reduce and wait, yield (also when a vote is ``synchronous``).

    Every rank posts the same all-reduces on ``group`` in the same order, whatever happened to its
    loader, and waits for all it posted before any other collective here (gathering the errors,
    a vote's decision) or when the iteration ends.

    Example::

        for batch in lockstep(iter(loader), env.cpu_group, votes=[stop]):
            ...  # batch i's all-reduce was posted when batch i - 1 was yielded
    """
    if any(getattr(v, "synchronous", False) for v in votes):
        depth = 0
    group = group if group is not None and dist.is_initialized() else None
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        group = None  # one rank: its own flags are the sums, no collective to post
    source: _Source[T] = _Source(batches)
    rounds: deque[_Round[T]] = deque()
    try:
        for step in itertools.count():
            while len(rounds) <= depth:
                rounds.append(_post(source, votes, group))
            current = rounds.popleft()
            exhausted, failed, *answers = current.wait()
            if failed or exhausted or any(answers):
                _wait_all(rounds)  # nothing of ours in flight before the collectives below
            if failed:
                error = source.error if source.failed_at == step else None
                messages = _gather_errors(error, group)
                if error is not None and world == 1:
                    raise error
                raise RankFailure(
                    f"input failed on {failed} of {world} ranks at step {step}:\n" + "\n".join(messages)
                ) from error
            for vote, yes in zip(votes, answers, strict=True):
                if yes and vote.decide(yes, world):
                    return
            if exhausted == world:
                return
            if exhausted:
                raise RankFailure(
                    f"{exhausted} of {world} ranks ran out of batches at step {step} while the others "
                    "still had data; every rank must take the same number of steps"
                )
            yield current.batch  # type: ignore[misc] - a batch: no rank failed or ran out
    finally:
        # Closed early (max_steps, a stop): every rank closes at the same batch, so the rounds it
        # posted ahead complete; wait for them so none is left running on the group.
        _wait_all(rounds, quiet=True)


def _post(source: _Source[T], votes: Sequence[StepVote], group: dist.ProcessGroup | None) -> _Round[T]:
    """Fetch the next batch and post its all-reduce: ``[exhausted, failed, *votes]``."""
    status, batch = source.next()
    own = [int(status == _EXHAUSTED), int(status == _FAILED), *(int(v.vote()) for v in votes)]
    if group is None:
        return _Round(batch, own, None)
    flags = torch.tensor(own, dtype=torch.int64)
    work = dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return _Round(batch, flags, work)


def _wait_all(rounds: Iterable[_Round[T]], quiet: bool = False) -> None:
    """Wait for every round in flight. ``quiet``: on the way out, a broken group (a rank died)
    must not hide the error that ends the iteration."""
    for r in rounds:
        try:
            r.wait()
        except RuntimeError as e:
            if not quiet:
                raise
            logger.debug("lockstep: an all-reduce in flight failed on the way out: %s", e)
            return


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
