"""The checkpoint folder on its own: publishing a save moves ``latest`` (and ``best``) and prunes
old steps but the best; the leftovers of interrupted saves go, complete published checkpoints
stay; saved-run commands read ``best``, else ``latest``, unless given a step."""

from __future__ import annotations

from pathlib import Path

import pytest
from towerrec.trainer.checkpoint import (
    CheckpointError,
    best_checkpoint,
    choose_checkpoint,
    complete_steps,
    find_checkpoint,
    latest_checkpoint,
)
from towerrec.trainer.checkpoint.layout import META, mark_best, publish, remove_leftovers


def _save(root: Path, step: int, keep_last: int = 2, best: bool = False) -> Path:
    tmp = root / f"step-{step:08d}.tmp"
    tmp.mkdir(parents=True)
    (tmp / META).write_text("{}")
    return publish(tmp, keep_last, best=best)


def test_publish_moves_latest_and_keeps_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        final = _save(root, step)
        assert latest_checkpoint(tmp_path) == final == root / f"step-{step:08d}"
    assert complete_steps(tmp_path) == [6, 9]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000009"]
    assert find_checkpoint(tmp_path, 6) == root / "step-00000006"


def test_publish_replaces_a_directory_latest_never_named(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 3)
    stale = root / "step-00000006"
    stale.mkdir()
    (stale / "stale").write_text("")
    _save(root, 6)
    assert not (stale / "stale").exists() and (stale / META).is_file()
    assert latest_checkpoint(tmp_path) == stale


def test_leftovers_of_interrupted_saves_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 3)
    (root / "step-00000006.tmp").mkdir()  # killed while writing
    (root / "step-00000006").mkdir()  # renamed, killed before latest moved
    (root / ".latest.abc.tmp").write_text("step-00000006")  # killed while moving latest
    (root / "notes").mkdir()  # not ours: kept
    remove_leftovers(root, 3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "notes", "step-00000003"]
    remove_leftovers(root, None)  # nothing published: every step directory is a leftover
    assert sorted(p.name for p in root.iterdir()) == ["latest", "notes"]


def test_retention_keeps_the_best_in_addition_to_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 2, keep_last=1, best=True)
    assert best_checkpoint(tmp_path) == latest_checkpoint(tmp_path) == root / "step-00000002"
    for step in (4, 6):
        _save(root, step, keep_last=1)
    assert complete_steps(tmp_path) == [2, 6]  # step 4 pruned, the best kept
    assert (root / "best").read_text() == "step-00000002\n"
    _save(root, 8, keep_last=1, best=True)  # a new best: the old one is an ordinary step now
    _save(root, 10, keep_last=1)
    assert complete_steps(tmp_path) == [8, 10] and best_checkpoint(tmp_path) == root / "step-00000008"


def test_commands_read_best_else_latest_unless_a_step_is_given(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 3)
    assert choose_checkpoint(tmp_path, None) == (root / "step-00000003", "latest")
    _save(root, 6, best=True)
    _save(root, 9)
    assert choose_checkpoint(tmp_path, None) == (root / "step-00000006", "best")
    assert choose_checkpoint(tmp_path, 9) == (root / "step-00000009", "--step")
    mark_best(tmp_path, 9)  # what a resumed run does when a kill came between latest and best
    assert choose_checkpoint(tmp_path, None) == (root / "step-00000009", "best")
    (root / "best").write_text("step-00000042\n")
    with pytest.raises(CheckpointError, match="best names step-00000042, which does not exist"):
        choose_checkpoint(tmp_path, None)


def test_an_interrupted_best_pointer_write_is_a_leftover(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 3, best=True)
    (root / ".best.abc.tmp").write_text("step-00000006")
    remove_leftovers(root, 3)
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step-00000003"]
