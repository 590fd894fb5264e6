"""Latency measurement with onnxruntime: the one method used on the device and locally.

autoseg's LocalDevice calls these same functions in-process, so local and device numbers are comparable.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import onnxruntime as ort

from edge_agent import fingerprint as _fp

CPU = "CPUExecutionProvider"
ORT_LOG_ERROR = 3  # onnxruntime severity: 0 verbose .. 3 error, 4 fatal

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def summarize(times_s: Sequence[float]) -> Dict[str, Any]:
    """Latency statistics in milliseconds of a list of per-run times in seconds."""
    ms = np.asarray(list(times_s), dtype=np.float64) * 1000.0
    if ms.size == 0:
        raise ValueError("summarize: no timings")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "min_ms": float(ms.min()),
        "median_ms": float(p50),
        "mean_ms": float(ms.mean()),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "std_ms": float(ms.std()),
        "count": int(ms.size),
    }


class ProviderUnavailable(ValueError):
    """A provider was asked for that this onnxruntime build lacks, and CPU was not allowed in its place."""


def select_providers(requested: Sequence[str]) -> List[str]:
    """Requested providers that this onnxruntime build has, in order, with CPU always last (for the nodes
    the others do not run).

    A provider this build lacks (CUDA or TensorRT on a board without them) raises ProviderUnavailable,
    unless the request lists CPUExecutionProvider too: that allows running on CPU in its place.
    """
    available = list(ort.get_available_providers())
    missing = [p for p in requested if p not in available and p != CPU]
    if missing and CPU not in requested:
        raise ProviderUnavailable(
            f"{', '.join(missing)} not available on this device (onnxruntime {ort.__version__} has "
            f"{', '.join(available)}); install an onnxruntime build with it (e.g. onnxruntime-gpu on a Jetson), "
            f"or list {CPU} after it to allow running on CPU instead")
    chosen: List[str] = []
    for p in requested:
        if p in available and p != CPU and p not in chosen:
            chosen.append(p)
    chosen.append(CPU)
    return chosen


def make_session(
    model: Union[str, bytes, os.PathLike],
    threads: Optional[int] = None,
    providers: Sequence[str] = (CPU,),
) -> ort.InferenceSession:
    """An InferenceSession set up for latency measurement (full graph optimisation, inter-op 1)."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = ORT_LOG_ERROR
    if not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(model, sess_options=so, providers=select_providers(providers))


def input_info(sess: ort.InferenceSession) -> List[Dict[str, Any]]:
    """[{"name", "shape", "type"}] of the session's inputs (symbolic dims as strings or None)."""
    return [{"name": i.name, "shape": list(i.shape), "type": i.type} for i in sess.get_inputs()]


def make_feed(sess: ort.InferenceSession, shape: Sequence[int], seed: int = 0) -> Dict[str, np.ndarray]:
    """Random normal inputs, fixed seed. `shape` is for input 0; others use static dims (dynamic -> 1)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for k, inp in enumerate(sess.get_inputs()):
        dims = [int(d) for d in shape] if k == 0 else _static_dims(inp.shape)
        dtype = _DTYPES.get(inp.type, np.float32)
        feed[inp.name] = rng.standard_normal(dims, dtype=np.float32).astype(dtype)
    return feed


def _static_dims(dims: Sequence[Any]) -> List[int]:
    return [d if isinstance(d, int) and d > 0 else 1 for d in dims]


def measure_session(
    sess: ort.InferenceSession,
    shape: Sequence[int],
    warmup: int,
    min_runs: int,
    min_seconds: float,
    seed: int = 0,
    cooldown_s: float = 0.0,
) -> Dict[str, Any]:
    """summarize() of timed runs; warm-up runs are discarded; runs until BOTH min_runs and min_seconds."""
    feed = make_feed(sess, shape, seed)
    if cooldown_s > 0:
        time.sleep(cooldown_s)
    for _ in range(max(0, int(warmup))):
        sess.run(None, feed)
    min_runs = max(1, int(min_runs))
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return summarize(times)


def _busy_cpu_s() -> Optional[float]:
    """CPU seconds the whole machine spent busy (Linux /proc/stat), or None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_cpu_s() -> float:
    """CPU seconds of this process, onnxruntime's threads included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_report(
    sess: ort.InferenceSession,
    shape: Sequence[int],
    warmup: int,
    min_runs: int,
    min_seconds: float,
    seed: int = 0,
    cooldown_s: float = 0.0,
) -> Dict[str, Any]:
    """The body of a `measure` reply: stats plus the thermal state around the measurement.

    `cpu_others` is how many cores other processes kept busy while we timed: a busy device
    gives inflated latencies even when their spread looks tight, so the host can retry or refuse to cache.
    `throttled` is true when the firmware throttled at any point of the measurement (None without vcgencmd).
    """
    if cooldown_s > 0:
        time.sleep(cooldown_s)
    temp_before = _fp.temperature_c()
    throttle_before = _fp.throttle_state()[1]
    busy_before, own_before, wall_before = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    stats = measure_session(sess, shape, warmup, min_runs, min_seconds, seed=seed)
    busy_after, own_after, wall = _busy_cpu_s(), _own_cpu_s(), time.perf_counter() - wall_before
    temp_after = _fp.temperature_c()
    others = None
    if busy_before is not None and busy_after is not None and wall > 0:
        others = max(0.0, (busy_after - busy_before) - (own_after - own_before)) / wall
    return {
        "stats": stats,
        "cpu_others": others,
        "temp_before_c": temp_before,
        "temp_after_c": temp_after,
        # At either end or in between (a Pi's sticky bits): a throttle that was over by the end still slowed runs.
        "throttled": _fp.throttled_between(throttle_before, _fp.throttle_state()[1]),
        "providers_used": list(sess.get_providers()),
    }
