from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# A config that validates (load_config checks the schema, not that the data exists).
VALID_CONFIG = {
    "run_dir": "runs/t",
    "data": {
        "train": "train/*.parquet",
        "eval": "eval/*.parquet",
        "tables": [{"name": "user", "num_embeddings": 100, "embedding_dim": 8}],
        "sparse_features": [{"name": "user_id", "table": "user"}],
        "tasks": [{"name": "click", "label": "click"}],
    },
    "model": {"type": "ple"},
}


@pytest.fixture
def valid_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(VALID_CONFIG))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def script(name: str) -> Path:
    """A console script of this environment (towerrec, torchx), skipping if not installed."""
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} console script not installed in {BIN}")
    return path
