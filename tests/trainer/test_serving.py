"""The serving helper turns raw rows (a pyarrow Table, RecordBatch or dict of Python lists) into
exactly the loader's batch for the same rows, from the artifact's schema alone."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from raw_helpers import raw_config, write_raw_data
from towerrec.data.errors import DataError
from towerrec.data.features import FittedFeatures
from towerrec.data.parquet import ParquetDataset
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.export import TOLERANCES, make_schema
from towerrec.trainer.serving import RowTransform, schema_data_config, transform_rows


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, FittedFeatures]:
    """The raw data, the schema an export of its config writes, and the fitted statistics."""
    root = tmp_path_factory.mktemp("raw")
    write_raw_data(root)
    config = ExperimentConfig.model_validate(raw_config(root))
    train = sorted(str(p) for p in (root / "train").glob("*.parquet"))
    fitted = FittedFeatures.fit(train, config.data)
    schema = make_schema(config, "none", {"step": 0}, TOLERANCES["none"], fitted)
    return root, schema, fitted


def _loader_batch(schema: dict, fitted: FittedFeatures, path: str, rows: int):
    data = schema_data_config(schema, [path])
    dataset = ParquetDataset([path], data, rows, labels=False, features=fitted)
    [batch] = list(dataset)
    assert batch.real_rows == rows  # one batch, no padding
    return batch


@pytest.mark.parametrize("part", ["eval/part-0.parquet", "train/part-1.parquet"])  # string, large_string
def test_rows_become_the_loaders_batch(served: tuple[Path, dict, FittedFeatures], part: str) -> None:
    root, schema, fitted = served
    path = str(root / part)
    table = pq.read_table(path)
    batch = _loader_batch(schema, fitted, path, len(table))
    transform = RowTransform(schema)
    for rows in (table, table.combine_chunks().to_batches()[0], table.to_pydict()):
        values, lengths, dense = transform(rows)
        assert values.dtype == torch.int64 and lengths.dtype == torch.int32 and dense.dtype == torch.float32
        assert torch.equal(values, batch.sparse.values())
        assert torch.equal(lengths, batch.sparse.lengths().to(torch.int32))
        assert torch.equal(dense, batch.dense)
    # A table of several chunks (rows arriving in pieces) gives the same.
    chunked = pa.concat_tables([table.slice(0, 100), table.slice(100)])
    assert torch.equal(transform_rows(schema, chunked)[0], batch.sparse.values())


def test_nulls_replaced_are_counted(served: tuple[Path, dict, FittedFeatures]) -> None:
    root, schema, _ = served
    table = pq.read_table(root / "eval" / "part-0.parquet")
    transform = RowTransform(schema)
    transform(table)
    tags = table["tags"]
    null_elements = pc.sum(pc.is_null(pc.list_flatten(tags))).as_py()
    assert transform.nulls_replaced["user"] == table["user"].null_count > 0
    assert transform.nulls_replaced["city"] == table["city"].null_count > 0
    assert transform.nulls_replaced["tags"] == tags.null_count + null_elements > tags.null_count
    assert transform.nulls_replaced["gain"] == table["gain"].null_count > 0
    assert transform.nulls_replaced["item_id"] == transform.nulls_replaced["hours"] == 0


def test_python_rows_with_unseen_values_and_only_nulls(served: tuple[Path, dict, FittedFeatures]) -> None:
    _, schema, fitted = served
    rows = {
        "user": [None, "never-seen", fitted.vocab("user").values[0]],
        "city": [None, None, None],  # only nulls: the type the feature reads
        "tags": [None, [None, "tag-1"], []],
        "item_id": [0, 1, 199],
        "age": [17.0, 50.0, 1e9],
        "gain": [None, 0.0, 1e6],
        "hours": [0, 40, 500],
    }
    values, lengths, dense = transform_rows(schema, rows)
    n = 3
    per_feature = lengths.view(-1, n)
    assert per_feature[0].tolist() == [1, 1, 1] and per_feature[1].tolist() == [0, 0, 0]
    assert per_feature[2].tolist() == [0, 1, 0]  # null list empty; the null element dropped
    assert values[:3].tolist() == [0, 0, 1]  # null -> default_id 0, unseen -> oov 0, first entry -> 1
    assert dense[0, 1] == 0.0  # a null gain becomes its default, in transformed space
    boundaries = fitted.boundaries("age_bucket")
    age_ids = values[3 + 1 + 3 : 3 + 1 + 3 + n].tolist()  # after user, tags (1 id), item_id
    assert age_ids == [int((boundaries <= a).sum()) for a in (17.0, 50.0, 1e9)]


def test_bad_rows_are_named(served: tuple[Path, dict, FittedFeatures]) -> None:
    root, schema, _ = served
    table = pq.read_table(root / "eval" / "part-0.parquet").slice(0, 5)
    transform = RowTransform(schema)
    with pytest.raises(DataError, match=r"column 'hours' \(feature 'hours_bucket'\) is missing"):
        transform(table.drop_columns(["hours"]))
    rows = table.to_pydict()
    rows["item_id"][2] = None
    with pytest.raises(DataError, match=r"serving rows: column 'item_id', row 2: value None; expected"):
        transform(rows)
    rows = table.to_pydict()
    rows["item_id"] = [str(v) for v in rows["item_id"]]
    with pytest.raises(DataError, match=r"column 'item_id' has type string; expected an integer type"):
        transform(rows)
    rows = table.to_pydict()
    rows["item_id"][3] = 200
    with pytest.raises(DataError, match=r"column 'item_id', row 3: value 200; expected an id in \[0, 200\)"):
        transform(rows)
    rows = table.to_pydict()
    rows["age"] = rows["age"][:4]
    with pytest.raises(DataError, match=r"different numbers of rows"):
        transform(rows)
    without = {**schema, "features": None}
    with pytest.raises(ValueError, match="no 'features' entry"):
        RowTransform(without)


def test_cross_features_equal_the_loaders(served: tuple[Path, dict, FittedFeatures]) -> None:
    """DTN's hashed crosses of integer id fields, after the sparse features, as the loader makes them."""
    root, schema, fitted = served
    data = {**schema["data"]}
    data["tables"] = [*data["tables"], {"name": "hours_h", "num_embeddings": 50, "embedding_dim": 8}]
    data["tables"].append({"name": "codebook", "num_embeddings": 64, "embedding_dim": 8})
    data["sparse_features"] = [
        *data["sparse_features"],
        {"name": "hours", "table": "hours_h", "id_mode": "hash"},
    ]
    data["cross"] = {"table": "codebook", "fields": ["item_id", "hours"], "num_hashes": 2}
    crossed = {**schema, "data": data}
    path = str(root / "eval" / "part-0.parquet")
    table = pq.read_table(path)
    batch = _loader_batch(crossed, fitted, path, len(table))
    values, lengths, dense = transform_rows(crossed, table)
    assert batch.sparse.keys()[-2:] == ["item_id_x_hours_h0", "item_id_x_hours_h1"]
    assert torch.equal(values, batch.sparse.values())
    assert torch.equal(lengths, batch.sparse.lengths().to(torch.int32))
    assert torch.equal(dense, batch.dense)
