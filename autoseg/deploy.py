"""`autoseg deploy RUN --device user@host [--images DIR]`: put the shipped net on the device and run it there.

The model (best/model.onnx, or best/model.int8.onnx with --int8) goes over SFTP to ~/autoseg-models/<run>/ on
the device (--remote-dir), into a temp name renamed when complete, and its sha256 is computed on the device and
compared with this host's. With --images, the images go up too, `python3 -m edge_agent predict` labels them on
the device (the agent autoseg deploys for latency measurement, so nothing else is installed there), and the
masks come back: the same files `autoseg predict` writes here, with the device's throughput.
"""

from __future__ import annotations

import json
import logging
import posixpath
import secrets
import shlex
import time
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import paramiko

from autoseg.config import DeviceConfig
from autoseg.devices import DeviceRefused, SSHDevice
from autoseg.errors import AutosegError, DeviceUnreachable, InputError
from autoseg.rundir import write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_REMOTE_DIR = "~/autoseg-models"
SHA_TIMEOUT_S = 300.0
PREDICT_TIMEOUT_S = 6 * 3600.0  # an emulated or slow board labelling a big folder
_SHA_SCRIPT = """\
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print("\\nAUTOSEG-SHA256 " + h.hexdigest())
"""
_SUMMARY = '{"edge_agent_predict"'


def deploy(
    target: Path,
    cfg: DeviceConfig,
    *,
    int8: bool = False,
    images: Path | None = None,
    out: Path | None = None,
    remote_dir: str | None = None,
    mode: str = "auto",
    overlap: float = 0.5,
    overlay: bool = False,
) -> dict[str, Any]:
    """Copy the model to the device (verified), optionally predict `images` there; returns what happened."""
    from autoseg.data import list_images
    from autoseg.predict import model_info, resolve_model

    if len(cfg.targets) > 1:
        raise InputError("--device: deploy copies the model to one device; give one of "
                         f"{', '.join(cfg.targets)} (run it once per device)")
    if cfg.target == "local":
        raise InputError("--device: deploy copies the model to a device over SSH; give user@host, user@host:port "
                         "or an ssh Host alias")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"--overlap: must be in [0.0, 1.0), got {overlap}")
    model = resolve_model(target, int8)
    model_info(model)  # an ONNX file autoseg did not export is refused here, not on the device
    files = list_images(images, "images", "--images") if images is not None else []
    run_name = target.resolve().name if target.is_dir() else model.stem
    if out is None:
        out = (target if target.is_dir() else model.parent) / "deploy" / "masks"
    data = model.read_bytes()
    sha = _sha256(data)

    t0 = time.perf_counter()
    with closing(SSHDevice(cfg)) as dev:
        connect_s = time.perf_counter() - t0
        fp = dev.fingerprint()
        sftp = dev.sftp()
        home = sftp.normalize(".")
        folder = _expand(remote_dir or posixpath.join(DEFAULT_REMOTE_DIR, run_name), home)
        remote = posixpath.join(folder, model.name)
        t1 = time.perf_counter()
        uploaded = _put_verified(dev, sftp, data, sha, remote)
        upload_s = time.perf_counter() - t1
        card = model.parent / "model_card.json"
        if card.is_file():
            _put(sftp, card.read_bytes(), posixpath.join(folder, "model_card.json"))
        result: dict[str, Any] = {
            "device": dev.name,
            "fingerprint": fp,
            "emulated": bool(fp.get("emulated")),
            "model": str(model),
            "remote_model": remote,
            "sha256": sha,
            "size_bytes": len(data),
            "uploaded": uploaded,
            "connect_s": connect_s,
            "upload_s": upload_s,
        }
        log.info("%s: %s -> %s (%d bytes, sha256 %s%s)", dev.name, model, remote, len(data), sha[:12],
                 "" if uploaded else ", already there")
        if files:
            result["predict"] = _predict_there(dev, sftp, remote, files, out, folder, mode, overlap, overlay, cfg)
            result["out"] = str(out)
    return result


def _predict_there(dev: SSHDevice, sftp: paramiko.SFTPClient, remote_model: str, files: list[Path], out: Path,
                   folder: str, mode: str, overlap: float, overlay: bool, cfg: DeviceConfig) -> dict[str, Any]:
    work = posixpath.join(folder, f".predict-{secrets.token_hex(4)}")
    up, down = posixpath.join(work, "images"), posixpath.join(work, "masks")
    try:
        t0 = time.perf_counter()
        _makedirs(sftp, up)
        for p in files:
            _put(sftp, p.read_bytes(), posixpath.join(up, p.name))
        images_s = time.perf_counter() - t0
        q = shlex.quote
        cmd = (f"cd {q(dev.agent_dir)} && {q(dev.python)} -m edge_agent predict {q(remote_model)} {q(up)} {q(down)} "
               f"--json --values training --mode {q(mode)} --overlap {overlap!r} "
               f"--providers {' '.join(q(p) for p in cfg.providers)}" + (" --overlay" if overlay else ""))
        if cfg.threads:
            cmd += f" --threads {int(cfg.threads)}"
        t1 = time.perf_counter()
        status, text = dev.run_command(cmd, PREDICT_TIMEOUT_S)
        wall_s = time.perf_counter() - t1
        summary = _summary(dev, status, text)
        t2 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        names = [name for item in summary["per_image"] for name in item["files"]]
        for name in names:
            with sftp.open(posixpath.join(down, name), "rb") as f:
                f.prefetch()
                write_bytes_atomic(out / name, f.read())
        summary.update(images_upload_s=images_s, wall_s=wall_s, download_s=time.perf_counter() - t2,
                       files=names)
        return summary
    except (OSError, EOFError, paramiko.SSHException) as e:
        if isinstance(e, OSError) and e.filename and not str(e.filename).startswith(folder):
            raise  # a local file: the CLI names it
        raise DeviceUnreachable(f"device {dev.name}: copying files failed ({e or type(e).__name__})") from None
    finally:
        with suppress(Exception):  # best effort: a lost connection leaves a hidden folder behind
            dev.run_command(f"rm -rf {shlex.quote(work)}", 60.0)


def _summary(dev: SSHDevice, status: int, text: str) -> dict[str, Any]:
    """The predict summary from the command's output, or its one-line error."""
    lines = text.strip().splitlines()
    found = next((ln for ln in reversed(lines) if ln.startswith(_SUMMARY)), None)
    if status == 0 and found is not None:
        return json.loads(found)
    errors = [ln for ln in lines if ln.startswith("edge-agent: ")]
    if status == 2 and errors:  # the agent refused our input (model, images): one line of its own
        raise InputError(f"device {dev.name}: {errors[-1][len('edge-agent: '):]}")
    tail = " | ".join(lines[-3:]) if lines else "no output"
    raise AutosegError(f"device {dev.name}: edge_agent predict failed (exit {status}): {tail}")


def _put_verified(dev: SSHDevice, sftp: paramiko.SFTPClient, data: bytes, sha: str, remote: str) -> bool:
    """Upload unless the device already holds these bytes; the device's sha256 must be ours. True if uploaded."""
    if _remote_sha(dev, remote) == sha:
        return False
    _makedirs(sftp, posixpath.dirname(remote))
    _put(sftp, data, remote)
    got = _remote_sha(dev, remote)
    if got != sha:
        with suppress(OSError):
            sftp.remove(remote)
        raise DeviceRefused(f"device {dev.name}: {remote} has sha256 {got or '?'} after the copy, expected {sha} "
                            "(disk full there?); removed it, free space and deploy again")
    return True


def _remote_sha(dev: SSHDevice, path: str) -> str | None:
    status, text = dev.run_command(f"{shlex.quote(dev.python)} -c {shlex.quote(_SHA_SCRIPT)} {shlex.quote(path)}",
                                   SHA_TIMEOUT_S)
    line = next((ln for ln in text.splitlines() if ln.startswith("AUTOSEG-SHA256 ")), None)
    return line.split()[1] if status == 0 and line else None


def _put(sftp: paramiko.SFTPClient, data: bytes, remote: str) -> None:
    """Write a file over SFTP under a temp name, renamed when complete: never half a model at that path."""
    tmp = f"{remote}.tmp-{secrets.token_hex(4)}"
    try:
        with sftp.open(tmp, "wb") as f:
            f.set_pipelined(True)
            f.write(data)
        sftp.posix_rename(tmp, remote)
    except BaseException:
        with suppress(Exception):
            sftp.remove(tmp)
        raise


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not sub:
            continue
        try:
            sftp.stat(sub)
        except FileNotFoundError:
            try:
                sftp.mkdir(sub, 0o755)
            except OSError:
                sftp.stat(sub)  # made meanwhile by another process: fine; otherwise this raises


def _expand(path: str, home: str) -> str:
    if path == "~":
        return home
    return posixpath.join(home, path[2:]) if path.startswith("~/") else path


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def summary_lines(r: dict[str, Any]) -> list[str]:
    """What `autoseg deploy` prints."""
    fp = r["fingerprint"]
    where = f"{r['device']} ({fp.get('arch') or '?'}, {fp.get('os') or '?'}"
    where += f", emulated by {fp.get('emulator') or 'user-mode emulation'})" if r["emulated"] else ")"
    copied = (f"copied in {r['upload_s']:.1f} s, sha256 verified on the device" if r["uploaded"]
              else "already there (same sha256)")
    lines = [f"{r['model']} -> {where}:{r['remote_model']} ({r['size_bytes'] / 1e3:.1f} kB, {copied})"]
    p = r.get("predict")
    if p:
        label = " (emulated: function, not timing)" if r["emulated"] else ""
        lines.append(f"{p['images']} image(s) labelled on the device: {p['images_per_s']:.3g} images/s, "
                     f"{p['ms_per_megapixel']:.1f} ms per megapixel on {', '.join(p['providers_used'])}{label}; "
                     f"masks in {r['out']}")
    return lines
