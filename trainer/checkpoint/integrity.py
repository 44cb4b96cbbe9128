"""Checks before a checkpoint is loaded: its files against DCP's index, its tables and tensors
against the model; and loading the weights into one plain module after those checks.

Example::

    metadata = verify_files(step_dir)                     # every .distcp file whole
    digests = file_digests(step_dir, written_files(step_dir, rank))   # at save: CRC32 of a rank's files
    checksum_problems(step_dir, meta.files, names)        # at load: [] or one line per damaged file
    differences = tensor_differences(metadata, "model", {k: v.size() for k, v in state.items()})
    load_model_state("runs/demo", None, build_train_module(config, torch.device("cpu")))
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from towerrec.trainer.checkpoint.layout import CheckpointError, find_checkpoint
from towerrec.trainer.checkpoint.meta import CheckpointMeta, FileDigest, TableMeta, read_meta

_MAX_LISTED = 20
_READ_BYTES = 16 << 20


def written_files(step_dir: str | Path, rank: int) -> list[str]:
    """The files of ``step_dir`` rank ``rank`` wrote in a DCP save: its ``__<rank>_<n>.distcp``
    and, on rank 0 (DCP's coordinator), ``.metadata``."""
    names = sorted(p.name for p in Path(step_dir).glob(f"__{rank}_*.distcp"))
    return names + ([".metadata"] if rank == 0 else [])


def file_digests(step_dir: str | Path, names: Iterable[str]) -> dict[str, FileDigest]:
    """Size and CRC32 of the files ``names`` of ``step_dir`` (read once, in blocks)."""
    digests, buffer = {}, bytearray(_READ_BYTES)
    view = memoryview(buffer)
    for name in names:
        crc, size = 0, 0
        with open(Path(step_dir) / name, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                crc, size = zlib.crc32(view[:n], crc), size + n
        digests[name] = FileDigest(bytes=size, crc32=crc)
    return digests


def checksum_problems(
    step_dir: str | Path, expected: Mapping[str, FileDigest], names: Iterable[str] | None = None
) -> list[str]:
    """One line per file of ``names`` (default: all of ``expected``) whose size or CRC32 differs
    from ``expected`` (meta.json's ``files``), naming the file."""
    problems = []
    for name in sorted(expected if names is None else names):
        path = Path(step_dir) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            want, found = expected[name], file_digests(step_dir, [name])[name]
        except OSError as e:
            problems.append(f"{name} is unreadable: {e.strerror}")
            continue
        if found.bytes != want.bytes:
            problems.append(f"{name} has {found.bytes} bytes, {want.bytes} were written (truncated?)")
        elif found.crc32 != want.crc32:
            problems.append(f"{name} is corrupted: CRC32 {found.crc32:08x}, {want.crc32:08x} when written")
    return problems


def verify_files(step_dir: str | Path, digests: Mapping[str, FileDigest] | None = None) -> Metadata:
    """DCP's index, after checking that every file it names exists and is long enough, and with
    ``digests`` (meta.json's ``files``) that every file matches its checksum.

    Raises:
        CheckpointError: listing every missing, truncated or corrupted file.
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
    if not problems and digests:
        problems = checksum_problems(step_dir, digests)
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
    Tensors of ``module`` on the meta device (e.g. tables built with ``device=meta``) are
    checked against the checkpoint but left unread.

    Raises:
        CheckpointError: missing or damaged files, or tables / tensors that differ from ``module``
            (all differences in one message).
    """
    step_dir = find_checkpoint(run_dir, step)
    meta = read_meta(step_dir)
    metadata = verify_files(step_dir, meta.files)
    state = module.state_dict()
    differences = []
    if meta.tables:
        ebc = module.model.ebc  # type: ignore[union-attr]
        current = {c.name: (c.num_embeddings, c.embedding_dim) for c in ebc.embedding_bag_configs()}
        differences += table_differences(meta.tables, current)
    differences += tensor_differences(metadata, "model", {k: v.size() for k, v in state.items()})
    if differences:
        raise mismatch_error(step_dir, differences)
    # Tables on the meta device are checked but not read (trainer.export streams them).
    wanted = {k: v for k, v in state.items() if not v.is_meta}
    try:
        dcp.load({"model": wanted}, checkpoint_id=str(step_dir), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors, reported as one
        raise CheckpointError(f"checkpoint {step_dir} could not be read: {describe_dcp_error(e)}") from None
    module.load_state_dict(state)
    return meta
