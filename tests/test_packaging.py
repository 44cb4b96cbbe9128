"""The built wheel installs one namespace, ``towerrec.*``, and runs outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "launch", "modules", "trainer")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of the sources: setuptools leaves build/ in the tree it builds.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source),
         "-w", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (path,) = out.glob("towerrec-*.whl")
    return path


def test_wheel_holds_only_the_towerrec_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"towerrec", wheel.name.split("-py")[0] + ".dist-info"}, top
    for package in PACKAGES:
        assert f"towerrec/{package}/__init__.py" in names
    assert "towerrec/trainer/main.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "towerrec = towerrec.launch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_unpacked_wheel_runs_the_trainer_entry_point_from_anywhere(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import towerrec.trainer.main as m, towerrec.launch.cli as c; "
        "print(m.__file__); print(c.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    # cwd is not the checkout: `import trainer` must not be what makes it work.
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert all(line.startswith(str(site)) for line in result.stdout.split()), result.stdout
    help_text = subprocess.run(
        [sys.executable, "-m", "towerrec.trainer.main", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "--config" in help_text
    bare = subprocess.run([sys.executable, "-c", "import trainer"], cwd=tmp_path, capture_output=True)
    assert bare.returncode != 0, "a top-level package 'trainer' is importable: the namespace leaks"
