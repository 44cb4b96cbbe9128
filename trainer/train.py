"""The distributed training loop: plan, shard, pipeline, evaluate, record.

Example::

    env = init_distributed()
    final = train(load_config("configs/demo.yaml"), env)
    final["click"]["auc"]
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import EvalPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer
from towerrec.data.batch import Batch
from towerrec.data.config import resolve_paths
from towerrec.data.parquet import ParquetDataset, format_nulls, make_dataloader
from towerrec.trainer.checkpoint import CheckpointManager, step_dir_name
from towerrec.trainer.config import ExperimentConfig, dump_config
from towerrec.trainer.cpu_share import ThreadGovernor
from towerrec.trainer.distributed import DistEnv, StepVote, lockstep, size_threads
from towerrec.trainer.early_stopping import EarlyStopping
from towerrec.trainer.features import run_features
from towerrec.trainer.importance import ImportanceResult, permutation_importance, write_importance
from towerrec.trainer.metrics import TaskMetrics
from towerrec.trainer.model import StepOutput, build_train_module
from towerrec.trainer.nonfinite import GuardedTrainPipeline, NonFiniteGuard, format_rows
from towerrec.trainer.optimizers import (
    apply_sparse_optimizer,
    clip_gradients,
    dense_optimizer,
    replicated_table_optimizer,
    replicated_tables,
)
from towerrec.trainer.planning.plan_file import plan_to_dict
from towerrec.trainer.preemption import Preempted, StopRequest
from towerrec.trainer.profiling import StepProfiler
from towerrec.trainer.progress import TrainProgress
from towerrec.trainer.schedules import LRSchedule, default_decay_length
from towerrec.trainer.sharding import plan_sharding, sharders

logger = logging.getLogger(__name__)


class RunRecorder:
    """Rank 0's outputs in the run directory: metrics.jsonl, eval_metrics.json, TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                logger.info("tensorboard is not installed; no TensorBoard scalars")
            else:
                self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write_json(self, name: str, payload: Any) -> None:
        if self.enabled:
            (self.run_dir / name).write_text(json.dumps(payload, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            (self.run_dir / name).write_text(text)

    def truncate_after(self, step: int) -> None:
        """Drop metrics.jsonl lines after ``step`` (a resumed run writes them again)."""
        path = self.run_dir / "metrics.jsonl"
        if self.enabled and path.is_file():
            kept = []
            for line in path.read_text().splitlines(keepends=True):
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except ValueError:  # a line cut short when the run was killed
                    pass
            path.write_text("".join(kept))

    def record(self, phase: str, step: int, epoch: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"phase": phase, "step": step, "epoch": epoch, **values}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if self._tensorboard is not None:
            for key, value in _flatten(values).items():
                self._tensorboard.add_scalar(f"{phase}/{key}", value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _run_phase(
    pipeline: GuardedTrainPipeline | EvalPipelineSparseDist, batches: Iterator[Batch]
) -> Iterator[StepOutput]:
    """Drive the pipeline until ``batches`` ends; the pipeline drains every batch it fetched."""
    while True:
        try:
            yield pipeline.progress(batches)
        except StopIteration:
            return


class InputTimer:
    """Wraps the loop's batch iterator and sums the seconds spent waiting in ``next()``: the
    loader's next batch and lockstep's agreement on it. Its share of a logging window is the
    ``input_wait`` of metrics.jsonl (torchtitan's data-loading share): near 0 when the input
    pipeline keeps up, the stall otherwise.

    Example::

        timed = InputTimer(iter(batches))
        for batch in timed: ...
        timed.take()  # seconds waited since the last take
    """

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches = batches
        self.seconds = 0.0

    def __iter__(self) -> "InputTimer":
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - start

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class Trainer:
    """Owns the sharded model, its pipeline and the data; ``fit()`` runs the whole schedule.

    ``stop``: the request a signal sets (``trainer.preemption``; :func:`train` installs it);
    every rank stops at the same step when any rank has it, saves and raises :class:`Preempted`.
    """

    def __init__(self, config: ExperimentConfig, env: DistEnv, stop: StopRequest | None = None) -> None:
        self.config = config
        self.env = env
        self.stop = stop if stop is not None else StopRequest()
        training = config.training
        self.recorder = RunRecorder(Path(config.run_dir), enabled=env.is_main)
        self.recorder.write_text("config.yaml", dump_config(config))

        torch.manual_seed(training.seed)
        # Fitted on the training files once (rank 0), reused on resume: trainer.features.
        self.features = run_features(config, env)
        data_kwargs = dict(
            data=config.data,
            batch_size=training.batch_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=training.seed,
            features=self.features,
        )
        self.train_set = ParquetDataset(
            resolve_paths(config.data.train, "data.train"),
            shuffle_buffer=training.shuffle_buffer,
            shuffle_row_groups=training.shuffle_buffer > 0,
            **data_kwargs,
        )
        self.eval_set = ParquetDataset(resolve_paths(config.data.eval, "data.eval"), **data_kwargs)

        module = build_train_module(config, torch.device("meta"))
        self.loss = module.loss
        apply_sparse_optimizer(module, training.sparse_optimizer)
        plan = plan_sharding(module, config, env)
        placement = plan_to_dict(plan)
        self.recorder.write_json("sharding_plan.json", placement)
        self._log_plan(placement)
        self.model = DistributedModelParallel(
            module,
            device=env.device,
            plan=plan,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            sharders=sharders(),
        )
        replicated = replicated_tables(placement)
        max_norm = training.grad_clip.max_norm
        self.dense_optimizer = clip_gradients(
            dense_optimizer(self.model, training.dense_optimizer, exclude=replicated), max_norm
        )
        self.table_optimizer = replicated_table_optimizer(self.model, replicated, training.sparse_optimizer)
        if self.table_optimizer is not None:
            self.table_optimizer = clip_gradients(self.table_optimizer, max_norm)
        if max_norm is not None and self.model.fused_optimizer.params and env.is_main:
            logger.warning(
                "training.grad_clip: the sharded tables are not clipped (their update is fused "
                "into backward); the dense network and data-parallel tables are"
            )
        self.lr_schedule = self._lr_schedule()
        optimizer = CombinedOptimizer(
            [self.model.fused_optimizer]
            + ([self.table_optimizer] if self.table_optimizer is not None else [])
            + [self.dense_optimizer]
        )
        self.nonfinite = NonFiniteGuard(
            training.nonfinite, training.nonfinite_max_skips, env, self._batch_rows
        )
        checked = dict(self.dense_optimizer.params)  # the gradients that exist after backward
        if self.table_optimizer is not None:
            checked.update(self.table_optimizer.params)
        self.pipeline = GuardedTrainPipeline(self.model, optimizer, env.device, self.nonfinite, checked)
        # The threads trainer.main planned: given back while other processes busy the same cores.
        plan = size_threads(training.threads, env.local_world_size, training.num_workers)
        self.governor = ThreadGovernor.for_plan(plan, env.local_world_size)
        if training.profile_steps is not None:  # a window of steps under torch.profiler
            profiler = StepProfiler(training.profile_steps, lambda: self.step, config.run_dir, env.rank)
            profiler.attach(self.pipeline)
        # Evaluation: TorchRec's eval pipeline, whose loader thread runs lockstep's all_reduce. That
        # gets a gloo group of its own: on the group of the embedding all-to-alls (the main thread's),
        # the two threads would order their collectives differently on each rank.
        self.eval_pipeline = EvalPipelineSparseDist(self.model, optimizer, env.device)
        self.eval_group = dist.new_group(backend="gloo", timeout=env.timeout)  # torch default: 30 min
        self.task_names = [t.name for t in config.data.tasks]
        eval_examples = self.eval_set.steps_per_epoch() * training.batch_size * env.world_size
        self.metrics = TaskMetrics(self.task_names, env, training.batch_size, eval_examples)
        stopping = training.early_stopping
        self.early_stopping = EarlyStopping(stopping, env) if stopping is not None else None
        # Last: restoring a checkpoint also restores the RNG states, which nothing may draw from
        # before training continues.
        self.checkpoints = CheckpointManager(
            config,
            env,
            self.model,
            self.dense_optimizer,
            self.table_optimizer,
            placement,
            self.train_set,
            self.early_stopping,
            lr_schedule=self.lr_schedule,
            nonfinite=self.nonfinite,
        )
        self.resumed = self.checkpoints.resume()
        self.step = self.resumed.step if self.resumed else 0
        if self.resumed:
            self.recorder.truncate_after(self.step)

    def _lr_schedule(self) -> LRSchedule:
        """``training.lr_schedule`` on the dense optimizer and the tables' (fused and, with
        data-parallel tables, torch) optimizers; each keeps its configured lr as base. The same
        names on every rank (a rank without fused tables has a fused optimizer without groups)."""
        training = self.config.training
        sparse_lr = training.sparse_optimizer.lr
        optimizers = {
            "dense": (self.dense_optimizer, training.dense_optimizer.lr),
            "sparse": (self.model.fused_optimizer, sparse_lr),
        }
        if self.table_optimizer is not None:
            optimizers["tables"] = (self.table_optimizer, sparse_lr)
        length = default_decay_length(training.lr_schedule, training.epochs, self.train_set.steps_per_epoch())
        return LRSchedule(training.lr_schedule, optimizers, length)

    def _log_plan(self, plan: dict[str, dict[str, Any]]) -> None:
        if not self.env.is_main:
            return
        for module_path, tables in plan.items():
            for table, placement in tables.items():
                logger.info(
                    "sharding %s.%s: %s on ranks %s (%s)",
                    module_path or "<root>",
                    table,
                    placement["sharding_type"],
                    placement["ranks"],
                    placement["compute_kernel"],
                )

    def _batch_rows(self, batch: int) -> str:
        """Where this rank's batch ``batch`` of the current training epoch was read."""
        return format_rows(*self.train_set.batch_rows(batch, self.config.training.num_workers))

    def _batches(
        self,
        dataset: ParquetDataset,
        group: dist.ProcessGroup | None = None,
        votes: list[StepVote] | None = None,
    ) -> Iterator[Batch]:
        """``dataset``'s batches under lockstep; ``votes`` (default: the stop request) ride on its
        all-reduce."""
        loader = make_dataloader(dataset, self.config.training.num_workers)
        group = group if group is not None else self.env.cpu_group
        return lockstep(iter(loader), group, votes if votes is not None else [self.stop])

    def evaluate(
        self, epoch: int, dataset: ParquetDataset | None = None, record: bool = True
    ) -> dict[str, dict[str, float]] | None:
        """One full pass over ``dataset`` (default: the evaluation set); every rank takes part.

        ``dataset`` must split the rows as ``eval_set`` does (the metrics' window is sized to it);
        ``record``: write the result to metrics.jsonl and the log. None: every rank stopped the
        pass at the same batch on a stop request (``trainer.preemption``).
        """
        dataset = dataset if dataset is not None else self.eval_set
        self.model.eval()
        self.metrics.reset()
        self.pipeline.detach()  # the pipelines take turns rewriting the sharded modules' forwards
        self.eval_pipeline.attach(self.model)
        try:
            with torch.no_grad():
                for out in _run_phase(self.eval_pipeline, self._batches(dataset, self.eval_group)):
                    self.metrics.update(out.logits, out.labels, out.example_weights)
        finally:
            self.eval_pipeline.detach()
            self.eval_pipeline.reset()  # stops its loader thread; training re-attaches on its next step
        self.model.train()
        if self.stop.agreed:
            return None
        result = self.metrics.compute()
        if not record:
            return result
        self.recorder.record("eval", self.step, epoch, result)
        if self.env.is_main:
            summary = "  ".join(
                f"{t}: auc {m['auc']:.4f} ne {m['ne']:.4f} logloss {m['logloss']:.4f}"
                for t, m in result.items()
            )
            logger.info("eval step %d epoch %d | %s", self.step, epoch, summary)
        self._record_nulls(dataset, "eval", epoch)
        return result

    def _record_nulls(self, dataset: ParquetDataset, split: str, epoch: int) -> None:
        """The nulls replaced (``on_null``) per feature in the pass over ``dataset`` that just
        ended, summed over the ranks: one number per feature in metrics.jsonl (phase ``nulls``)
        and in rank 0's log. Every rank calls it at the same point (one all_reduce); nothing to
        do, and no collective, when no feature of the config replaces nulls."""
        counts = dataset.nulls_replaced()  # the same features, in config order, on every rank
        if not counts:
            return
        total = torch.tensor(list(counts.values()), dtype=torch.int64)
        if self.env.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.env.cpu_group)
        summed = dict(zip(counts, total.tolist(), strict=True))
        self.recorder.record("nulls", self.step, epoch, {"split": split, "nulls_replaced": summed})
        if self.env.is_main:
            logger.info(
                "nulls step %d epoch %d | %s, replaced on all ranks: %s",
                self.step,
                epoch,
                split,
                format_nulls(summed),
            )

    def _segments(self, steps_left: int) -> list[tuple[int, bool]]:
        """``(length, evaluate after)`` of the training stretches of the rest of an epoch, cut at
        every global step that is a multiple of ``eval_interval`` (evaluated) or of
        ``checkpoint.interval`` (saved); the last one, at the epoch's end or ``max_steps``, is
        evaluated too."""
        training = self.config.training
        remaining = steps_left
        if training.max_steps is not None:
            remaining = min(remaining, training.max_steps - self.step)
        cuts = [i for i in (training.eval_interval, self.checkpoints.interval) if i]
        segments, step = [], self.step
        while remaining > 0:
            length = min([remaining] + [i - step % i for i in cuts])
            remaining -= length
            step += length
            at_eval = bool(training.eval_interval) and step % training.eval_interval == 0
            segments.append((length, remaining == 0 or at_eval))
        return segments

    def train_segment(
        self,
        batches: Iterator[Batch],
        length: int,
        epoch: int,
        batch: int,
        progress: TrainProgress | None = None,
    ) -> int:
        """Train ``length`` steps from batch ``batch`` of ``epoch``, or fewer when every rank
        agreed to stop (``trainer.preemption``); returns the steps taken. Skipped steps
        (``training.nonfinite: skip``) count as taken.

        No step waits for the device: the loss is summed on it and read at ``log_interval``,
        lockstep's all-reduce is in flight during the step, the non-finite checks are read when
        done. Two blocking all-reduces per stretch: a stop requested during the save or the
        evaluation before it stops the run here, and the non-finite checks of its last steps
        (``NonFiniteGuard.settle``) are agreed before the model is evaluated or saved.
        """
        training = self.config.training
        samples_per_step = training.batch_size * self.env.world_size
        if self.stop.agree(self.env.cpu_group):
            return 0
        self.nonfinite.begin(self.step, epoch, batch)
        window_start, window_steps, losses = time.perf_counter(), 0, 0
        window_loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        done = 0
        timed = InputTimer(itertools.islice(batches, length))
        for out in _run_phase(self.pipeline, timed):
            if self.governor is not None:
                self.governor.tick()
            self.step += 1
            done += 1
            window_steps += 1
            if not self._record_skips(epoch):
                window_loss += out.loss.detach()
                losses += 1
            if progress is not None:
                progress.advance()
            if self.step % training.log_interval == 0:
                elapsed = time.perf_counter() - window_start
                values = {
                    "loss": float(window_loss) / losses if losses else None,  # None: every step skipped
                    "samples_per_s": window_steps * samples_per_step / elapsed,
                    "input_wait": timed.take() / elapsed,  # share of the window waiting for batches
                    "task_weights": self.loss.task_weights(),  # learned by loss.weighting, or ω_k(t)
                    **self._lrs(),
                }
                self.recorder.record("train", self.step, epoch, values)
                if self.env.is_main:
                    logger.info(
                        "train step %d epoch %d | loss %.4f (rank 0) | %.0f samples/s | input wait %.0f%%",
                        self.step,
                        epoch,
                        values["loss"] if losses else float("nan"),
                        values["samples_per_s"],
                        100 * values["input_wait"],
                    )
                window_start, window_steps, losses = time.perf_counter(), 0, 0
                window_loss.zero_()
            self.lr_schedule.step()
        self.nonfinite.settle()
        return done

    def _record_skips(self, epoch: int) -> bool:
        """Record the steps the non-finite guard skipped since the last call; True if any."""
        skips = self.nonfinite.take_skips()
        for step, reason in skips:
            count = len(self.nonfinite.skipped_steps)
            self.recorder.record("skip", step, epoch, {"reason": reason, "skipped_steps": count})
            if self.env.is_main:
                logger.warning(
                    "step %d skipped, no update (training.nonfinite: skip; %d of at most %d): %s",
                    step,
                    count,
                    self.config.training.nonfinite_max_skips,
                    reason,
                )
        return bool(skips)

    def _lrs(self) -> dict[str, float]:
        """The lrs the last step used: ``lr_dense`` and ``lr_sparse`` (the tables')."""
        lrs = self.lr_schedule.lrs()
        return {"lr_dense": lrs["dense"], "lr_sparse": lrs.get("sparse", lrs.get("tables"))}

    def fit(self) -> dict[str, dict[str, float]]:
        training = self.config.training
        steps_per_epoch = self.train_set.steps_per_epoch()
        if self.env.is_main:
            logger.info(
                "training %d epochs x %d steps per rank, batch %d per rank, %d ranks",
                training.epochs,
                steps_per_epoch,
                training.batch_size,
                self.env.world_size,
            )
        # A resumed run continues at its checkpoint's batch of its epoch (trainer.checkpoint).
        final: dict[str, dict[str, float]] = self.resumed.eval_metrics if self.resumed else {}
        epoch, batch = (self.resumed.epoch, self.resumed.batch) if self.resumed else (0, 0)
        planned = training.epochs * steps_per_epoch
        progress = TrainProgress(
            training.progress_bar,
            self.env.is_main,
            total_steps=min(planned, training.max_steps or planned),
            done_steps=self.step,
            samples_per_step=training.batch_size * self.env.world_size,
        )
        eval_pending = bool(self.resumed and self.resumed.eval_pending)
        with progress:
            if eval_pending:  # a preemption interrupted the evaluation due at this step
                final, eval_pending = self._pending_evaluation(epoch, batch, final)
            while not self.stop.agreed and epoch < training.epochs and not self._stops_early():
                segments = self._segments(steps_per_epoch - batch)
                if not segments:
                    break
                self.loss.set_epoch(epoch)
                self.lr_schedule.set_epoch(epoch)
                self.train_set.set_epoch(epoch, start_batch=batch)
                batches = self._batches(self.train_set, votes=[self.nonfinite, self.stop])
                for length, evaluate in segments:
                    batch += self.train_segment(batches, length, epoch, batch, progress)
                    if self.stop.agreed:  # every rank stopped after the same step
                        break
                    if evaluate:
                        result = self.evaluate(epoch)
                        if result is None:  # stopped during the evaluation
                            eval_pending = True
                            break
                        final = result
                        self._track(final, epoch)
                    self.checkpoints.maybe_save(self.step, epoch, batch, final)
                    if self._stops_early():
                        break
                _close(batches)
                self._record_nulls(self.train_set, "train", epoch)
                if self.stop.agreed or batch < steps_per_epoch:  # max_steps, early stopping, a stop
                    break
                epoch, batch = epoch + 1, 0
        if self.stop.agreed:
            self._preempted(epoch, batch, final, eval_pending)
        self.checkpoints.save_final(self.step, epoch, batch, final)
        self.recorder.write_json("eval_metrics.json", final)
        if self.config.importance.enabled:
            self.permutation_importance(final)
        self.recorder.close()
        return final

    def _pending_evaluation(
        self, epoch: int, batch: int, final: dict[str, dict[str, float]]
    ) -> tuple[dict[str, dict[str, float]], bool]:
        """Run the evaluation a preemption interrupted at the resumed step and record it in
        that checkpoint; ``(metrics, still pending)``."""
        eval_epoch = epoch - 1 if batch == 0 and epoch > 0 else epoch  # due at the epoch's end
        result = self.evaluate(eval_epoch)
        if result is None:
            return final, True
        self._track(result, eval_epoch)
        self.checkpoints.record_evaluation(self.step, result)
        return result, False

    def _preempted(
        self, epoch: int, batch: int, final: dict[str, dict[str, float]], eval_pending: bool
    ) -> NoReturn:
        """Every rank stopped at ``self.step`` on a stop request: save what the next run needs to
        lose no step (unless that checkpoint exists), say what happened, raise Preempted."""
        stop, settings = self.stop, self.config.checkpoint
        grace, saved = settings.preemption_grace_s, self.checkpoints.last_saved_step
        signal_name = stop.signal_name or "a signal to another rank"
        if self.env.is_main:
            logger.warning(
                "%s: every rank stopped at step %d (epoch %d, batch %d%s)",
                signal_name,
                self.step,
                epoch,
                batch,
                ", before the evaluation due there" if eval_pending else "",
            )
        if not settings.enabled:
            what = "nothing saved (checkpoint.enabled is false): the next run starts over"
        elif self.step == 0:
            what = "nothing trained, nothing to save"
        elif self.step == saved:
            what = f"its checkpoint {self.checkpoints.root / step_dir_name(self.step)} exists"
        else:
            expected = (self.checkpoints.last_save_seconds or 0.0) + stop.seconds_since()
            if expected > grace and self.env.is_main:
                logger.warning(
                    "the last save took %.1f s: this one may end after checkpoint.preemption_grace_s "
                    "(%g s); if the job is killed first, latest stays %s",
                    self.checkpoints.last_save_seconds or 0.0,
                    grace,
                    step_dir_name(saved) if saved else "none",
                )
            path = self.checkpoints.save(self.step, epoch, batch, final, eval_pending=eval_pending)
            what = f"saved {path}"
        elapsed = stop.seconds_since()
        self.recorder.record(
            "preempted", self.step, epoch, {"signal": stop.signal_name, "eval_pending": eval_pending}
        )
        self.recorder.close()
        if elapsed > grace and self.env.is_main:
            logger.warning(
                "%s %.1f s after the signal, later than checkpoint.preemption_grace_s (%g s)",
                what,
                elapsed,
                grace,
            )
        raise Preempted(
            f"stopped at step {self.step} on {signal_name}: {what}"
            + (f" {elapsed:.1f} s after the signal (grace {grace:g} s)" if stop.requested else "")
            + "; the next run continues from it (checkpoint.resume: auto)"
        )

    def _stops_early(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.should_stop

    def _track(self, metrics: dict[str, dict[str, float]], epoch: int) -> None:
        """Give an evaluation to early stopping (a new best is saved by ``maybe_save``); record
        why training stops when it does."""
        if self.early_stopping is None:
            return
        self.early_stopping.update(self.step, metrics)
        if not self.early_stopping.should_stop:
            return
        reason = self.early_stopping.reason()
        self.recorder.record("stop", self.step, epoch, reason)
        if self.env.is_main:
            logger.info(
                "early stopping at step %d: %s did not improve by more than %g in %d evaluations; "
                "best %s at step %s",
                self.step,
                reason["metric"],
                reason["min_delta"],
                reason["patience"],
                reason["best"],
                reason["best_step"],
            )

    def permutation_importance(self, baseline: dict[str, dict[str, float]] | None = None) -> ImportanceResult:
        """Permutation importance of every sparse field on the evaluation set with the sharded
        model (``trainer.importance``); every rank takes part, rank 0 writes RUN_DIR/importance/.

        ``baseline``: the final evaluation of this model on the eval set (None: evaluated here).
        """
        ev = self.eval_set

        def evaluate(field: str | None) -> dict[str, dict[str, float]]:
            result = self.evaluate(0, ev.with_permutation(field) if field else None, record=False)
            if result is None:
                raise Preempted(
                    f"stopped during permutation importance on {self.stop.signal_name or 'a signal'}: "
                    f"training is complete and saved at step {self.step}; the next run "
                    "(checkpoint.resume: auto) computes the importance"
                )
            return result

        fields = self.config.data.sparse_feature_names
        source = {"run_dir": self.config.run_dir, "step": self.step, "data": ev.files}  # paths as given
        result = permutation_importance(evaluate, fields, baseline, source)
        if self.env.is_main:
            paths = write_importance(result, Path(self.config.run_dir) / "importance")
            logger.info("importance: wrote %s", ", ".join(str(p) for p in paths.values()))
        return result


def _close(batches: Iterator[Batch]) -> None:
    """Stop a partly consumed epoch (max_steps) so its loader workers exit now."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def train(config: ExperimentConfig, env: DistEnv) -> dict[str, dict[str, float]]:
    """Train as ``config`` says. SIGTERM makes every rank stop at the same step, save and raise
    :class:`~towerrec.trainer.preemption.Preempted` (``trainer.preemption``)."""
    with StopRequest.on_sigterm() as stop:
        return Trainer(config, env, stop).fit()
