import os
import platform
from pathlib import Path

# The shared datasets sit beside the clone (../shared/datasets); $AUTOSEG_DATASETS points elsewhere.
DATA_ROOT = Path(os.environ.get("AUTOSEG_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


# A results file's notes written by hand go below this line; a rerun of its bench writes the tables above it anew
# and keeps them.
NOTES_MARK = "<!-- written by hand from here on: a rerun of the bench keeps it -->"


def write_results(path: Path, text: str) -> None:
    """Write a bench's results to `path` (atomically), keeping the notes below NOTES_MARK of the file it replaces."""
    from autoseg.rundir import write_text_atomic  # here: bench_reliability loads nothing of autoseg while it runs

    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else ""
    write_text_atomic(path, text.rstrip("\n") + "\n" + (f"\n{notes}" if notes else ""))
    if notes:
        print(f"{path}: the notes written by hand below the tables were kept; check them against the new numbers")


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
