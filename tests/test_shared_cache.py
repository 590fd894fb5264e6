"""The latency cache on the study's database server (a real PostgreSQL, tests/postgres.py): what one host
measured, every other host reads, and the predictor learns from all of them."""

from __future__ import annotations

import subprocess
import sys
from contextlib import closing

import pytest
import sqlalchemy

from autoseg.config import DeviceConfig
from autoseg.devices import CachedDevice, LatencyCache, MeasureSettings
from autoseg.devices.measure import open_device
from autoseg.latency_history import load_history, remember_arch
from autoseg.unet import Arch

pytestmark = pytest.mark.postgres

FAST = MeasureSettings(warmup=1, min_runs=3, min_seconds=0.02, threads=1)
ARCH = Arch(kernels=(3, 3), channels=(8, 16))


def test_two_hosts_share_one_cache_on_the_server(postgres_url):
    a, b = LatencyCache(postgres_url), LatencyCache(postgres_url)  # two hosts' processes
    assert a.path is None and "***" in a.where and "pg-test-pw" not in a.where
    a.put("g", "fp", "k", {"median_ms": 2.0})
    assert b.get("g", "fp", "k") == {"median_ms": 2.0} and b.get("g", "other", "k") is None
    b.put("g", "fp", "k", {"median_ms": 3.0})  # measured again (it was flagged): replaced, not an error
    assert a.get("g", "fp", "k") == {"median_ms": 3.0} and len(a) == 1
    remember_arch(a, "g", ARCH, 3, 2, "fp32")
    remember_arch(b, "g", Arch(kernels=(5, 5), channels=(8, 16)), 3, 2, "fp32")  # the first record stays
    key = MeasureSettings().key()
    a.put("g2", "fp", f"{key}|shape=1x3x32x32", {"error": "OK", "median_ms": 4.0, "stats": {"median_ms": 4.0}})
    remember_arch(b, "g2", ARCH, 3, 2, "fp32")
    hist = load_history(a, "fp", key, "fp32")
    assert [(r.arch, r.size, r.latency_ms) for r in hist.records] == [(ARCH, (32, 32), 4.0)]
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:  # our tables say whose they are, beside Optuna's
        names = set(sqlalchemy.inspect(conn).get_table_names())
    engine.dispose()
    assert {"autoseg_latency", "autoseg_latency_arch"} <= names
    a.close()
    b.close()


def test_a_measurement_from_one_host_is_a_cache_hit_on_another(postgres_url, tiny_onnx):
    cfg = DeviceConfig(target="local", max_busy_cores=None)
    with closing(open_device(cfg, None, postgres_url)) as first:
        m = first.measure(tiny_onnx, (1, 3, 16, 16), FAST)
        assert not m.cached and m.median_ms > 0
    with closing(open_device(cfg, None, postgres_url)) as second:  # another host: nothing of its own
        again = second.measure(tiny_onnx, (1, 3, 16, 16), FAST)
        assert again.cached and again.median_ms == m.median_ms
        assert isinstance(second, CachedDevice) and second.hits == 1 and second.misses == 0


def test_a_dropped_connection_is_replaced_and_processes_racing_on_one_key_do_not_fail(postgres_server,
                                                                                     postgres_url):
    cache = LatencyCache(postgres_url)
    cache.put("g", "fp", "k", {"median_ms": 1.0})
    db = postgres_url.rsplit("/", 1)[1]
    # The server drops the idle connection (a restart, an idle timeout during a long fold).
    postgres_server.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' "
                          "AND pid <> pg_backend_pid()")
    assert cache.get("g", "fp", "k") == {"median_ms": 1.0}
    cache.close()
    race = ("import sys; from autoseg.devices import LatencyCache\n"
            "c = LatencyCache(sys.argv[1])\n"
            "for i in range(30): c.put(f'g{i}', 'fp', 'k', {'by': sys.argv[2]}); "
            "c.remember_arch(f'g{i}', {'kernels': [3]}, 3, 2, 'fp32')\n")
    procs = [subprocess.Popen([sys.executable, "-c", race, postgres_url, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with closing(LatencyCache(postgres_url)) as cache:
        assert len(cache) == 31


def test_without_a_server_the_cache_stays_a_file_in_the_run(tmp_path, tiny_onnx):
    cfg = DeviceConfig(target="local", max_busy_cores=None)
    with closing(open_device(cfg, tmp_path / "latency_cache.db", f"sqlite:///{tmp_path}/study.db")) as dev:
        dev.measure(tiny_onnx, (1, 3, 16, 16), FAST)
        assert isinstance(dev, CachedDevice) and dev.cache.path == str(tmp_path / "latency_cache.db")
