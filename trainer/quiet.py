"""The known-harmless third-party warnings, silenced in one place.

Each entry matches one message of one library and says why nobody running towerrec can act on
it; everything else (our own warnings, new third-party ones, errors) still shows. Called once at
process start by the rank entry point (``towerrec.trainer.main``), the ``towerrec`` CLI and the
processes ``towerrec predict --nproc`` spawns. Imports nothing heavy, so ``--help`` stays fast.
(``towerrec plan`` also lowers TorchRec's planner logging: there the plan is the output.)

Example::

    from towerrec.trainer.quiet import silence_known_warnings

    silence_known_warnings()  # before torch / torchrec start warning
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import NamedTuple


class WarningFilter(NamedTuple):
    """A Python ``warnings`` message (regex, matched at its start) of ``category``."""

    category: type[Warning]
    message: str
    reason: str


class LogFilter(NamedTuple):
    """A record of ``logger`` (exactly that logger; "" is the root) whose message matches ``pattern``."""

    logger: str
    pattern: str
    reason: str


WARNING_FILTERS: tuple[WarningFilter, ...] = (
    WarningFilter(
        FutureWarning,
        r"HeuristicalStorageReservation is known to cause issues",
        "we build the planner's reservation as TorchRec's own planner does, with a percentage",
    ),
    WarningFilter(
        FutureWarning,
        r"`broadcast_buffers` is deprecated",
        "TorchRec 1.8 passes it to the DistributedDataParallel wrappers it builds, once per rank",
    ),
    WarningFilter(
        UserWarning,
        r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load",
        "export, evaluate and importance read a sharded checkpoint in one process on purpose",
    ),
    WarningFilter(
        UserWarning,
        r".*an autograd kernel was not registered",
        "fbgemm_gpu registers inference-only operators; printed on import",
    ),
    WarningFilter(
        DeprecationWarning,
        r"`torch\.jit\.\w+` is (deprecated|not supported)",
        "TorchRec's inference recipe (export, predict) is TorchScript, which torch 2.13 deprecates",
    ),
)

LOG_FILTERS: tuple[LogFilter, ...] = (
    LogFilter(
        "torchrec.distributed.utils",
        r"(Sharding Type is data_parallel|Compute Kernel is dense), caching params will be ignored",
        "printed per replicated table; towerrec sets no caching params",
    ),
    LogFilter(
        "torchrec.distributed.planner.storage_reservations",
        r"There is a known issue with TorchRec's dense tensor size calculation",
        "planning on the meta device is what towerrec does on purpose (storage_reserve covers it)",
    ),
    LogFilter(
        "",  # TorchRec's plan check logs on the root logger
        r"Sharding spec not found for ",
        "data-parallel tables have no sharding spec; the plan log line names their placement",
    ),
    LogFilter(
        "torch.fx._symbolic_trace",
        r"is_fx_tracing will return true for both",
        "an API note for torch.export authors, printed when TorchRec traces the model",
    ),
)


class _DropMatching(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:  # never hide an error
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not self.pattern.match(message)


def silence_known_warnings() -> None:
    """Install the filters of :data:`WARNING_FILTERS` and :data:`LOG_FILTERS` (idempotent)."""
    for f in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=f.message, category=f.category)
    by_logger: dict[str, list[str]] = {}
    for f in LOG_FILTERS:
        by_logger.setdefault(f.logger, []).append(f.pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        for old in [x for x in logger.filters if isinstance(x, _DropMatching)]:
            logger.removeFilter(old)
        logger.addFilter(_DropMatching(patterns))
