"""atomic_output: the target is replaced whole on success and untouched on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from towerrec.data.files import atomic_output


def test_the_target_is_replaced_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "out" / "model.pt"  # the folder is created
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("first")
        assert not target.exists()  # readers never see a partial file
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]  # no temporary file left


def test_the_file_gets_the_usual_mode_not_mkstemps(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
