"""The `towerrec` console script: help texts, `data synth` wiring, `train` validation and dryrun."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
from launch_helpers import script

from launch import cli


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help(capsys):
    out = help_of(capsys)
    assert out.startswith("usage: towerrec")
    assert "data" in out and "train" in out and "quick start" in out


def test_data_help(capsys):
    assert "synth" in help_of(capsys, "data")


def test_data_synth_help(capsys):
    out = help_of(capsys, "data", "synth")
    for option in ["--out", "--rows", "--files", "--seed", "config.yaml"]:
        assert option in out


def test_train_help(capsys):
    out = help_of(capsys, "train")
    for option in ["--config", "--nproc_per_node", "--set", "--dryrun", "--log_dir", "local_cwd"]:
        assert option in out


def test_console_script_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys; from launch import cli\n"
        "try: cli.main(['--help'])\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'torchx', 'pyarrow', 'trainer.config') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    result = subprocess.run([str(script("towerrec")), "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: towerrec train" in result.stdout


def test_group_without_subcommand_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert cli.main(["data"]) == 2
    assert "synth" in capsys.readouterr().err


def test_subcommands_come_from_the_registry():
    assert list(cli._COMMANDS)[:2] == ["data", "train"]
    with pytest.raises(ValueError, match="registered twice"):
        cli.command("train")(lambda subparsers: None)


def test_data_synth_calls_write_synthetic(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("data.synth")
    fake.write_synthetic = lambda out_dir, rows, files=4, seed=0: calls.append(
        (out_dir, rows, files, seed)
    ) or {"rows": rows}
    monkeypatch.setitem(sys.modules, "data.synth", fake)
    out = tmp_path / "d"
    assert cli.main(["data", "synth", "--out", str(out), "--rows", "100", "--seed", "7"]) == 0
    assert calls == [(str(out), 100, 4, 7)]
    printed = capsys.readouterr().out
    assert str(out) in printed and str(out / "config.yaml") in printed


def test_data_synth_rejects_non_positive_rows(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "synth", "--out", "x", "--rows", "0"])
    assert exit_.value.code == 2
    assert "--rows" in capsys.readouterr().err


def test_train_invalid_config_exits_2_naming_the_key(valid_config):
    result = subprocess.run(
        [str(script("towerrec")), "train", "--config", str(valid_config),
         "--set", "training.batch_sizee=4096"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "training.batch_sizee" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_train_missing_config_exits_2(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "does not exist" in err


def test_train_dryrun_prints_the_local_request(valid_config, capsys):
    argv = ["train", "--config", str(valid_config), "--nproc_per_node", "2"]
    assert cli.main([*argv, "--set", "training.batch_size=64", "--dryrun"]) == 0
    out = capsys.readouterr().out
    assert "=== SCHEDULER REQUEST ===" in out
    assert "--nproc_per_node 2" in out and "-m trainer.main" in out
    assert "--set training.batch_size=64" in out
