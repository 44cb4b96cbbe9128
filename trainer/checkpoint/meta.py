"""meta.json: what rank 0 writes beside a checkpoint's data, as typed (strict) pydantic models.

Example::

    meta = read_meta("runs/demo/checkpoints/step-00000040")
    meta.step, meta.epoch, meta.tables["user"].column_groups, meta.path

A field missing, unknown or of another type makes :func:`read_meta` raise a
:class:`CheckpointError` naming the file and the field, instead of a ``KeyError`` later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import PrivateAttr, ValidationError
from towerrec.data.config import StrictModel
from towerrec.data.files import atomic_output
from towerrec.trainer.checkpoint.layout import META, CheckpointError

FORMAT_VERSION = 1


class TableMeta(StrictModel):
    """One table's size and placement. ``column_groups``: ``[[column offset, width], ...]`` of
    its column shards by offset (one group when every shard spans all columns); the row-wise
    optimizer state holds one block of rows per group, in this order."""

    num_embeddings: int
    embedding_dim: int
    sharding_type: str | None
    column_groups: list[list[int]]


class DataLayout(StrictModel):
    """What fixes the batches of an epoch; equal layouts allow an exact resume mid-epoch.
    ``files``: ``(file name, rows per row group)`` of the training files."""

    world_size: int
    batch_size: int
    num_workers: int
    shuffle_buffer: int
    shuffle_row_groups: bool
    seed: int
    steps_per_epoch: int
    files: list[tuple[str, list[int]]]


class DataPosition(StrictModel):
    """``batch`` batches of ``epoch`` taken, ``batches_per_worker`` of them from each worker."""

    epoch: int
    batch: int
    batches_per_worker: list[int]


class FileDigest(StrictModel):
    """One file of a checkpoint as it was written: its size and CRC32 (``zlib.crc32``)."""

    bytes: int
    crc32: int


class CheckpointMeta(StrictModel):
    """meta.json of one checkpoint. ``epoch`` is the epoch the next step belongs to and
    ``batch_in_epoch`` the batches of it already taken (0: ``epoch`` epochs are complete).
    ``path`` (the checkpoint directory) is where it was read from, not part of the file."""

    format: Literal[1]
    step: int
    epoch: int
    batch_in_epoch: int
    world_size: int
    config: dict[str, Any]  # ExperimentConfig.model_dump(mode="json")
    plan: dict[str, Any]  # plan_to_dict of the sharding plan
    tables: dict[str, TableMeta]
    sparse_optimizer: str
    dense_optimizer: str
    data: DataLayout
    data_position: DataPosition
    eval_metrics: dict[str, Any]
    # trainer.early_stopping's state (best value and step, evaluations since); None: it was off
    early_stopping: dict[str, Any] | None = None
    # trainer.schedules.LRSchedule.state_dict(): the lr schedulers' state; None: saved before them
    lr_schedule: dict[str, Any] | None = None
    # trainer.nonfinite.NonFiniteGuard.state_dict(): the steps skipped so far; None: saved before it
    nonfinite: dict[str, Any] | None = None
    # saved when a preemption interrupted the evaluation due at this step: the resumed run runs it
    eval_pending: bool = False
    # every DCP file of the checkpoint (checkpoint.checksums); None: not recorded
    files: dict[str, FileDigest] | None = None
    saved_at: str
    versions: dict[str, str | None]
    _path: Path = PrivateAttr(default_factory=Path)

    @property
    def path(self) -> Path:
        return self._path

    def at(self, step_dir: Path) -> CheckpointMeta:
        """This metadata, as read from checkpoint directory ``step_dir`` (sets :attr:`path`)."""
        self._path = Path(step_dir)
        return self

    def write(self, step_dir: Path) -> None:
        """Write ``step_dir/meta.json`` whole or not at all (key order: the fields')."""
        with atomic_output(Path(step_dir) / META) as tmp:
            tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n")


def read_meta(step_dir: str | Path) -> CheckpointMeta:
    """Read and check a checkpoint's meta.json.

    Raises:
        CheckpointError: meta.json missing or unreadable, or a field missing, unknown or of
            another type (every such field named).
    """
    step_dir = Path(step_dir)
    path = step_dir / META
    if not path.is_file():
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: {META} is missing")
    try:
        return CheckpointMeta.model_validate_json(path.read_bytes()).at(step_dir)
    except OSError as e:
        raise CheckpointError(f"checkpoint {step_dir}: {META} is unreadable: {e}") from None
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(error["type"] == "json_invalid" for error in errors):
            raise CheckpointError(
                f"checkpoint {step_dir}: {META} is unreadable (truncated?): {errors[0]['msg']}"
            ) from None
        lines = [f"{'.'.join(map(str, error['loc'])) or '(top level)'}: {error['msg']}" for error in errors]
        header = f"{path} is not a towerrec checkpoint's {META} (format {FORMAT_VERSION})"
        raise CheckpointError(header + ":\n  " + "\n  ".join(lines)) from None


__all__ = [
    "FORMAT_VERSION",
    "CheckpointMeta",
    "DataLayout",
    "DataPosition",
    "FileDigest",
    "TableMeta",
    "read_meta",
]
