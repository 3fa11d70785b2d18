"""The wheel ``pip install .`` builds: the package, its data files, the ``cortex`` command.

Built offline from a copy of the sources (the checkout stays clean), with the
venv's own setuptools: ``pip wheel --no-deps --no-build-isolation --no-index``.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from cortex import __version__

ROOT = Path(__file__).resolve().parent.parent
# The first setuptools that reads `project.license` as an SPDX expression (PEP 639).
SETUPTOOLS_MIN = 77
PIP = (sys.executable, "-m", "pip")

pytestmark = pytest.mark.slow


def _setuptools_major() -> int:
    try:
        return int(metadata.version("setuptools").split(".")[0])
    except metadata.PackageNotFoundError:
        return 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # setuptools comes with the test extra: a venv without it is broken, not a reason to skip.
    assert _setuptools_major() >= SETUPTOOLS_MIN, (
        f"needs setuptools>={SETUPTOOLS_MIN} in the venv (pip install -e '.[test]')"
    )
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "cortex", src / "cortex", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    build = [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [*build, "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (built,) = out.glob("*.whl")
    return built


def test_the_version_is_defined_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    assert metadata.version("cortex-gateway") == __version__


def test_the_wheel_holds_the_package_and_the_command(wheel: Path) -> None:
    assert wheel.name == f"cortex_gateway-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"cortex_gateway-{__version__}.dist-info"
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        meta = zf.read(f"{info}/METADATA").decode()
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "cortex").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources <= names
    assert {"cortex/py.typed", "cortex/sim/__init__.py", "cortex/__main__.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]

    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert dict(scripts["console_scripts"]) == {"cortex": "cortex.cli:main"}
    headers = meta.split("\n\n", 1)[0].splitlines()
    assert f"Version: {__version__}" in headers
    assert "Requires-Python: >=3.11" in headers
    assert "License-Expression: GPL-3.0-or-later" in headers
    required = {
        h.split(":", 1)[1].split(">")[0].strip()
        for h in headers
        if h.startswith("Requires-Dist:") and "extra ==" not in h
    }
    assert {
        "aiohttp",
        "uvloop",
        "orjson",
        "msgspec",
        "aioprometheus",
        "tomli-w",
        "click",
    } <= required


def test_the_installed_command_prints_the_version(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [*PIP, "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}  # the wheel's copy before the checkout
    where = subprocess.run(
        [sys.executable, "-c", "import cortex.sim, cortex.cli; print(cortex.__file__)"],
        cwd=tmp_path,  # not the checkout: `python -c` puts the working directory first
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(target)
    version = subprocess.run(
        [str(target / "bin" / "cortex"), "--version"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert version.stdout == f"cortex, version {__version__}\n"
