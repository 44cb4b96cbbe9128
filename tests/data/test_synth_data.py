"""Synthetic data: reproducible bytes, a loadable config, intended label rates, flat memory."""

from __future__ import annotations

import filecmp
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from towerrec.data.config import resolve_paths
from towerrec.data.hashing import hash_ids
from towerrec.data.parquet import ParquetDataset
from towerrec.data.synth import synthetic_config, write_synthetic


def parquet_files(out_dir: str) -> list[str]:
    splits = ("train", "eval")
    return [os.path.join(s, f) for s in splits for f in sorted(os.listdir(os.path.join(out_dir, s)))]


def test_same_seed_same_bytes_uneven_files(tmp_path):
    kwargs = dict(rows=6000, files=3, row_group_rows=700)
    a = write_synthetic(str(tmp_path / "a"), seed=1, **kwargs)
    write_synthetic(str(tmp_path / "b"), seed=1, **kwargs)
    write_synthetic(str(tmp_path / "c"), seed=2, **kwargs)
    names = parquet_files(a.out_dir)
    assert names == [f"{s}/part-{i:05d}.parquet" for s in ("train", "eval") for i in range(3)]
    assert parquet_files(str(tmp_path / "b")) == names
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert not mismatch and not errors
    _, mismatch, _ = filecmp.cmpfiles(tmp_path / "a", tmp_path / "c", names, shallow=False)
    assert mismatch == names

    metas = [pq.read_metadata(f) for f in a.train_files]
    assert [m.num_rows for m in metas] == [800, 1600, 2400]  # uneven on purpose
    assert [m.num_row_groups for m in metas] == [2, 3, 4]
    assert a.rows == {"train": 4800, "eval": 1200}
    assert sum(pq.read_metadata(f).num_rows for f in a.eval_files) == 1200


def test_config_is_complete_and_readable(tmp_path):
    out = str(tmp_path / "synth")
    summary = write_synthetic(out, rows=3000, files=2, row_group_rows=1000)
    with open(summary.config_path) as f:
        raw = yaml.safe_load(f)
    assert raw == synthetic_config(out)
    assert raw["data"]["train"] == os.path.join(out, "train", "*.parquet")
    from towerrec.trainer.config import load_config  # the whole experiment schema, models included

    config = load_config(summary.config_path)
    assert [t.name for t in config.data.tasks] == ["click", "conversion"]
    assert config.data.tasks[1].sample_space == "click"
    schema = pq.read_schema(summary.train_files[0])
    assert schema.field("user_history").type.value_type == pa.int64()
    assert schema.field("click").type == pa.int8() and schema.field("price").type == pa.float32()
    # Every id is inside its table: the checking reader goes through both splits.
    for pattern in (config.data.train, config.data.eval):
        dataset = ParquetDataset(resolve_paths(pattern, "data"), config.data, batch_size=512)
        assert sum(b.real_rows for b in dataset) == dataset.num_rows


def test_label_rates_and_conversion_implies_click(tmp_path):
    summary = write_synthetic(str(tmp_path), rows=50_000, files=2, seed=0)
    table = pa.concat_tables(pq.read_table(f, columns=["click", "conversion"]) for f in summary.train_files)
    click = table.column("click").to_numpy().astype(bool)
    conversion = table.column("conversion").to_numpy().astype(bool)
    assert not (conversion & ~click).any()
    assert 0.17 < click.mean() < 0.23
    assert 0.16 < conversion[click].mean() < 0.24
    assert summary.positives["train"] == {"click": int(click.sum()), "conversion": int(conversion.sum())}
    assert 0.17 < summary.rate("eval", "click") < 0.23


def test_memory_does_not_grow_with_rows(tmp_path, memory_probe):
    peaks = []
    for rows in (20_000, 40_000):
        with memory_probe() as peak:
            write_synthetic(str(tmp_path / str(rows)), rows=rows, files=1, row_group_rows=1_000)
        peaks.append(peak)
    data_bytes = pq.read_table(tmp_path / "40000" / "train" / "part-00000.parquet").nbytes
    chunk_bytes = data_bytes / 32  # 32k train rows in 1k-row groups
    for peak in peaks:
        # One chunk's columns plus its float64 temporaries (hashes and effects of ~10 history
        # ids per row): measured ~6 chunks' worth; 12 chunks is 3/8 of the larger data set.
        assert peak["python"] < 12 * chunk_bytes, (peak, chunk_bytes)
        assert peak["arrow"] < 4 * chunk_bytes, (peak, chunk_bytes)
    assert peaks[1]["python"] < 1.2 * peaks[0]["python"] + 16384
    assert peaks[1]["arrow"] < 1.2 * peaks[0]["arrow"] + 16384


def test_visitor_ids_span_int64_and_load_through_a_hashed_table(tmp_path):
    plain = write_synthetic(str(tmp_path / "plain"), rows=2000, files=1)
    assert "visitor_id" not in pq.read_schema(plain.train_files[0]).names  # opt-in only
    visitors = 10**9  # never allocated: the loader only hashes into it
    summary = write_synthetic(str(tmp_path / "v"), rows=20_000, files=2, eval_fraction=0.1, visitors=visitors)
    assert summary.rows == {"train": 18_000, "eval": 2_000}
    ids = pa.concat_tables(pq.read_table(f, columns=["visitor_id"]) for f in summary.train_files)
    raw = ids.column("visitor_id").to_numpy()
    # splitmix64 images of visitor numbers: spread over the whole int64 range, signs included.
    assert raw.min() < -(2**62) and raw.max() > 2**62
    assert 1_000 < len(np.unique(raw)) < len(raw)  # Zipf: repeated visitors, and many of them
    with open(summary.config_path) as f:
        raw_config = yaml.safe_load(f)
    assert raw_config == synthetic_config(summary.out_dir, visitors=visitors)
    table = next(t for t in raw_config["data"]["tables"] if t["name"] == "visitor")
    assert table["num_embeddings"] == visitors
    feature = next(f for f in raw_config["data"]["sparse_features"] if f["name"] == "visitor_id")
    assert feature == {"name": "visitor_id", "table": "visitor", "id_mode": "hash"}

    from towerrec.trainer.config import load_config

    data = load_config(summary.config_path).data
    dataset = ParquetDataset(summary.train_files, data, batch_size=4096)
    loaded = np.concatenate([b.sparse.to_dict()["visitor_id"].values().numpy() for b in dataset])
    np.testing.assert_array_equal(loaded, hash_ids(raw, visitors))  # every row, in file order
