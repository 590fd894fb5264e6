"""What the measurements ran on: a best-effort description of the device. Never raises.

Every field is optional (None when the file/tool is missing), so this works on a laptop, a
Raspberry Pi, a Jetson or inside a container alike.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import threading
from typing import Any, Dict, Optional, Tuple

# Keys that identify the device + runtime; volatile state (temperature, frequency) is excluded.
STABLE_KEYS = ("machine", "arch", "cpu_model", "cores", "ram_mb", "os", "onnxruntime", "providers")
# MemTotal moves by a few MB between kernels; round so the same board keeps the same id.
RAM_ROUND_MB = 256
VCGENCMD_TIMEOUT_S = 2.0
# What each kernel architecture runs natively: its own binaries and its 32-bit compat ones.
_NATIVE = {
    "x86_64": ("x86_64", "amd64", "i386", "i486", "i586", "i686"),
    "aarch64": ("aarch64", "arm64", "armv8l", "armv7l", "armv6l", "arm"),
    "ppc64le": ("ppc64le", "ppc64", "ppc"),
    "s390x": ("s390x", "s390"),
    "riscv64": ("riscv64", "riscv32"),
}


def fingerprint() -> Dict[str, Any]:
    throttled_now, throttled_raw = throttle_state()
    return {
        "machine": _safe(platform.node) or None,
        "arch": _safe(platform.machine) or None,
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "ram_mb": ram_mb(),
        "os": os_name(),
        "python": platform.python_version(),
        "numpy": _module_version("numpy"),
        "onnxruntime": _module_version("onnxruntime"),
        "providers": _providers(),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "cpu_freq_mhz": cpu_freq_mhz(),
        "temperature_c": temperature_c(),
        "throttled": throttled_now,
        "throttled_raw": throttled_raw,
        **emulation(_safe(platform.machine)),
    }


def fingerprint_id(fp: Dict[str, Any]) -> str:
    """16 hex chars identifying the device + runtime (stable keys only)."""
    stable = {k: fp.get(k) for k in STABLE_KEYS}
    if fp.get("emulated"):  # only then, so that the ids of real devices stay what they were
        stable["emulated"] = True
    ram = stable.get("ram_mb")
    if isinstance(ram, (int, float)) and not isinstance(ram, bool):
        stable["ram_mb"] = round(ram / RAM_ROUND_MB) * RAM_ROUND_MB
    providers = stable.get("providers")
    if isinstance(providers, (list, tuple)):
        stable["providers"] = sorted(str(p) for p in providers)
    blob = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def emulation(arch: Optional[str]) -> Dict[str, Any]:
    """Whether this process runs under user-mode emulation (qemu-user through binfmt_misc, say: aarch64
    python on an x86_64 kernel), where latencies are hundreds of times those of the real device.

    {"emulated": True/False (None: no /proc to tell), "emulator": what runs us, "kernel_arch": the kernel's}.
    Signals, any of which suffices: the executable the kernel runs is not the one we see (qemu answers
    /proc/self/exe with the guest binary, but not /proc/self/task/<tid>/exe), the kernel's architecture
    (/proc/sys/kernel/arch) cannot run ours natively, or /proc/cpuinfo describes another architecture's CPU.
    """
    kernel = _read("/proc/sys/kernel/arch")
    emulator = None
    seen = real = None
    try:
        seen = os.readlink("/proc/self/exe")
        tid = threading.get_native_id() if hasattr(threading, "get_native_id") else os.getpid()
        real = os.readlink(f"/proc/self/task/{tid}/exe")
    except (OSError, AttributeError):
        pass
    if seen and real and os.path.basename(seen) != os.path.basename(real):
        emulator = "qemu-user" if "qemu" in real else os.path.basename(real)
        emulator = f"{emulator} ({real})"
    mismatch = None
    own = (arch or "").lower()
    if kernel and own:
        mismatch = own not in _NATIVE.get(kernel, (kernel,))
    info = _cpuinfo()
    if own and info:
        x86_cpu = "vendor_id" in info or "flags" in info
        arm_cpu = "CPU implementer" in info or "Features" in info
        if (own in _NATIVE["aarch64"] and x86_cpu) or (own in _NATIVE["x86_64"] and arm_cpu and not x86_cpu):
            mismatch = True
        elif mismatch is None:
            mismatch = False
    if emulator is None and mismatch and kernel:
        emulator = f"user-mode emulation on a {kernel} kernel"
    emulated = True if emulator or mismatch else (None if seen is None and mismatch is None else False)
    return {"emulated": emulated, "emulator": emulator, "kernel_arch": kernel}


def temperature_c() -> Optional[float]:
    """Hottest thermal zone in degrees C, or None if the kernel exposes none."""
    temps = []
    for path in sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp")):
        raw = _read(path)
        try:
            value = int(raw) / 1000.0 if raw is not None else None
        except ValueError:
            value = None
        # Some zones report nonsense (e.g. -273 or 0 for absent sensors): keep plausible readings.
        if value is not None and -40.0 < value < 150.0:
            temps.append(value)
    return max(temps) if temps else None


def throttled() -> Optional[bool]:
    """True if the Pi firmware reports throttling/under-voltage now; None where vcgencmd is absent."""
    return throttle_state()[0]


def throttle_state() -> Tuple[Optional[bool], Optional[str]]:
    """(throttled now, raw hex string) from `vcgencmd get_throttled`; (None, None) if unavailable.

    Bits 0-3 of the firmware word are the *current* state: under-voltage, arm frequency capped,
    currently throttled, soft temperature limit. Bits 16-19 are "has occurred since boot" and are
    reported only through the raw value.
    """
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None, None
    try:
        # Fixed argv, no shell, short timeout: the only external command the agent ever runs.
        out = subprocess.run(
            [exe, "get_throttled"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=VCGENCMD_TIMEOUT_S,
            check=False,
        ).stdout.decode("ascii", "replace")
    except (OSError, subprocess.SubprocessError):
        return None, None
    return parse_throttled(out)


def parse_throttled(text: str) -> Tuple[Optional[bool], Optional[str]]:
    """Parse 'throttled=0x50005' -> (True, '0x50005'); anything unparsable -> (None, None)."""
    raw = text.strip().split("=", 1)[-1].strip()
    try:
        value = int(raw, 16)
    except ValueError:
        return None, None
    return bool(value & 0xF), raw


def throttled_between(before: Optional[str], after: Optional[str]) -> Optional[bool]:
    """Whether the firmware throttled at any time between two raw `get_throttled` words (None: unknown).

    Bits 0-3 say "now" at either end; a "has occurred since boot" bit (16-19) that was clear before and set
    after says it happened in between, even when it was over by the end.
    """
    words = []
    for raw in (before, after):
        try:
            words.append(int(raw, 16) if raw is not None else None)
        except ValueError:
            words.append(None)
    b, a = words
    if a is None:
        return None if b is None else bool(b & 0xF) or None
    if b is None:
        return bool(a & 0xF)
    return bool((a | b) & 0xF) or bool((a >> 16) & 0xF & ~(b >> 16))


def cpu_model() -> Optional[str]:
    # A Pi/Jetson names the board in the device tree; that is more telling than the ARM core name.
    board = _read("/proc/device-tree/model")
    if board:
        return board
    info = _cpuinfo()
    for key in ("model name", "Model", "Hardware", "Processor", "cpu model"):
        if info.get(key):
            return info[key]
    return _safe(platform.processor) or None


def ram_mb() -> Optional[int]:
    text = _read("/proc/meminfo")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            try:
                return int(parts[1]) // 1024  # kB
            except (IndexError, ValueError):
                return None
    return None


def os_name() -> Optional[str]:
    text = _read("/etc/os-release")
    if text:
        for line in text.splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"').strip("'") or None
    return _safe(platform.platform) or None


def cpu_freq_mhz() -> Optional[float]:
    raw = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    try:
        return int(raw) / 1000.0 if raw is not None else None  # kHz
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return None
    text = data.decode("utf-8", "replace").replace("\x00", "").strip()
    return text or None


def _cpuinfo() -> Dict[str, str]:
    info: Dict[str, str] = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if ":" in line:
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key and val and key not in info:
                info[key] = val
    return info


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception:
        return None


def _module_version(name: str) -> Optional[str]:
    try:
        mod = __import__(name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "")) or None


def _providers() -> Optional[list]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:
        return None
