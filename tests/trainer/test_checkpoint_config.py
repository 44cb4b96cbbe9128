"""The ``checkpoint:`` config section: defaults, overrides, one clear message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import BASE, write
from towerrec.trainer.config import CheckpointConfig, ConfigError, load_config


def test_defaults_save_every_1000_steps_keep_two_and_resume_automatically(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.checkpoint == CheckpointConfig(enabled=True, interval=1000, keep_last=2, resume="auto")
    # Faults: fall back from a damaged latest, check checksums, stop on a failed save, 25 s grace.
    c = config.checkpoint
    assert c.resume_fallback and c.checksums and c.on_save_error == "stop" and c.preemption_grace_s == 25.0
    assert (config.training.nonfinite, config.training.nonfinite_max_skips) == ("stop", 10)


def test_overrides_set_every_key(tmp_path: Path) -> None:
    overrides = ["checkpoint.interval=0", "checkpoint.keep_last=5", "checkpoint.resume=required"]
    config = load_config(write(tmp_path, BASE), overrides)
    assert (config.checkpoint.interval, config.checkpoint.keep_last, config.checkpoint.resume) == (
        0,
        5,
        "required",
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("checkpoint.resume=sometimes", "checkpoint.resume: Input should be 'auto', 'never' or 'required'"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last: Input should be greater than 0"),
        ("checkpoint.interval=-1", "checkpoint.interval: Input should be greater than or equal to 0"),
        ("checkpoint.every=10", "checkpoint.every: unknown key"),
        ("checkpoint.on_save_error=retry", "checkpoint.on_save_error: Input should be 'stop' or 'continue'"),
        ("checkpoint.preemption_grace_s=0", "checkpoint.preemption_grace_s: Input should be greater than 0"),
        ("checkpoint.resume_fallback=maybe", "checkpoint.resume_fallback: Input should be a valid boolean"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE), [override])
    assert expected in str(info.value)


def test_required_resume_needs_checkpoints_enabled(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resume: required needs checkpoints; enabled is false"):
        load_config(write(tmp_path, BASE), ["checkpoint.enabled=false", "checkpoint.resume=required"])
