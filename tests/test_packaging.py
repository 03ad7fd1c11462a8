"""Every import is declared: deptry (configured in pyproject.toml) passes on the project and fails
on an undeclared import, so CI fails whenever a fresh machine's install would miss a package."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO


def deptry(root) -> subprocess.CompletedProcess:
    # deptry reads the pyproject.toml of the folder it runs in
    return subprocess.run(
        [sys.executable, "-m", "deptry", "."], cwd=root, capture_output=True, text=True, timeout=120
    )


def test_every_import_is_declared():
    proc = deptry(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_an_undeclared_import_fails_the_check(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    pkg = tmp_path / "megatron_yuyuan"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import yaml\n")
    (pkg / "report.py").write_text("import pandas  # not in pyproject.toml\n")
    proc = deptry(tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # DEP001 (not installed) or DEP003 (installed only as another package's dependency, e.g.
    # of datasets): either way an import that pyproject.toml does not declare
    assert ("DEP001" in out or "DEP003" in out) and "pandas" in out


def test_the_wheel_holds_only_the_library_and_the_yuyuan_command(tmp_path):
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("megatron_yuyuan", "tools", "checkpoints_convert", "benchmarks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("megatron_yuyuan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"megatron_yuyuan"}
    info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(info).decode().split() == ["megatron_yuyuan"]
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "yuyuan = megatron_yuyuan.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # the embedded sample data and the web page travel with the library
    assert any(n.startswith("megatron_yuyuan/data/medquad_sample/") for n in names)
    assert any(n.startswith("megatron_yuyuan/serve/static/") for n in names)
