"""Checks before a checkpoint is loaded: its files against DCP's index, its tables and tensors
against the model; and loading the weights into one plain module after those checks.

Example::

    metadata = verify_files(step_dir)                     # every .distcp file whole
    differences = tensor_differences(metadata, "model", {k: v.size() for k, v in state.items()})
    load_model_state("runs/demo", None, build_train_module(config, torch.device("cpu")))
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from towerrec.trainer.checkpoint.layout import CheckpointError, find_checkpoint
from towerrec.trainer.checkpoint.meta import CheckpointMeta, TableMeta, read_meta

_MAX_LISTED = 20


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


def table_differences(saved: dict[str, TableMeta], current: dict[str, tuple[int, int]]) -> list[str]:
    """Names, rows and dims of the checkpoint's tables against ``{name: (rows, dim)}``."""
    lines = []
    for name in sorted(saved.keys() - current.keys()):
        t = saved[name]
        lines.append(
            f"table {name!r}: in the checkpoint ({t.num_embeddings} x {t.embedding_dim}), not in the config"
        )
    for name in sorted(current.keys() - saved.keys()):
        rows, dim = current[name]
        lines.append(f"table {name!r}: in the config ({rows} x {dim}), not in the checkpoint")
    for name in sorted(saved.keys() & current.keys()):
        for key, now in zip(("num_embeddings", "embedding_dim"), current[name], strict=True):
            before = getattr(saved[name], key)
            if before != now:
                lines.append(f"table {name!r}: {key} {before} in the checkpoint, {now} in the config")
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


def mismatch_error(step_dir: Path, differences: list[str]) -> CheckpointError:
    """One error listing the (first ``_MAX_LISTED``) differences between checkpoint and model."""
    shown = differences[:_MAX_LISTED]
    if len(differences) > _MAX_LISTED:
        shown.append(f"... and {len(differences) - _MAX_LISTED} more")
    return CheckpointError(
        f"checkpoint {step_dir} does not match this model ({len(differences)} differences):\n  "
        + "\n  ".join(shown)
    )


def describe_dcp_error(error: BaseException) -> str:
    """One line per failed rank of a DCP error (its tracebacks are pages long)."""
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
        raise mismatch_error(step_dir, differences)
    try:
        dcp.load({"model": state}, checkpoint_id=str(step_dir), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors, reported as one
        raise CheckpointError(f"checkpoint {step_dir} could not be read: {describe_dcp_error(e)}") from None
    module.load_state_dict(state)
    return meta
