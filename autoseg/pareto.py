"""The Pareto front of (score, latency) points: the nets no other net beats on both."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, ordered by latency (then by score, best first).

    Each point is (score, latency): score is maximised, latency minimised. A point is dominated when
    another is at least as good on both and strictly better on one; exact duplicates both stay
    (callers drop repeated trials of one net first).
    Points with a non-finite coordinate are never on the front.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    s, lat = pts[:, 0], pts[:, 1]
    ok = np.isfinite(s) & np.isfinite(lat)
    front = []
    for i in np.flatnonzero(ok):
        dominated = ok & (s >= s[i]) & (lat <= lat[i]) & ((s > s[i]) | (lat < lat[i]))
        if not dominated.any():
            front.append(int(i))
    return sorted(front, key=lambda i: (lat[i], -s[i], i))
