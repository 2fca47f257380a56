"""The package imports under its namespaced paths everywhere: repo root, elsewhere, a wheel."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("model", "controller", "workers", "v1")
IMPORT_ALL = (
    "import pathways_lite, pathways_lite.model, pathways_lite.controller, pathways_lite.workers;"
    "import pathways_lite.v1.common_pb2;"
    "print(pathways_lite.__file__)"
)


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, **kw)


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_namespaced_imports_work_in_a_subprocess(where: str, tmp_path: Path) -> None:
    cwd = REPO if where == "repo" else tmp_path
    result = _run([sys.executable, "-c", IMPORT_ALL], cwd)
    assert result.returncode == 0, result.stderr


def test_no_generic_top_level_packages_are_installed() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    for name in ("model", "controller", "workers", "protos"):
        assert not (site / name).exists(), f"{name} landed in site-packages"


@pytest.mark.timeout(600)
def test_built_wheel_installs_and_imports_in_a_scratch_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(REPO),
        ],
        REPO,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("pathways_lite-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    for sub in SUBPACKAGES:
        assert f"pathways_lite/{sub}/__init__.py" in names, f"wheel lacks pathways_lite/{sub}"
    assert "pathways_lite/v1/common_pb2.py" in names, "generated protobuf code missing"
    assert not any(n.startswith(("model/", "controller/", "workers/", "tests/")) for n in names)

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    target = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
        ).stdout.strip()
    )
    installed = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        tmp_path,
    )
    assert installed.returncode == 0, installed.stderr
    # Third-party dependencies come from the test environment; our own code only from the wheel.
    deps = Path(sysconfig.get_paths()["purelib"])
    (target / "_deps.pth").write_text(f"{deps}\n")

    result = _run([str(py), "-c", IMPORT_ALL], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target)), result.stdout
