"""edge_agent as a package of its own (edge_agent/pyproject.toml, distribution autoseg-edge-agent): a device can
`pip install` it without the host package; numpy and onnxruntime are its only dependencies (issue #23 section 3).

Built here from a copy of the folder (fast, `make test`); installing it on the arm64 device is in test_arm64.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import edge_agent
from autoseg.devices.deploy_agent import agent_files

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_needs_numpy_and_onnxruntime_only(tmp_path: Path) -> None:
    shutil.copytree(REPO / "edge_agent", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path / "dist"), str(tmp_path / "src")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"autoseg_edge_agent-{edge_agent.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"autoseg_edge_agent-{edge_agent.__version__}.dist-info/METADATA").decode()
        entry = z.read(f"autoseg_edge_agent-{edge_agent.__version__}.dist-info/entry_points.txt").decode()
    assert {f"edge_agent/{p.name}" for p in (REPO / "edge_agent").glob("*.py")} <= names
    assert not any(n.startswith(("autoseg/", "tests/")) for n in names)
    requires = sorted(ln.split(": ", 1)[1] for ln in meta.splitlines()
                      if ln.startswith("Requires-Dist:") and "extra ==" not in ln)
    assert requires == ["numpy", "onnxruntime"]
    assert "Requires-Python: >=3.8" in meta
    assert "edge-agent = edge_agent.__main__:main" in entry


def test_the_host_still_uploads_the_sources_alone() -> None:
    # SFTP deployment needs no package: autoseg sends the agent's .py files, never the packaging file.
    files = agent_files()
    assert "pyproject.toml" not in files and "predict.py" in files
    assert set(files) == {p.name for p in (REPO / "edge_agent").glob("*.py")}
