"""What a latency measurement is: its settings, its result, the flags that say why a figure is not a clean one,
the Device protocol every device follows and the refusals a device raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from enum import IntEnum
from typing import Any, Literal, Protocol

from autoseg.config import DeviceConfig
from autoseg.errors import DeviceUnreachable


class MeasureError(IntEnum):
    OK = 0
    REFUSED = 1
    LOAD_FAILED = 2
    RUN_FAILED = 3
    UNREACHABLE = 4


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = 5
    min_runs: int = 20
    min_seconds: float = 0.5
    threads: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cooldown_s: float = 0.0
    seed: int = 0

    def key(self) -> str:
        """Stable text form, part of the latency cache key."""
        d = asdict(self)
        d["providers"] = list(self.providers)
        d["min_seconds"] = float(self.min_seconds)
        d["cooldown_s"] = float(self.cooldown_s)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Measurement:
    error: MeasureError
    message: str
    stats: dict | None
    source: Literal["device", "local"]
    device: str
    fingerprint: dict
    fingerprint_id: str
    temp_before_c: float | None
    temp_after_c: float | None
    throttled: bool | None
    cached: bool = False
    # Cores other processes kept busy while this was timed (None where the device cannot tell).
    cpu_others: float | None = None
    # The device ran under user-mode emulation (qemu-user): the figure proves function, not timing.
    emulated: bool = False
    # The execution providers the session really ran on (None where not measured).
    providers_used: tuple[str, ...] | None = None
    # Why the figure is not a clean one (measurement_flags): busy, noisy, throttled, warming, emulated.
    flags: tuple[str, ...] = ()

    @property
    def median_ms(self) -> float | None:
        if self.error != MeasureError.OK or not self.stats:
            return None
        return self.stats.get("median_ms")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error"] = self.error.name
        d["median_ms"] = self.median_ms
        d["flags"] = list(self.flags)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        err = d["error"]
        error = MeasureError[err] if isinstance(err, str) else MeasureError(int(err))
        m = cls(
            error=error,
            message=d.get("message", ""),
            stats=d.get("stats"),
            source=d["source"],
            device=d["device"],
            fingerprint=d.get("fingerprint") or {},
            fingerprint_id=d["fingerprint_id"],
            temp_before_c=d.get("temp_before_c"),
            temp_after_c=d.get("temp_after_c"),
            throttled=d.get("throttled"),
            cached=bool(d.get("cached", False)),
            cpu_others=d.get("cpu_others"),
            emulated=bool(d.get("emulated", False)),
            providers_used=tuple(d["providers_used"]) if d.get("providers_used") else None,
            flags=tuple(d.get("flags") or ()),
        )
        # A record written before flags were kept: judged from its own numbers, at the default limit.
        return m if "flags" in d else flag(m, DEFAULT_MAX_BUSY_CORES)


# ------------------------------------------------------------------ flags: why a figure is not a clean one

DEFAULT_MAX_BUSY_CORES = 0.5  # DeviceConfig.max_busy_cores' default
# A quiet CPU keeps p90 within ~1.2x the median; beyond this the runs were disturbed (the case: 18x).
NOISY_P90_RATIO = 1.5
# std over mean: a spread as wide as half the mean is not one stall among many runs but a disturbed measurement.
NOISY_CV = 0.5
NOISY_MIN_RUNS = 10  # the percentiles of fewer runs say nothing about noise
TEMP_RISE_C = 5.0  # the SoC warming this much while timing: it is on its way to clocking down
FLAG_THROTTLED = "throttled"
FLAG_EMULATED = "emulated"


def measurement_flags(
    stats: Mapping[str, Any] | None,
    cpu_others: float | None,
    throttled: bool | None,
    temp_before_c: float | None,
    temp_after_c: float | None,
    emulated: bool,
    max_busy_cores: float | None,
) -> tuple[str, ...]:
    """Short reasons why a latency is not a clean one; () for a clean one.

    max_busy_cores None switches off the load checks (busy and noisy: both say the machine was shared),
    as `device.max_busy_cores: null` does; throttling, warming and emulation are always flagged.
    """
    flags: list[str] = []
    if max_busy_cores is not None and cpu_others is not None and cpu_others > max_busy_cores:
        flags.append(f"busy: others used {cpu_others:.1f} cores")
    if max_busy_cores is not None and stats and (stats.get("count") or 0) >= NOISY_MIN_RUNS:
        median, p90 = stats.get("median_ms"), stats.get("p90_ms")
        mean, std = stats.get("mean_ms"), stats.get("std_ms")
        if median and p90 is not None and p90 / median > NOISY_P90_RATIO:
            flags.append(f"noisy: p90/median {p90 / median:.1f}")
        elif mean and std is not None and std / mean > NOISY_CV:
            flags.append(f"noisy: CV {std / mean:.2f}")
    if throttled:
        flags.append(FLAG_THROTTLED)
    if temp_before_c is not None and temp_after_c is not None and temp_after_c - temp_before_c > TEMP_RISE_C:
        flags.append(f"temperature rose {temp_after_c - temp_before_c:.1f} °C")
    if emulated:
        flags.append(FLAG_EMULATED)
    return tuple(flags)


def flag(m: Measurement, max_busy_cores: float | None) -> Measurement:
    """m with its flags judged afresh (a failed measurement has no figure to flag)."""
    if m.error != MeasureError.OK:
        return replace(m, flags=())
    # Where the measurement could not tell, the device's own report at connection (a Pi's vcgencmd) stands in.
    throttled = m.throttled if m.throttled is not None else (m.fingerprint or {}).get("throttled")
    return replace(m, flags=measurement_flags(m.stats, m.cpu_others, throttled, m.temp_before_c,
                                              m.temp_after_c, m.emulated, max_busy_cores))


def passing(flags: Sequence[str]) -> tuple[str, ...]:
    """The flags a wait can clear (all but emulation): such a figure is measured again, and never cached."""
    return tuple(f for f in flags if f != FLAG_EMULATED)


def unreliable_note(flags: Sequence[str]) -> str:
    """' (unreliable: ...)' after a figure with flags, '' after a clean one: for summary lines."""
    unique = list(dict.fromkeys(flags))
    return f" (unreliable: {'; '.join(unique)})" if unique else ""


def failure_hint(m: Measurement, opset: int) -> str:
    """What to change when a device cannot measure the models it is sent (m.error is not OK)."""
    ort = (m.fingerprint or {}).get("onnxruntime") or "?"
    where = "this machine" if m.source == "local" else f"{m.device}"
    if m.error == MeasureError.LOAD_FAILED:
        return (f"onnxruntime {ort} on {where} cannot load the models, exported at ONNX opset {opset}: "
                f"lower --opset (export.opset, e.g. 13) to one it supports, or upgrade onnxruntime there")
    if m.error == MeasureError.RUN_FAILED:
        return (f"onnxruntime {ort} on {where} loads the models but cannot run them (out of memory?): "
                "lower --measure-size or allow smaller nets in search.space")
    if m.error == MeasureError.REFUSED:
        return f"the agent on {where} refuses the models: raise device.max_model_mb or allow smaller nets"
    return f"check that {where} is reachable"


class Device(Protocol):
    name: str
    source: str

    def fingerprint(self) -> dict: ...

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement: ...

    def close(self) -> None: ...


class DeviceRefused(DeviceUnreachable):
    """The device answers but cannot be used as configured (host key, login, missing packages).

    Exit code 3 like DeviceUnreachable, but never retried and never replaced by the local fallback:
    these need the user's attention (a changed host key may be an attack).
    """


class DeviceBusy(DeviceRefused):
    """Another measurement held the device's measurement lock for longer than we wait (exit code 3)."""


def settings_from_config(cfg: DeviceConfig, seed: int = 0) -> MeasureSettings:
    return MeasureSettings(
        warmup=cfg.warmup,
        min_runs=cfg.min_runs,
        min_seconds=float(cfg.min_seconds),
        threads=cfg.threads,
        providers=tuple(cfg.providers),
        cooldown_s=float(cfg.cooldown_s),
        seed=seed,
    )



# onnxruntime prefixes its errors with the C++ source line and function signature: noise to a user.
_ORT_SOURCE = re.compile(r"\S*onnxruntime\S*/\S+:\d+ (?:[^()]*\((?:[^()]|\([^()]*\))*\) )?")


def one_line(text: str) -> str:
    return _ORT_SOURCE.sub("", " ".join(str(text).split()))


def unquiet(m: Measurement) -> tuple[bool, int, float]:
    """Sort key: a figure before a failure, then fewer flags a wait can clear, then the less busy device."""
    return m.error != MeasureError.OK, len(passing(m.flags)), m.cpu_others if m.cpu_others is not None else 0.0
