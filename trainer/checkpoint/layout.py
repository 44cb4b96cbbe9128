"""The folder layout of a run's checkpoints: step directories, ``latest``, publishing a save
atomically, retention and the leftovers of interrupted saves.

Example::

    root = checkpoint_root("runs/demo")                 # runs/demo/checkpoints
    publish(root / "step-00000040.tmp", keep_last=2)    # rename, point latest to it, prune
    find_checkpoint("runs/demo")                        # runs/demo/checkpoints/step-00000040
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from towerrec.data.files import atomic_output, fsync_dir

logger = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model; or a save failed.
    The message names the checkpoint and lists every difference found."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a directory named ``step-XXXXXXXX``; None for any other name."""
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def complete_steps(run_dir: str | Path) -> list[int]:
    """Steps whose checkpoint directory was renamed into place (has meta.json), ascending."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    steps = [step_of(p.name) for p in root.iterdir() if p.is_dir() and (p / META).is_file()]
    return sorted(s for s in steps if s is not None)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory ``checkpoints/latest`` names, or None when there is no ``latest``."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    return checkpoint_root(run_dir) / pointer.read_text().strip()


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The directory of checkpoint ``step`` (None: the latest complete one).

    Raises:
        CheckpointError: naming what is missing and the steps that exist.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints ({root} does not exist)")
    if step is None:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(
                f"{run_dir}: no complete checkpoint ({root / LATEST} does not exist); "
                f"complete checkpoint steps: {complete_steps(run_dir)}"
            )
        if not latest.is_dir():
            raise CheckpointError(f"{root / LATEST} names {latest.name}, which does not exist")
        return latest
    directory = root / step_dir_name(step)
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint {directory} does not exist; complete checkpoint steps: {complete_steps(run_dir)}"
        )
    return directory


def publish(tmp: Path, keep_last: int) -> Path:
    """Make the complete save in ``step-XXXXXXXX.tmp`` the latest checkpoint, then delete all
    but the newest ``keep_last``. Returns the checkpoint directory.

    Renames ``tmp``, fsyncs the folder, then replaces ``latest``: a crash before the last
    rename leaves ``latest`` and its checkpoint as they were.
    """
    root, final = tmp.parent, tmp.with_name(tmp.name.removesuffix(TMP_SUFFIX))
    if final.exists():  # a leftover that latest never named: replaced only now
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    with atomic_output(root / LATEST) as pointer:
        pointer.write_text(final.name + "\n")
    for step in complete_steps(root.parent)[:-keep_last]:
        shutil.rmtree(root / step_dir_name(step))
    return final


def remove_leftovers(root: Path, latest_step: int | None) -> None:
    """Delete interrupted saves in ``root``: ``.tmp`` directories, and complete directories newer
    than ``latest`` (renamed, never published; the resumed run writes them again)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.is_file() and path.name.startswith(f".{LATEST}.") and path.name.endswith(TMP_SUFFIX):
            path.unlink()  # atomic_output's temporary file of a pointer write cut short
            continue
        step = step_of(path.name.removesuffix(TMP_SUFFIX).removesuffix(".old"))
        if step is None or not path.is_dir():
            continue
        if path.name != step_dir_name(step) or latest_step is None or step > latest_step:
            logger.warning("removing %s, left by an interrupted save", path)
            shutil.rmtree(path)
