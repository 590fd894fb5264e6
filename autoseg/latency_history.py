"""What the latency cache knows about nets: the measurements a LatencyPredictor learns from.

The cache (autoseg.devices.LatencyCache) keys a measurement by graph hash, device fingerprint id and settings
(with the input shape); a graph hash does not say which net it was. So the search records, beside the cache's
own table in the same database, the architecture of each graph it timed (LatencyCache.remember_arch). Joining
the two gives, for one fingerprint, settings and precision, every clean measurement of a known net, from this
study (every worker's, when the cache is on the study's server) and from earlier runs that used the same cache.
Measurements from before that table (or of graphs the search did not export itself) have no architecture and
are left out, counted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autoseg.devices.records import one_line
from autoseg.predictor import LatencyRecord
from autoseg.unet import Arch, validate_arch

if TYPE_CHECKING:
    from autoseg.devices.cache import LatencyCache

log = logging.getLogger(__name__)

SHAPE_SEP = "|shape="  # CachedDevice.measure's key: f"{settings.key()}|shape={'x'.join(dims)}"


@dataclass(frozen=True)
class History:
    records: list[LatencyRecord]
    unknown: int  # measurements of this fingerprint whose net is not recorded
    corrupt: int  # entries skipped as unreadable


def remember_arch(cache: LatencyCache, graph_hash: str, arch: Arch, in_channels: int, num_classes: int,
                  precision: str) -> None:
    """Record which net `graph_hash` is, so later fits can use its measurements. Best effort: a cache that
    cannot be written costs the predictor a record, never the search."""
    import sqlalchemy as sa

    try:
        cache.remember_arch(graph_hash, arch.to_dict(), in_channels, num_classes, precision)
    except sa.exc.SQLAlchemyError as e:
        log.warning("latency cache %s: cannot record the net of a measurement (%s); the predictor will not use it",
                    cache.where, one_line(str(e)))


def _shape(text: str) -> tuple[int, int]:
    dims = [int(d) for d in text.split("x")]
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"shape {text!r} is not NxCxHxW")
    return dims[2], dims[3]


def load_history(cache: LatencyCache, fingerprint_id: str, settings_key: str, precision: str) -> History:
    """Clean measurements of known nets on `fingerprint_id` with these settings (MeasureSettings.key()) and
    precision. A corrupt entry is skipped with a warning; a cache that cannot be read gives no records."""
    import sqlalchemy as sa

    try:
        rows = cache.history_rows(fingerprint_id)
    except sa.exc.SQLAlchemyError as e:
        log.warning("latency cache %s: cannot be read for the predictor (%s); measuring every net", cache.where,
                    one_line(str(e)))
        return History([], 0, 0)
    records: dict[tuple[str, tuple[int, int]], LatencyRecord] = {}
    unknown = corrupt = 0
    for ghash, key, text, arch_text, ic, nc, prec in rows:
        settings, sep, shape = str(key).partition(SHAPE_SEP)
        if settings != settings_key or not sep:
            continue
        if arch_text is None:
            unknown += 1
            continue
        if prec != precision:
            continue
        try:
            m = json.loads(text)
            ms = float(m["stats"]["median_ms"]) if m.get("stats") else float(m["median_ms"])
            if m.get("error") not in ("OK", 0) or not ms > 0:
                raise ValueError("not an OK measurement with a positive median")
            arch = Arch.from_dict(json.loads(arch_text))
            validate_arch(arch)
            size = _shape(shape)
            rec = LatencyRecord(arch, size, ms, int(ic), int(nc))
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
            corrupt += 1
            log.warning("latency cache %s: entry %s… skipped, it cannot be read (%s)", cache.where, str(ghash)[:12],
                        e)
            continue
        records[(arch.key(), size)] = rec  # the latest measurement of a net at a size
    return History(list(records.values()), unknown, corrupt)


REFIT_EVERY = 5  # new measurements between refits: a fit takes milliseconds, a measurement seconds


@dataclass(frozen=True)
class Guess:
    """A predicted latency (ms) and its band, with the fit that made it."""

    median_ms: float
    lo_ms: float
    hi_ms: float
    fit: dict

    def attrs(self) -> dict:
        return {"latency_predicted_ms": self.median_ms, "latency_predicted_lo_ms": self.lo_ms,
                "latency_predicted_hi_ms": self.hi_ms, "latency_predictor": self.fit}


class Learner:
    """Keeps a LatencyPredictor fitted on one fingerprint, settings and precision as measurements arrive.

    Its records are the cache's (every run that used it, including parallel workers; reread at each refit) and
    this process's own (which is all there is without a cache)."""

    def __init__(self, cache: LatencyCache | None, fingerprint_id: str, settings_key: str, precision: str,
                 refit_every: int = REFIT_EVERY, min_measurements: int | None = None) -> None:
        from autoseg.predictor import MIN_MEASUREMENTS, LatencyPredictor

        self.cache = cache
        self.fingerprint_id, self.settings_key, self.precision = fingerprint_id, settings_key, precision
        self.refit_every = refit_every
        self.session: dict[tuple, LatencyRecord] = {}
        self.predictor = LatencyPredictor(MIN_MEASUREMENTS if min_measurements is None else min_measurements)
        self.fit_info: dict = {}
        self._new = 0
        self._said = ""
        self._refit()

    def add(self, rec: LatencyRecord) -> None:
        self.session[(rec.arch.key(), rec.size, rec.in_channels, rec.num_classes)] = rec
        self._new += 1
        # Every refit_every new ones, and at once when the minimum is reached.
        if self._new >= self.refit_every or (self.predictor.n < self.predictor.min_measurements
                                             <= self.predictor.n + self._new):
            self._refit()

    def records(self) -> tuple[list[LatencyRecord], History]:
        hist = (load_history(self.cache, self.fingerprint_id, self.settings_key, self.precision)
                if self.cache is not None else History([], 0, 0))
        merged = {(r.arch.key(), r.size, r.in_channels, r.num_classes): r for r in hist.records}
        merged.update(self.session)
        return list(merged.values()), hist

    def _refit(self) -> None:
        recs, hist = self.records()
        p = self.predictor.fit(recs)
        self._new = 0
        self.fit_info = {"n": p.n, "model": p.kind, "usable": p.usable,
                         "cv_within_10": p.cv.within_10 if p.cv else None, "cv_mape": p.cv.mape if p.cv else None}
        if p.usable:
            say = (f"latency predictor: fitted on {p.n} measured nets ({p.kind}), {p.cv.text() if p.cv else ''}; "
                   "nets predicted over the budget by more than their uncertainty are not measured")
        else:
            say = f"latency predictor not used: {p.why_not()}; measuring every net"
            if hist.unknown and p.n < p.min_measurements:
                say += f" ({hist.unknown} cached measurements are of nets not recorded, from before it)"
        # One line per change of state, not one per refit.
        state = say.split(":")[0] + str(p.usable) + (str(p.n >= p.min_measurements))
        if state != self._said:
            log.info("%s", say)
            self._said = state

    def guess(self, arch: Arch, size: int, in_channels: int, num_classes: int) -> Guess | None:
        """The prediction for a net, when the predictor is fitted (usable or not: its error is kept too)."""
        if not self.predictor.fitted or self.predictor.n < self.predictor.min_measurements:
            return None
        med, lo, hi = self.predictor.predict(arch, size, in_channels, num_classes)
        return Guess(med, lo, hi, dict(self.fit_info))
