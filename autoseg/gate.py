"""A latency measurement on this machine must not share the CPU with training in another worker.

Parallel search workers pass through a gate made of two flock'ed files in the run directory: every
training epoch holds the room shared; a measurement takes the turnstile (so no new epoch starts), then the
room exclusively (so the epochs in flight finish first). The OS drops the locks of a killed process.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases its lock


class Gate:
    def __init__(self, folder: Path) -> None:
        self.turnstile = Path(folder) / ".gate-turnstile"
        self.room = Path(folder) / ".gate-room"

    @contextmanager
    def epoch(self) -> Iterator[None]:
        """Held by a training epoch; waits while a measurement is queued or running."""
        with _flock(self.turnstile, fcntl.LOCK_SH):
            pass
        with _flock(self.room, fcntl.LOCK_SH):
            yield

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Held by a measurement: no epoch runs in any worker meanwhile."""
        with _flock(self.turnstile, fcntl.LOCK_EX), _flock(self.room, fcntl.LOCK_EX):
            yield
