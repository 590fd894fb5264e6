import os
import platform
from pathlib import Path

# The shared datasets sit beside the clone (../shared/datasets); $AUTOSEG_DATASETS points elsewhere.
DATA_ROOT = Path(os.environ.get("AUTOSEG_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def peak_rss_mb() -> float:
    """This process's peak RSS in MB (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not on Windows; /proc is Linux only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_and_ram() -> tuple[str, str]:
    """The CPU's model name and the RAM ("15 GiB RAM"), for the machine line of a benchmark's results."""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    try:
        ram = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        ram = "RAM unknown"
    return cpu, ram
