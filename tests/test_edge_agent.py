"""edge_agent: the on-device agent, driven as a real subprocess over JSON lines.

Models are tiny Conv+Relu ONNX graphs built here with onnx.helper. Budget: < 25 s.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge_agent
from edge_agent import protocol
from edge_agent.fingerprint import fingerprint, fingerprint_id, parse_throttled

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "edge_agent"
TIMEOUT = 30.0
FAST = {"warmup": 1, "min_runs": 5, "min_seconds": 0.05, "threads": 1}
STATS_KEYS = {"min_ms", "median_ms", "mean_ms", "p90_ms", "p99_ms", "std_ms", "count"}
FP_KEYS = {
    "machine", "arch", "cpu_model", "cores", "ram_mb", "os", "python", "numpy", "onnxruntime", "providers",
    "governor", "cpu_freq_mhz", "temperature_c", "throttled", "throttled_raw",
}


def conv_relu_model(out_channels: int = 4, in_channels: int = 3) -> bytes:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out_channels, in_channels, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", in_channels, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_channels, "H", "W"])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by older onnxruntime builds too
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return conv_relu_model()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Agent:
    """`python -m edge_agent serve` in a subprocess; every stdout line must be a protocol line.

    The measurement lock is <tmp>/lock/measure.lock unless `lock` says otherwise (None: the agent's default).
    """

    def __init__(self, tmp: Path, *extra: str, lock: Path | str | None = "", cache: Path | None = None,
                 env: dict | None = None) -> None:
        self.cache = cache or tmp / "cache"
        self.models = self.cache / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        self.err_path = tmp / "agent.stderr"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 (lives as long as the agent)
        self.lock = tmp / "lock" / "measure.lock" if lock == "" else lock
        self.nonce = f"test-{os.getpid()}-{id(self):x}"
        args = ["--cache-dir", str(self.cache), "--nonce", self.nonce]
        if self.lock is not None:
            args += ["--lock", str(self.lock)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "serve", *args, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, cwd=REPO, bufsize=0, env=env,
        )
        self._id = 0
        self.progress: list[dict] = []
        first = self.read_line()
        assert first == protocol.ready_line(self.nonce), first[:200]  # the framing marker comes first
        self.hello: dict | None = None

    def send_raw(self, line: bytes) -> dict:
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        return self.read()

    def read_line(self) -> bytes:
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        assert ready, f"agent did not answer within {TIMEOUT}s; stderr:\n{self.stderr()}"
        line = self.proc.stdout.readline()
        assert line.endswith(b"\n"), f"agent closed stdout; stderr:\n{self.stderr()}"
        return line

    def read(self) -> dict:
        """The next reply; progress messages on the way are kept in self.progress."""
        while True:
            msg = protocol.decode_reply(self.read_line())  # raises if stdout carried anything but protocol
            if "progress" not in msg:
                return msg
            self.progress.append(msg)

    def call(self, op: str, **fields) -> dict:
        self._id += 1
        reply = self.send_raw(protocol.encode(protocol.request(op, self._id, **fields)))
        assert reply["id"] == self._id
        if reply["ok"]:
            protocol.check_reply(reply, op)
            if op == "hello":
                self.hello = reply
        return reply

    @property
    def upload_dir(self) -> Path:
        """This agent's own folder for model files (as the host uploads them)."""
        if self.hello is None:
            self.call("hello")
        return self.models / self.hello["upload_dir"]

    def put(self, name: str, data: bytes) -> Path:
        path = self.models / name
        path.write_bytes(data)
        return path

    def load(self, name: str, data: bytes) -> str:
        self.put(name, data)
        reply = self.call("load", path=name, sha256=sha(data))
        assert reply["ok"], reply
        return reply["model_id"]

    def wait(self) -> int:
        try:
            rc = self.proc.wait(TIMEOUT)
        finally:
            self._err.close()
        assert self.proc.stdout.read() == b"", "stdout carried something after the last reply"
        return rc

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.err_path.read_text(errors="replace")

    def model_files(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir() if p.is_file())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


@pytest.fixture
def agent(tmp_path: Path):
    a = Agent(tmp_path)
    yield a
    a.close()


def assert_error(reply: dict, code: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]


# -- serve ------------------------------------------------------------------------------------------------


def test_hello(agent: Agent) -> None:
    reply = agent.call("hello")
    assert reply["ok"] and reply["v"] == protocol.PROTOCOL_VERSION
    assert reply["protocol"] == protocol.PROTOCOL_VERSION
    assert reply["agent_version"] == edge_agent.__version__
    assert isinstance(reply["agent_version"], str)
    assert set(reply["fingerprint"]) >= FP_KEYS
    assert reply["fingerprint"]["onnxruntime"]
    assert "CPUExecutionProvider" in reply["fingerprint"]["providers"]
    assert reply["max_model_bytes"] == 256 * 2**20
    assert Path(reply["cache_dir"]) == agent.cache.resolve()
    assert agent.call("bye")["ok"]
    assert agent.wait() == 0


def test_load_measure_unload(agent: Agent, model_bytes: bytes) -> None:
    path = agent.put("a.onnx", model_bytes)
    reply = agent.call("load", path="a.onnx", sha256=sha(model_bytes))
    assert reply["ok"], reply
    model_id = reply["model_id"]
    assert reply["inputs"] == [{"name": "input", "shape": ["N", 3, "H", "W"], "type": "tensor(float)"}]

    reply = agent.call("measure", model_id=model_id, shape=[1, 3, 16, 16], providers=["CPUExecutionProvider"],
                       cooldown_s=0.0, seed=0, **FAST)
    assert reply["ok"], reply
    stats = reply["stats"]
    assert set(stats) == STATS_KEYS
    assert stats["count"] >= FAST["min_runs"]
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert reply["providers_used"] == ["CPUExecutionProvider"]
    for key in ("temp_before_c", "temp_after_c", "throttled"):
        assert key in reply

    # A provider the device lacks is refused, naming it, unless CPU is listed too (issue #23 section 3).
    refused = agent.call("measure", model_id=model_id, shape=[2, 3, 8, 8], providers=["NoSuchExecutionProvider"])
    assert_error(refused, "provider_unavailable")
    assert "NoSuchExecutionProvider not available" in refused["error"]["message"]
    # Other settings rebuild the session; unknown providers fall back to the CPU listed; optional fields default.
    reply = agent.call("measure", model_id=model_id, shape=[2, 3, 8, 8], threads=None,
                       providers=["NoSuchExecutionProvider", "CPUExecutionProvider"], warmup=0, min_runs=5,
                       min_seconds=0.0)
    assert reply["ok"], reply
    assert reply["providers_used"] == ["CPUExecutionProvider"]
    assert reply["stats"]["count"] >= 5

    assert_error(agent.call("measure", model_id=model_id, shape=[1, 2, 16, 16], **FAST), "run_failed")
    assert_error(agent.call("measure", model_id="nope", shape=[1, 3, 16, 16], **FAST), "not_found")

    assert path.exists()
    assert agent.call("unload", model_id=model_id) == protocol.ok(agent._id)
    assert not path.exists()
    assert agent.model_files() == []
    assert_error(agent.call("unload", model_id=model_id), "not_found")
    assert_error(agent.call("measure", model_id=model_id, shape=[1, 3, 16, 16], **FAST), "not_found")
    assert agent.call("bye")["ok"]
    assert agent.wait() == 0


def test_two_agents_on_one_device_never_time_at_once(tmp_path: Path, model_bytes: bytes) -> None:
    # Two searches sharing a device: without the lock each would slow the other and both latencies be wrong.
    lock = tmp_path / "lock" / "measure.lock"
    agents = [Agent(tmp_path / name, lock=lock) for name in ("a", "b")]
    try:
        ids = [a.load("m.onnx", model_bytes) for a in agents]
        for n, (a, model_id) in enumerate(zip(agents, ids, strict=True)):
            a.proc.stdin.write(protocol.encode(protocol.request(
                "measure", 100 + n, model_id=model_id, shape=[1, 3, 32, 32], providers=["CPUExecutionProvider"],
                threads=1, warmup=1, min_runs=3, min_seconds=0.4, cooldown_s=0.0, seed=0)))
            a.proc.stdin.flush()
        replies = [a.read() for a in agents]
    finally:
        for a in agents:
            a.close()
    assert all(r["ok"] for r in replies), replies
    first, second = sorted(r["timed_span"] for r in replies)
    assert first[1] <= second[0]  # one after the other
    assert max(r["lock_wait_s"] for r in replies) > 0  # the second waited for the first


def test_refuses_bad_models(agent: Agent, model_bytes: bytes) -> None:
    path = agent.put("a.onnx", model_bytes)
    assert_error(agent.call("load", path="a.onnx", sha256="0" * 64), "hash_mismatch")
    assert not path.exists()
    assert_error(agent.call("load", path="a.onnx", sha256=sha(model_bytes)), "not_found")

    junk = b"this is not an onnx model"
    path = agent.put("junk.onnx", junk)
    assert_error(agent.call("load", path="junk.onnx", sha256=sha(junk)), "load_failed")
    assert not path.exists()
    assert agent.call("hello")["ok"]


def test_too_large(tmp_path: Path, model_bytes: bytes) -> None:
    agent = Agent(tmp_path, "--max-model-mb", "0.001")  # 1048 bytes
    try:
        big = conv_relu_model(out_channels=16)
        assert len(model_bytes) < 1048 < len(big)
        path = agent.put("big.onnx", big)
        assert_error(agent.call("load", path="big.onnx", sha256=sha(big)), "too_large")
        assert not path.exists()
        assert agent.load("small.onnx", model_bytes)  # the limit is a limit, not a refusal of everything
        assert agent.call("hello")["max_model_bytes"] == 1048
        assert agent.call("bye")["ok"]
        assert agent.wait() == 0
        assert agent.model_files() == []
    finally:
        agent.close()


def test_refuses_paths_outside_cache(agent: Agent, tmp_path: Path, model_bytes: bytes) -> None:
    digest = sha(model_bytes)
    escaped = agent.cache / "x.onnx"  # next to models/, not inside it
    escaped.write_bytes(model_bytes)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(model_bytes)
    (agent.models / "sub").mkdir()
    (agent.models / "link.onnx").symlink_to(outside)
    (agent.models / "dirlink").symlink_to(tmp_path)

    for bad in ("../x.onnx", "sub/../../x.onnx", str(outside), str(escaped), "link.onnx",
                "dirlink/outside.onnx", ".."):
        assert_error(agent.call("load", path=bad, sha256=digest), "outside_cache")
    # Refused paths are never touched: nothing outside the models dir is deleted.
    assert escaped.exists() and outside.exists()
    assert (agent.models / "link.onnx").is_symlink()

    (agent.models / "sub" / "ok.onnx").write_bytes(model_bytes)  # subfolders inside are fine
    assert agent.call("load", path="sub/ok.onnx", sha256=digest)["ok"]
    assert agent.call("bye")["ok"]
    assert agent.wait() == 0
    assert not (agent.models / "sub" / "ok.onnx").exists()
    assert escaped.exists() and outside.exists()


def test_malformed_requests(agent: Agent) -> None:
    cases = [
        (b"garbage\n", "bad_request", None),
        (b"\xff\xfe\n", "bad_request", None),
        (b"[1, 2, 3]\n", "bad_request", None),
        (b'"hello"\n', "bad_request", None),
        (b'{"v": 1, "id": 7}\n', "bad_request", 7),
        (b'{"v": 1, "id": 8, "op": "format_disk"}\n', "unknown_op", 8),
        (b'{"v": 1, "id": 9, "op": 5}\n', "bad_request", 9),
        (b'{"v": 99, "id": 10, "op": "hello"}\n', "version", 10),
        (b'{"v": "1", "id": 11, "op": "hello"}\n', "version", 11),
        (b'{"id": 12, "op": "hello"}\n', "version", 12),
        (b'{"v": 1, "op": "hello"}\n', "bad_request", None),
        (b'{"v": 1, "id": "13", "op": "hello"}\n', "bad_request", None),
        (b'{"v": 1, "id": 14, "op": "load", "path": "a.onnx"}\n', "bad_request", 14),
        (b'{"v": 1, "id": 15, "op": "load", "path": 3, "sha256": "00"}\n', "bad_request", 15),
        (b'{"v": 1, "id": 16, "op": "load", "path": "a.onnx", "sha256": "xyz"}\n', "bad_request", 16),
        (b'{"v": 1, "id": 17, "op": "measure", "model_id": "m", "shape": "1,3,8,8"}\n', "bad_request", 17),
        (b'{"v": 1, "id": 18, "op": "measure", "model_id": "m", "shape": [1, -3]}\n', "bad_request", 18),
        (b'{"v": 1, "id": 19, "op": "measure", "model_id": "m", "shape": [1], "min_runs": true}\n',
         "bad_request", 19),
        (b'{"v": 1, "id": 20, "op": "measure", "model_id": "m", "shape": [1], "threads": 0}\n', "bad_request", 20),
        (b'{"v": 1, "id": 21, "op": "measure", "model_id": "m", "shape": [65536, 65536]}\n', "bad_request", 21),
        (b'{"v": 1, "id": 22, "op": "unload"}\n', "bad_request", 22),
        (b"x" * (protocol.MAX_LINE_BYTES + 10) + b"\n", "bad_request", None),
    ]
    for line, code, rid in cases:
        reply = agent.send_raw(line.replace(b'"v": 1,', b'"v": %d,' % protocol.PROTOCOL_VERSION))
        assert_error(reply, code)
        assert reply["id"] == rid, (line[:80], reply)
    assert agent.proc.poll() is None
    agent.proc.stdin.write(b"\n")  # blank lines are ignored, not answered
    assert agent.call("hello")["ok"]
    assert agent.call("bye")["ok"]
    assert agent.wait() == 0


def test_bye_deletes_models(agent: Agent, model_bytes: bytes) -> None:
    agent.load("a.onnx", model_bytes)
    agent.load("b.onnx", model_bytes)
    assert agent.model_files() == ["a.onnx", "b.onnx"]
    assert agent.call("bye") == protocol.ok(agent._id)
    assert agent.wait() == 0
    assert agent.model_files() == []


def test_eof_exits_cleanly(agent: Agent, model_bytes: bytes) -> None:
    agent.load("a.onnx", model_bytes)
    agent.proc.stdin.close()
    assert agent.wait() == 0
    assert agent.model_files() == []
    assert "Traceback" not in agent.stderr()


def test_sigterm_deletes_models(agent: Agent, model_bytes: bytes) -> None:
    agent.load("a.onnx", model_bytes)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == 128 + signal.SIGTERM
    assert agent.model_files() == []


# -- CLI --------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=TIMEOUT)


def test_bench_cli(tmp_path: Path, model_bytes: bytes) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(model_bytes)
    fast = ["--warmup", "1", "--min-runs", "5", "--min-seconds", "0.05"]
    res = run_cli("bench", str(model), "--shape", "1,3,16,16", "--threads", "1", *fast)
    assert res.returncode == 0, res.stderr
    for word in ("fingerprint", "onnxruntime", "median", "p90", "p99", "runs", "CPUExecutionProvider"):
        assert word in res.stdout

    res = run_cli("bench", str(model), "--json", *fast)  # shape from the model: 1,3,64,64
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["shape"] == [1, 3, 64, 64]
    assert set(out["stats"]) == STATS_KEYS and out["stats"]["count"] >= 5
    assert out["fingerprint_id"] == fingerprint_id(out["fingerprint"])

    res = run_cli("bench", str(tmp_path / "missing.onnx"))
    assert res.returncode == 2 and "missing.onnx" in res.stderr and "Traceback" not in res.stderr


def test_fingerprint_cli() -> None:
    res = run_cli("fingerprint")
    assert res.returncode == 0, res.stderr
    fp = json.loads(res.stdout)
    assert set(fp) >= FP_KEYS
    assert re.fullmatch(r"[0-9a-f]{16}", fp["fingerprint_id"])
    assert fp["cores"] == os.cpu_count()


def test_fingerprint_id_uses_stable_keys_only() -> None:
    fp = fingerprint()
    assert set(fp) >= FP_KEYS
    base = fingerprint_id(fp)
    volatile = dict(fp, temperature_c=99.0, cpu_freq_mhz=1.0, governor="powersave", throttled=True,
                    python="3.8.10", numpy="1.0")
    assert fingerprint_id(volatile) == base
    assert fingerprint_id(dict(fp, cores=(fp["cores"] or 0) + 1)) != base
    assert fingerprint_id(dict(fp, onnxruntime="0.0.1")) != base


def test_parse_throttled() -> None:
    assert parse_throttled("throttled=0x0\n") == (False, "0x0")
    assert parse_throttled("throttled=0x50000") == (False, "0x50000")  # happened since boot, not now
    assert parse_throttled("throttled=0x50005") == (True, "0x50005")
    assert parse_throttled("throttled=0x8") == (True, "0x8")
    assert parse_throttled("error") == (None, None)


def test_protocol_helpers() -> None:
    line = protocol.encode(protocol.ok(3, value=float("nan"), nested={"x": [1.5, float("inf")]}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    v = protocol.PROTOCOL_VERSION
    assert protocol.decode(line) == {"v": v, "id": 3, "ok": True, "value": None, "nested": {"x": [1.5, None]}}
    req = protocol.parse_request(protocol.encode(protocol.request("measure", 4, model_id="m", shape=[1, 3, 8, 8])))
    assert req["min_runs"] >= 1 and req["providers"] == ["CPUExecutionProvider"] and req["threads"] is None
    err = protocol.error(None, "bad_request", "x")
    assert err == {"v": v, "id": None, "ok": False, "error": {"code": "bad_request", "message": "x"}}
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode(b"{}")
    assert info.value.code == "version"


# -- portability ------------------------------------------------------------------------------------------

BLOCKED_IMPORTS = r"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "autoseg"):
            raise ImportError("blocked: " + name)
        return None

sys.meta_path.insert(0, Block())
import edge_agent, edge_agent.protocol, edge_agent.fingerprint, edge_agent.bench, edge_agent.serve
import edge_agent.__main__
from edge_agent.bench import make_session, measure_session

sess = make_session(sys.argv[1], 1, ["CPUExecutionProvider"])
stats = measure_session(sess, [1, 3, 16, 16], warmup=1, min_runs=5, min_seconds=0.05)
assert stats["count"] >= 5, stats
edge_agent.fingerprint.fingerprint()
leaked = [m for m in sys.modules if m.split(".")[0] in ("torch", "autoseg")]
assert not leaked, leaked
print("OK")
"""


def test_runs_without_torch_or_autoseg(tmp_path: Path, model_bytes: bytes) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(model_bytes)
    res = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, str(model)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK"


def _sources() -> list[Path]:
    files = sorted(PKG.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "__main__.py", "protocol.py", "bench.py",
                                         "fingerprint.py", "serve.py"}
    return files


def test_sources_are_python38() -> None:
    for path in _sources():
        src = path.read_text()
        tree = ast.parse(src, filename=str(path), feature_version=(3, 8))
        annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign))
                       if n.annotation is not None]
        annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) if n.returns]
        for ann in annotations:
            for node in ast.walk(ann):
                assert not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)), (
                    f"{path.name}:{ann.lineno}: `X | Y` annotation; use typing.Optional/Union")
        if annotations:
            assert "from __future__ import annotations" in src, f"{path.name}: add the __future__ import"
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Match), f"{path.name}: match statement"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("torch", "autoseg", "onnx") for n in names), path.name
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dataclass":
                assert not {k.arg for k in node.keywords} & {"slots", "kw_only"}, path.name


def _old_python(minor: int) -> str | None:
    name = f"python3.{minor}"
    candidates = [shutil.which(name), *glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}*/bin/{name}"))]
    for exe in filter(None, candidates):
        try:
            res = subprocess.run([exe, "-c", f"import sys; print(sys.version_info[:2] == (3, {minor}))"],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if res.stdout.strip() == "True":
            return exe
    return None


@pytest.mark.parametrize("minor", [8, 9])  # 3.8: JetPack 5 on a Jetson; 3.9: Raspberry Pi OS 11
def test_real_old_python_if_available(tmp_path: Path, minor: int) -> None:
    exe = _old_python(minor)
    if exe is None:
        pytest.skip(f"no Python 3.{minor} interpreter on this machine")
    # Compile everything, then run the stdlib-only parts (numpy/onnxruntime may be absent there).
    code = (
        "import compileall, sys; assert compileall.compile_dir(sys.argv[1], quiet=1, legacy=False, "
        "force=True)\n"
        "import edge_agent.protocol as p, edge_agent.fingerprint as f\n"
        "assert p.decode(p.encode(p.request('hello', 1)))['op'] == 'hello'\n"
        "fp = f.fingerprint(); assert f.fingerprint_id(fp)\n"
    )
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"), PYTHONPATH=str(REPO))
    res = subprocess.run([exe, "-c", code, str(PKG)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr + res.stdout
