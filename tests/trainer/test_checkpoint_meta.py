"""meta.json is typed: a file with a missing, unknown or wrongly typed field is refused with one
error naming the file and every such field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from towerrec.trainer.checkpoint import CheckpointError, CheckpointMeta, read_meta
from towerrec.trainer.checkpoint.meta import DataLayout, DataPosition, TableMeta


def _meta(step: int = 40) -> CheckpointMeta:
    return CheckpointMeta(
        format=1,
        step=step,
        epoch=1,
        batch_in_epoch=4,
        world_size=2,
        config={"run_dir": "runs/x", "training": {"batch_size": 512}},
        plan={"model.ebc": {"user": {"sharding_type": "column_wise"}}},
        tables={
            "user": TableMeta(
                num_embeddings=100,
                embedding_dim=16,
                sharding_type="column_wise",
                column_groups=[[0, 8], [8, 8]],
            )
        },
        sparse_optimizer="rowwise_adagrad",
        dense_optimizer="adam",
        data=DataLayout(
            world_size=2,
            batch_size=512,
            num_workers=1,
            shuffle_buffer=0,
            shuffle_row_groups=False,
            seed=7,
            steps_per_epoch=16,
            files=[("part-00000.parquet", [1000, 1000])],
        ),
        data_position=DataPosition(epoch=1, batch=4, batches_per_worker=[4]),
        eval_metrics={"click": {"auc": 0.71, "logloss": float("nan")}},
        saved_at="2026-01-01T00:00:00+0000",
        versions={"torch": "2.13.0", "fbgemm_gpu": None},
    )


def _written(tmp_path: Path, edit: Any = None) -> Path:
    """A checkpoint directory whose meta.json is ``_meta()``'s, changed by ``edit(raw)``."""
    step_dir = tmp_path / "step-00000040"
    step_dir.mkdir()
    _meta().write(step_dir)
    if edit is not None:
        raw = json.loads((step_dir / "meta.json").read_text())
        edit(raw)
        (step_dir / "meta.json").write_text(json.dumps(raw))
    return step_dir


def test_meta_reads_back_as_written_with_its_directory(tmp_path: Path) -> None:
    step_dir = _written(tmp_path)
    meta = read_meta(step_dir)
    assert meta.path == step_dir
    assert meta.tables["user"].column_groups == [[0, 8], [8, 8]]
    assert meta.data == _meta().data  # what an exact resume compares
    assert meta.model_dump(exclude={"eval_metrics"}) == _meta().model_dump(exclude={"eval_metrics"})
    raw = json.loads((step_dir / "meta.json").read_text())
    assert list(raw)[:5] == ["format", "step", "epoch", "batch_in_epoch", "world_size"]
    assert raw["data"]["files"] == [["part-00000.parquet", [1000, 1000]]]


def _error(step_dir: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_meta(step_dir)
    return str(info.value)


def test_a_missing_field_is_named_with_the_file(tmp_path: Path) -> None:
    step_dir = _written(tmp_path, lambda raw: raw.pop("world_size"))
    message = _error(step_dir)
    assert str(step_dir / "meta.json") in message
    assert "world_size: Field required" in message


def test_an_unknown_field_is_named_with_the_file(tmp_path: Path) -> None:
    step_dir = _written(tmp_path, lambda raw: raw["tables"]["user"].update(rows=100))
    message = _error(step_dir)
    assert str(step_dir / "meta.json") in message
    assert "tables.user.rows: Extra inputs are not permitted" in message


def test_wrongly_typed_fields_are_all_named_not_coerced(tmp_path: Path) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["step"] = "40"  # a string of digits is not silently taken as a step
        raw["data"]["shuffle_row_groups"] = 0
        raw["format"] = 2

    message = _error(_written(tmp_path, edit))
    assert "step: Input should be a valid integer" in message
    assert "data.shuffle_row_groups: Input should be a valid boolean" in message
    assert "format: Input should be 1" in message


def test_a_truncated_or_missing_meta_json_is_reported_as_such(tmp_path: Path) -> None:
    step_dir = _written(tmp_path)
    text = (step_dir / "meta.json").read_text()
    (step_dir / "meta.json").write_text(text[: len(text) // 2])
    assert f"checkpoint {step_dir}: meta.json is unreadable (truncated?)" in _error(step_dir)
    (step_dir / "meta.json").unlink()
    assert "is incomplete: meta.json is missing" in _error(step_dir)
