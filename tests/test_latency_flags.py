"""Latency flags: a figure timed on a busy, noisy, throttled or warming device never passes as a clean one.

Real onnxruntime (LocalDevice) times every model; where a test needs a busy or noisy device it overwrites
the figures the real measurement returned (fed stats), so the outcome does not hang on this machine's load.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from autoseg.devices import (
    CachedDevice,
    LatencyCache,
    LocalDevice,
    MeasureError,
    Measurement,
    MeasureSettings,
    flag,
    measure_quiet,
    measurement_flags,
    unreliable_note,
)
from autoseg.devices import measure as measure_module
from autoseg.devices.cache import _graph_hash
from autoseg.model_card import _int8_summary, summary_lines
from autoseg.pipeline import chosen_latency
from edge_agent.fingerprint import fingerprint_id, throttled_between

FAST = MeasureSettings(warmup=1, min_runs=3, min_seconds=0.02)
SHAPE = (1, 3, 32, 32)
CLEAN = {"min_ms": 0.9, "median_ms": 1.0, "mean_ms": 1.02, "p90_ms": 1.1, "p99_ms": 1.2, "std_ms": 0.05, "count": 40}
# The busy run: p90 8.5 ms against a median of 0.47 ms.
NOISY = {"min_ms": 0.4, "median_ms": 0.47, "mean_ms": 1.9, "p90_ms": 8.5, "p99_ms": 9.0, "std_ms": 3.0, "count": 40}


def flags(stats=CLEAN, others=0.0, throttled=False, before=40.0, after=41.0, emulated=False, limit=0.5):
    return measurement_flags(stats, others, throttled, before, after, emulated, limit)


# ------------------------------------------------------------------ the pure judgement


def test_a_quiet_measurement_has_no_flags():
    assert flags() == ()
    assert flags(others=None, throttled=None, before=None, after=None) == ()  # a device that cannot tell


def test_busy_names_the_cores_others_used():
    assert flags(others=1.3) == ("busy: others used 1.3 cores",)
    assert flags(others=0.5) == ()  # at the limit, not over it
    assert flags(others=1.3, limit=2.0) == ()


def test_noisy_by_p90_over_median_or_by_cv():
    assert flags(NOISY) == ("noisy: p90/median 18.1",)
    wide = {**CLEAN, "p90_ms": 1.2, "std_ms": 0.8, "mean_ms": 1.3}  # tight p90, one long stall pulls std up
    assert flags(wide) == ("noisy: CV 0.62",)
    assert flags({**NOISY, "count": 5}) == ()  # the percentiles of 5 runs say nothing about noise


def test_null_limit_switches_the_load_checks_off_but_not_the_thermal_ones():
    assert flags(NOISY, others=1.9, limit=None) == ()
    assert flags(NOISY, others=1.9, throttled=True, before=40.0, after=47.5, limit=None) == (
        "throttled", "temperature rose 7.5 °C")


def test_throttled_warming_and_emulated_are_flagged_in_a_fixed_order():
    assert flags(NOISY, others=1.3, throttled=True, before=50.0, after=56.0, emulated=True) == (
        "busy: others used 1.3 cores", "noisy: p90/median 18.1", "throttled", "temperature rose 6.0 °C", "emulated")
    assert flags(before=50.0, after=55.0) == ()  # 5 °C is the limit


def test_throttled_between_reads_the_pis_sticky_bits():
    assert throttled_between("0x0", "0x0") is False
    assert throttled_between("0x0", "0x40000") is True  # throttling occurred during, over by the end
    assert throttled_between("0x40000", "0x40000") is False  # occurred before we started: not ours
    assert throttled_between("0x50005", "0x50000") is True  # throttled at the start
    assert throttled_between("0x0", "0x4") is True
    assert throttled_between(None, None) is None  # no vcgencmd: unknown
    assert throttled_between(None, "0x0") is False and throttled_between("junk", "0x4") is True


def test_flags_round_trip_and_old_records_are_judged_from_their_numbers():
    m = Measurement(MeasureError.OK, "", NOISY, "device", "pi@h:22", {"cores": 4}, "ab" * 8, 40.0, 47.0, True,
                    cpu_others=1.3, flags=("throttled",))
    d = m.to_dict()
    assert d["flags"] == ["throttled"]
    assert Measurement.from_dict(d) == m  # stored flags are kept as they were judged
    del d["flags"]  # written before flags existed
    assert Measurement.from_dict(d).flags == (
        "busy: others used 1.3 cores", "noisy: p90/median 18.1", "throttled", "temperature rose 7.0 °C")
    # The fingerprint's vcgencmd reading stands in where the measurement could not tell.
    old = {**d, "throttled": None, "fingerprint": {"throttled": True}, "stats": CLEAN, "cpu_others": 0.0,
           "temp_after_c": 40.0}
    assert Measurement.from_dict(old).flags == ("throttled",)


def test_unreliable_note():
    assert unreliable_note([]) == ""
    assert unreliable_note(["busy: others used 1.3 cores", "busy: others used 1.3 cores", "throttled"]) == (
        " (unreliable: busy: others used 1.3 cores; throttled)")


# ------------------------------------------------------------------ real measurements, fed figures


class Fed:
    """A real LocalDevice whose first `bad` measurements come back with the given figures (busy or noisy),
    and the rest with quiet ones: onnxruntime really runs, the load is what the test says."""

    source = "local"
    name = "local"

    def __init__(self, bad: int, stats: dict = CLEAN, others: float = 0.0, **extra: object) -> None:
        self.inner = LocalDevice()
        self.bad, self.stats, self.others, self.extra = bad, stats, others, extra
        self.calls = 0

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement:
        m = self.inner.measure(model, shape, settings)
        assert m.error == MeasureError.OK and m.stats["count"] >= 3  # onnxruntime really timed it
        self.calls += 1
        quiet = {"stats": CLEAN, "cpu_others": 0.0, "temp_before_c": 40.0, "temp_after_c": 40.0, "throttled": False}
        if self.calls <= self.bad:
            return replace(m, **{**quiet, "stats": self.stats, "cpu_others": self.others, **self.extra})
        return replace(m, **quiet)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("bad, want", [
    ({"others": 1.3}, "busy: others used 1.3 cores"),
    ({"stats": NOISY}, "noisy: p90/median 18.1"),
    ({"throttled": True}, "throttled"),
])
def test_a_flagged_measurement_is_measured_again_then_kept_flagged_and_not_cached(tiny_onnx, bad, want):
    dev = CachedDevice(Fed(99, **bad), LatencyCache(":memory:"), busy_wait_s=0.0)
    first = dev.measure(tiny_onnx, SHAPE, FAST)
    assert first.flags == (want,) and dev.inner.calls == 2  # measured again once
    assert "not cached" in first.message and want in first.message and len(dev.cache) == 0
    second = dev.measure(tiny_onnx, SHAPE, FAST)
    assert not second.cached and second.flags == (want,) and dev.hits == 0


def test_a_quiet_retry_is_cached_with_no_flags(tiny_onnx):
    dev = CachedDevice(Fed(1, NOISY), LatencyCache(":memory:"), busy_wait_s=0.0)
    m = dev.measure(tiny_onnx, SHAPE, FAST)
    assert m.flags == () and m.median_ms == CLEAN["median_ms"] and len(dev.cache) == 1
    again = dev.measure(tiny_onnx, SHAPE, FAST)
    assert again.cached and again.flags == () and dev.inner.calls == 2


def test_an_emulated_figure_is_flagged_but_cached(tiny_onnx):
    """Emulation does not pass with a wait: its figure proves function, and is cached under its own fingerprint."""
    dev = CachedDevice(Fed(99, emulated=True), LatencyCache(":memory:"), busy_wait_s=0.0)
    m = dev.measure(tiny_onnx, SHAPE, FAST)
    assert m.flags == ("emulated",) and dev.inner.calls == 1 and len(dev.cache) == 1
    assert dev.measure(tiny_onnx, SHAPE, FAST).cached


def test_a_noisy_entry_cached_before_flags_existed_is_measured_again(tiny_onnx):
    dev = CachedDevice(Fed(0), LatencyCache(":memory:"))
    fid = fingerprint_id(dev.fingerprint())
    key = f"{FAST.key()}|shape=1x3x32x32"
    old = Measurement(MeasureError.OK, "", NOISY, "local", "local", dev.fingerprint(), fid, None, None, None).to_dict()
    del old["flags"]
    dev.cache.put(_graph_hash(tiny_onnx), fid, key, old)
    m = dev.measure(tiny_onnx, SHAPE, FAST)
    assert not m.cached and m.flags == () and dev.inner.calls == 1 and dev.hits == 0


def test_measure_quiet_waits_for_a_quiet_device(tiny_onnx, monkeypatch):
    monkeypatch.setattr(measure_module, "QUIET_FIRST_PAUSE_S", 0.01)
    fed = Fed(2, others=1.3)  # fp32 busy in round 1, int8 busy in round 1: quiet from round 2
    dev = CachedDevice(fed, LatencyCache(":memory:"))
    timed, lost = measure_quiet(dev, {"fp32": tiny_onnx, "int8": tiny_onnx}, SHAPE, FAST, max_wait_s=5.0)
    assert lost is None and fed.calls == 4  # both timed again, alike
    assert all(m.flags == () and m.median_ms == CLEAN["median_ms"] for m in timed.values())


def test_measure_quiet_gives_up_after_its_wait_and_keeps_the_flags(tiny_onnx, monkeypatch):
    monkeypatch.setattr(measure_module, "QUIET_FIRST_PAUSE_S", 0.02)
    fed = Fed(99, others=1.3)
    timed, lost = measure_quiet(CachedDevice(fed, LatencyCache(":memory:")), {"chosen net": tiny_onnx}, SHAPE, FAST,
                                max_wait_s=0.05)
    # pauses of 0.02 then 0.03 s (capped by what is left): three rounds in all
    assert lost is None and fed.calls == 3 and timed["chosen net"].flags == ("busy: others used 1.3 cores",)


# ------------------------------------------------------------------ the run's last figures


def test_int8_comparison_is_plain_only_when_both_figures_are_clean():
    q = {"test_miou": 0.5, "latency_ms": 1.73, "fp32_latency_ms": 15.87, "size_bytes": 4000, "path": "m.int8.onnx",
         "latency_flags": [], "fp32_latency_flags": []}
    (line,) = _int8_summary(q)
    assert "1.73 ms vs 15.87 ms float, ONNX 4.0 kB" in line and "unreliable" not in line
    (line,) = _int8_summary({**q, "fp32_latency_flags": ["busy: others used 1.3 cores"]})
    assert "1.73 ms vs 15.87 ms float (unreliable: busy: others used 1.3 cores)" in line
    (line,) = _int8_summary({k: v for k, v in q.items() if not k.endswith("flags")})  # a card from before flags
    assert "1.73 ms vs 15.87 ms float," in line


def test_summary_flags_the_chosen_nets_latency():
    card = {"arch": "a", "trial": 3, "tile": 16, "cv_score": 0.5, "cv_std": 0.1, "test_miou": 0.4, "test_images": 2,
            "latency_ms": 0.47, "measure_size": None, "device": "local", "latency_source": "local",
            "params": 1000, "macs": 2e6, "onnx": {"size_bytes": 5000}, "latency_flags": ["noisy: p90/median 18.1"]}
    latency_line = next(x for x in summary_lines(card) if "latency:" in x)
    assert latency_line.endswith("on local (local) (unreliable: noisy: p90/median 18.1)")
    card["latency_flags"] = []
    assert next(x for x in summary_lines(card) if "latency:" in x).endswith("on local (local)")


def search_attrs(stats: dict, others: float) -> dict:
    m = Measurement(MeasureError.OK, "", stats, "local", "local", {}, "ab" * 8, 40.0, 40.0, False, cpu_others=others)
    m = flag(m, 0.5)
    return {"latency": m.to_dict(), "latency_ms": m.median_ms, "latency_source": "local", "device": "local",
            "measure_size": 32}


def test_chosen_latency_times_a_flagged_search_figure_again(tiny_onnx, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(measure_module, "QUIET_FIRST_PAUSE_S", 0.01)
    graph = tmp_path / "model.onnx"
    graph.write_bytes(tiny_onnx)
    attrs = search_attrs(NOISY, 1.3)
    # Without a device (shipping another trial's net) the search's figure stays, with its flags.
    kept = chosen_latency(attrs, 3, graph)
    assert kept["latency_ms"] == 0.47 and kept["latency_flags"] == ["busy: others used 1.3 cores",
                                                                    "noisy: p90/median 18.1"]
    fed = Fed(1, NOISY, 1.3)  # still busy at the first try, quiet at the second
    card = chosen_latency(attrs, 3, graph, CachedDevice(fed, LatencyCache(":memory:")), FAST)
    assert fed.calls == 2 and card["latency_ms"] == CLEAN["median_ms"] and card["latency_flags"] == []
    assert card["search_latency_ms"] == 0.47 and card["search_latency_flags"] == kept["latency_flags"]
    # A clean search figure is not timed again.
    clean = chosen_latency(search_attrs(CLEAN, 0.0), 3, graph, CachedDevice(fed, LatencyCache(":memory:")), FAST)
    assert fed.calls == 2 and clean["latency_flags"] == [] and "search_latency_ms" not in clean
