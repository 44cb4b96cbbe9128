"""The folder layout of a run's checkpoints: step directories, ``latest`` and ``best``,
publishing a save atomically, retention and the leftovers of interrupted saves.

Example::

    root = checkpoint_root("runs/demo")                 # runs/demo/checkpoints
    publish(root / "step-00000040.tmp", keep_last=2)    # rename, point latest to it, prune
    find_checkpoint("runs/demo")                        # runs/demo/checkpoints/step-00000040
    choose_checkpoint("runs/demo", None)                # best if there is one, else latest

``best`` (written when early stopping names a new best step) is a pointer file like ``latest``;
retention keeps its checkpoint in addition to the newest ``keep_last``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from towerrec.data.files import atomic_output, fsync_dir

logger = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"
META = "meta.json"
TMP_SUFFIX = ".tmp"
DAMAGED_SUFFIX = ".damaged"


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
    return _pointed(run_dir, LATEST)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory ``checkpoints/best`` names (early stopping's best step), or None."""
    return _pointed(run_dir, BEST)


def _pointed(run_dir: str | Path, pointer_name: str) -> Path | None:
    pointer = checkpoint_root(run_dir) / pointer_name
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


def choose_checkpoint(run_dir: str | Path, step: int | None) -> tuple[Path, str]:
    """The checkpoint a saved-run command reads, and why: ``step`` when given, else ``best`` when
    the run has one, else ``latest``.

    Example::

        path, why = choose_checkpoint("runs/demo", None)   # (.../step-00000040, "best")

    Raises:
        CheckpointError: as :func:`find_checkpoint`, or ``best`` names a missing directory.
    """
    if step is not None:
        return find_checkpoint(run_dir, step), "--step"
    best = best_checkpoint(run_dir)
    if best is None:
        return find_checkpoint(run_dir), LATEST
    if not best.is_dir():
        raise CheckpointError(f"{checkpoint_root(run_dir) / BEST} names {best.name}, which does not exist")
    return best, BEST


def describe_choice(step_dir: Path, why: str) -> str:
    """What a saved-run command tells the user about :func:`choose_checkpoint`'s answer."""
    because = {
        BEST: "checkpoints/best: early stopping's best evaluation; --step N reads another",
        LATEST: "checkpoints/latest: the run has no best checkpoint",
    }.get(why, why)
    return f"checkpoint {step_dir} ({because})"


def publish(tmp: Path, keep_last: int, best: bool = False) -> Path:
    """Make the complete save in ``step-XXXXXXXX.tmp`` the latest checkpoint (and with ``best``
    the best one too), then delete all but the newest ``keep_last`` and the best. Returns the
    checkpoint directory.

    Renames ``tmp``, fsyncs the folder, then replaces ``latest``, then ``best``: a crash before
    the rename of ``latest`` leaves both pointers and their checkpoints as they were; one
    between the two leaves ``best`` at the previous best, which still exists.
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
    for name in [LATEST, BEST] if best else [LATEST]:
        _point(root / name, final)
    kept = best_checkpoint(root.parent)
    for step in complete_steps(root.parent)[:-keep_last]:
        if kept is None or kept.name != step_dir_name(step):
            shutil.rmtree(root / step_dir_name(step))
    return final


def mark_best(run_dir: str | Path, step: int) -> None:
    """Point ``best`` to checkpoint ``step`` (a resumed run repairing a pointer write cut short)."""
    _point(checkpoint_root(run_dir) / BEST, find_checkpoint(run_dir, step))


def mark_latest(run_dir: str | Path, step: int) -> None:
    """Point ``latest`` to checkpoint ``step`` (a resume falling back from a damaged one)."""
    _point(checkpoint_root(run_dir) / LATEST, find_checkpoint(run_dir, step))


def set_aside(step_dir: Path) -> Path:
    """Rename a damaged checkpoint to ``step-XXXXXXXX.damaged`` (``.damaged.1``, ... if taken):
    kept for inspection, no longer seen by resume, retention or the leftover clean-up."""
    target, n = step_dir.with_name(step_dir.name + DAMAGED_SUFFIX), 0
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{DAMAGED_SUFFIX}.{n}")
    os.rename(step_dir, target)
    fsync_dir(step_dir.parent)
    return target


def _point(pointer: Path, step_dir: Path) -> None:
    with atomic_output(pointer) as tmp:
        tmp.write_text(step_dir.name + "\n")


def remove_leftovers(root: Path, latest_step: int | None) -> None:
    """Delete interrupted saves in ``root``: ``.tmp`` directories, and complete directories newer
    than ``latest`` (renamed, never published; the resumed run writes them again)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        pointer_tmp = path.name.startswith((f".{LATEST}.", f".{BEST}.")) and path.name.endswith(TMP_SUFFIX)
        if path.is_file() and pointer_tmp:
            path.unlink()  # atomic_output's temporary file of a pointer write cut short
            continue
        step = step_of(path.name.removesuffix(TMP_SUFFIX).removesuffix(".old"))
        if step is None or not path.is_dir():
            continue
        if path.name != step_dir_name(step) or latest_step is None or step > latest_step:
            logger.warning("removing %s, left by an interrupted save", path)
            shutil.rmtree(path)
