"""`python3 -m edge_agent serve`: one process answers JSON-line requests for a whole search.

Safety rules: it only reads model files inside `<cache-dir>/models/` (paths resolved, escapes and
symlinks out refused), verifies each model's sha256 and size before loading, never runs commands from
requests, and deletes the model files it was handed on unload, bye, EOF, SIGTERM/SIGHUP and at exit.
stdout carries protocol lines only; everything else goes to stderr.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import logging
import os
import signal
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import IO, Any, Dict, Iterator, Optional, Set, Tuple

from edge_agent import __version__, protocol
from edge_agent.protocol import ProtocolError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "autoseg-agent", "work")
# One measurement at a time on a device, whichever search (or user) asks: two would slow each other down
# and both latencies would be wrong. In the temp dir, so agents of every version and user share it.
DEFAULT_LOCK = os.path.join(tempfile.gettempdir(), "autoseg-agent-measure.lock")
DEFAULT_MAX_MODEL_MB = 256.0
DEFAULT_MAX_MODEL_BYTES = int(DEFAULT_MAX_MODEL_MB * 2**20)


class _Model:
    """A verified model: its bytes (so sessions can be rebuilt per thread/provider setting) and file."""

    def __init__(self, model_id: str, path: str, data: bytes, sha256: str) -> None:
        self.model_id = model_id
        self.path = path
        self.data = data
        self.sha256 = sha256
        self.session_key: Optional[Tuple[Any, ...]] = None
        self.session: Any = None


class Agent:
    """Request handling, independent of stdin/stdout so it can be driven directly."""

    def __init__(self, cache_dir: str, max_model_bytes: int, lock_path: Optional[str] = DEFAULT_LOCK) -> None:
        self.lock_path = lock_path
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.models_dir = os.path.join(self.cache_dir, "models")
        os.makedirs(self.models_dir, mode=0o700, exist_ok=True)
        self.models_real = os.path.realpath(self.models_dir)
        self.max_model_bytes = int(max_model_bytes)
        self.models: Dict[str, _Model] = {}
        self.files: Set[str] = set()  # files handed to this agent that it must delete
        self._counter = 0

    # -- dispatch ----------------------------------------------------------------------------------------

    def handle_line(self, line: bytes) -> Tuple[Dict[str, Any], bool]:
        """(reply, stop). Never raises for bad input: every problem becomes an error reply."""
        try:
            req = protocol.parse_request(line)
        except ProtocolError as e:
            log.warning("refused request: %s: %s", e.code, e.message)
            return protocol.error(e.id, e.code, e.message), False
        op, rid = req["op"], req["id"]
        try:
            if op == "bye":
                self.cleanup()
                return protocol.ok(rid), True
            if op == "hello":
                body = self.hello()
            elif op == "load":
                body = self.load(req["path"], req["sha256"])
            elif op == "measure":
                body = self.measure(req)
            else:  # unload
                body = self.unload(req["model_id"])
            return protocol.ok(rid, **body), False
        except ProtocolError as e:
            log.warning("%s #%s failed: %s: %s", op, rid, e.code, e.message)
            return protocol.error(rid, e.code, e.message), False
        except Exception as e:  # a bug or an exotic failure must not kill a long search
            log.exception("%s #%s raised", op, rid)
            code = {"load": "load_failed", "measure": "run_failed"}.get(op, "bad_request")
            return protocol.error(rid, code, f"{type(e).__name__}: {e}"), False

    # -- ops ---------------------------------------------------------------------------------------------

    def hello(self) -> Dict[str, Any]:
        from edge_agent.fingerprint import fingerprint, fingerprint_id

        fp = fingerprint()
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "agent_version": __version__,
            "fingerprint": fp,
            "fingerprint_id": fingerprint_id(fp),
            "cache_dir": self.cache_dir,
            "models_dir": self.models_dir,
            "max_model_bytes": self.max_model_bytes,
        }

    def load(self, rel_path: str, sha256: str) -> Dict[str, Any]:
        from edge_agent.bench import CPU, input_info, make_session

        path = self.resolve(rel_path)
        data = self._read_model(path, rel_path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256.lower():
            self._delete(path)
            text = f"{rel_path}: sha256 is {digest}, expected {sha256}; file deleted"
            raise ProtocolError("hash_mismatch", text)
        self.files.add(path)
        try:
            sess = make_session(data, None, [CPU])
        except Exception as e:
            self._delete(path)
            raise ProtocolError("load_failed", f"{rel_path}: onnxruntime cannot load it: {e}") from None
        self._counter += 1
        model_id = f"m{self._counter}-{digest[:12]}"
        model = _Model(model_id, path, data, digest)
        model.session_key, model.session = (None, (CPU,)), sess
        self.models[model_id] = model
        log.info("loaded %s as %s (%d bytes)", rel_path, model_id, len(data))
        return {"model_id": model_id, "inputs": input_info(sess), "size_bytes": len(data)}

    def measure(self, req: Dict[str, Any]) -> Dict[str, Any]:
        from edge_agent.bench import make_session, measure_report

        model = self._model(req["model_id"])
        key = (req["threads"], tuple(req["providers"]))
        if model.session_key != key:
            # Keep one session per model: the host measures each model with one setting.
            model.session_key, model.session = None, None
            try:
                model.session = make_session(model.data, req["threads"], req["providers"])
            except Exception as e:
                raise ProtocolError("load_failed", f"{model.model_id}: cannot create session: {e}") from None
            model.session_key = key
        try:
            with measure_lock(self.lock_path) as waited:
                start = time.time()
                body = measure_report(
                    model.session,
                    req["shape"],
                    warmup=req["warmup"],
                    min_runs=req["min_runs"],
                    min_seconds=float(req["min_seconds"]),
                    seed=req["seed"],
                    cooldown_s=float(req["cooldown_s"]),
                )
                body["timed_span"] = [start, time.time()]
        except Exception as e:
            text = f"{model.model_id}: inference failed on shape {req['shape']}: {e}"
            raise ProtocolError("run_failed", text) from None
        body["lock_wait_s"] = waited
        if waited > 0.5:
            log.info("waited %.1f s for another measurement on this device", waited)
        log.info("measured %s %s: median %.3f ms over %d runs", model.model_id, req["shape"],
                 body["stats"]["median_ms"], body["stats"]["count"])
        return body

    def unload(self, model_id: str) -> Dict[str, Any]:
        model = self._model(model_id)
        del self.models[model_id]
        if all(m.path != model.path for m in self.models.values()):
            self._delete(model.path)
        log.info("unloaded %s", model_id)
        return {}

    def cleanup(self) -> None:
        """Drop every session and delete every model file this agent was handed. Idempotent."""
        self.models.clear()
        for path in sorted(self.files):
            self._delete(path)

    # -- paths and files ---------------------------------------------------------------------------------

    def resolve(self, rel_path: str) -> str:
        """Real path of a model file, which must lie inside the models dir (no escapes, no symlinks out)."""
        if "\x00" in rel_path:
            raise ProtocolError("bad_request", "path contains a NUL byte")
        if os.path.isabs(rel_path):
            text = f"{rel_path}: absolute paths are refused; give a name relative to {self.models_dir}"
            raise ProtocolError("outside_cache", text)
        joined = os.path.normpath(os.path.join(self.models_dir, rel_path))
        real = os.path.realpath(joined)
        lexical_ok = self._inside(joined, os.path.normpath(self.models_dir))
        if not (lexical_ok and self._inside(real, self.models_real)):
            raise ProtocolError("outside_cache", f"{rel_path}: resolves outside {self.models_dir}; refused")
        return real

    @staticmethod
    def _inside(path: str, root: str) -> bool:
        return path.startswith(root.rstrip(os.sep) + os.sep)

    def _read_model(self, path: str, rel_path: str) -> bytes:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise ProtocolError("not_found", f"{rel_path}: no such file in {self.models_dir}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a symlink after resolve()
                raise ProtocolError("outside_cache", f"{rel_path}: is a symlink; refused") from None
            raise ProtocolError("not_found", f"{rel_path}: cannot open: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolError("bad_request", f"{rel_path}: not a regular file")
            data = None if st.st_size > self.max_model_bytes else f.read(self.max_model_bytes + 1)
        if data is None or len(data) > self.max_model_bytes:
            self._delete(path)
            size = st.st_size if data is None else len(data)
            text = f"{rel_path}: {size} bytes exceeds the limit of {self.max_model_bytes}; file deleted"
            raise ProtocolError("too_large", text)
        return data

    def _delete(self, path: str) -> None:
        self.files.discard(path)
        if not self._inside(path, self.models_real):  # never delete anything outside the models dir
            return
        try:
            os.unlink(path)
            log.info("deleted %s", path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not delete %s: %s", path, e)

    def _model(self, model_id: str) -> _Model:
        model = self.models.get(model_id)
        if model is None:
            raise ProtocolError("not_found", f"model_id {model_id!r} is not loaded")
        return model


_LOCK_WARNED: Set[str] = set()


@contextmanager
def measure_lock(path: Optional[str]) -> Iterator[float]:
    """Hold the device-wide measurement lock (an flock on `path`); yields the seconds waited for it.

    Without fcntl (not POSIX) or a usable lock file, measurements go on unlocked, as before the lock.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None  # type: ignore[assignment]
    fd = None
    if fcntl is not None and path:
        try:
            try:  # without O_CREAT first: protected_regular forbids it on another user's file in /tmp
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # readable by all: other users lock it too
        except OSError as e:
            if path not in _LOCK_WARNED:
                _LOCK_WARNED.add(path)
                log.warning("cannot open the measurement lock %s (%s); measuring without it", path, e.strerror)
    if fd is None:
        yield 0.0
        return
    try:
        t0 = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.monotonic() - t0
    finally:
        os.close(fd)  # closing drops the flock


# ---------------------------------------------------------------------------------------------------------


def serve(
    cache_dir: str = DEFAULT_CACHE_DIR, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    lock_path: Optional[str] = DEFAULT_LOCK,
) -> int:
    """Serve requests from stdin until bye or EOF; returns the exit code."""
    out = _claim_stdout()
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only, and onnxruntime logs to stderr
    agent = Agent(cache_dir, max_model_bytes, lock_path)
    atexit.register(agent.cleanup)
    _exit_on_signals()
    log.info("edge_agent %s serving (protocol %d), models in %s, limit %d bytes",
             __version__, protocol.PROTOCOL_VERSION, agent.models_dir, agent.max_model_bytes)
    stdin = sys.stdin.buffer
    try:
        while True:
            line, too_long = _read_line(stdin)
            if line is None:
                log.info("stdin closed; exiting")
                return 0
            if too_long:
                text = f"line longer than {protocol.MAX_LINE_BYTES} bytes"
                reply: Dict[str, Any] = protocol.error(None, "bad_request", text)
                stop = False
            elif not line.strip():
                continue
            else:
                reply, stop = agent.handle_line(line)
            _send(out, reply)
            if stop:
                log.info("bye; exiting")
                return 0
    except BrokenPipeError:
        log.warning("host closed the pipe; exiting")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        agent.cleanup()


def _send(out: IO[bytes], reply: Dict[str, Any]) -> None:
    try:
        data = protocol.encode(reply)
    except (TypeError, ValueError) as e:  # an unserialisable result is a bug; still answer
        data = protocol.encode(protocol.error(reply.get("id"), "run_failed", f"cannot encode reply: {e}"))
    out.write(data)
    out.flush()


def _read_line(stdin: IO[bytes]) -> Tuple[Optional[bytes], bool]:
    """(line, too_long); (None, False) at EOF. Over-long lines are consumed and discarded."""
    line = stdin.readline(protocol.MAX_LINE_BYTES + 1)
    if not line:
        return None, False
    if len(line) <= protocol.MAX_LINE_BYTES or line.endswith(b"\n"):
        return line, False
    while True:
        rest = stdin.readline(protocol.MAX_LINE_BYTES)
        if not rest or rest.endswith(b"\n"):
            return b"", True


def _claim_stdout() -> IO[bytes]:
    """Keep the real stdout for protocol lines; point fd 1 and sys.stdout at stderr for everything else."""
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # native libraries printing to fd 1 now land on stderr
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "wb")


def _exit_on_signals() -> None:
    def handler(signum: int, frame: Any) -> None:
        log.info("signal %d; exiting", signum)
        raise SystemExit(128 + signum)  # unwinds through serve()'s finally, then atexit

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)
