"""A minimal experiment config for tests that check how a model section parses.

Example::

    config = load_config(write_config(tmp_path, {"type": "mmoe", "num_experts": 3}))
"""

from __future__ import annotations

from pathlib import Path

import yaml

MINIMAL_EXPERIMENT = {
    "run_dir": "runs/t",
    "data": {
        "train": "train/*.parquet",
        "eval": ["eval"],
        "tables": [{"name": "user", "num_embeddings": 100, "embedding_dim": 8}],
        "sparse_features": [{"name": "user_id", "table": "user"}],
        "dense_features": ["price"],
        "tasks": [{"name": "click", "label": "click"}, {"name": "conversion", "label": "conversion"}],
    },
}


def write_config(tmp_path: Path, model: dict, data: dict | None = None) -> Path:
    """``MINIMAL_EXPERIMENT`` with ``model`` as its model section (and the keys of ``data`` replacing
    those of its data section), written to ``tmp_path/c.yaml``."""
    path = tmp_path / "c.yaml"
    merged = {**MINIMAL_EXPERIMENT["data"], **(data or {})}
    path.write_text(yaml.safe_dump({**MINIMAL_EXPERIMENT, "data": merged, "model": model}))
    return path
