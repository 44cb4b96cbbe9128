"""Rank 0's progress bar over the planned training steps: samples, samples/s and ETA (tqdm).

``training.progress_bar``: ``auto`` shows it when stderr is a terminal (logs and CI stay clean),
``true``/``false`` (YAML also reads ``on``/``off`` as these) force it. On a terminal, log records
go above the bar; forced into a file or a relayed log (torchrun, TorchX) it prints one plain
line every 30 s instead. Advancing it is host-side counting only: no device sync per step.

Example::

    with TrainProgress("auto", is_main=True, total_steps=790, done_steps=0, samples_per_step=2048) as bar:
        for _ in range(790):
            train_step()
            bar.advance()
"""

from __future__ import annotations

import contextlib
import sys
from typing import Literal, TextIO

ProgressMode = Literal["auto"] | bool


def shows_progress(mode: ProgressMode, is_main: bool, stream: TextIO) -> bool:
    """Whether this rank draws the bar: rank 0 only; ``auto`` only on a terminal."""
    if not is_main or mode is False:
        return False
    if mode is True:
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Lines:
    """A file for tqdm off a terminal: each redraw becomes one line (no ``\\r`` overwrites)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:  # tqdm clears the bar by writing spaces: nothing to clear in a log
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class TrainProgress(contextlib.AbstractContextManager):
    """A tqdm bar counting samples from ``done_steps`` to ``total_steps``; a no-op when not shown."""

    def __init__(
        self,
        mode: ProgressMode,
        is_main: bool,
        total_steps: int,
        done_steps: int,
        samples_per_step: int,
        stream: TextIO | None = None,
    ) -> None:
        self.samples_per_step = samples_per_step
        self._bar = None
        self._redirect = contextlib.ExitStack()
        stream = stream if stream is not None else sys.stderr
        if not shows_progress(mode, is_main, stream):
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        tty = bool(getattr(stream, "isatty", None) and stream.isatty())
        self._bar = tqdm(
            total=total_steps * samples_per_step,
            initial=min(done_steps, total_steps) * samples_per_step,
            desc="train",
            unit="sample",
            unit_scale=True,
            file=stream if tty else _Lines(stream),
            dynamic_ncols=tty,
            mininterval=0.5 if tty else 30.0,
            smoothing=0.1,
        )
        if tty:  # log lines (ours, the libraries') printed above the bar instead of through it
            self._redirect.enter_context(logging_redirect_tqdm())

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps * self.samples_per_step)

    def close(self) -> None:
        self._redirect.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __exit__(self, *exc: object) -> None:
        self.close()
