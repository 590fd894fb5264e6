"""pip-installable (issue #24 section 5): the sdist runs its own tests, the wheels say what they are and need.

Built offline from a copy of this tree with the PEP 517 backend pyproject.toml names (setuptools), called in this
interpreter: no build isolation, nothing downloaded, nothing written into the checkout. The host wheel is built
from the unpacked sdist, as `pip install autoseg_edge-*.tar.gz` does, so a file missing from the sdist fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a checkout holds beside its sources: never copied into the build tree.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.py[cod]", ".pytest_cache", ".ruff_cache", "onnxruntime_profile_*")
TIMEOUT = 120


def _build(hook: str, src: Path, out: Path) -> Path:
    """Run the backend's `hook` (build_sdist or build_wheel) in `src`; the file it wrote in `out`."""
    code = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    proc = subprocess.run([sys.executable, "-c", code, hook, str(out)], cwd=src, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]  # setuptools logs to stdout; the hook's answer comes last


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the sdist, the folder it unpacks to), built from a copy of this tree."""
    pytest.importorskip("setuptools", reason="pyproject.toml's build backend: `pip install setuptools`")
    tmp = tmp_path_factory.mktemp("packaging")
    shutil.copytree(REPO, tmp / "src", ignore=NOT_SOURCE)
    tarball = _build("build_sdist", tmp / "src", tmp / "dist")
    with tarfile.open(tarball) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # the filter came in 3.10.12
        tar.extractall(tmp / "unpacked", **safe)
    (top,) = (tmp / "unpacked").iterdir()
    return tarball, top


def _wheel(src: Path, out: Path) -> tuple[Message, set[str], str]:
    """(METADATA, file names, entry_points.txt) of the wheel built from `src`."""
    wheel = _build("build_wheel", src, out)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry = z.read(f"{info}/entry_points.txt").decode()
    return meta, names, entry


@pytest.fixture(scope="module")
def host_wheel(sdist: tuple[Path, Path]) -> tuple[Message, set[str], str]:
    return _wheel(sdist[1], sdist[1].parent / "wheel")


@pytest.fixture(scope="module")
def agent_wheel(sdist: tuple[Path, Path]) -> tuple[Message, set[str], str]:
    # The agent's own package (edge_agent/pyproject.toml), from the sdist's copy of the folder.
    return _wheel(sdist[1] / "edge_agent", sdist[1].parent / "agent-wheel")


def _sources(root: Path, *folders: str) -> set[str]:
    return {p.relative_to(root).as_posix() for f in folders for p in (root / f).rglob("*.py")
            if "__pycache__" not in p.parts}


def test_the_sdist_holds_the_tests_and_everything_they_import(sdist: tuple[Path, Path]) -> None:
    tarball, top = sdist
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "Makefile", "pyproject.toml", "tests/conftest.py", "tests/sshd_server.py",
            "tests/onnx_models.py", "tests/e2e/conftest.py", "tests/e2e/arm64_device.sh",
            "edge_agent/pyproject.toml", "edge_agent/LICENSE"} <= names
    src = top.parent.parent / "src"
    assert _sources(src, "tests", "autoseg", "edge_agent") <= names  # every test, helper and module
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_unpacked_sdist_collects_its_whole_test_suite(sdist: tuple[Path, Path]) -> None:
    top = sdist[1]
    env = {**os.environ, "PYTHONPATH": str(top)}  # its own autoseg, before the checkout's editable install
    env.pop("PYTEST_ADDOPTS", None)
    where = subprocess.run([sys.executable, "-c", "import autoseg, edge_agent; print(autoseg.__file__); "
                            "print(edge_agent.__file__)"], cwd=top, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert where.returncode == 0, where.stderr
    assert all(Path(f).is_relative_to(top) for f in where.stdout.split())
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=top, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\d+(/\d+)? tests? collected", proc.stdout), proc.stdout[-1000:]
    assert "test_packaging.py::" in proc.stdout and "test_infer.py::" in proc.stdout


def test_the_host_wheel_is_autoseg_edge_with_the_agent_inside(host_wheel: tuple[Message, set[str], str]) -> None:
    meta, names, entry = host_wheel
    assert meta["Name"] == "autoseg-edge"  # `autoseg` and `edge-agent` are other projects on the public index
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # autoseg imports the agent's window blending and PNG writer, and uploads its sources to devices.
    assert {f"edge_agent/{p.name}" for p in (REPO / "edge_agent").glob("*.py")} <= names
    assert {"autoseg/cli/__init__.py", "autoseg/infer.py", "autoseg/predict.py"} <= names
    assert "edge_agent/pyproject.toml" not in names and "edge_agent/LICENSE" not in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    assert "autoseg = autoseg.cli:main" in entry and "edge-agent = edge_agent.__main__:main" in entry


def test_the_agents_own_wheel_needs_numpy_and_onnxruntime_only(agent_wheel: tuple[Message, set[str], str]) -> None:
    meta, names, _ = agent_wheel
    assert meta["Name"] == "autoseg-edge-agent"
    assert meta["Requires-Python"] == ">=3.8"
    assert sorted(r for r in meta.get_all("Requires-Dist") if "extra ==" not in r) == ["numpy", "onnxruntime"]
    assert "edge_agent/predict.py" in names and not [n for n in names if n.startswith("autoseg/")]
    # The same licence as the host's (a copy: setuptools takes licence files from the package's own folder).
    assert (REPO / "edge_agent" / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()
    assert any(n.endswith(".dist-info/LICENSE") or n.endswith(".dist-info/licenses/LICENSE") for n in names)


def _vermin() -> str:
    exe = Path(sys.executable).with_name("vermin")
    found = str(exe) if exe.exists() else shutil.which("vermin")
    if found is None:
        pytest.skip("vermin is not installed: `pip install -e '.[test]'`")
    return found


def test_requires_python_is_what_the_code_needs(host_wheel: tuple[Message, set[str], str],
                                                agent_wheel: tuple[Message, set[str], str]) -> None:
    # vermin reads the sources for the newest syntax and library each needs: the metadata says no less, no more.
    vermin = _vermin()
    for package, wheel in (("autoseg", host_wheel), ("edge_agent", agent_wheel)):
        proc = subprocess.run([vermin, "--no-tips", str(REPO / package)],
                              capture_output=True, text=True, timeout=TIMEOUT)
        found = re.search(r"Minimum required versions: (3\.\d+)", proc.stdout)
        assert found, proc.stdout[-1000:] + proc.stderr
        assert wheel[0]["Requires-Python"] == f">={found.group(1)}", package
