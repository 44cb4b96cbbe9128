"""The checkpoint folder on its own: publishing a save moves ``latest`` and prunes old steps;
the leftovers of interrupted saves go, complete published checkpoints stay."""

from __future__ import annotations

from pathlib import Path

from towerrec.trainer.checkpoint import complete_steps, find_checkpoint, latest_checkpoint
from towerrec.trainer.checkpoint.layout import META, publish, remove_leftovers


def _save(root: Path, step: int, keep_last: int = 2) -> Path:
    tmp = root / f"step-{step:08d}.tmp"
    tmp.mkdir(parents=True)
    (tmp / META).write_text("{}")
    return publish(tmp, keep_last)


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
