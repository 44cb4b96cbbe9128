"""Non-finite losses and gradients: stop the run naming the step, task and rows, or skip the step.

``training.nonfinite: stop`` (default) stops every rank with :class:`NonFiniteError`;
``skip`` leaves the model and every optimizer state as they were and counts the step, up to
``training.nonfinite_max_skips`` skipped steps in the run (then it stops).

Two checks per step, in :class:`GuardedTrainPipeline`:

* **Loss**, before backward: the tables' optimizer runs inside backward (fbgemm fuses it), so the
  only way not to apply a step to them is not to run backward. The ranks must agree (a rank that
  skips backward and one that does not would wait for each other in the embeddings' all-to-all).
  They do in the all-reduce ``distributed.lockstep`` runs anyway: the pipeline fetches the next
  batch after the forward (``enqueue_batch_after_forward``), and :meth:`NonFiniteGuard.vote`
  answers for the loss just computed. Only where no fetch follows a forward (the last two steps
  before an evaluation, a save or the epoch's end) the guard all-reduces the flag itself.
* **Gradient**, after backward: the dense network's and data-parallel tables' gradients, which
  DDP has already averaged, so every rank sees the same values and decides alike without a
  collective. With ``skip`` their update is skipped; the sharded tables have then already been
  updated in backward with the gradient of that loss (finite, or the loss would have been caught):
  a limitation of fused updates. If their rows became non-finite, later losses are, and are
  caught (and counted) in turn.

Cost: one ``isfinite`` of the loss and one fused norm over the dense gradients per step; no
collective beyond lockstep's except at those last steps of a stretch.

Example::

    guard = NonFiniteGuard("skip", 10, env, describe_rows)
    pipeline = GuardedTrainPipeline(model, optimizer, device, guard, dense_optimizer.params)
    guard.begin(step=0, epoch=0, batch=0)
    for batch in lockstep(iter(loader), group, votes=[guard]):
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """One forward's loss check: where its batch is, whether its loss is finite here, and what
    every rank agreed (None: not agreed yet)."""

    step: int
    epoch: int
    batch: int
    report: str | None  # this rank's description of a non-finite loss; None: finite
    voted: bool = False
    agreed_bad: bool = False
    reports: list[str] | None = None  # every bad rank's report, once agreed


class NonFiniteGuard:
    """The two checks of the module docstring and the count of skipped steps.

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
        self.skipped_steps: list[int] = []
        self._next = (1, 0, 0)  # (step, epoch, batch) of the next forward
        self._pending: _Check | None = None  # the last forward's check, until its backward
        self._current: _Check | None = None  # the check of the batch being updated
        self._skip_reports: list[tuple[int, str]] = []

    def begin(self, step: int, epoch: int, batch: int) -> None:
        """The next forward trains global step ``step + 1`` on batch ``batch`` of ``epoch``."""
        self._next = (step + 1, epoch, batch)

    # ---- the loss, after forward -------------------------------------------------------------

    def observe(self, out: StepOutput) -> None:
        step, epoch, batch = self._next
        self._next = (step + 1, epoch, batch + 1)
        report = None
        if not bool(torch.isfinite(out.loss)):
            tasks = ", ".join(f"{task} {float(loss):g}" for task, loss in out.task_losses.items())
            report = (
                f"rank {self.env.rank}: loss {float(out.loss):g} (tasks: {tasks}); "
                f"batch rows: {self.describe_rows(batch)}"
            )
        self._pending = _Check(step, epoch, batch, report)

    def vote(self) -> bool:
        """distributed.StepVote: the last forward's loss is non-finite here (each forward is
        voted on once, in the fetch that follows it)."""
        check = self._pending
        if check is None or check.voted:
            return False
        check.voted = True
        return check.report is not None

    def decide(self, yes: int, world: int) -> bool:
        assert self._pending is not None
        self._agree_bad(self._pending)
        return False  # the iteration goes on: the pipeline skips or has already raised

    def _agree_bad(self, check: _Check) -> None:
        check.agreed_bad = True
        check.reports = [r for r in self._gather(check.report) if r is not None]
        if self.mode == "stop":
            raise NonFiniteError(
                f"non-finite loss at step {check.step} (epoch {check.epoch}, batch {check.batch}) on "
                f"{len(check.reports)} of {self.env.world_size} ranks:\n  "
                + "\n  ".join(check.reports)
                + "\ntraining.nonfinite: skip would skip such steps instead (up to "
                "training.nonfinite_max_skips)"
            )

    # ---- the pipeline's hooks ----------------------------------------------------------------

    def backward_allowed(self) -> bool:
        """Before backward: False on every rank when some rank's loss is non-finite."""
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
        """After backward: False (skip) or raise (stop) when a gradient of ``parameters`` is
        non-finite; also False after a skipped backward."""
        check = self._current
        if check is not None and check.agreed_bad:
            return False
        grads = [_dense(p.grad) for p in parameters.values() if p.grad is not None]
        if not grads or bool(torch.stack(torch._foreach_norm(grads)).sum().isfinite()):
            return True
        bad = [name for name, p in parameters.items() if p.grad is not None and not _finite(p.grad)]
        named = ", ".join(bad[:_MAX_PARAMETERS_NAMED]) + (" ..." if len(bad) > _MAX_PARAMETERS_NAMED else "")
        where = "" if check is None else f" at step {check.step} (epoch {check.epoch}, batch {check.batch})"
        rows = self._gather(
            None if check is None else f"rank {self.env.rank}: {self.describe_rows(check.batch)}"
        )
        reason = (
            f"non-finite gradient{where} with a finite loss: {len(bad)} of {len(parameters)} dense "
            f"parameters ({named}); the batches of every rank contributed: " + "; ".join(filter(None, rows))
        )
        if self.mode == "stop":
            raise NonFiniteError(reason + "\ntraining.nonfinite: skip would skip the dense update instead")
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

    def _gather(self, mine: str | None) -> list[str | None]:
        if self.env.world_size == 1:
            return [mine]
        gathered: list[str | None] = [None] * self.env.world_size
        dist.all_gather_object(gathered, mine, group=self.env.cpu_group)
        return gathered


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.coalesce().values() if grad.is_sparse else grad


def _finite(grad: torch.Tensor) -> bool:
    return bool(torch.isfinite(_dense(grad)).all())


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
