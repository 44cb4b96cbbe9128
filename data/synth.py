"""Synthetic multi-task ranking logs of any size, streamed to Parquet in bounded memory.

Example::

    summary = write_synthetic("runs/demo-data", rows=200_000, seed=0)
    summary.config_path       # runs/demo-data/config.yaml, a complete experiment config
    summary.train_files[:2]   # [".../train/part-00000.parquet", ".../train/part-00001.parquet"]

Schema (one row = one impression):

* single-hot ids: ``user_id`` (Zipf over 100k), ``item_id`` (Zipf over 50k), ``item_category``
  (200, a fixed function of the item), ``user_city`` (1000, a fixed function of the user),
  ``device`` (10); multi-hot ``user_history``: 0..20 items, Zipf over the item vocabulary, read
  through the same ``item`` table as ``item_id``.
* dense float32, roughly N(0, 1): ``price``, ``user_age``, ``item_ctr``, ``hour_sin``.
* labels int8: ``click`` (~20 %) and ``conversion`` (~20 % of clicks; always 0 without a click).
* with ``visitors=V`` > 0 also ``visitor_id``: raw 64-bit ids spread over the whole int64 range
  (the splitmix64 image of a Zipf draw over V visitors, as a hashed user key would be), read with
  ``id_mode: hash`` through a ``visitor`` table of V rows: the large table of the scale benchmark.
  Its effect moves the click logit (std 0.5), so the table has something to learn.

Hidden model: per-id effects are Gaussians drawn from a hash of (table, id, seed), so no table is
stored and any chunk can be generated alone. A shared signal ``s`` (user, item and history effects,
age, item ctr) feeds both tasks; clicks also depend strongly on the category and the hour,
conversions on the city and the price. Each task thus has features the other ignores.

Determinism: chunk k of file f of a split draws from ``default_rng([seed, split, f, k])``; the same
seed gives the same bytes. One row group is generated and written at a time, so memory does not
grow with ``rows`` (nor with ``visitors``: no table is stored).
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from towerrec.data.config import ready_training_section
from towerrec.data.hashing import mix64, unit_uniform

VOCAB = {"user": 100_000, "item": 50_000, "category": 200, "city": 1_000, "device": 10}
SINGLE_HOT = {  # column -> table
    "user_id": "user",
    "item_id": "item",
    "item_category": "category",
    "user_city": "city",
    "device": "device",
}
MULTI_HOT = {"user_history": "item"}
DENSE = ["price", "user_age", "item_ctr", "hour_sin"]
LABELS = ["click", "conversion"]
VISITOR_COLUMN, VISITOR_TABLE = "visitor_id", "visitor"
MAX_HISTORY = 20
SPLITS = ("train", "eval")

# Logit offsets calibrated (seed 0, 655k rows) to a ~20 % click rate and ~20 % conversion|click.
_CLICK_BIAS = -1.76
_CONVERSION_BIAS = -2.29


def schema(visitors: bool = False) -> pa.Schema:
    """The files' schema; ``visitors``: with the ``visitor_id`` column after the single-hot ids."""
    ids = list(SINGLE_HOT) + ([VISITOR_COLUMN] if visitors else [])
    return pa.schema(
        [pa.field(c, pa.int64(), nullable=False) for c in ids]
        + [
            pa.field(c, pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False)
            for c in MULTI_HOT
        ]
        + [pa.field(c, pa.float32(), nullable=False) for c in DENSE]
        + [pa.field(c, pa.int8(), nullable=False) for c in LABELS]
    )


@dataclass
class SynthSummary:
    """Where the data went and its label counts (``positives[split][label]``)."""

    out_dir: str
    config_path: str
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    positives: dict[str, dict[str, int]] = field(default_factory=dict)

    def rate(self, split: str, label: str) -> float:
        return self.positives[split][label] / max(self.rows[split], 1)


def synthetic_config(out_dir: str, run_dir: str = "runs/synth", visitors: int = 0) -> dict[str, Any]:
    """The experiment config (``trainer.config`` format) for data written to ``out_dir``;
    ``visitors`` > 0 adds the ``visitor`` table of that many rows (``id_mode: hash``)."""
    sizes = {**VOCAB, **({VISITOR_TABLE: visitors} if visitors else {})}
    single_hot = {**SINGLE_HOT, **({VISITOR_COLUMN: VISITOR_TABLE} if visitors else {})}
    return {
        "run_dir": run_dir,
        "data": {
            "train": os.path.join(out_dir, "train", "*.parquet"),
            "eval": os.path.join(out_dir, "eval", "*.parquet"),
            "tables": [
                {"name": name, "num_embeddings": size, "embedding_dim": 16, "pooling": "sum"}
                for name, size in sizes.items()
            ],
            "sparse_features": [
                {"name": column, "table": table, "id_mode": "hash" if column == VISITOR_COLUMN else "check"}
                for column, table in single_hot.items()
            ]
            + [
                {"name": column, "table": table, "multi_hot": True, "id_mode": "check"}
                for column, table in MULTI_HOT.items()
            ],
            "dense_features": list(DENSE),
            "tasks": [
                {"name": "click", "label": "click"},
                {"name": "conversion", "label": "conversion", "sample_space": "click"},
            ],
        },
        "model": {
            "type": "ple",
            "num_levels": 2,
            "experts_per_task": 1,
            "shared_experts": 1,
            "expert_hidden": [64],
            "tower_hidden": [64, 32],
        },
        "training": ready_training_section(),
    }


def _salt(name: str, seed: int) -> np.uint64:
    key = (zlib.crc32(name.encode()) << 32) ^ (seed % 2**32)
    return mix64(np.array([key], dtype=np.uint64))[0]


def effect(name: str, ids: np.ndarray, seed: int) -> np.ndarray:
    """A fixed N(0, 1) value per (name, id, seed), by Box-Muller on two hashes; float64."""
    key = mix64(ids.astype(np.int64).view(np.uint64) ^ _salt(name, seed))
    u1, u2 = unit_uniform(key), unit_uniform(key ^ np.uint64(0x5851F42D4C957F2D))
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def _attribute(name: str, ids: np.ndarray, seed: int) -> np.ndarray:
    """A fixed uniform [0, 1) value per (name, id, seed)."""
    return unit_uniform(ids.astype(np.int64).view(np.uint64) ^ _salt(name, seed))


def _zipf_quantile(u: np.ndarray, n: int, a: float) -> np.ndarray:
    """Inverse CDF of a continuous power law ``x^-a`` on ``[1, n+1)``, floored to ids ``0..n-1``."""
    top = (n + 1) ** (1.0 - a)
    x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - a))
    return np.minimum(x.astype(np.int64) - 1, n - 1)


def visitor_ids(u: np.ndarray, visitors: int, seed: int) -> np.ndarray:
    """Raw int64 visitor ids for uniforms ``u``: a Zipf draw over ``visitors`` visitors mapped by
    splitmix64 (a bijection) onto the whole int64 range, negative ids included."""
    index = _zipf_quantile(u, visitors, 0.85)
    return mix64(index.view(np.uint64) ^ _salt(VISITOR_COLUMN, seed)).view(np.int64)


def _chunk(rng: np.random.Generator, n: int, seed: int, visitors: int = 0) -> pa.Table:
    """``n`` rows of the schema; every random draw comes from ``rng``."""
    user = _zipf_quantile(rng.random(n), VOCAB["user"], 0.85)
    item = _zipf_quantile(rng.random(n), VOCAB["item"], 0.95)
    # Category and city are attributes of the item and user: hashed, Zipf-shaped.
    category = _zipf_quantile(_attribute("item_category", item, seed), VOCAB["category"], 0.8)
    city = _zipf_quantile(_attribute("user_city", user, seed), VOCAB["city"], 0.9)
    device = _zipf_quantile(rng.random(n), VOCAB["device"], 1.5)
    lengths = rng.integers(0, MAX_HISTORY + 1, n)
    history = _zipf_quantile(rng.random(int(lengths.sum())), VOCAB["item"], 0.95)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)

    item_effect = effect("item", item, seed)
    user_effect = effect("user", user, seed)
    owner = np.repeat(np.arange(n), lengths)
    taste = np.bincount(owner, effect("item", history, seed), minlength=n) / np.maximum(lengths, 1)
    price = 0.8 * effect("item_price", item, seed) + 0.6 * rng.standard_normal(n)
    age = 0.9 * effect("user_age", user, seed) + 0.45 * rng.standard_normal(n)
    ctr = 0.7 * item_effect + 0.7 * rng.standard_normal(n)
    hour_sin = np.sqrt(2.0) * np.sin(2.0 * np.pi * rng.integers(0, 24, n) / 24.0)

    shared = 0.7 * user_effect + 0.7 * item_effect + 1.5 * taste + 0.3 * age + 0.2 * ctr
    click_logit = _CLICK_BIAS + shared + 0.6 * effect("category", category, seed) + 0.4 * hour_sin
    extra: dict[str, np.ndarray] = {}
    if visitors:  # drawn only then: the data without visitors keeps its bytes
        extra[VISITOR_COLUMN] = visitor_ids(rng.random(n), visitors, seed)
        click_logit = click_logit + 0.5 * effect(VISITOR_TABLE, extra[VISITOR_COLUMN], seed)
    conversion_logit = _CONVERSION_BIAS + 0.6 * shared + 1.0 * effect("city", city, seed) - 0.6 * price
    click = rng.random(n) < _sigmoid(click_logit)
    conversion = click & (rng.random(n) < _sigmoid(conversion_logit))

    columns = {
        "user_id": user,
        "item_id": item,
        "item_category": category,
        "user_city": city,
        "device": device,
        **extra,
        "user_history": pa.ListArray.from_arrays(offsets, history),
        "price": price.astype(np.float32),
        "user_age": age.astype(np.float32),
        "item_ctr": ctr.astype(np.float32),
        "hour_sin": hour_sin.astype(np.float32),
        "click": click.astype(np.int8),
        "conversion": conversion.astype(np.int8),
    }
    return pa.Table.from_pydict(columns, schema=schema(bool(visitors)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _file_sizes(rows: int, files: int) -> list[int]:
    """Deliberately uneven: file i gets a share proportional to ``i + 1``."""
    bounds = [rows * k * (k + 1) // (files * (files + 1)) for k in range(files + 1)]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def write_synthetic(
    out_dir: str,
    rows: int,
    files: int = 4,
    seed: int = 0,
    eval_fraction: float = 0.2,
    row_group_rows: int = 16384,
    visitors: int = 0,
) -> SynthSummary:
    """Write ``out_dir/{train,eval}/part-NNNNN.parquet`` and ``out_dir/config.yaml``.

    ``rows`` are split ``1 - eval_fraction`` / ``eval_fraction`` between train and eval, each over
    ``files`` files of uneven sizes, in row groups of ``row_group_rows``. ``visitors`` > 0 adds
    the ``visitor_id`` column and a ``visitor`` table of that many rows (module docstring).
    """
    if rows <= 0 or files <= 0 or row_group_rows <= 0:
        raise ValueError(f"rows, files, row_group_rows must be positive: {rows}, {files}, {row_group_rows}")
    if visitors < 0:
        raise ValueError(f"visitors must be >= 0 (0: no visitor_id column), got {visitors}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    eval_rows = round(rows * eval_fraction)
    split_rows = {"train": rows - eval_rows, "eval": eval_rows}
    paths: dict[str, list[str]] = {}
    positives: dict[str, dict[str, int]] = {}
    for s, split in enumerate(SPLITS):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        positives[split] = {label: 0 for label in LABELS}
        paths[split] = []
        for f, size in enumerate(_file_sizes(split_rows[split], files)):
            path = os.path.join(out_dir, split, f"part-{f:05d}.parquet")
            with pq.ParquetWriter(path, schema(bool(visitors))) as writer:
                for k in range(math.ceil(size / row_group_rows)):
                    n = min(row_group_rows, size - k * row_group_rows)
                    table = _chunk(np.random.default_rng([seed % 2**64, s, f, k]), n, seed, visitors)
                    writer.write_table(table, row_group_size=n)
                    for label in LABELS:
                        positives[split][label] += int(np.asarray(table.column(label)).sum(dtype=np.int64))
            paths[split].append(path)
    config_path = os.path.join(out_dir, "config.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(synthetic_config(out_dir, visitors=visitors), f, sort_keys=False)
    return SynthSummary(out_dir, config_path, paths["train"], paths["eval"], split_rows, positives)
