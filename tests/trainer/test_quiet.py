"""trainer.quiet: the known third-party notices go, everything else (ours, errors, new ones) stays."""

from __future__ import annotations

import logging
import warnings

import pytest
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from towerrec.trainer.quiet import LOG_FILTERS, silence_known_warnings


@pytest.fixture
def quiet():
    """silence_known_warnings() for one test; the logging filters and warning filters restored."""
    loggers = [logging.getLogger(f.logger) for f in LOG_FILTERS]
    saved = [list(lg.filters) for lg in loggers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        silence_known_warnings()  # idempotent: one filter per logger
        yield caught
    for lg, filters in zip(loggers, saved, strict=True):
        lg.filters[:] = filters


def test_torchrec_reservation_notice_is_silenced_but_other_future_warnings_show(quiet):
    HeuristicalStorageReservation(percentage=0.15)  # warns in its constructor
    warnings.warn("towerrec: something new", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in quiet] == ["towerrec: something new"]


def test_torch_jit_deprecation_is_silenced(quiet):
    jit = "`torch.jit.save` is deprecated. Please switch to `torch.export`."
    warnings.warn(jit, DeprecationWarning, stacklevel=1)
    warnings.warn("`torch.foo` is deprecated.", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in quiet] == ["`torch.foo` is deprecated."]


@pytest.mark.parametrize(
    "name, message",
    [
        ("torchrec.distributed.utils", "Sharding Type is data_parallel, caching params will be ignored"),
        ("torchrec.distributed.utils", "Compute Kernel is dense, caching params will be ignored"),
        ("", "Sharding spec not found for model.ebc.category"),
        ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both fx.symbolic_trace and ..."),
        (
            "torchrec.distributed.planner.storage_reservations",
            "There is a known issue with TorchRec's dense tensor size calculation in dry run scenarios",
        ),
    ],
)
def test_known_log_records_are_dropped_others_of_the_same_logger_kept(quiet, caplog, name, message):
    logger = logging.getLogger(name)
    # Other test modules lower TorchRec's loggers to ERROR: this logger's own level decides here.
    with caplog.at_level(logging.WARNING), caplog.at_level(logging.WARNING, logger=name or None):
        logger.warning(message)
        logger.warning("a new warning of %s", name or "root")
        logger.error(message)  # an error is never hidden
        logging.getLogger("towerrec.trainer").warning(message)  # nor anything of ours
    assert [(r.name, r.levelname) for r in caplog.records] == [
        (name or "root", "WARNING"),
        (name or "root", "ERROR"),
        ("towerrec.trainer", "WARNING"),
    ]
