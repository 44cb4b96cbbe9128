"""The `towerrec` console script: help texts, `data synth` wiring, `train` validation and dryrun."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launch_helpers import script
from towerrec.launch import cli


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
        "import sys; from towerrec.launch import cli\n"
        "try: cli.main(['--help'])\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'torchx', 'pyarrow', 'towerrec.data.parquet') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    result = subprocess.run([str(script("towerrec")), "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: towerrec train" in result.stdout


def test_group_without_subcommand_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert cli.main(["data"]) == 2
    assert "synth" in capsys.readouterr().err


def test_every_command_module_is_registered_and_listed_in_help(capsys):
    import pkgutil

    from towerrec.launch import commands

    modules = {m.name for m in pkgutil.iter_modules(commands.__path__)} - {"common"}
    assert {c.__name__.rsplit(".", 1)[1] for c in cli.COMMANDS} == modules
    out = help_of(capsys)
    for name in modules:
        assert f"\n    {name}" in out, name


def test_data_synth_writes_parquet_and_a_config_that_loads(tmp_path, capsys):
    from towerrec.trainer.config import load_config, validate_data

    out = tmp_path / "d"
    assert (
        cli.main(["data", "synth", "--out", str(out), "--rows", "3000", "--files", "2", "--seed", "7"]) == 0
    )
    printed = capsys.readouterr().out
    assert str(out) in printed and str(out / "config.yaml") in printed
    assert len(list((out / "train").glob("*.parquet"))) == 2
    validate_data(load_config(out / "config.yaml"))


def test_train_checks_the_data_before_launching(synth_data, tmp_path):
    result = subprocess.run(
        [str(script("towerrec")), "train", "--config", str(synth_data / "config.yaml"),
         "--set", "data.tasks.0.label=clicked"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "data.train:" in result.stderr and "column 'clicked' (label) is missing" in result.stderr
    assert "launched" not in result.stderr  # failed before any process started
    missing = subprocess.run(
        [str(script("towerrec")), "train", "--config", str(synth_data / "config.yaml"),
         "--set", f"data.eval={tmp_path / 'nowhere'}/*.parquet"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "data.eval:" in missing.stderr and "matches no file" in missing.stderr


def test_data_synth_eval_fraction_and_hashed_visitor_ids(tmp_path, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "v"
    argv = ["data", "synth", "--out", str(out), "--rows", "2000", "--files", "1"]
    assert cli.main([*argv, "--eval_fraction", "0.25", "--visitors", "5000000"]) == 0
    assert "train 1500, eval 500" in capsys.readouterr().out
    assert pq.read_schema(out / "train" / "part-00000.parquet").field("visitor_id").type == "int64"
    assert cli.main([*argv, "--eval_fraction", "1"]) == 2
    assert "--eval_fraction must be below 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--visitors", "0"])
    assert exit_.value.code == 2 and "--visitors" in capsys.readouterr().err


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
    assert "--nproc_per_node 2" in out and "-m towerrec.trainer.main" in out
    assert "--set training.batch_size=64" in out
