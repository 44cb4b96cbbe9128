"""Files written whole or not at all: the one atomic-write helper of the project.

Example::

    with atomic_output("runs/demo/model.pt") as tmp:   # a temporary file next to the target
        torch.jit.save(scripted, str(tmp))             # renamed onto the target only on success

It lives in ``data`` (the lowest layer that writes files) so that ``data``, ``trainer`` and
``launch`` share it without an import cycle.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (a rename into it, say) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto ``path`` only if the block succeeds.

    The file is fsynced before the rename and the directory after it, so a crash at any point
    leaves ``path`` either as it was or complete; on an error the temporary file is removed.
    Readers never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual mode
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points to it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


__all__ = ["atomic_output", "fsync_dir"]
