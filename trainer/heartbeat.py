"""Which rank stopped responding, when a collective fails: a heartbeat per rank in the job's store.

A gloo collective that times out says ``Timed out waiting 600000ms for recv operation`` and one
whose peer died ``Connection closed by peer [ip]:port``; neither names a rank. So every rank runs
a daemon thread that increments its own counter in the job's TCPStore (``MASTER_ADDR:MASTER_PORT``)
every :data:`BEAT_S` seconds. After a collective fails, a rank reads every counter twice,
:data:`WINDOW_S` apart: a rank whose counter did not move is stopped (SIGSTOP), dead, hung in
native code that holds the GIL, or cut off. A rank merely blocked in a collective still beats (the
wait releases the GIL), so the ranks waiting for the stuck one are not blamed.

Example::

    beat = Heartbeat.start(env)       # None with one rank
    try:
        train(config, env)
    except RuntimeError as e:
        if is_collective_failure(e):
            print(describe_collective_failure(e, env, beat))   # "... rank 1 is not responding ..."
    finally:
        beat.stop()
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from towerrec.trainer.distributed import DistEnv, describe_error

logger = logging.getLogger(__name__)
BEAT_S = 1.0
WINDOW_S = 3.0  # a silent rank missed 3 beats
STORE_TIMEOUT_S = 10.0  # one store operation; the store's host may be the stuck rank
_ROOT = Path(__file__).resolve().parents[1]  # the repository (editable install) or site-packages/towerrec
# What gloo, NCCL and c10d say when a collective times out or loses a peer ("Timed out waiting
# 600000ms for recv", "Application timeout caused pair closure", "Connection closed by peer").
_COLLECTIVE = re.compile(
    r"gloo|nccl|timed out|timeout caused|connection closed|connection reset|broken pipe|connectFullMesh",
    re.IGNORECASE,
)


class StoreUnreachable(RuntimeError):
    """The job's store did not answer: its host (rank 0 under torchrun) is the one not responding."""


class Heartbeat:
    """This rank's beats, and the other ranks' as read from the store (:meth:`silent_ranks`)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, address: str) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.address = address
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="towerrec-heartbeat", daemon=True)

    @classmethod
    def start(cls, env: DistEnv) -> Heartbeat | None:
        """Start beating on a store connection of its own (None when the job has one rank)."""
        if env.world_size == 1:
            return None
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        try:
            timeout = timedelta(seconds=STORE_TIMEOUT_S)
            client = dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
        except Exception as e:  # noqa: BLE001 - training goes on; only the diagnosis is lost
            logger.warning("no heartbeat: the job's store at %s:%s refused a connection (%s)", host, port, e)
            return None
        beat = cls(
            dist.PrefixStore("towerrec/heartbeat/", client), env.rank, env.world_size, f"{host}:{port}"
        )
        beat._thread.start()
        return beat

    def _beat(self) -> None:
        while not self._stopped.is_set():
            try:
                self.store.add(str(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store's host may be gone or stopped: keep trying
                pass
            self._stopped.wait(BEAT_S)

    def stop(self) -> None:
        """No more beats once this returns (or, with the store's host stopped, none that arrive)."""
        self._stopped.set()
        self._thread.join(timeout=BEAT_S + 1)

    def _counts(self) -> list[int]:
        """Every rank's count, read in a thread of its own: a store whose host is stopped never
        answers (the connection stays open), whatever the client's timeout says."""
        answer: list[list[int] | BaseException] = []

        def read() -> None:
            try:
                answer.append([self.store.add(str(r), 0) for r in range(self.world_size)])
            except Exception as e:  # noqa: BLE001 - DistStoreError, or a timeout as RuntimeError
                answer.append(e)

        reader = threading.Thread(target=read, name="towerrec-heartbeat-read", daemon=True)
        reader.start()
        reader.join(STORE_TIMEOUT_S)
        if not answer or isinstance(answer[0], BaseException):
            why = type(answer[0]).__name__ if answer else f"no answer in {STORE_TIMEOUT_S:.0f} s"
            raise StoreUnreachable(
                f"the job's store at {self.address} does not answer ({why}); under torchrun it "
                "lives in rank 0, which is then the rank not responding"
            )
        return answer[0]

    def silent_ranks(self, window_s: float = WINDOW_S) -> list[int]:
        """The other ranks that did not beat during the next ``window_s`` seconds.

        Raises:
            StoreUnreachable: the store itself did not answer.
        """
        before = self._counts()
        time.sleep(window_s)
        after = self._counts()
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is a failed or timed-out collective."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, RuntimeError) and _COLLECTIVE.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_collective_failure(error: BaseException, env: DistEnv, beat: Heartbeat | None) -> str:
    """One line: where the collective failed, after how long, and which rank is not responding."""
    timed_out = re.search(r"timed out|timeout", str(error), re.IGNORECASE) is not None
    what = f"timed out after {env.timeout.total_seconds():.0f} s (training.collective_timeout_s)"
    where = _where(error)
    try:
        silent = beat.silent_ranks() if beat is not None else []
    except StoreUnreachable as e:
        who = str(e)
    else:
        if silent:
            names = ", ".join(map(str, silent))
            verb = "is" if len(silent) == 1 else "are"
            who = (
                f"rank{'s' if len(silent) > 1 else ''} {names} {verb} not responding (no heartbeat "
                f"in {WINDOW_S:.0f} s: stopped, dead, hung or unreachable)"
            )
        else:
            who = "every rank still beats: a connection failed, not a rank; its peer's log says why"
    return f"a collective {what if timed_out else 'failed'}{where}: {who} [{describe_error(error)}]"


def _where(error: BaseException) -> str:
    """`` in FUNCTION (FILE:LINE)``: the innermost frame of towerrec's own code in the traceback."""
    ours = [f for f in traceback.extract_tb(error.__traceback__) if _is_ours(Path(f.filename))]
    if not ours:
        return ""
    frame = ours[-1]
    return f" in {frame.name} ({Path(frame.filename).relative_to(_ROOT)}:{frame.lineno})"


def _is_ours(path: Path) -> bool:
    return path.is_relative_to(_ROOT) and not {".venv", "site-packages"} & set(path.relative_to(_ROOT).parts)
