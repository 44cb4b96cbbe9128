import sys
from pathlib import Path

import pytest

# Tests import the shared helpers in tests/ (dist_utils) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small real synthetic data set (16,000 train / 4,000 eval rows, 3 uneven files each)
    with its ready config at ``synth_data / "config.yaml"``."""
    from towerrec.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), rows=20_000, files=3, seed=0, row_group_rows=2048)
    return out
