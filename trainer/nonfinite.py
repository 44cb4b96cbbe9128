"""Non-finite losses and gradients: stop the run naming the step, task and rows, or skip the step.

``training.nonfinite: stop`` (default) stops every rank with :class:`NonFiniteError`;
``skip`` leaves the model and every optimizer state as they were and counts the step, up to
``training.nonfinite_max_skips`` skipped steps in the run (then it stops).

Each step checks the **loss** (after forward) and the **gradients** of the dense network and
data-parallel tables (after backward; DDP has averaged them, so every rank sees the same values).
The ranks must agree on what they do, which the two modes reach at different costs:

* ``stop`` never waits for the device: both checks stay on it (one ``isfinite`` of the loss and
  one fused inf-norm over the gradients per step, copied to the host without blocking; on CPU,
  where reading costs no wait, one ``isfinite`` per storage the gradients share), are read
  once done, and vote in the all-reduce ``distributed.lockstep`` runs anyway
  (:meth:`NonFiniteGuard.vote`; it decides a vote one batch after asking it). The steps in between
  still update: the run stops anyway. :meth:`NonFiniteGuard.settle` agrees on the rest of a
  stretch (one all-reduce) before an evaluation or a save uses the model, so a diverged model is
  never evaluated or saved. Every rank raises naming the first non-finite step: the ranks whose
  loss was non-finite there, or, with finite losses, the gradients (a non-finite gradient on the
  ranks whose loss was finite is that loss's doing and is not listed).
* ``skip`` must decide before each update, so it syncs every step: the tables' optimizer runs
  inside backward (fbgemm fuses it), so the only way not to apply a step to them is not to run
  backward, and every rank must skip alike (a rank that skips backward and one that does not
  would wait for each other in the embeddings' all-to-all). The loss is read after forward and
  voted in lockstep's all-reduce, which a ``synchronous`` vote makes blocking again: the pipeline
  fetches the next batch after the forward (``enqueue_batch_after_forward``). Only where no fetch
  follows a forward (the last two steps before an evaluation, a save or the epoch's end) the guard
  all-reduces the flag itself. The gradients are read after backward; with identical values on
  every rank they decide alike without a collective. A skipped dense update leaves the sharded
  tables updated in backward with the gradient of that loss (finite, or the loss would have been
  caught): a limitation of fused updates. If their rows became non-finite, later losses are, and
  are caught (and counted) in turn.

Example::

    guard = NonFiniteGuard("stop", 10, env, describe_rows)
    pipeline = GuardedTrainPipeline(model, optimizer, device, guard, dense_optimizer.params)
    guard.begin(step=0, epoch=0, batch=0)
    for batch in lockstep(iter(loader), group, votes=[guard]):
        ...
    guard.settle()  # before evaluating or saving
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from towerrec.trainer.distributed import DistEnv, RankFailure
from towerrec.trainer.model import StepOutput

_MAX_PARAMETERS_NAMED = 5


class NonFiniteError(RankFailure):
    """A non-finite loss or gradient stopped the run (or too many steps were skipped); raised on
    every rank with the step, the tasks and every affected rank's batch rows."""


@dataclass
class _Check:
    """``skip``: one forward's loss check: where its batch is, whether its loss is finite here,
    and what every rank agreed (None: not agreed yet)."""

    step: int
    epoch: int
    batch: int
    report: str | None  # this rank's description of a non-finite loss; None: finite
    voted: bool = False
    agreed_bad: bool = False
    reports: list[str] | None = None  # every bad rank's report, once agreed


@dataclass
class _Deferred:
    """``stop``: one step's checks, computed on the device and read once the step is done."""

    step: int
    epoch: int
    batch: int
    loss: torch.Tensor
    task_losses: dict[str, torch.Tensor]
    names: list[str] = field(default_factory=list)  # the parameters with a gradient
    total: int = 0  # the parameters checked, with a gradient or not
    norms: torch.Tensor | None = None  # each named gradient's largest magnitude
    finite: torch.Tensor | None = None  # [loss finite, every gradient finite] on the host
    ready: Any = None  # torch.cuda.Event: ``finite`` has arrived; None: readable now


@dataclass(frozen=True)
class _Failure:
    """``stop``: a rank's first non-finite step, as the ranks gather it."""

    step: int
    epoch: int
    batch: int
    loss: bool  # the loss; False: a gradient after a finite loss
    report: str  # loss: "rank r: loss ... (tasks: ...); batch rows: ..."; gradient: "rank r: rows"
    parameters: str = ""  # gradient: "2 of 9 dense parameters (a, b)"


class NonFiniteGuard:
    """The checks of the module docstring and the count of skipped steps; a
    ``distributed.StepVote`` (``synchronous`` in ``skip`` mode).

    Args:
        mode: ``stop`` or ``skip`` (``training.nonfinite``).
        max_skips: steps that may be skipped in the whole run (``training.nonfinite_max_skips``).
        env: the ranks; their ``cpu_group`` carries the agreements.
        describe_rows: ``batch -> "file rows [a, b)"``: where this rank's batch ``batch`` of the
            current epoch was read.
    """

    def __init__(
        self,
        mode: Literal["stop", "skip"],
        max_skips: int,
        env: DistEnv,
        describe_rows: Callable[[int], str],
    ) -> None:
        self.mode = mode
        self.max_skips = max_skips
        self.env = env
        self.describe_rows = describe_rows
        # skip decides each loss in the fetch that follows its forward: lockstep must not defer it.
        self.synchronous = mode == "skip"
        self.skipped_steps: list[int] = []
        self._next = (1, 0, 0)  # (step, epoch, batch) of the next forward
        self._pending: _Check | None = None  # skip: the last forward's check, until its backward
        self._current: _Check | None = None  # skip: the check of the batch being updated
        self._skip_reports: list[tuple[int, str]] = []
        self._step: _Deferred | None = None  # stop: the last forward's check, until its update
        self._unread: deque[_Deferred] = deque()  # stop: checks of updated steps, not read yet
        self._failure: _Failure | None = None  # stop: this rank's first non-finite step

    def begin(self, step: int, epoch: int, batch: int) -> None:
        """The next forward trains global step ``step + 1`` on batch ``batch`` of ``epoch``."""
        self._next = (step + 1, epoch, batch)

    # ---- the loss, after forward -------------------------------------------------------------

    def observe(self, out: StepOutput) -> None:
        step, epoch, batch = self._next
        self._next = (step + 1, epoch, batch + 1)
        if self.mode == "stop":  # checked on the device with the gradients (update_allowed)
            tasks = {task: loss.detach() for task, loss in out.task_losses.items()}
            self._step = _Deferred(step, epoch, batch, out.loss.detach(), tasks)
            return
        report = None
        if not bool(torch.isfinite(out.loss)):  # skip: decided before backward, a host sync
            report = self._loss_report(out.loss, out.task_losses, batch)
        self._pending = _Check(step, epoch, batch, report)

    def _loss_report(self, loss: torch.Tensor, task_losses: Mapping[str, torch.Tensor], batch: int) -> str:
        tasks = ", ".join(f"{task} {float(value):g}" for task, value in task_losses.items())
        rows = self.describe_rows(batch)
        return f"rank {self.env.rank}: loss {float(loss):g} (tasks: {tasks}); batch rows: {rows}"

    def vote(self) -> bool:
        """distributed.StepVote. ``stop``: a step read so far was non-finite here (asked again
        until decided). ``skip``: the last forward's loss is non-finite here (each forward is
        voted on once, in the fetch that follows it)."""
        if self.mode == "stop":
            self._read(wait=False)
            return self._failure is not None
        check = self._pending
        if check is None or check.voted:
            return False
        check.voted = True
        return check.report is not None

    def decide(self, yes: int, world: int) -> bool:
        if self.mode == "stop":
            self._stop()
        assert self._pending is not None
        self._agree_bad(self._pending)
        return False  # the iteration goes on: the pipeline skips

    def settle(self) -> None:
        """``stop``: agree now on every step updated so far (one blocking all-reduce), before an
        evaluation or a save uses the model; raises :class:`NonFiniteError` on every rank if a
        rank's was non-finite. Every rank calls it at the same step. ``skip``: nothing to do,
        each step was agreed before its update."""
        if self.mode != "stop":
            return
        self._read(wait=True)
        flag = torch.tensor([int(self._failure is not None)], dtype=torch.int64)
        if self.env.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.env.cpu_group)
        if int(flag.item()):
            self._stop()

    def _agree_bad(self, check: _Check) -> None:
        check.agreed_bad = True
        check.reports = [r for r in self._gather(check.report) if r is not None]

    # ---- stop: the device-side checks --------------------------------------------------------

    def _defer(self, parameters: Mapping[str, torch.Tensor]) -> None:
        """Queue the last forward's loss and these gradients' checks, without waiting for them."""
        check, self._step = self._step, None
        if check is None:
            return
        named = [(name, grad) for name, p in parameters.items() if (grad := p.grad) is not None]
        flags = [torch.isfinite(check.loss).all()]
        check.total = len(parameters)
        if named:
            check.names = [name for name, _ in named]
            grads = [grad for _, grad in named]
            if check.loss.is_cuda:  # a fused kernel, read when the device gets there
                check.norms = _max_magnitudes(grads)
                flags.append(torch.isfinite(check.norms).all())
            else:  # read now: the gradients are still there to name the non-finite ones
                finite = _all_finite(grads)
                if not bool(finite):
                    check.norms = _max_magnitudes(grads)
                flags.append(finite)
        finite = torch.stack(flags)
        if finite.is_cuda:  # arrives while the device works on; vote() reads it once there
            check.finite = finite.to("cpu", non_blocking=True)
            check.ready = torch.cuda.Event()
            check.ready.record()
        else:
            check.finite = finite
        self._unread.append(check)

    def _read(self, wait: bool) -> None:
        """Read the queued checks in order, those already on the host (all, with ``wait``); keep
        the first non-finite step."""
        while self._unread:
            check = self._unread[0]
            if check.ready is not None and not (wait or check.ready.query()):
                return
            self._unread.popleft()
            if check.ready is not None:
                check.ready.synchronize()
            if self._failure is None:
                self._failure = self._failure_of(check)

    def _failure_of(self, check: _Deferred) -> _Failure | None:
        assert check.finite is not None
        loss_finite, *grads_finite = check.finite.tolist()
        if not loss_finite:
            report = self._loss_report(check.loss, check.task_losses, check.batch)
            return _Failure(check.step, check.epoch, check.batch, True, report)
        if all(grads_finite):
            return None
        assert check.norms is not None
        bad = [n for n, ok in zip(check.names, torch.isfinite(check.norms).tolist(), strict=True) if not ok]
        rows = f"rank {self.env.rank}: {self.describe_rows(check.batch)}"
        return _Failure(
            check.step, check.epoch, check.batch, False, rows, _describe_parameters(bad, check.total)
        )

    def _stop(self) -> None:
        """Raise on every rank (a collective) naming the first non-finite step of any rank."""
        self._read(wait=True)
        failures = [f for f in self._gather(self._failure) if f is not None]
        first = min(f.step for f in failures)
        at = [f for f in failures if f.step == first]
        where = f"step {first} (epoch {at[0].epoch}, batch {at[0].batch})"
        losses = [f for f in at if f.loss]  # then the others' gradients are that loss's doing
        if losses:
            raise NonFiniteError(
                f"non-finite loss at {where} on {len(losses)} of {self.env.world_size} ranks:\n  "
                + "\n  ".join(f.report for f in losses)
                + "\ntraining.nonfinite: skip would skip such steps instead (up to "
                "training.nonfinite_max_skips)"
            )
        raise NonFiniteError(
            f"non-finite gradient at {where} with a finite loss: {at[0].parameters}; the batches of "
            "every rank contributed: "
            + "; ".join(f.report for f in at)
            + "\ntraining.nonfinite: skip would skip the dense update instead"
        )

    # ---- the pipeline's hooks ----------------------------------------------------------------

    def backward_allowed(self) -> bool:
        """Before backward: False on every rank when some rank's loss is non-finite (``skip``;
        ``stop`` always runs it and stops at a later vote)."""
        if self.mode == "stop":
            return True
        check, self._pending = self._pending, None
        self._current = check
        if check is None:
            return True
        if not check.voted:  # no fetch after this forward: agree here
            check.voted = True
            flag = torch.tensor([int(check.report is not None)], dtype=torch.int64)
            if self.env.world_size > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.env.cpu_group)
            if int(flag.item()):
                self._agree_bad(check)
        if check.agreed_bad:
            self._skip(check, "non-finite loss on " + "; ".join(check.reports or []))
            return False
        return True

    def update_allowed(self, parameters: Mapping[str, torch.Tensor]) -> bool:
        """After backward. ``skip``: False when a gradient of ``parameters`` is non-finite (a host
        sync) or after a skipped backward. ``stop``: True; the checks are queued on the device."""
        if self.mode == "stop":
            self._defer(parameters)
            return True
        check = self._current
        if check is not None and check.agreed_bad:
            return False
        grads = [p.grad for p in parameters.values() if p.grad is not None]
        if not grads or bool(_all_finite(grads)):
            return True
        finite = torch.isfinite(_max_magnitudes(grads)).tolist()
        if all(finite):
            return True
        names = [name for name, p in parameters.items() if p.grad is not None]
        bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
        where = "" if check is None else f" at step {check.step} (epoch {check.epoch}, batch {check.batch})"
        rows = self._gather(
            None if check is None else f"rank {self.env.rank}: {self.describe_rows(check.batch)}"
        )
        reason = (
            f"non-finite gradient{where} with a finite loss: {_describe_parameters(bad, len(parameters))}; "
            "the batches of every rank contributed: " + "; ".join(filter(None, rows))
        )
        if check is not None:
            self._skip(check, reason)
        return False

    # ---- skipped steps -----------------------------------------------------------------------

    def _skip(self, check: _Check, reason: str) -> None:
        self.skipped_steps.append(check.step)
        self._skip_reports.append((check.step, reason))
        if len(self.skipped_steps) > self.max_skips:
            raise NonFiniteError(
                f"{len(self.skipped_steps)} steps skipped for non-finite values, more than "
                f"training.nonfinite_max_skips={self.max_skips} (steps {self.skipped_steps}); the last, "
                f"step {check.step}: {reason}"
            )

    def take_skips(self) -> list[tuple[int, str]]:
        """The ``(step, reason)`` of the steps skipped since the last call."""
        skips, self._skip_reports = self._skip_reports, []
        return skips

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.skipped_steps = list((state or {}).get("skipped_steps", []))

    def _gather(self, mine: Any) -> list[Any]:
        if self.env.world_size == 1:
            return [mine]
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, mine, group=self.env.cpu_group)
        return gathered


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.coalesce().values() if grad.is_sparse else grad


def _all_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """Whether every value of ``grads`` is finite (a 0-d bool tensor), checked once per run of
    gradients lying side by side in one storage: DDP's gradient buckets (its gradients are views
    of them) and a data-parallel table lookup's flat weight. On CPU a kernel per gradient costs
    more than the values: OpenMP wakes its threads for each (measured: 1.6 ms of a 31 ms Census
    PLE step for 72 gradients)."""
    return torch.stack([torch.isfinite(run).all() for run in _contiguous_runs(grads)]).all()


def _contiguous_runs(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` as flat views over the runs of their storages they tile exactly (each element
    once, nothing else); a sparse or non-contiguous gradient, or one overlapping another, as is."""
    by_storage: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
    runs: list[torch.Tensor] = []
    for grad in grads:
        if grad.is_sparse or not grad.is_contiguous():
            runs.append(_dense(grad))
        else:
            by_storage.setdefault((grad.untyped_storage().data_ptr(), grad.dtype), []).append(grad)
    for tensors in by_storage.values():
        tensors.sort(key=lambda t: t.storage_offset())
        start, end = tensors[0].storage_offset(), tensors[0].storage_offset()
        for t in tensors:
            offset = t.storage_offset()
            if offset < end:  # overlaps the run: checked on its own
                runs.append(t)
                continue
            if offset > end:  # a gap: the run ends
                runs.append(tensors[0].as_strided((end - start,), (1,), start))
                start = offset
            end = offset + t.numel()
        runs.append(tensors[0].as_strided((end - start,), (1,), start))
    return runs


def _max_magnitudes(grads: list[torch.Tensor]) -> torch.Tensor:
    """Each gradient's largest magnitude, in one fused kernel: finite exactly when every value
    is (a 2-norm could overflow on finite values)."""
    return torch.stack(torch._foreach_norm([_dense(g) for g in grads], float("inf")))


def _describe_parameters(bad: list[str], total: int) -> str:
    named = ", ".join(bad[:_MAX_PARAMETERS_NAMED]) + (" ..." if len(bad) > _MAX_PARAMETERS_NAMED else "")
    return f"{len(bad)} of {total} dense parameters ({named})"


class GuardedTrainPipeline(TrainPipelineSparseDist):
    """TorchRec's ``TrainPipelineSparseDist`` with :class:`NonFiniteGuard`'s checks around
    backward and the optimizer step; the next batch is fetched (lockstep's all-reduce, which
    carries the loss vote) after the forward."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        guard: NonFiniteGuard,
        checked: Mapping[str, torch.Tensor],
    ) -> None:
        super().__init__(
            model, optimizer, device, custom_model_fwd=self._forward, enqueue_batch_after_forward=True
        )
        self.guard = guard
        self.checked = checked  # the parameters whose gradients exist after backward

    def _forward(self, batch: Any) -> tuple[torch.Tensor, StepOutput]:
        losses, out = self._model(batch)
        self.guard.observe(out)
        return losses, out

    def _backward(self, losses: torch.Tensor) -> None:
        if self.guard.backward_allowed():
            super()._backward(losses)

    def _optimizer_step(self) -> None:
        if self.guard.update_allowed(self.checked):
            super()._optimizer_step()


def format_rows(ranges: list[tuple[str, int, int]], shuffled: bool) -> str:
    """``ParquetDataset.batch_rows``'s answer for a message: ``a.parquet rows [0, 512)``."""
    if not ranges:
        return "padding only (no rows)"
    text = ", ".join(f"{path} rows [{a}, {b})" for path, a, b in ranges)
    return text + (" (the batch's rows are shuffled among these)" if shuffled else "")


__all__ = ["GuardedTrainPipeline", "NonFiniteError", "NonFiniteGuard", "format_rows"]
