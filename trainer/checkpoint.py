"""Sharded checkpoints: atomic saves, exact resume, resharding to another world size or plan.

Example::

    manager = CheckpointManager(config, env, model, dense_opt, table_opt, plan, train_set)
    point = manager.resume()              # None: a fresh run; else where to continue
    manager.maybe_save(step, epoch, batch, eval_metrics)   # every checkpoint.interval steps
    load_model_state("runs/demo", None, build_train_module(config, torch.device("cpu")))

Layout (a contract: ``trainer.export`` reads it)::

    RUN_DIR/checkpoints/step-00000040/   one torch.distributed.checkpoint (DCP) directory:
        .metadata, __<rank>_0.distcp      DCP's index and every rank's data
        meta.json                         rank 0: step, epoch, world size, config, plan, tables
    RUN_DIR/checkpoints/latest            "step-00000040": the newest complete checkpoint

Entries of the DCP state dict:

* ``model``: ``TrainModule.state_dict()`` keys, exactly those of an unsharded
  ``build_train_module`` (DistributedModelParallel's state dict has them; sharded tables are
  ShardedTensors, data-parallel tables and the dense network plain tensors). DCP reshards on load.
* ``optim.dense``: the dense optimizer's state by parameter key.
* ``optim.sparse.<table>.<state>``: the tables' optimizer state under fbgemm's names, whatever the
  placement (TorchRec issue 2394: a data-parallel table's torch optimizer names it otherwise).
  Point-wise state (adagrad) has the table's shape, so DCP reshards it like the weights.
  Row-wise state (rowwise_adagrad's ``momentum1``) has one value per row *per column shard*:
  ``[rows * n]`` with column shard j (by column offset) at ``[j*rows, (j+1)*rows)``, as TorchRec
  stores it; meta.json keeps the shards' column ranges. A row's value for a column range is the
  width-weighted mean of the saved shards' values over that range: exact when shards merge
  (a shard accumulates mean(g^2) over its columns), the best estimate when one splits.
* ``progress``: step, epoch, batch in the epoch (JSON); ``ranks.<r>``: rank r's RNG states
  (torch, numpy, python) and data position, per DataLoader worker (JSON).

Atomic save: every rank writes into ``step-XXXXXXXX.tmp``; after DCP's collective finish (all
data and ``.metadata`` written) rank 0 writes meta.json, renames the directory, then replaces
``latest`` (write + fsync + ``os.replace``); retention deletes the oldest. A process killed
anywhere before the last rename leaves ``latest`` and its checkpoint as they were; leftovers
(``.tmp`` directories, a renamed directory ``latest`` never pointed to) are deleted when the run
resumes. A failed save raises on every rank and changes nothing that was complete.

Resume policy (``checkpoint.resume``): ``auto`` continues from ``latest`` if there is one,
``required`` fails without one, ``never`` refuses a run directory that holds checkpoints. Before
loading, rank 0 checks the files (every ``.distcp`` file as long as ``.metadata`` says), the
tables (names, rows, dims) against the config and every model tensor's shape, and raises one
:class:`CheckpointError` listing all differences.

Data position: with the same world size, batch size, workers, shuffle settings and data files,
every rank continues its epoch at the batch after the checkpoint (``ParquetDataset.set_epoch``
with ``start_batch``), so no example is repeated or skipped, and RNG states are restored per rank:
the continuation is bitwise identical to an uninterrupted run on CPU. Otherwise (resharding to
another world size, say) the ranks' row ranges differ and the consumed rows cannot be mapped
exactly: a checkpoint at an epoch boundary continues exactly at the next epoch; one inside an
epoch continues at the same fraction of it (batch ``round(k * S_new / S_old)``), so rows near the
old and new rank boundaries may be repeated or skipped once. Both cases are logged as a warning.
RNG states are restored only on the same world size (they are per rank); otherwise each rank
keeps the seeded state of a fresh run. The global step continues from the checkpoint's.

Not saved, because the config defines them: learning rates and optimizer hyper-parameters (there
is no LR schedule; a changed config value applies from the resumed step, with a warning listing
the config differences), and the step count of the data-parallel tables' torch optimizers (fbgemm
keeps none; it is set to the global step, and only matters with an lr decay, which is not used).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from towerrec.data.parquet import ParquetDataset, resume_plan
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.distributed import DistEnv
from towerrec.trainer.optimizers import TORCH_STATE_NAMES

logger = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"
# Test hook: "STEP:SECONDS" sleeps inside the save of STEP, after the ranks wrote their data and
# before DCP's .metadata, meta.json and the renames, so a test can kill a save in the middle.
PAUSE_ENV = "TOWERREC_TEST_SAVE_PAUSE"

_MAX_LISTED = 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model; or a save failed.
    The message names the checkpoint and lists every difference found."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(name: str) -> int | None:
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def complete_steps(run_dir: str | Path) -> list[int]:
    """Steps whose checkpoint directory was renamed into place (has meta.json), ascending."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    steps = [_step_of(p.name) for p in root.iterdir() if p.is_dir() and (p / META).is_file()]
    return sorted(s for s in steps if s is not None)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory ``checkpoints/latest`` names, or None when there is no ``latest``."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    return checkpoint_root(run_dir) / pointer.read_text().strip()


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The directory of checkpoint ``step`` (None: the latest complete one).

    Raises:
        CheckpointError: naming what is missing and the steps that exist.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints ({root} does not exist)")
    if step is None:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(
                f"{run_dir}: no complete checkpoint ({root / LATEST} does not exist); "
                f"complete checkpoint steps: {complete_steps(run_dir)}"
            )
        if not latest.is_dir():
            raise CheckpointError(f"{root / LATEST} names {latest.name}, which does not exist")
        return latest
    directory = root / step_dir_name(step)
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint {directory} does not exist; complete checkpoint steps: {complete_steps(run_dir)}"
        )
    return directory


@dataclass(frozen=True)
class CheckpointMeta:
    """meta.json of one checkpoint. ``epoch`` is the epoch the next step belongs to and
    ``batch_in_epoch`` the batches of it already taken (0: ``epoch`` epochs are complete)."""

    path: Path
    step: int
    epoch: int
    batch_in_epoch: int
    world_size: int
    config: dict[str, Any]
    plan: dict[str, Any]
    tables: dict[str, dict[str, Any]]
    data: dict[str, Any]
    eval_metrics: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


def read_meta(step_dir: str | Path) -> CheckpointMeta:
    """Read and check a checkpoint's meta.json.

    Raises:
        CheckpointError: meta.json missing, unreadable or without ``step`` and ``config``.
    """
    step_dir = Path(step_dir)
    path = step_dir / META
    if not path.is_file():
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: {META} is missing")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: {META} is unreadable (truncated?): {e}") from None
    missing = [k for k in ("step", "config") if k not in raw] if isinstance(raw, dict) else ["everything"]
    if missing:
        raise CheckpointError(f"checkpoint {step_dir}: {META} lacks {missing}")
    return read_meta_dict(step_dir, raw)


def verify_files(step_dir: str | Path) -> Metadata:
    """DCP's index, after checking that every file it names exists and is long enough.

    Raises:
        CheckpointError: listing every missing or truncated file.
    """
    step_dir = Path(step_dir)
    if not (step_dir / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: DCP's .metadata file is missing")
    try:
        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unpickling error means a damaged file
        raise CheckpointError(f"checkpoint {step_dir}: .metadata is unreadable (truncated?): {e}") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        path = step_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size < size:
            problems.append(f"{name} is truncated: {path.stat().st_size} bytes, expected at least {size}")
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} is damaged:\n  " + "\n  ".join(problems))
    return metadata


def table_differences(saved: dict[str, dict[str, Any]], current: dict[str, tuple[int, int]]) -> list[str]:
    """Names, rows and dims of the checkpoint's tables against ``{name: (rows, dim)}``."""
    lines = []
    for name in sorted(saved.keys() - current.keys()):
        t = saved[name]
        lines.append(
            f"table {name!r}: in the checkpoint ({t['num_embeddings']} x {t['embedding_dim']}), "
            "not in the config"
        )
    for name in sorted(current.keys() - saved.keys()):
        rows, dim = current[name]
        lines.append(f"table {name!r}: in the config ({rows} x {dim}), not in the checkpoint")
    for name in sorted(saved.keys() & current.keys()):
        for key, now in zip(("num_embeddings", "embedding_dim"), current[name], strict=True):
            if int(saved[name][key]) != now:
                lines.append(
                    f"table {name!r}: {key} {saved[name][key]} in the checkpoint, {now} in the config"
                )
    return lines


def tensor_differences(metadata: Metadata, prefix: str, current: dict[str, torch.Size]) -> list[str]:
    """Keys and shapes of the checkpoint's ``prefix.*`` tensors against ``{key: shape}``."""
    saved = {
        key[len(prefix) + 1 :]: md.size
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(md, TensorStorageMetadata)
    }
    lines = [
        f"{prefix} tensor {k}: in the model {list(current[k])}, not in the checkpoint"
        for k in sorted(current.keys() - saved.keys())
    ]
    lines += [
        f"{prefix} tensor {k}: in the checkpoint {list(saved[k])}, not in the model"
        for k in sorted(saved.keys() - current.keys())
    ]
    lines += [
        f"{prefix} tensor {k}: shape {list(saved[k])} in the checkpoint, {list(current[k])} in the model"
        for k in sorted(saved.keys() & current.keys())
        if torch.Size(saved[k]) != torch.Size(current[k])
    ]
    return lines


def _mismatch_error(step_dir: Path, differences: list[str]) -> CheckpointError:
    shown = differences[:_MAX_LISTED]
    if len(differences) > _MAX_LISTED:
        shown.append(f"... and {len(differences) - _MAX_LISTED} more")
    return CheckpointError(
        f"checkpoint {step_dir} does not match this model ({len(differences)} differences):\n  "
        + "\n  ".join(shown)
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, CheckpointException):
        return "; ".join(
            f"rank {rank}: {_last_line(exc)}" for rank, (exc, _) in sorted(error.failures.items())
        )
    return f"{type(error).__name__}: {error}"


def _last_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def load_model_state(run_dir: str | Path, step: int | None, module: torch.nn.Module) -> CheckpointMeta:
    """Load checkpoint ``step`` (None: the latest) of ``run_dir`` into an unsharded ``TrainModule``
    in this process alone (no process group needed), whatever world size and plan wrote it.

    Raises:
        CheckpointError: missing or damaged files, or tables / tensors that differ from ``module``
            (all differences in one message).
    """
    step_dir = find_checkpoint(run_dir, step)
    meta = read_meta(step_dir)
    metadata = verify_files(step_dir)
    state = module.state_dict()
    differences = []
    if meta.tables:
        ebc = module.model.ebc  # type: ignore[union-attr]
        current = {c.name: (c.num_embeddings, c.embedding_dim) for c in ebc.embedding_bag_configs()}
        differences += table_differences(meta.tables, current)
    differences += tensor_differences(metadata, "model", {k: v.size() for k, v in state.items()})
    if differences:
        raise _mismatch_error(step_dir, differences)
    try:
        dcp.load({"model": state}, checkpoint_id=str(step_dir), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors, reported as one
        raise CheckpointError(f"checkpoint {step_dir} could not be read: {_describe(e)}") from None
    module.load_state_dict(state)
    return meta


def read_sparse_state(step_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every table's saved optimizer state, whole, in this process: row-wise state as
    ``[column shards, rows]`` (shard order: meta.json ``tables.<t>.column_groups``), point-wise
    state as ``[rows, dim]``."""
    step_dir = Path(step_dir)
    metadata = verify_files(step_dir)
    meta = read_meta(step_dir)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, md in metadata.state_dict_metadata.items():
        parts = key.split(".")
        if parts[:2] == ["optim", "sparse"] and isinstance(md, TensorStorageMetadata):
            state.setdefault(parts[2], {})[".".join(parts[3:])] = torch.empty(
                md.size, dtype=md.properties.dtype
            )
    dcp.load({"optim": {"sparse": state}}, checkpoint_id=str(step_dir), no_dist=True)
    for table, states in state.items():
        rows = int(meta.tables[table]["num_embeddings"])
        for name, value in states.items():
            if value.dim() == 1:
                states[name] = value.view(-1, rows)
    return state


class _BoxLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that also fills ``boxes``: pieces of saved tensors, by key and offsets,
    that are no tensor of this process's state dict (the rows of column shard j of a row-wise
    state written under another plan). DCP's own resharding computes the reads."""

    def __init__(self, boxes: dict[str, dict[tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__()
        self.boxes = boxes

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        items = list(plan.items)
        assert self.metadata is not None
        for fqn, pieces in self.boxes.items():
            md = self.metadata.state_dict_metadata[fqn]
            assert isinstance(md, TensorStorageMetadata)
            chunks = [ChunkStorageMetadata(torch.Size(o), t.size()) for o, t in pieces.items()]
            items += create_read_items_for_chunk_list(fqn, md, chunks)
        return dataclasses.replace(plan, items=items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        pieces = self.boxes.get(index.fqn)
        if pieces is not None:
            assert index.offset is not None
            return pieces[tuple(index.offset)]
        return super().lookup_tensor(index)


class _StepWriter(FileSystemWriter):
    """DCP's file writer, plus the test pause of :data:`PAUSE_ENV` after the data is written."""

    def __init__(self, path: Path, step: int) -> None:
        super().__init__(str(path))
        self.step = step

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        result = super().write_data(plan, planner)
        result.wait()
        pause_step, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
        if pause_step.isdigit() and int(pause_step) == self.step:
            logger.warning("test pause inside the save of step %d for %s s", self.step, seconds)
            time.sleep(float(seconds))
        return result


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """This process's torch (and CUDA), numpy and python RNG states, JSON-ready."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(words), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, words, gauss_next = state["python"]
    random.setstate((version, tuple(words), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def data_layout(dataset: ParquetDataset, num_workers: int) -> dict[str, Any]:
    """What fixes the batches of an epoch; equal layouts allow an exact resume mid-epoch."""
    return {
        "world_size": dataset.world_size,
        "batch_size": dataset.batch_size,
        "num_workers": num_workers,
        "shuffle_buffer": dataset.shuffle_buffer,
        "shuffle_row_groups": dataset.shuffle_row_groups,
        "seed": dataset.seed,
        "steps_per_epoch": dataset.steps_per_epoch(),
        "files": [[Path(i.path).name, list(i.row_groups)] for i in dataset.infos],
    }


def _column_groups(placement: dict[str, Any] | None, dim: int) -> list[list[int]]:
    """``[[column offset, width], ...]`` of a table's column shards in TorchRec's order (by
    offset); one group for a table whose shards all span every column (data-parallel,
    table-wise, row-wise)."""
    shards = (placement or {}).get("shards") or []
    if not shards or all(s["sizes"][1] == dim for s in shards):
        return [[0, dim]]
    if any(s["offsets"][0] != 0 for s in shards):
        raise CheckpointError(
            f"sharding type {placement['sharding_type']} (row and column shards) is not supported "  # type: ignore[index]
            "for row-wise optimizer state"
        )
    return sorted([s["offsets"][1], s["sizes"][1]] for s in shards)


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


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: global ``step``; batch ``batch`` of epoch ``epoch``."""

    step: int
    epoch: int
    batch: int
    eval_metrics: dict[str, Any]
    exact: bool
    checkpoint: Path


class CheckpointManager:
    """Saves and restores everything a run needs to continue (see the module docstring).

    Args:
        model: the DistributedModelParallel; its ``fused_optimizer`` holds the sharded tables'
            optimizer state.
        dense_optimizer: the dense network's KeyedOptimizer.
        table_optimizer: the data-parallel tables' KeyedOptimizer (None without such tables).
        plan: ``plan_to_dict`` of the model's sharding plan.
        train_set: the training data, for the data position and its layout.
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
    ) -> None:
        self.config = config
        self.settings = config.checkpoint
        self.env = env
        self.model = model
        self.dense_optimizer = dense_optimizer
        self.table_optimizer = table_optimizer
        self.plan = plan
        self.train_set = train_set
        self.root = checkpoint_root(config.run_dir)
        self.layout = data_layout(train_set, config.training.num_workers)
        self.last_saved_step: int | None = None

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

    def maybe_save(self, step: int, epoch: int, batch: int, eval_metrics: dict[str, Any]) -> bool:
        """Save if ``step`` is a multiple of ``checkpoint.interval``."""
        if self.interval and step % self.interval == 0 and step != self.last_saved_step:
            self.save(step, epoch, batch, eval_metrics)
            return True
        return False

    def save_final(self, step: int, epoch: int, batch: int, eval_metrics: dict[str, Any]) -> None:
        """The end-of-run save (unless disabled, nothing trained, or this step is saved)."""
        if self.settings.enabled and step > 0 and step != self.last_saved_step:
            self.save(step, epoch, batch, eval_metrics)

    def save(self, step: int, epoch: int, batch: int, eval_metrics: dict[str, Any]) -> Path:
        """Save the run after global ``step``, with ``batch`` batches of ``epoch`` taken; every
        rank calls it. Returns the checkpoint directory.

        Raises:
            CheckpointError: on every rank if any rank failed; ``latest`` is then unchanged.
        """
        started = time.perf_counter()
        steps_per_epoch = self.layout["steps_per_epoch"]
        if batch >= steps_per_epoch:
            epoch, batch = epoch + 1, 0
        name = step_dir_name(step)
        final, tmp = self.root / name, self.root / f"{name}.tmp"

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # a save of this step that was interrupted
                shutil.rmtree(tmp)

        self._on_main(prepare)
        self._barrier()
        state = {
            "model": self.model.state_dict(),
            "optim": _non_empty(
                dense=self.dense_optimizer.state_dict()["state"], sparse=self._sparse_state()
            ),
            "progress": json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch}),
            # One top-level key per rank: DCP stores a dict without tensors as one value, which
            # the ranks' copies would overwrite.
            f"ranks.{self.env.rank}": json.dumps(self._rank_state(epoch, batch)),
        }
        try:
            dcp.save(state, storage_writer=_StepWriter(tmp, step), process_group=self.env.cpu_group)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors, as one
            latest = latest_checkpoint(self.config.run_dir)
            raise CheckpointError(
                f"saving checkpoint {name} failed ({_describe(e)}); the latest complete checkpoint "
                f"({latest.name if latest else 'none'}) is unchanged"
            ) from None
        # dcp.save returned on every rank: every rank's data and DCP's .metadata are written.
        meta = self._meta(step, epoch, batch, eval_metrics)
        self._on_main(lambda: self._publish(tmp, final, meta))
        self.last_saved_step = step
        if self.env.is_main:
            logger.info("checkpoint %s saved in %.1f s", final, time.perf_counter() - started)
        return final

    def _publish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        _write_durably(tmp / META, json.dumps(meta, indent=1) + "\n")
        if final.exists():  # a leftover that latest never named: replaced only now
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_durably(self.root / LATEST, final.name + "\n")
        for step in complete_steps(self.config.run_dir)[: -self.settings.keep_last]:
            shutil.rmtree(self.root / step_dir_name(step))

    def _meta(self, step: int, epoch: int, batch: int, eval_metrics: dict[str, Any]) -> dict[str, Any]:
        tables = {}
        ebc_plan = next(iter(self.plan.values()), {}) if self.plan else {}
        for t in self.config.data.tables:
            placement = ebc_plan.get(t.name)
            tables[t.name] = {
                "num_embeddings": t.num_embeddings,
                "embedding_dim": t.embedding_dim,
                "sharding_type": placement["sharding_type"] if placement else None,
                "column_groups": _column_groups(placement, t.embedding_dim),
            }
        taken = resume_plan(self.layout["steps_per_epoch"], self.layout["num_workers"], batch)[1]
        return {
            "format": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "world_size": self.env.world_size,
            "config": self.config.model_dump(mode="json"),
            "plan": self.plan,
            "tables": tables,
            "sparse_optimizer": self.config.training.sparse_optimizer.type,
            "dense_optimizer": self.config.training.dense_optimizer.type,
            "data": self.layout,
            "data_position": {"epoch": epoch, "batch": batch, "batches_per_worker": taken},
            "eval_metrics": eval_metrics,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {p: _version(p) for p in ("torch", "torchrec", "fbgemm_gpu_cpu", "fbgemm_gpu")},
        }

    def _rank_state(self, epoch: int, batch: int) -> dict[str, Any]:
        steps, workers = self.layout["steps_per_epoch"], self.layout["num_workers"]
        next_worker, taken = resume_plan(steps, workers, batch)
        start, end = self.train_set.rank_rows()
        return {
            "rank": self.env.rank,
            "rng": rng_state(),
            "data": {
                "epoch": epoch,
                "batch": batch,
                "rows": [start, end],
                "batches_per_worker": taken,
                "next_worker": next_worker,
            },
        }

    def _sparse_state(self) -> dict[str, dict[str, Any]]:
        """``{table: {fbgemm state name: tensor}}`` of the tables this rank holds."""
        out: dict[str, dict[str, Any]] = {}
        for fqn, states in self.model.fused_optimizer.state_dict()["state"].items():
            table = fqn.split(".")[-2]
            for key, value in states.items():
                out.setdefault(table, {})[key.removeprefix(f"{table}.")] = value
        if self.table_optimizer is not None:
            kind = self.config.training.sparse_optimizer.type
            for fqn, states in self.table_optimizer.state_dict()["state"].items():
                table = fqn.split(".")[-2]
                for name, canonical in TORCH_STATE_NAMES[kind].items():
                    value = states[name]
                    out.setdefault(table, {})[canonical] = (
                        value.view(-1) if kind == "rowwise_adagrad" else value
                    )
        return out

    # ---- resuming ------------------------------------------------------------------------

    def resume(self) -> ResumePoint | None:
        """Restore the run from ``latest`` as ``checkpoint.resume`` says; every rank calls it.
        None: start at step 0.

        Raises:
            CheckpointError: on every rank, with one message (see the module docstring).
        """
        if not self.settings.enabled:
            return None
        found = self._on_main(self._choose)
        if found is None:
            return None
        step_dir, raw = Path(found[0]), found[1]
        meta = read_meta_dict(step_dir, raw)
        self._load(step_dir, meta)
        point = self._position(meta)
        if self.env.is_main:
            logger.info(
                "resumed from %s: step %d, epoch %d, batch %d%s",
                step_dir,
                point.step,
                point.epoch,
                point.batch,
                "" if point.exact else " (data position approximated, see the warning above)",
            )
        self.last_saved_step = meta.step
        return point

    def _choose(self) -> tuple[str, dict[str, Any]] | None:
        """Rank 0: the checkpoint to resume from, checked against this run; leftovers removed."""
        mode, run_dir = self.settings.resume, self.config.run_dir
        latest = latest_checkpoint(run_dir)
        if mode == "never":
            if latest is not None or complete_steps(run_dir):
                raise CheckpointError(
                    f"{self.root} holds checkpoints (latest: {latest.name if latest else 'none'}) and "
                    "checkpoint.resume is never: resume them (checkpoint.resume=auto), use another "
                    f"run_dir, or delete {self.root}"
                )
            self._remove_leftovers(None)
            return None
        if latest is None:
            if mode == "required":
                raise CheckpointError(
                    f"checkpoint.resume is required but there is no checkpoint to resume "
                    f"({self.root / LATEST} does not exist)"
                )
            self._remove_leftovers(None)
            return None
        step_dir = find_checkpoint(run_dir)
        meta = read_meta(step_dir)
        metadata = verify_files(step_dir)
        differences = self._differences(meta, metadata)
        if differences:
            raise _mismatch_error(step_dir, differences)
        self._log_config_changes(meta)
        self._remove_leftovers(meta.step)
        return str(step_dir), meta.raw

    def _differences(self, meta: CheckpointMeta, metadata: Metadata) -> list[str]:
        training = self.config.training
        current = {t.name: (t.num_embeddings, t.embedding_dim) for t in self.config.data.tables}
        lines = table_differences(meta.tables, current)
        shapes = {k: v.size() for k, v in self.model.state_dict().items()}
        lines += tensor_differences(metadata, "model", shapes)
        for key, now in (
            ("sparse_optimizer", training.sparse_optimizer.type),
            ("dense_optimizer", training.dense_optimizer.type),
        ):
            if meta.raw.get(key, now) != now:
                lines.append(f"training.{key}.type: {meta.raw[key]} in the checkpoint, {now} in the config")
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

    def _remove_leftovers(self, latest_step: int | None) -> None:
        """Delete interrupted saves: ``.tmp`` directories, and complete directories newer than
        ``latest`` (renamed, never published; the resumed run writes them again)."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            step = _step_of(path.name.removesuffix(".tmp").removesuffix(".old"))
            if step is None or not path.is_dir():
                continue
            if path.name != step_dir_name(step) or latest_step is None or step > latest_step:
                logger.warning("removing %s, left by an interrupted save", path)
                shutil.rmtree(path)

    def _load(self, step_dir: Path, meta: CheckpointMeta) -> None:
        """Load model, optimizers and (same world size) this rank's RNG states; collective."""
        if not self.dense_optimizer.state:
            self.dense_optimizer.init_state()  # torch optimizers create their state lazily
        model_state = self.model.state_dict()
        dense_state = self.dense_optimizer.state_dict()
        fused_state = self.model.fused_optimizer.state_dict()
        table_state = self.table_optimizer.state_dict() if self.table_optimizer is not None else None
        metadata = FileSystemReader(str(step_dir)).read_metadata()
        sparse, boxes, fills = self._sparse_targets(meta, metadata, fused_state, table_state)
        state: dict[str, Any] = {
            "model": model_state,
            "optim": _non_empty(dense=dense_state["state"], sparse=sparse),
        }
        same_world = meta.world_size == self.env.world_size
        if same_world:
            state[f"ranks.{self.env.rank}"] = ""
        try:
            dcp.load(
                state,
                checkpoint_id=str(step_dir),
                planner=_BoxLoadPlanner(boxes),
                process_group=self.env.cpu_group,
            )
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors, as one
            raise CheckpointError(f"checkpoint {step_dir} could not be read: {_describe(e)}") from None
        for target, terms in fills:
            target.copy_(
                terms[0][0] if len(terms) == 1 and terms[0][1] == 1.0 else sum(w * box for box, w in terms)
            )
        self.model.load_state_dict(model_state)
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

    def _sparse_targets(
        self,
        meta: CheckpointMeta,
        metadata: Metadata,
        fused_state: dict[str, Any],
        table_state: dict[str, Any] | None,
    ) -> tuple[
        dict[str, Any], dict[str, dict[tuple[int, ...], torch.Tensor]], list[tuple[torch.Tensor, list]]
    ]:
        """Where the saved table optimizer state goes in this placement: point-wise state as
        ordinary DCP targets; row-wise state as boxes (the saved column shards' rows each local
        piece needs) and fills (local piece <- width-weighted sum of boxes)."""
        kind = self.config.training.sparse_optimizer.type
        ebc_plan = next(iter(self.plan.values()), {}) if self.plan else {}
        dims = {t.name: (t.num_embeddings, t.embedding_dim) for t in self.config.data.tables}
        targets: list[tuple[str, str, Any, list[list[int]]]] = []  # table, name, tensor, new groups
        for fqn, states in fused_state["state"].items():
            table = fqn.split(".")[-2]
            groups = _column_groups(ebc_plan.get(table), dims[table][1])
            for key, value in states.items():
                targets.append((table, key.removeprefix(f"{table}."), value, groups))
        if table_state is not None:
            for fqn, states in table_state["state"].items():
                table = fqn.split(".")[-2]
                for name, canonical in TORCH_STATE_NAMES[kind].items():
                    value = states[name].view(-1) if kind == "rowwise_adagrad" else states[name]
                    targets.append((table, canonical, value, [[0, dims[table][1]]]))
        sparse: dict[str, dict[str, Any]] = {}
        boxes: dict[str, dict[tuple[int, ...], torch.Tensor]] = {}
        fills: list[tuple[torch.Tensor, list]] = []
        for table, name, target, groups in targets:
            fqn = f"optim.sparse.{table}.{name}"
            md = metadata.state_dict_metadata.get(fqn)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"checkpoint {meta.path} has no optimizer state {fqn}")
            if len(md.size) == 2:  # point-wise: DCP reshards it like the table
                sparse.setdefault(table, {})[name] = target
                continue
            rows = dims[table][0]
            old_groups = meta.tables[table]["column_groups"]
            if isinstance(target, ShardedTensor):
                pieces = []
                for shard in target.local_shards():
                    offset = shard.metadata.shard_offsets[0]
                    g = offset // rows if len(groups) > 1 else 0
                    pieces.append((shard.tensor, offset - g * rows, groups[g]))
            else:
                pieces = [(target, 0, groups[0])]
            for tensor, first_row, (c0, width) in pieces:
                terms = []
                for j, (o, d) in enumerate(old_groups):
                    overlap = min(c0 + width, o + d) - max(c0, o)
                    if overlap <= 0:
                        continue
                    start = j * rows + first_row if len(old_groups) > 1 else first_row
                    box = boxes.setdefault(fqn, {}).setdefault((start,), torch.empty(tensor.numel()))
                    terms.append((box, overlap / width))
                fills.append((tensor, terms))
        return sparse, boxes, fills

    def _position(self, meta: CheckpointMeta) -> ResumePoint:
        """Where the data continues (policy: module docstring)."""
        saved = meta.data
        epoch, batch = meta.epoch, meta.batch_in_epoch
        exact = saved == self.layout
        if not exact:
            changed = sorted(k for k in set(saved) | set(self.layout) if saved.get(k) != self.layout.get(k))
            old_steps, new_steps = int(saved.get("steps_per_epoch") or 1), self.layout["steps_per_epoch"]
            if batch:
                new_batch = round(batch * new_steps / old_steps)
                if self.env.is_main:
                    logger.warning(
                        "the data layout changed (%s): the consumed rows of epoch %d cannot be mapped "
                        "exactly; continuing at the same fraction of it: batch %d of %d (was %d of %d); "
                        "rows near the old and new rank (or worker) boundaries may be seen twice or "
                        "not at all in this epoch",
                        ", ".join(changed),
                        epoch,
                        new_batch,
                        new_steps,
                        batch,
                        old_steps,
                    )
                batch = new_batch
                if batch >= new_steps:
                    epoch, batch = epoch + 1, 0
            elif self.env.is_main:
                logger.warning(
                    "the data layout changed (%s); the checkpoint is at an epoch boundary, so epoch %d "
                    "starts as usual",
                    ", ".join(changed),
                    epoch,
                )
            if meta.world_size != self.env.world_size and self.env.is_main:
                logger.warning(
                    "world size %d -> %d: RNG states are not restored (they are per rank)",
                    meta.world_size,
                    self.env.world_size,
                )
        # At an epoch boundary nothing needs mapping: the position is exact whatever the layout.
        exact = exact or meta.batch_in_epoch == 0
        return ResumePoint(meta.step, epoch, batch, meta.eval_metrics, exact, meta.path)


def read_meta_dict(step_dir: Path, raw: dict[str, Any]) -> CheckpointMeta:
    """A :class:`CheckpointMeta` from meta.json's content read elsewhere (rank 0)."""
    return CheckpointMeta(
        path=step_dir,
        step=int(raw["step"]),
        epoch=int(raw.get("epoch", 0)),
        batch_in_epoch=int(raw.get("batch_in_epoch", 0)),
        world_size=int(raw.get("world_size", 0)),
        config=raw["config"],
        plan=raw.get("plan", {}),
        tables=raw.get("tables", {}),
        data=raw.get("data", {}),
        eval_metrics=raw.get("eval_metrics", {}),
        raw=raw,
    )


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMeta",
    "ResumePoint",
    "checkpoint_root",
    "complete_steps",
    "find_checkpoint",
    "latest_checkpoint",
    "load_model_state",
    "read_meta",
    "read_sparse_state",
    "step_dir_name",
    "verify_files",
]
