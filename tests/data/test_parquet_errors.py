"""Bad data fails with a DataError naming file, row group, column, row and value."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from towerrec.data.parquet import DataError, ParquetDataset, inspect_files, make_dataloader

ROWS, GROUP, BAD_ROW = 32, 16, 21  # the bad value sits in row group 1 of the second file


def with_value(table: pa.Table, column: str, value, type_: pa.DataType | None = None) -> pa.Table:
    values = table.column(column).to_pylist()
    values[BAD_ROW] = value
    array = pa.array(values, type_ or table.schema.field(column).type)
    return table.set_column(table.schema.get_field_index(column), column, array)


def write_pair(tmp_path, table_fn, bad: pa.Table) -> list[str]:
    good = tmp_path / "a-good.parquet"
    pq.write_table(table_fn(0, ROWS), good, row_group_size=GROUP)
    path = tmp_path / "b-bad.parquet"
    pq.write_table(bad, path, row_group_size=GROUP)
    return [str(good), str(path)]


VALUE_CASES = {
    "null id": ("user_id", None, None, ["value None", "non-null integer id"]),
    "id out of range": ("user_id", 50, None, ["value 50", "table 'user'", "num_embeddings=50"]),
    "negative id": ("user_id", -3, None, ["value -3", "[0, 50)"]),
    "null list": ("history", None, None, ["value None", "null list"]),
    "null list element": ("history", [4, None], None, ["value [4, None] (element 1 is null)"]),
    "list id out of range": ("history", [4, 100], None, ["value 100 (element 1 of the row's list)"]),
    "label 2": ("click", 2, None, ["value 2", "exactly 0 or 1"]),
    "label null": ("conversion", None, None, ["value None", "exactly 0 or 1"]),
    "label 0.5": ("conversion", 0.5, pa.float64(), ["value 0.5", "exactly 0 or 1"]),
    "dense null": ("price", None, None, ["value None", "non-null number"]),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_value(tmp_path, table, data_config, case):
    column, value, type_, expected = VALUE_CASES[case]
    files = write_pair(tmp_path, table, with_value(table(ROWS, ROWS), column, value, type_))
    dataset = ParquetDataset(files, data_config(), batch_size=8)
    with pytest.raises(DataError) as info:
        list(dataset)
    message = str(info.value)
    where = f"{files[1]}: row group 1, column {column!r}, row {BAD_ROW}"
    assert where in message, message
    for part in expected:
        assert part in message, message


def test_error_crosses_worker_processes(tmp_path, table, data_config):
    files = write_pair(tmp_path, table, with_value(table(ROWS, ROWS), "click", 2))
    with pytest.raises(DataError, match=r"b-bad.parquet: row group 1, column 'click', row 21"):
        list(make_dataloader(ParquetDataset(files, data_config(), batch_size=8), num_workers=1))


def test_rank_without_the_bad_row_reads_on(tmp_path, table, data_config):
    files = write_pair(tmp_path, table, with_value(table(ROWS, ROWS), "click", 2))
    assert len(list(ParquetDataset(files, data_config(), 8, rank=0, world_size=2))) == 4
    with pytest.raises(DataError):
        list(ParquetDataset(files, data_config(), 8, rank=1, world_size=2))


def retyped(table: pa.Table, column: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, array)


SCHEMA_CASES = {
    "missing column": (lambda t: t.drop_columns(["age"]), ["'age'", "missing", "float or integer"]),
    "float id": (
        lambda t: retyped(t, "user_id", t.column("user_id").cast(pa.float64())),
        ["'user_id'", "type double", "integer type"],
    ),
    "multi-hot not a list": (
        lambda t: retyped(t, "history", t.column("row_id")),
        ["'history'", "type int64", "list<integer>"],
    ),
    "list of strings": (
        lambda t: retyped(t, "history", pa.array([["a"]] * t.num_rows)),
        ["'history'", "list<element: string>", "list<integer>"],
    ),
    "string dense": (
        lambda t: retyped(t, "price", t.column("price").cast(pa.string())),
        ["'price'", "type string", "float or integer"],
    ),
    "string label": (
        lambda t: retyped(t, "click", t.column("click").cast(pa.string())),
        ["'click'", "type string", "integer, bool or float"],
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_bad_schema_found_from_footer(tmp_path, table, data_config, case):
    change, expected = SCHEMA_CASES[case]
    files = write_pair(tmp_path, table, change(table(ROWS, ROWS)))
    with pytest.raises(DataError) as info:
        ParquetDataset(files, data_config(), batch_size=8)  # at construction, before any read
    message = str(info.value)
    assert message.startswith(f"{files[1]}: column "), message
    for part in expected:
        assert part in message, message


def test_not_parquet_and_no_rows(tmp_path, table, data_config):
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        inspect_files([str(junk)], data_config())
    empty = tmp_path / "empty.parquet"
    pq.write_table(table(0, 0), empty)
    assert inspect_files([str(empty)], data_config())[0].row_groups in ((), (0,))
    with pytest.raises(DataError, match="no rows"):
        ParquetDataset([str(empty)], data_config(), batch_size=8)
