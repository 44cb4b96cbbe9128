"""Batch prediction: Parquet files through an exported artifact (``trainer.export``) to Parquet.

Example::

    artifact = load_artifact("model.pt")                  # TorchScript module + its schema
    predict(artifact, files, "preds/", passthrough=["user_id", "item_id"])
    # preds/part-00000.parquet: user_id, item_id, p_click, p_conversion; one row per input row

Reading reuses the training loader (``data.parquet.ParquetDataset`` with ``labels=False``), so
prediction takes the raw columns and applies the same column checks and feature transforms as
training (hashing, vocabularies, buckets, dense transforms, nulls; the fitted statistics come from
the artifact's schema, ``Artifact.features``), and splits
the rows over ``world_size`` processes the same way: rank r takes the contiguous rows
``[r*N//W, (r+1)*N//W)`` of the sorted files and writes ``part-{r:05d}.parquet`` with those rows
in input order. The loader's padding rows are never written. Memory stays at a few batches plus
one output row group, whatever the data size, and one copy of the artifact per process:
``torch.jit.load`` reads each tensor record of the file straight into its storage (measured in
tests/trainer/test_memory.py and docs/MEMORY.md).

Output columns: the passthrough columns (default: the single-hot sparse features' columns), copied
from the input unchanged, then ``p_<task>`` (float32) per task. A task with a ``sample_space``
was trained on that task's positives only, so ``p_conversion`` is P(conversion | click) and
P(click and conversion) is ``p_click * p_conversion``.

Every file is written to a temporary name next to its target and renamed only when complete:
a failed run leaves earlier output untouched and no partial file.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from towerrec.data.batch import Batch
from towerrec.data.config import DataConfig, resolve_paths
from towerrec.data.features import FittedFeatures
from towerrec.data.files import atomic_output
from towerrec.data.parquet import DataError, ParquetDataset, make_dataloader, report_nulls
from towerrec.trainer.distributed import set_threads, size_threads
from towerrec.trainer.serving import schema_data_config

SCHEMA_FILE = "towerrec_schema.json"  # the artifact's schema, a TorchScript extra file
PREFIX = "p_"  # output column of task t: p_<t>
_ROW_GROUP_ROWS = 65_536  # output rows buffered before they are written as one row group


@dataclass
class Artifact:
    """An exported model: ``module(values, lengths, dense) -> {task: probability [B]}`` and the
    schema it was exported with (see ``trainer.export``)."""

    module: torch.jit.ScriptModule
    schema: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.schema["data"]["tasks"]]

    def data_config(self, files: list[str]) -> DataConfig:
        """The training data section (tables, features, tasks) reading ``files``."""
        return schema_data_config(self.schema, files)

    @functools.cached_property
    def features(self) -> FittedFeatures | None:
        """The run's fitted statistics the artifact was exported with (None: none needed, or an
        artifact exported before they existed)."""
        raw = self.schema.get("features")
        return FittedFeatures.from_json(raw, f"{SCHEMA_FILE} of the artifact") if raw is not None else None

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return self.module(batch.sparse.values(), batch.sparse.lengths(), batch.dense)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Load an artifact written by ``towerrec export``; needs only torch and fbgemm_gpu."""
    import fbgemm_gpu  # noqa: F401 - registers the embedding operators the artifact calls

    extra = {SCHEMA_FILE: ""}
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit; see trainer.export
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[SCHEMA_FILE]:
        raise ValueError(f"{path}: not a towerrec artifact (no {SCHEMA_FILE} inside)")
    return Artifact(module.eval(), json.loads(extra[SCHEMA_FILE]))


def default_passthrough(artifact: Artifact) -> list[str]:
    """The Parquet columns of the single-hot sparse features, each once."""
    columns = [
        f.get("column") or f["name"]
        for f in artifact.schema["data"]["sparse_features"]
        if not f.get("multi_hot")
    ]
    return list(dict.fromkeys(columns))


def part_path(out_dir: str | os.PathLike, rank: int) -> Path:
    return Path(out_dir) / f"part-{rank:05d}.parquet"


def predict(
    artifact: Artifact | str | os.PathLike,
    files: list[str],
    out_dir: str | os.PathLike,
    rank: int = 0,
    world_size: int = 1,
    passthrough: list[str] | None = None,
    batch_size: int = 4096,
    num_workers: int = 0,
) -> tuple[Path, int]:
    """Predict rank ``rank``'s share of ``files``; returns (its part file, rows written).

    ``num_workers`` is 0 (read in this process) or 1 (one reader process ahead of the model):
    the DataLoader interleaves the batches of several workers, which would reorder the rows.

    Raises:
        DataError: a missing or mistyped feature or passthrough column (named), a bad value.
    """
    if num_workers not in (0, 1):
        raise ValueError(f"num_workers must be 0 or 1 (row order), got {num_workers}; use more processes")
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    passthrough = default_passthrough(artifact) if passthrough is None else passthrough
    data = artifact.data_config(files)
    features = artifact.features
    if features is not None:
        features.check(data)  # fitted for these features: checked at export, cheap to recheck
    dataset = ParquetDataset(files, data, batch_size, rank, world_size, labels=False, features=features)
    schema = _output_schema(dataset, passthrough, artifact.tasks)
    ids = _Passthrough(dataset, passthrough)
    out, written = part_path(out_dir, rank), 0
    with atomic_output(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        pending: list[pa.Table] = []
        for batch in make_dataloader(dataset, num_workers):
            n = batch.real_rows  # padding rows come last in a batch and are not written
            if n == 0:
                continue
            probabilities = artifact(batch)
            table = ids.take(n)
            for task in artifact.tasks:
                table = table.append_column(PREFIX + task, pa.array(probabilities[task][:n].numpy()))
            pending.append(table.cast(schema))
            written += n
            if sum(len(t) for t in pending) >= _ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending))
    report_nulls(dataset, f"predict rank {rank}")
    return out, written


def _output_schema(dataset: ParquetDataset, passthrough: list[str], tasks: list[str]) -> pa.Schema:
    """Passthrough columns with the first file's types, then ``p_<task>`` float32.

    Raises:
        DataError: a passthrough column missing from some file, or clashing with an output column.
    """
    outputs = [PREFIX + t for t in tasks]
    clash = sorted(set(passthrough) & set(outputs))
    if clash:
        raise DataError(f"passthrough columns {clash} clash with the output columns {outputs}")
    fields: list[pa.Field] = []
    for info in dataset.infos:
        file_schema = pq.read_schema(info.path)
        for column in passthrough:
            if file_schema.get_field_index(column) < 0:
                raise DataError(
                    f"{info.path}: passthrough column {column!r} is missing; "
                    f"the file has columns {file_schema.names}"
                )
        fields = fields or [file_schema.field(c) for c in passthrough]
    return pa.schema(fields + [pa.field(c, pa.float32()) for c in outputs])


class _Passthrough:
    """The passthrough columns of a dataset's rows in the dataset's (unshuffled) order."""

    def __init__(self, dataset: ParquetDataset, columns: list[str]) -> None:
        self._chunks = self._read(dataset, columns)
        self._pending: list[pa.Table] = []
        self._have = 0

    @staticmethod
    def _read(dataset: ParquetDataset, columns: list[str]) -> Iterator[pa.Table]:
        lo, hi = dataset.rank_rows()
        offset = 0
        for info in dataset.infos:
            if offset >= hi:
                return
            if offset + info.num_rows <= lo:
                offset += info.num_rows
                continue
            with pq.ParquetFile(info.path) as parquet:
                for group, rows in enumerate(info.row_groups):
                    begin, stop = max(lo - offset, 0), min(hi - offset, rows)
                    offset += rows
                    if begin >= stop:
                        continue
                    position = 0
                    for rb in parquet.iter_batches(
                        batch_size=_ROW_GROUP_ROWS, row_groups=[group], columns=columns
                    ):
                        a, b = max(begin - position, 0), min(stop - position, rb.num_rows)
                        if a < b:
                            yield pa.Table.from_batches([rb.slice(a, b - a)])
                        position += rb.num_rows

    def take(self, n: int) -> pa.Table:
        """The next ``n`` rows."""
        while self._have < n:
            chunk = next(self._chunks)
            self._pending.append(chunk)
            self._have += len(chunk)
        rows = pa.concat_tables(self._pending)
        rest = rows.slice(n)
        self._pending, self._have = ([rest] if len(rest) else []), len(rest)
        return rows.slice(0, n)


def _predict_rank(model: str, files: list[str], out_dir: str, rank: int, world_size: int, kw: dict) -> int:
    from towerrec.trainer.quiet import silence_known_warnings

    silence_known_warnings()  # a fresh (spawned) process: the parent's filters do not carry over
    # The processes of this machine share its cores as training's ranks do (one way to size them).
    set_threads(size_threads("auto", world_size, kw.get("num_workers", 0)), announce=False)
    return predict(model, files, out_dir, rank, world_size, **kw)[1]


def predict_files(
    model: str | os.PathLike,
    patterns: list[str],
    out_dir: str | os.PathLike,
    nproc: int = 1,
    **kw: Any,
) -> list[tuple[Path, int]]:
    """Predict every file matching ``patterns`` (files, directories, globs) with ``nproc``
    processes; returns ``(part file, rows)`` per rank. Once every rank succeeded, part files
    of an earlier run with more ranks are removed so ``out_dir`` holds exactly this run.
    """
    files = resolve_paths(list(patterns), "--data")
    if nproc == 1:
        results = [predict(model, files, out_dir, **kw)]
    else:
        with ProcessPoolExecutor(nproc, mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(_predict_rank, str(model), files, str(out_dir), r, nproc, kw)
                for r in range(nproc)
            ]
            results = [(part_path(out_dir, r), f.result()) for r, f in enumerate(futures)]
    keep = {path.name for path, _ in results}
    for stale in Path(out_dir).glob("part-*.parquet"):
        if stale.name not in keep:
            stale.unlink()
    return results
