"""Getting the agent onto a device: the check of the device python and its packages, and the SFTP upload of
edge_agent's sources, once per version and content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import secrets
import stat
from pathlib import Path

import paramiko

import edge_agent
from autoseg.devices.records import DeviceRefused, one_line

log = logging.getLogger(__name__)

# Where the agent is deployed on the device (overridable for tests or read-only homes).
AGENT_ROOT_ENV = "AUTOSEG_AGENT_ROOT"
DEFAULT_AGENT_ROOT = "~/.cache/autoseg-agent"
_MARKER = ".autoseg-deployed"


CHECK_SCRIPT = """\
import json, os, sys, sysconfig
from importlib.util import find_spec
missing = []
for name in ("numpy", "onnxruntime"):
    try:
        __import__(name)
    except Exception:
        missing.append(name)
venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
print("\\nAUTOSEG-CHECK " + json.dumps({"python": list(sys.version_info[:3]), "missing": missing,
      "venv": venv, "managed": managed and not venv, "pip": find_spec("pip") is not None,
      "ensurepip": find_spec("ensurepip") is not None, "jetson": os.path.exists("/etc/nv_tegra_release")}))
"""


def _install_hint(py: str, info: dict) -> str:
    """The command that installs numpy and onnxruntime for `py` on this device, from what the check saw."""
    pkgs = "onnxruntime numpy"
    if info.get("jetson") and "onnxruntime" in info.get("missing", ()):
        # PyPI's aarch64 onnxruntime has no CUDA: Jetsons use NVIDIA's onnxruntime-gpu wheel for their JetPack.
        pkgs = "numpy and NVIDIA's onnxruntime-gpu wheel for your JetPack (https://elinux.org/Jetson_Zoo)"
        return f"install {pkgs} with `{py} -m pip install ...`"
    if info.get("managed"):  # Debian 12 / Raspberry Pi OS bookworm refuse pip in the system python (PEP 668)
        venv = "python3 -m venv ~/autoseg-venv" if info.get("ensurepip", True) else \
            "sudo apt install python3-venv && python3 -m venv ~/autoseg-venv"
        return (f"this python is managed by the system, so create a venv there: `{venv} && "
                f"~/autoseg-venv/bin/pip install {pkgs}`, then pass --device-python ~/autoseg-venv/bin/python")
    if not info.get("pip", True):
        return (f"pip is missing: `{py} -m ensurepip --upgrade` (or `sudo apt install python3-pip`), then "
                f"`{py} -m pip install {pkgs}`")
    return f"run `{py} -m pip install {pkgs}` on the device"


def check_python(status: int, out: str, py: str, device: str) -> None:
    """Turn the output of CHECK_SCRIPT into a clear refusal when the device python is unusable."""
    where = f"device {device}"
    fix = "pass --device-python /path/to/venv/bin/python"
    # On a line of its own: a shell start-up file may have printed before it (without a newline, even).
    line = next((ln for ln in out.splitlines() if ln.startswith("AUTOSEG-CHECK ")), None)
    if line is None:
        if status == 127:
            raise DeviceRefused(f"{where}: {py} not found; install Python >= 3.8 on the device or {fix}")
        raise DeviceRefused(f"{where}: `{py}` failed (exit {status}: {one_line(out)[-200:]}); {fix}")
    info = json.loads(line.split(" ", 1)[1])
    if tuple(info["python"][:2]) < (3, 8):
        raise DeviceRefused(f"{where}: {py} is Python {'.'.join(map(str, info['python']))}, "
                            f"the agent needs >= 3.8; {fix}")
    if info["missing"]:
        names = " and ".join(info["missing"])
        raise DeviceRefused(f"{where}: {names} missing for {py}; {_install_hint(py, info)}, or {fix}")

def deploy(sftp: paramiko.SFTPClient, version_dir: str, device: str) -> None:
    """Upload edge_agent once per version and content (a marker holds the content hash)."""
    files = agent_files()
    digest = _files_digest(files)
    final = posixpath.join(version_dir, "edge_agent")
    marker = posixpath.join(final, _MARKER)
    if _sftp_read(sftp, marker) == digest.encode():
        return
    log.info("device %s: deploying edge_agent %s to %s", device, edge_agent.__version__, final)
    nonce = secrets.token_hex(4)
    tmp = posixpath.join(version_dir, f".edge_agent.{nonce}")
    for rel, data in files.items():
        path = posixpath.join(tmp, rel)
        sftp_makedirs(sftp, posixpath.dirname(path))
        with sftp.open(path, "wb") as f:
            f.write(data)
    with sftp.open(posixpath.join(tmp, _MARKER), "wb") as f:
        f.write(digest.encode())
    if _sftp_exists(sftp, final):
        old = posixpath.join(version_dir, f".edge_agent.old.{nonce}")
        sftp.rename(final, old)
        _sftp_rmtree(sftp, old)
    try:
        sftp.rename(tmp, final)
    except OSError:
        # Another host process deployed at the same moment: fine if it left the same content.
        _sftp_rmtree(sftp, tmp)
        if _sftp_read(sftp, marker) != digest.encode():
            raise


def expand_home(path: str, home: str) -> str:
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path


def agent_files() -> dict[str, bytes]:
    pkg = Path(edge_agent.__file__).parent
    return {p.relative_to(pkg).as_posix(): p.read_bytes()
            for p in sorted(pkg.rglob("*.py")) if "__pycache__" not in p.parts}


def _files_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel, data in sorted(files.items()):
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def _sftp_exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
        return True
    except FileNotFoundError:
        return False


def _sftp_read(sftp: paramiko.SFTPClient, path: str) -> bytes | None:
    try:
        with sftp.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not sub or sub in (".", "~") or _sftp_exists(sftp, sub):
            continue
        try:
            sftp.mkdir(sub, 0o700)
        except OSError:
            if not _sftp_exists(sftp, sub):  # lost a race with another process: fine
                raise


def _sftp_rmtree(sftp: paramiko.SFTPClient, path: str) -> None:
    for entry in sftp.listdir_attr(path):
        sub = posixpath.join(path, entry.filename)
        if stat.S_ISDIR(entry.st_mode or 0):
            _sftp_rmtree(sftp, sub)
        else:
            sftp.remove(sub)
    sftp.rmdir(path)

