"""`towerrec export` and `towerrec predict`: help, a real round trip through the console
script, a named missing column, and a failed export that leaves the old file alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from export_helpers import exported, trained_run
from towerrec.launch import cli

TOWERREC = Path(sys.executable).parent / "towerrec"


@pytest.mark.parametrize(
    "command, options",
    [
        ("export", ["--run", "--step", "--out", "--quantize", "--check_rows", "--max_dp", "TorchScript"]),
        ("predict", ["--model", "--data", "--out", "--passthrough", "--nproc", "p_<task>"]),
    ],
)
def test_help(capsys: pytest.CaptureFixture, command: str, options: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out


def test_help_stays_light() -> None:
    code = (
        "import sys; from towerrec.launch import cli\n"
        "for c in ('export', 'predict'):\n"
        "    try: cli.main([c, '--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = ('torch', 'pyarrow', 'towerrec.trainer.export', 'towerrec.trainer.predict')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_export_then_predict_round_trip(synth_data: Path, tmp_path: Path) -> None:
    if not TOWERREC.exists():
        pytest.skip(f"towerrec console script not installed in {TOWERREC.parent}")
    run_dir = trained_run(synth_data)
    model = tmp_path / "model.pt"
    export = subprocess.run(
        [str(TOWERREC), "export", "--run", str(run_dir), "--out", str(model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert "export check on 4000 eval rows, int8 tables" in export.stdout
    assert f"wrote {model}" in export.stdout
    predict = subprocess.run(
        [
            str(TOWERREC),
            "predict",
            "--model",
            str(model),
            "--data",
            str(synth_data / "eval" / "*.parquet"),
            "--out",
            str(tmp_path / "predictions"),
            "--passthrough",
            "user_id,item_id",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "(4000 rows)" in predict.stdout
    out = pq.read_table(tmp_path / "predictions")
    assert out.column_names == ["user_id", "item_id", "p_click", "p_conversion"] and out.num_rows == 4000
    assert out["user_id"].equals(pq.read_table(synth_data / "eval", columns=["user_id"])["user_id"])


def test_predict_missing_column_names_it(synth_data: Path, tmp_path: Path, capsys) -> None:
    model, _ = exported(synth_data, "int8")
    source = next((synth_data / "eval").glob("*.parquet"))
    pq.write_table(pq.read_table(source).drop_columns(["hour_sin"]), tmp_path / "no-hour.parquet")
    data, out = str(tmp_path / "no-hour.parquet"), str(tmp_path / "out")
    code = cli.main(["predict", "--model", str(model), "--data", data, "--out", out, "--num_workers", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no-hour.parquet: column 'hour_sin' (dense feature) is missing" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_failed_export_leaves_the_previous_file(synth_data: Path, tmp_path: Path, capsys) -> None:
    run_dir = trained_run(synth_data)
    model = tmp_path / "model.pt"
    model.write_bytes(b"previous artifact")
    # int8 rows always move some probability a little: a zero tolerance must fail the check.
    code = cli.main(["export", "--run", str(run_dir), "--out", str(model), "--max_dp", "0"])
    assert code == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and f"{model} was not written" in captured.err
    assert model.read_bytes() == b"previous artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert cli.main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(model)]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(run_dir), "--step", "7", "--out", str(model)]) == 1
    assert "step-00000007 does not exist; complete checkpoint steps: [60]" in capsys.readouterr().err
