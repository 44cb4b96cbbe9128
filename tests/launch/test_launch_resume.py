"""`towerrec train --resume` reaches every rank as the checkpoint.resume override."""

from __future__ import annotations

import pytest
from towerrec.launch import cli


def test_train_resume_flag_becomes_the_checkpoint_resume_override(valid_config, capsys):
    argv = ["train", "--config", str(valid_config), "--nproc_per_node", "2", "--resume", "required"]
    assert cli.main([*argv, "--dryrun"]) == 0
    assert "--set checkpoint.resume=required" in capsys.readouterr().out


def test_train_resume_flag_takes_only_the_three_modes(valid_config, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--config", str(valid_config), "--resume", "sometimes", "--dryrun"])
    assert exit_.value.code == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
