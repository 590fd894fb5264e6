"""LocalDevice: measures in this process with onnxruntime, using the edge agent's own bench code."""

from __future__ import annotations

from typing import Any

from autoseg.devices.records import (
    DEFAULT_MAX_BUSY_CORES,
    MeasureError,
    Measurement,
    MeasureSettings,
    flag,
    one_line,
)
from autoseg.errors import InputError
from edge_agent import bench as _bench
from edge_agent import fingerprint as _fp


class LocalDevice:
    """Measures in this process with onnxruntime, using the agent's bench code."""

    source = "local"

    def __init__(self, max_busy_cores: float | None = DEFAULT_MAX_BUSY_CORES) -> None:
        self.name = "local"
        self.max_busy_cores = max_busy_cores
        self._fp: dict | None = None

    def fingerprint(self) -> dict:
        if self._fp is None:
            self._fp = _fp.fingerprint()
        return self._fp

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement:
        fp = self.fingerprint()

        def result(error: MeasureError, message: str, stats: dict | None = None, **extra: Any) -> Measurement:
            return flag(Measurement(
                error=error, message=message, stats=stats, source="local", device=self.name,
                fingerprint=fp, fingerprint_id=_fp.fingerprint_id(fp),
                temp_before_c=extra.get("tb"), temp_after_c=extra.get("ta"), throttled=extra.get("thr"),
                cpu_others=extra.get("busy"), emulated=bool(fp.get("emulated")),
                providers_used=tuple(extra["used"]) if extra.get("used") else None,
            ), self.max_busy_cores)

        try:
            sess = _bench.make_session(bytes(model), settings.threads, list(settings.providers))
        except _bench.ProviderUnavailable as e:
            raise InputError(f"device.providers: {e}") from None
        except Exception as e:  # onnxruntime raises many types for a bad graph
            return result(MeasureError.LOAD_FAILED, one_line(f"load failed: {e}"))
        try:
            r = _bench.measure_report(sess, list(shape), settings.warmup, settings.min_runs,
                                      settings.min_seconds, seed=settings.seed, cooldown_s=settings.cooldown_s)
        except Exception as e:
            return result(MeasureError.RUN_FAILED, one_line(f"run failed: {e}"))
        finally:
            del sess
        used = r.get("providers_used") or []
        return result(MeasureError.OK, f"providers: {', '.join(used)}" if used else "", r["stats"],
                      tb=r.get("temp_before_c"), ta=r.get("temp_after_c"), thr=r.get("throttled"),
                      busy=r.get("cpu_others"), used=used)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
