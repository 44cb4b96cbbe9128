"""Batch prediction: one output row per input row, in order, split over processes like training;
bad input names the column and leaves earlier output alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from export_helpers import exported
from towerrec.data.parquet import DataError, ParquetDataset
from towerrec.trainer.predict import load_artifact, predict, predict_files

IDS = ["user_id", "item_id"]


def _eval_files(synth_data: Path) -> list[str]:
    return sorted(str(p) for p in (synth_data / "eval").glob("*.parquet"))


def test_two_processes_write_every_row_once_in_order(synth_data: Path, tmp_path: Path) -> None:
    model, _ = exported(synth_data, "int8")
    files = _eval_files(synth_data)
    inputs = pq.read_table(files, columns=IDS)  # 4000 rows in the sorted files' order
    # In-process reference: one process, the artifact run on the same data.
    [(single, rows)] = predict_files(model, files, tmp_path / "single", passthrough=IDS, batch_size=1500)
    assert rows == 4000
    reference = pq.read_table(single)
    assert reference.column_names == IDS + ["p_click", "p_conversion"]
    assert reference.select(IDS).equals(inputs)

    out = tmp_path / "two"
    out.mkdir()
    (out / "part-00002.parquet").write_bytes(b"stale part of an earlier 3-process run")
    # 2000 rows per rank in batches of 1500: each rank's second batch has 1000 padding rows.
    parts = predict_files(model, [str(synth_data / "eval")], out, nproc=2, passthrough=IDS, batch_size=1500)
    assert [(p.name, n) for p, n in parts] == [("part-00000.parquet", 2000), ("part-00001.parquet", 2000)]
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    tables = [pq.read_table(p) for p, _ in parts]
    assert tables[0].select(IDS).equals(inputs.slice(0, 2000))  # rank r: the r-th contiguous half
    assert tables[1].select(IDS).equals(inputs.slice(2000))
    both = pa.concat_tables(tables)
    for column in ("p_click", "p_conversion"):
        p = both[column].to_numpy()
        assert p.dtype == np.float32 and ((p > 0) & (p < 1)).all()
        np.testing.assert_allclose(p, reference[column].to_numpy(), rtol=0, atol=1e-6)


def test_predicted_rows_are_the_artifacts_outputs(synth_data: Path, tmp_path: Path) -> None:
    """Label-free input; probabilities equal the artifact called directly on the same batch."""
    model, _ = exported(synth_data, "int8")
    artifact = load_artifact(model)
    source = pq.read_table(_eval_files(synth_data)[0]).slice(0, 300)
    unlabelled = tmp_path / "in.parquet"
    pq.write_table(source.drop_columns(["click", "conversion"]), unlabelled, row_group_size=128)
    path, rows = predict(artifact, [str(unlabelled)], tmp_path / "out", passthrough=[], batch_size=512)
    out = pq.read_table(path)
    assert rows == 300 and out.column_names == ["p_click", "p_conversion"]
    files = [str(unlabelled)]
    dataset = ParquetDataset(files, artifact.data_config(files), 512, labels=False)
    expected = artifact(next(iter(dataset)))
    for task in ("click", "conversion"):
        np.testing.assert_array_equal(out[f"p_{task}"].to_numpy(), expected[task][:300].numpy())


def test_missing_feature_column_is_named_and_nothing_is_written(synth_data: Path, tmp_path: Path) -> None:
    model, _ = exported(synth_data, "int8")
    table = pq.read_table(_eval_files(synth_data)[0]).slice(0, 50).drop_columns(["user_city"])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: column 'user_city' \(sparse feature\) is missing"):
        predict(model, [str(tmp_path / "bad.parquet")], tmp_path / "out")
    with pytest.raises(DataError, match=r"passthrough column 'request_id' is missing"):
        predict(model, _eval_files(synth_data), tmp_path / "out", passthrough=["request_id"])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_failed_prediction_keeps_the_previous_output(synth_data: Path, tmp_path: Path) -> None:
    model, _ = exported(synth_data, "int8")
    table = pq.read_table(_eval_files(synth_data)[0]).slice(0, 600)
    items = table["item_id"].to_numpy().copy()
    items[555] = 10**9  # outside the item table, in the third batch: two were predicted already
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(items))
    pq.write_table(table, tmp_path / "bad.parquet")
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"previous predictions")
    with pytest.raises(DataError, match=r"column 'item_id', row 555: value 1000000000"):
        predict(model, [str(tmp_path / "bad.parquet")], out, batch_size=256)
    assert (out / "part-00000.parquet").read_bytes() == b"previous predictions"
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]
