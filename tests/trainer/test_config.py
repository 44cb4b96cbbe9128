"""Config parsing: typed sections, dotted overrides, and one clear message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from towerrec.trainer.config import ConfigError, ExperimentConfig, apply_override, dump_config, load_config

BASE = {
    "run_dir": "runs/t",
    "data": {
        "train": "train/*.parquet",
        "eval": ["eval"],
        "tables": [
            {"name": "user", "num_embeddings": 100, "embedding_dim": 8},
            {"name": "item", "num_embeddings": 50, "embedding_dim": 8, "pooling": "mean"},
        ],
        "sparse_features": [
            {"name": "user_id", "table": "user"},
            {"name": "item_id", "table": "item"},
            {"name": "history", "table": "item", "multi_hot": True, "id_mode": "hash"},
        ],
        "dense_features": ["price"],
        "tasks": [
            {"name": "click", "label": "click"},
            {"name": "conversion", "label": "conversion", "sample_space": "click", "pos_weight": 2.0},
        ],
    },
    "model": {"type": "ple", "experts_per_task": [1, 2]},
    "training": {"dense_optimizer": {"lr": "1e-3"}},
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw).replace("'1e-3'", "1e-3"))
    return path


def test_parses_typed_sections_and_scientific_floats(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert isinstance(config, ExperimentConfig)
    assert config.data.train == ["train/*.parquet"]
    assert config.training.dense_optimizer.lr == pytest.approx(1e-3)
    assert config.data.table("item").pooling == "mean"
    assert config.data.columns == ["user_id", "item_id", "history", "price", "click", "conversion"]
    assert config.model.experts_per_task == [1, 2]


def test_overrides_reach_nested_keys_and_list_items(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, BASE),
        ["training.batch_size=4096", "data.tables.1.embedding_dim=4", "model.num_levels=1"],
    )
    assert config.training.batch_size == 4096
    assert config.data.table("item").embedding_dim == 4
    assert config.model.num_levels == 1


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_base_dir_rebases_relative_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), base_dir="/srv/exp")
    assert config.data.train == ["/srv/exp/train/*.parquet"]
    assert config.run_dir == "/srv/exp/runs/t"


def test_base_dir_rebases_a_relative_vocab_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    overrides = ["data.sparse_features.0.id_mode=vocab", "data.sparse_features.0.vocab_file=vocab/users.txt"]
    config = load_config(path, overrides, base_dir="/srv/exp")
    assert config.data.sparse_features[0].vocab_file == "/srv/exp/vocab/users.txt"
    assert load_config(path, overrides).data.sparse_features[0].vocab_file == "vocab/users.txt"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.batchsize=3", "training.batchsize: unknown key"),
        ("training.batch_size=abc", "training.batch_size: Input should be a valid integer"),
        ("training.batch_size=0", "training.batch_size: Input should be greater than 0"),
        ("model.type=transformer", "model: unknown type 'transformer'; allowed: 'ple'"),
        ("data.tables.0.pooling=max", "data.tables.0.pooling: Input should be 'sum' or 'mean'"),
        ("data.sparse_features.0.table=nope", "unknown table 'nope' for feature 'user_id'"),
        ("data.tasks.1.sample_space=conversion", "sample_space: 'conversion' must name another task"),
        ("model.experts_per_task=[1,2,3]", "model.experts_per_task: 3 counts given for 2 tasks"),
        (
            "sharding.constraints={ghost: {sharding_types: [table_wise]}}",
            "sharding.constraints.ghost: unknown table",
        ),
        ("training.sparse_optimizer.type=adam", "training.sparse_optimizer.type: Input should be"),
        ("training.nonfinite=ignore", "training.nonfinite: Input should be 'stop' or 'skip'"),
        ("training.nonfinite_max_skips=-1", "training.nonfinite_max_skips: Input should be greater than or"),
    ],
)
def test_each_mistake_names_its_key(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), [override])
    assert expected in str(err.value)
    assert str(tmp_path / "c.yaml") in str(err.value)


def test_unused_table_is_an_error(tmp_path: Path) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["data"]["tables"].append({"name": "orphan", "num_embeddings": 10, "embedding_dim": 4})
    with pytest.raises(ConfigError, match=r"table 'orphan' is not used by any sparse feature"):
        load_config(write(tmp_path, raw))


def test_missing_file_and_malformed_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "training.batch_size")


REPO = Path(__file__).resolve().parents[2]


def test_demo_config_is_what_data_synth_writes() -> None:
    from towerrec.data.synth import synthetic_config

    committed = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert committed == synthetic_config("runs/demo-data", run_dir="runs/demo")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(path)
