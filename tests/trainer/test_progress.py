"""Rank 0's progress bar (trainer.progress) and its config key training.progress_bar."""

from __future__ import annotations

import io
import logging

import pytest
from config_utils import write_config
from towerrec.trainer.config import ConfigError, load_config
from towerrec.trainer.progress import TrainProgress, shows_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "mode, is_main, stream, shown",
    [
        ("auto", True, Terminal(), True),
        ("auto", True, io.StringIO(), False),  # a log file or CI: no bar
        ("auto", False, Terminal(), False),  # rank 0 only
        (True, True, io.StringIO(), True),
        (True, False, io.StringIO(), False),
        (False, True, Terminal(), False),
    ],
)
def test_who_shows_the_bar(mode, is_main, stream, shown):
    assert shows_progress(mode, is_main, stream) is shown


def test_forced_bar_counts_samples_and_shows_rate_and_eta():
    out = io.StringIO()
    with TrainProgress(True, True, total_steps=10, done_steps=2, samples_per_step=1000, stream=out) as bar:
        for _ in range(8):
            bar.advance()
    text = out.getvalue()
    assert "10.0k/10.0k" in text  # resumed at 2 steps, 8 more: all planned samples
    assert "sample/s" in text and "<00:00" in text  # rate and ETA
    assert "\r" not in text and text.endswith("\n")  # off a terminal: plain lines for a log
    assert not bar.shown  # closed


def test_auto_bar_off_a_terminal_prints_nothing():
    out = io.StringIO()
    with TrainProgress("auto", True, total_steps=5, done_steps=0, samples_per_step=4, stream=out) as bar:
        bar.advance()
    assert not bar.shown and out.getvalue() == ""


def test_log_lines_go_above_the_bar_and_handlers_come_back(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    root = logging.getLogger()
    handler = logging.StreamHandler()  # on stderr, as trainer.main's basicConfig
    root.addHandler(handler)
    try:
        with TrainProgress("auto", True, total_steps=4, done_steps=0, samples_per_step=1) as bar:
            bar.advance()
            assert bar.shown and handler not in root.handlers  # tqdm's handler while shown
            logging.getLogger("towerrec.test").warning("eval step 1")
        assert handler in root.handlers
    finally:
        root.removeHandler(handler)
    text = terminal.getvalue()
    # the record on its own line, the bar redrawn below it
    assert "eval step 1\n" in text and text.index("eval step 1") < text.rindex("1.00/4.00")


@pytest.mark.parametrize("value, parsed", [("on", True), ("false", False), ("auto", "auto")])
def test_progress_bar_config_key(tmp_path, value, parsed):
    path = write_config(tmp_path, {"type": "ple"})
    assert load_config(path, [f"training.progress_bar={value}"]).training.progress_bar == parsed
    assert load_config(path).training.progress_bar == "auto"
    with pytest.raises(ConfigError, match="progress_bar"):
        load_config(path, ["training.progress_bar=sometimes"])
