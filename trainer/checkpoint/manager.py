"""CheckpointManager: the saves and the resume of a distributed run (see the package docstring).

Example::

    manager = CheckpointManager(config, env, model, dense_opt, table_opt, plan, train_set)
    point = manager.resume()              # None: a fresh run; else where to continue
    manager.maybe_save(step, epoch, batch, eval_metrics)   # every checkpoint.interval steps
                                                           # and at early stopping's new best
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from towerrec.data.parquet import ParquetDataset, resume_plan
from towerrec.trainer.checkpoint.chunks import SavedRows, chunked_state
from towerrec.trainer.checkpoint.integrity import (
    checksum_problems,
    describe_dcp_error,
    file_digests,
    mismatch_error,
    table_differences,
    tensor_differences,
    verify_files,
    written_files,
)
from towerrec.trainer.checkpoint.layout import (
    LATEST,
    TMP_SUFFIX,
    CheckpointError,
    best_checkpoint,
    checkpoint_root,
    complete_steps,
    find_checkpoint,
    latest_checkpoint,
    mark_best,
    mark_latest,
    publish,
    remove_leftovers,
    set_aside,
    step_dir_name,
    step_of,
)
from towerrec.trainer.checkpoint.meta import (
    FORMAT_VERSION,
    CheckpointMeta,
    DataPosition,
    TableMeta,
    read_meta,
)
from towerrec.trainer.checkpoint.sparse_state import (
    column_groups,
    sparse_state,
    sparse_targets,
    table_placements,
)
from towerrec.trainer.checkpoint.train_state import (
    ResumePoint,
    data_layout,
    rank_state,
    resume_point,
    set_rng_state,
)
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.distributed import DistEnv
from towerrec.trainer.early_stopping import EarlyStopping
from towerrec.trainer.optimizers import TORCH_STATE_NAMES
from towerrec.trainer.schedules import LRSchedule

logger = logging.getLogger(__name__)
T = TypeVar("T")


class CheckpointManager:
    """Saves and restores everything a run needs to continue (see the package docstring).

    Args:
        model: the DistributedModelParallel; its ``fused_optimizer`` holds the sharded tables'
            optimizer state.
        dense_optimizer: the dense network's KeyedOptimizer.
        table_optimizer: the data-parallel tables' KeyedOptimizer (None without such tables).
        plan: ``plan_to_dict`` of the model's sharding plan.
        train_set: the training data, for the data position and its layout.
        early_stopping: its state is saved and restored; its new best steps are saved and
            become ``checkpoints/best``.
        lr_schedule: its schedulers' state is saved (meta.json) and restored.
        nonfinite: the non-finite guard (``trainer.nonfinite``); its skipped steps are saved and
            restored.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        env: DistEnv,
        model: torch.nn.Module,
        dense_optimizer: Any,
        table_optimizer: Any | None,
        plan: dict[str, dict[str, Any]],
        train_set: ParquetDataset,
        early_stopping: EarlyStopping | None = None,
        lr_schedule: LRSchedule | None = None,
        nonfinite: Any | None = None,
    ) -> None:
        self.config = config
        self.settings = config.checkpoint
        self.env = env
        self.model = model
        self.dense_optimizer = dense_optimizer
        self.table_optimizer = table_optimizer
        self.plan = plan
        self.train_set = train_set
        self.early_stopping = early_stopping
        self.lr_schedule = lr_schedule
        self.nonfinite = nonfinite
        self.root = checkpoint_root(config.run_dir)
        self.layout = data_layout(train_set, config.training.num_workers)
        self.last_saved_step: int | None = None
        self.last_save_seconds: float | None = None

    @property
    def interval(self) -> int:
        """Steps between saves; 0 when only the end is saved or checkpoints are disabled."""
        return self.settings.interval if self.settings.enabled else 0

    # ---- collectives ---------------------------------------------------------------------

    def _on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give its result, or its CheckpointError, to every rank."""
        box: list[Any] = [None, None]
        if self.env.is_main:
            try:
                box = [fn(), None]
            except CheckpointError as e:
                box = [None, str(e)]
            except Exception as e:  # noqa: BLE001 - the other ranks must not wait for rank 0
                box = [None, f"{type(e).__name__}: {e}"]
        if self.env.world_size > 1:
            dist.broadcast_object_list(box, src=0, group=self.env.cpu_group)
        if box[1] is not None:
            raise CheckpointError(box[1])
        return box[0]

    def _barrier(self) -> None:
        if self.env.world_size > 1:
            dist.barrier(group=self.env.cpu_group)

    # ---- saving --------------------------------------------------------------------------

    def _is_best(self, step: int) -> bool:
        return self.early_stopping is not None and self.early_stopping.best_step == step

    def maybe_save(self, step: int, epoch: int, batch: int, eval_metrics: dict[str, Any]) -> bool:
        """Save if ``step`` is a multiple of ``checkpoint.interval`` or early stopping's new best.

        A failed save raises, or with ``checkpoint.on_save_error: continue`` logs a warning and
        returns False (``latest`` is still the previous complete checkpoint).
        """
        due = (self.interval and step % self.interval == 0) or self._is_best(step)
        if not (self.settings.enabled and due and step != self.last_saved_step):
            return False
        try:
            self.save(step, epoch, batch, eval_metrics)
        except CheckpointError as e:
            if self.settings.on_save_error != "continue":
                raise
            if self.env.is_main:
                best = " (a new best: checkpoints/best stays where it was)" if self._is_best(step) else ""
                logger.warning(
                    "checkpoint at step %d not saved%s; training goes on (checkpoint.on_save_error: "
                    "continue): %s",
                    step,
                    best,
                    e,
                )
            return False
        return True

    def save_final(self, step: int, epoch: int, batch: int, eval_metrics: dict[str, Any]) -> None:
        """The end-of-run save (unless disabled, nothing trained, or this step is saved)."""
        if self.settings.enabled and step > 0 and step != self.last_saved_step:
            self.save(step, epoch, batch, eval_metrics)

    def save(
        self, step: int, epoch: int, batch: int, eval_metrics: dict[str, Any], eval_pending: bool = False
    ) -> Path:
        """Save the run after global ``step``, with ``batch`` batches of ``epoch`` taken; every
        rank calls it. Returns the checkpoint directory. ``eval_pending``: the evaluation due at
        ``step`` did not run (a preemption); the resumed run runs it first.

        Raises:
            CheckpointError: on every rank if any rank failed; ``latest`` is then unchanged and
                the partial ``.tmp`` directory removed.
        """
        started = time.perf_counter()
        if batch >= self.layout.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        name = step_dir_name(step)
        tmp = self.root / f"{name}{TMP_SUFFIX}"

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # a save of this step that was interrupted
                shutil.rmtree(tmp)

        self._on_main(prepare)
        self._barrier()
        kind = self.config.training.sparse_optimizer.type
        # Tables in row chunks: DCP clones each item it writes (chunks.py), never a whole table.
        chunk = int(self.settings.chunk_mb * 2**20)
        sparse = sparse_state(self.model.fused_optimizer, self.table_optimizer, kind)
        state = {
            "model": chunked_state(self.model.state_dict(), chunk),
            "optim": _non_empty(
                dense=self.dense_optimizer.state_dict()["state"],
                sparse=chunked_state(sparse, chunk),
            ),
            "progress": json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch}),
            # One top-level key per rank: DCP stores a dict without tensors as one value, which
            # the ranks' copies would overwrite.
            f"ranks.{self.env.rank}": json.dumps(
                rank_state(self.env.rank, self.train_set, self.layout, epoch, batch)
            ),
        }
        try:
            dcp.save(state, storage_writer=FileSystemWriter(str(tmp)), process_group=self.env.cpu_group)
            # dcp.save returned on every rank: every rank's data and DCP's .metadata are written.
            files = self._digests(tmp) if self.settings.checksums else None
            meta = self._meta(step, epoch, batch, eval_metrics, eval_pending, files)

            def finish() -> Path:
                meta.write(tmp)
                return publish(tmp, self.settings.keep_last, best=self._is_best(step))

            final = self._on_main(finish)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors, as one
            self._on_main(lambda: shutil.rmtree(tmp, ignore_errors=True))  # free what it took
            latest = latest_checkpoint(self.config.run_dir)
            reason = str(e) if isinstance(e, CheckpointError) else describe_dcp_error(e)
            raise CheckpointError(
                f"saving checkpoint {name} failed ({reason}); the latest complete checkpoint "
                f"({latest.name if latest else 'none'}) is unchanged"
            ) from None
        self.last_saved_step = step
        self.last_save_seconds = time.perf_counter() - started
        if self.env.is_main:
            logger.info("checkpoint %s saved in %.1f s", final, self.last_save_seconds)
        return final

    def _digests(self, step_dir: Path) -> dict[str, Any]:
        """Every rank's CRC32 of the files it wrote, gathered (collective; an unreadable file
        raises on every rank)."""
        mine: dict[str, Any] | str
        try:
            mine = file_digests(step_dir, written_files(step_dir, self.env.rank))
        except OSError as e:
            mine = f"rank {self.env.rank}: reading back {e.filename}: {e.strerror}"
        gathered: list[Any] = [mine]
        if self.env.world_size > 1:
            gathered = [None] * self.env.world_size
            dist.all_gather_object(gathered, mine, group=self.env.cpu_group)
        errors = [part for part in gathered if isinstance(part, str)]
        if errors:
            raise CheckpointError("; ".join(errors))
        return {name: digest for part in gathered for name, digest in part.items()}

    def record_evaluation(self, step: int, eval_metrics: dict[str, Any]) -> None:
        """The evaluation a preemption interrupted, run by the resumed run at ``step`` (its
        checkpoint): into that checkpoint's meta.json (result, early stopping's state), and
        ``best`` if it is early stopping's new best; every rank calls it."""

        def update() -> None:
            step_dir = self.root / step_dir_name(step)
            meta = read_meta(step_dir)
            stopping = self.early_stopping.state_dict() if self.early_stopping is not None else None
            changes = {"eval_metrics": eval_metrics, "eval_pending": False, "early_stopping": stopping}
            meta.model_copy(update=changes).write(step_dir)
            if self._is_best(step):
                mark_best(self.config.run_dir, step)

        if self.settings.enabled:
            self._on_main(update)

    def _meta(
        self,
        step: int,
        epoch: int,
        batch: int,
        eval_metrics: dict[str, Any],
        eval_pending: bool,
        files: dict[str, Any] | None,
    ) -> CheckpointMeta:
        placements = table_placements(self.plan)
        tables = {}
        for t in self.config.data.tables:
            placement = placements.get(t.name)
            tables[t.name] = TableMeta(
                num_embeddings=t.num_embeddings,
                embedding_dim=t.embedding_dim,
                sharding_type=placement["sharding_type"] if placement else None,
                column_groups=column_groups(placement, t.embedding_dim),
            )
        taken = resume_plan(self.layout.steps_per_epoch, self.layout.num_workers, batch)[1]
        return CheckpointMeta(
            format=FORMAT_VERSION,
            step=step,
            epoch=epoch,
            batch_in_epoch=batch,
            world_size=self.env.world_size,
            config=self.config.model_dump(mode="json"),
            plan=self.plan,
            tables=tables,
            sparse_optimizer=self.config.training.sparse_optimizer.type,
            dense_optimizer=self.config.training.dense_optimizer.type,
            data=self.layout,
            data_position=DataPosition(epoch=epoch, batch=batch, batches_per_worker=taken),
            eval_metrics=eval_metrics,
            early_stopping=self.early_stopping.state_dict() if self.early_stopping is not None else None,
            lr_schedule=self.lr_schedule.state_dict() if self.lr_schedule is not None else None,
            nonfinite=self.nonfinite.state_dict() if self.nonfinite is not None else None,
            eval_pending=eval_pending,
            files=files,
            saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            versions={p: _version(p) for p in ("torch", "torchrec", "fbgemm_gpu_cpu", "fbgemm_gpu")},
        )

    # ---- resuming ------------------------------------------------------------------------

    def resume(self) -> ResumePoint | None:
        """Restore the run from ``latest`` as ``checkpoint.resume`` says; every rank calls it.
        None: start at step 0.

        Raises:
            CheckpointError: on every rank, with one message (see the package docstring).
        """
        if not self.settings.enabled:
            return None
        meta = self._on_main(self._choose)
        while meta is not None:  # every rank checks the checksums of a share of the files
            problems = self._checksum_problems(meta)
            if not problems:
                break
            damaged = (meta.path, f"checkpoint {meta.path} is damaged:\n  " + "\n  ".join(problems))
            meta = self._on_main(lambda damaged=damaged: self._choose(damaged))
        if meta is None:
            return None
        self._load(meta)
        if self.lr_schedule is not None:
            self._load_lr_schedule(meta)
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(meta.early_stopping)
            self._on_main(self._repair_best)
        if self.nonfinite is not None:
            self.nonfinite.load_state_dict(meta.nonfinite)
        point = resume_point(meta, self.layout, self.env.world_size, log=self.env.is_main)
        if self.env.is_main:
            logger.info(
                "resumed from %s: step %d, epoch %d, batch %d%s",
                meta.path,
                point.step,
                point.epoch,
                point.batch,
                "" if point.exact else " (data position approximated, see the warning above)",
            )
        self.last_saved_step = meta.step
        return point

    def _load_lr_schedule(self, meta: CheckpointMeta) -> None:
        """Continue the lr schedule at the checkpoint's step (it is stepped once per step)."""
        assert self.lr_schedule is not None
        if meta.lr_schedule is not None:
            self.lr_schedule.load_state_dict(meta.lr_schedule)
            return
        if self.env.is_main:
            logger.info("%s has no lr schedule state: continuing it at step %d", meta.path, meta.step)
        self.lr_schedule.seek(meta.step, meta.epoch)

    def _repair_best(self) -> None:
        """Rank 0: point ``best`` to the restored best step if a save was cut short between
        moving ``latest`` and ``best``."""
        step = self.early_stopping.best_step if self.early_stopping is not None else None
        best = best_checkpoint(self.config.run_dir)
        if step is not None and step in complete_steps(self.config.run_dir):
            if best is None or best.name != step_dir_name(step):
                mark_best(self.config.run_dir, step)

    def _checksum_problems(self, meta: CheckpointMeta) -> list[str]:
        """Files of checkpoint ``meta`` that do not match meta.json's checksums; each rank reads
        every world_size-th file, the answers are gathered (collective)."""
        if not meta.files:
            return []
        names = sorted(meta.files)[self.env.rank :: self.env.world_size]
        mine = checksum_problems(meta.path, meta.files, names)
        if self.env.world_size == 1:
            return mine
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, mine, group=self.env.cpu_group)
        return [line for part in gathered for line in part]

    def _choose(self, damaged: tuple[Path, str] | None = None) -> CheckpointMeta | None:
        """Rank 0: the checkpoint to resume from, checked against this run; leftovers removed.
        ``damaged``: a checkpoint found damaged after this chose it, and why."""
        mode, run_dir = self.settings.resume, self.config.run_dir
        if damaged is not None:
            self._fall_back(*damaged)
        latest = latest_checkpoint(run_dir)
        if mode == "never":
            if latest is not None or complete_steps(run_dir):
                raise CheckpointError(
                    f"{self.root} holds checkpoints (latest: {latest.name if latest else 'none'}) and "
                    "checkpoint.resume is never: resume them (checkpoint.resume=auto), use another "
                    f"run_dir, or delete {self.root}"
                )
            remove_leftovers(self.root, None)
            return None
        if latest is None:
            if mode == "required":
                raise CheckpointError(
                    f"checkpoint.resume is required but there is no checkpoint to resume "
                    f"({self.root / LATEST} does not exist)"
                )
            remove_leftovers(self.root, None)
            return None
        meta, metadata = self._newest_whole()
        differences = self._differences(meta, metadata)
        if differences:
            raise mismatch_error(meta.path, differences)
        self._log_config_changes(meta)
        remove_leftovers(self.root, meta.step)
        return meta

    def _newest_whole(self) -> tuple[CheckpointMeta, Metadata]:
        """Rank 0: ``latest``'s meta and DCP index once its files are all there and long
        enough; a damaged one is replaced by the previous complete checkpoint when
        ``checkpoint.resume_fallback`` allows (:meth:`_fall_back`)."""
        while True:
            latest = latest_checkpoint(self.config.run_dir)
            try:
                step_dir = find_checkpoint(self.config.run_dir)
                meta = read_meta(step_dir)
                return meta, verify_files(step_dir)
            except CheckpointError as e:
                assert latest is not None  # _choose returns before when there is no latest
                self._fall_back(latest, str(e))

    def _fall_back(self, step_dir: Path, reason: str) -> None:
        """Rank 0: checkpoint ``step_dir`` (what ``latest`` names) is damaged for ``reason``. Set
        it aside as ``step-X.damaged`` and point ``latest`` to the newest older complete
        checkpoint, with a warning; or raise when ``checkpoint.resume_fallback`` is false or
        there is none."""
        step = step_of(step_dir.name)
        older = [s for s in complete_steps(self.config.run_dir) if step is None or s < step]
        if not self.settings.resume_fallback or not older:
            hint = (
                "no older complete checkpoint to fall back to"
                if not older
                else f"checkpoint.resume_fallback=true would resume from {step_dir_name(older[-1])} instead"
            )
            raise CheckpointError(f"{reason}\n{hint}")
        aside = set_aside(step_dir) if step_dir.is_dir() else None
        mark_latest(self.config.run_dir, older[-1])
        logger.warning(
            "%s\nresuming from the previous complete checkpoint %s instead (checkpoint.resume_fallback: "
            "true): the steps after it are trained again%s",
            reason,
            step_dir_name(older[-1]),
            f"; the damaged checkpoint is kept as {aside}" if aside is not None else "",
        )

    def _differences(self, meta: CheckpointMeta, metadata: Metadata) -> list[str]:
        training = self.config.training
        current = {t.name: (t.num_embeddings, t.embedding_dim) for t in self.config.data.tables}
        lines = table_differences(meta.tables, current)
        shapes = {k: v.size() for k, v in self.model.state_dict().items()}
        lines += tensor_differences(metadata, "model", shapes)
        for key, before, now in (
            ("sparse_optimizer", meta.sparse_optimizer, training.sparse_optimizer.type),
            ("dense_optimizer", meta.dense_optimizer, training.dense_optimizer.type),
        ):
            if before != now:
                lines.append(f"training.{key}.type: {before} in the checkpoint, {now} in the config")
        if not lines and TORCH_STATE_NAMES[training.sparse_optimizer.type]:
            for t in self.config.data.tables:
                key = f"optim.sparse.{t.name}.momentum1"
                if key not in metadata.state_dict_metadata:
                    lines.append(f"table {t.name!r}: no optimizer state ({key}) in the checkpoint")
        return lines

    def _log_config_changes(self, meta: CheckpointMeta) -> None:
        before, now = _flat_config(meta.config), _flat_config(self.config.model_dump(mode="json"))
        changed = [
            f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(before.keys() | now.keys())
            if before.get(k) != now.get(k) and k != "run_dir"
        ]
        if changed:
            logger.warning("the config differs from the checkpoint's: %s", "; ".join(changed))

    def _load(self, meta: CheckpointMeta) -> None:
        """Load model, optimizers and (same world size) this rank's RNG states; collective."""
        step_dir = meta.path
        if not self.dense_optimizer.state:
            self.dense_optimizer.init_state()  # torch optimizers create their state lazily
        model_state = self.model.state_dict()
        dense_state = self.dense_optimizer.state_dict()
        fused_state = self.model.fused_optimizer.state_dict()
        table_state = self.table_optimizer.state_dict() if self.table_optimizer is not None else None
        metadata = FileSystemReader(str(step_dir)).read_metadata()
        dims = {t.name: (t.num_embeddings, t.embedding_dim) for t in self.config.data.tables}
        kind = self.config.training.sparse_optimizer.type
        targets = sparse_targets(meta, metadata, fused_state, table_state, kind, self.plan, dims)
        state: dict[str, Any] = {
            "model": model_state,
            "optim": _non_empty(dense=dense_state["state"], sparse=targets.state),
        }
        same_world = meta.world_size == self.env.world_size
        if same_world:
            state[f"ranks.{self.env.rank}"] = ""  # DCP replaces it with the saved JSON
        try:
            dcp.load(
                state,
                checkpoint_id=str(step_dir),
                process_group=self.env.cpu_group,
            )
            targets.fill(SavedRows(step_dir, metadata))  # row-wise state, chunk by chunk
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors, as one
            reason = describe_dcp_error(e)
            raise CheckpointError(f"checkpoint {step_dir} could not be read: {reason}") from None
        # DCP wrote into the live tensors where the state dict holds views of them (fbgemm's
        # tables, the dense parameters); loading those again would cost TorchRec a copy of each
        # rank's column shards (torch.cat in its load hook).
        copied = _copied_entries(model_state, self.model.state_dict())
        if copied:
            self.model.load_state_dict({k: model_state[k] for k in copied}, strict=False)
        self.dense_optimizer.load_state_dict(dense_state)
        self.model.fused_optimizer.load_state_dict(fused_state)
        if self.table_optimizer is not None:
            # fbgemm keeps no step count; every global step steps every table optimizer once.
            for states in table_state["state"].values():  # type: ignore[index]
                if "step" in states:
                    states["step"].fill_(float(meta.step))
            self.table_optimizer.load_state_dict(table_state)
        if same_world:
            set_rng_state(json.loads(state[f"ranks.{self.env.rank}"])["rng"])


def _copied_entries(loaded: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """Keys of ``loaded`` whose tensors are not the storage of ``live`` (a fresh state dict of
    the same module): only these still need ``load_state_dict``."""

    def pointers(value: Any) -> list[int]:
        if isinstance(value, ShardedTensor):
            return [shard.tensor.data_ptr() for shard in value.local_shards()]
        return [value.data_ptr()] if isinstance(value, torch.Tensor) else []

    return [k for k, v in loaded.items() if not pointers(v) or pointers(v) != pointers(live.get(k))]


def _non_empty(**entries: dict[str, Any]) -> dict[str, Any]:
    """``entries`` without the empty ones (DCP would store an empty dict as a value of its own)."""
    return {key: value for key, value in entries.items() if value}


def _flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat_config(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None
