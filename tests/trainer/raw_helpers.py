"""Small raw Parquet data (strings, lists of strings, nulls, heavy-tailed numbers) and a config
that reads it through every transform: string vocab, hash of strings and list<string>, quantile
and explicit buckets, log1p / clip / standardize with nulls. For the run-lifecycle tests of
fitted features (train, resume, evaluate, export, predict, serving)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

USERS = np.array([f"u{i:02d}" for i in range(64)], dtype=object)
CITIES = np.array(["Paris", "Zürich", "Lyon", "Basel", "", "São Paulo", "Oslo", "Köln"], dtype=object)
TAGS = np.array([f"tag-{i}" for i in range(30)], dtype=object)


def raw_table(n: int, seed: int, large_city: bool = False) -> pa.Table:
    """``n`` rows; ``large_city``: the city column as large_string (type drift between files)."""
    rng = np.random.default_rng(seed)
    user_index = np.minimum(rng.zipf(1.4, n) - 1, len(USERS) - 1)
    user = pa.array(USERS[user_index], pa.string(), mask=rng.random(n) < 0.05)
    city = pa.array(CITIES[rng.integers(0, len(CITIES), n)], mask=rng.random(n) < 0.05)
    city = city.cast(pa.large_string() if large_city else pa.string())
    sizes = rng.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    elements = pa.array(TAGS[rng.integers(0, len(TAGS), offsets[-1])], mask=rng.random(offsets[-1]) < 0.05)
    tags = pa.ListArray.from_arrays(pa.array(offsets), elements, mask=pa.array(rng.random(n) < 0.04))
    age = np.round(rng.uniform(17, 90, n))
    gain = np.where(rng.random(n) < 0.8, 0.0, rng.lognormal(7.0, 1.5, n))
    gain_nulls = rng.random(n) < 0.1
    hours = rng.integers(1, 100, n)
    logit = -0.5 + 1.5 * (user_index < 4) + 0.8 * (gain > 0) + 0.02 * (hours - 40)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    conversion = click * (rng.random(n) < 0.2 + 0.4 * (gain > 0))
    return pa.table(
        {
            "user": user,
            "city": city,
            "tags": tags,
            "item_id": pa.array(rng.integers(0, 200, n)),
            "age": pa.array(age),
            "gain": pa.array(gain, mask=gain_nulls),
            "hours": pa.array(hours),
            "click": pa.array(click),
            "conversion": pa.array(conversion.astype(np.int64)),
        }
    )


def raw_config(root: Path) -> dict[str, Any]:
    """The experiment config (a dict) reading ``root/train`` and ``root/eval``."""
    table = lambda name, rows: {"name": name, "num_embeddings": rows, "embedding_dim": 8}  # noqa: E731
    return {
        "run_dir": str(root / "run"),
        "data": {
            "train": str(root / "train" / "*.parquet"),
            "eval": str(root / "eval" / "*.parquet"),
            "tables": [
                table("user", 40),  # the fitted vocabulary is longer: the rarest values go to id 0
                table("city", 97),
                table("tag", 101),
                table("item", 200),
                table("age_b", 9),
                table("hours_b", 6),
            ],
            "sparse_features": [
                {"name": "user", "table": "user", "id_mode": "vocab", "min_count": 2, "on_null": "default"},
                {"name": "city", "table": "city", "id_mode": "hash", "on_null": "empty"},
                {"name": "tags", "table": "tag", "multi_hot": True, "id_mode": "hash", "on_null": "empty"},
                {"name": "item_id", "table": "item"},
                {
                    "name": "age_bucket",
                    "column": "age",
                    "table": "age_b",
                    "id_mode": "bucketize",
                    "quantiles": 8,
                },
                {
                    "name": "hours_bucket",
                    "column": "hours",
                    "table": "hours_b",
                    "id_mode": "bucketize",
                    "boundaries": [20.0, 35.0, 40.0, 45.0, 60.0],
                },
            ],
            "dense_features": [
                {"name": "age_std", "column": "age", "transforms": ["standardize"]},
                {
                    "name": "gain",
                    "transforms": ["log1p", "standardize"],
                    "on_null": "default",
                    "default": 0.0,
                },
                {"name": "hours", "transforms": ["clip", "standardize"], "clip": [0.0, 80.0]},
            ],
            "tasks": [
                {"name": "click", "label": "click"},
                {"name": "conversion", "label": "conversion", "sample_space": "click"},
            ],
        },
        "model": {"type": "mmoe", "num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
        "training": {
            "batch_size": 128,
            "epochs": 1,
            "seed": 0,
            "num_workers": 0,
            "log_interval": 10,
            "dense_optimizer": {"type": "adam", "lr": 0.01},
        },
    }


def write_raw_data(root: Path) -> Path:
    """Two training files (1500 and 1200 rows; city string in one, large_string in the other), one
    evaluation file (600 rows), row groups of 500 rows, and ``root/config.yaml``."""
    for sub, parts in (("train", [(1500, 1, False), (1200, 2, True)]), ("eval", [(600, 3, False)])):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i, (n, seed, large) in enumerate(parts):
            pq.write_table(raw_table(n, seed, large), root / sub / f"part-{i}.parquet", row_group_size=500)
    (root / "config.yaml").write_text(yaml.safe_dump(raw_config(root), sort_keys=False))
    return root / "config.yaml"
