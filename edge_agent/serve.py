"""`python3 -m edge_agent serve`: one process answers JSON-line requests for a whole search.

Safety rules: it only reads model files inside `<cache-dir>/models/` (paths resolved, escapes and
symlinks out refused), verifies each model's sha256 and size before loading, never runs commands from
requests, and deletes the model files it was handed on unload, bye, EOF, SIGTERM/SIGHUP and at exit.
stdout carries protocol lines only; everything else goes to stderr.

Each agent gets its own upload folder `models/agent-<pid>-<random>/`, held by an flock on its `.owner`
file: agents sharing a cache dir never touch each other's files, and a starting agent removes the folders
whose owner is gone (killed agents). It never hangs: the device-wide measurement lock is waited for with a
timeout and progress lines, and an agent whose host went away (stdin EOF, stdout broken) exits at once.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import logging
import os
import select
import shutil
import signal
import stat
import sys
import time
from contextlib import contextmanager, suppress
from typing import IO, Any, Callable, Dict, Iterator, Optional, Set, Tuple

from edge_agent import __version__, protocol
from edge_agent.protocol import ProtocolError

try:
    import fcntl
except ImportError:  # not POSIX: no measurement lock and no stale-folder detection
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "autoseg-agent", "work")
# One measurement at a time on a device, whichever search asks: two would slow each other down and both
# latencies would be wrong. The lock lives in the agent's own per-user folder (mode 0700): in the shared
# temp dir any local user, or a FIFO put at its path, could stall every measurement.
DEFAULT_LOCK = os.path.join("~", ".cache", "autoseg-agent", "measure.lock")
DEFAULT_LOCK_TIMEOUT_S = 600.0
BUSY_REPORT_S = 5.0  # first "device busy" progress line after this long (or half the timeout, if shorter)
BUSY_REPORT_EVERY_S = 30.0
POLL_S = 0.1  # while waiting: how often the lock is tried and the host checked
DEFAULT_MAX_MODEL_MB = 256.0
DEFAULT_MAX_MODEL_BYTES = int(DEFAULT_MAX_MODEL_MB * 2**20)
AGENT_DIR_PREFIX = "agent-"
NEW_DIR_PREFIX = ".new-"  # an upload folder being set up; renamed once its owner lock is held
OWNER_FILE = ".owner"


class HostGone(Exception):
    """The host went away (its SSH channel closed): stop whatever is going on and exit."""


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

    def __init__(
        self, cache_dir: str, max_model_bytes: int, lock_path: Optional[str] = DEFAULT_LOCK,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, busy_report_s: float = BUSY_REPORT_S,
        idle: Optional[Callable[[float], None]] = None, report: Optional[Callable[[int, str], None]] = None,
    ) -> None:
        """idle(seconds) waits while the lock is busy (raising HostGone when the host left);
        report(request id, text) sends a progress line."""
        self.lock_path = lock_path
        self.lock_timeout_s = float(lock_timeout_s)
        self.busy_report_s = float(busy_report_s)
        self.idle = idle or time.sleep
        self.report = report
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.models_dir = os.path.join(self.cache_dir, "models")
        os.makedirs(self.models_dir, mode=0o700, exist_ok=True)
        self.models_real = os.path.realpath(self.models_dir)
        self.max_model_bytes = int(max_model_bytes)
        self.models: Dict[str, _Model] = {}
        self.files: Set[str] = set()  # files handed to this agent that it must delete
        self._counter = 0
        self.upload_dir, self._owner_fd = _claim_upload_dir(self.models_real)
        self._clean_stale()

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
        except HostGone:
            raise
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
            "upload_dir": os.path.basename(self.upload_dir),  # where the host puts this agent's models
            "pid": os.getpid(),
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
        from edge_agent.bench import ProviderUnavailable, make_session, measure_report

        model = self._model(req["model_id"])
        key = (req["threads"], tuple(req["providers"]))
        if model.session_key != key:
            # Keep one session per model: the host measures each model with one setting.
            model.session_key, model.session = None, None
            try:
                model.session = make_session(model.data, req["threads"], req["providers"])
            except ProviderUnavailable as e:
                raise ProtocolError("provider_unavailable", str(e)) from None
            except Exception as e:
                raise ProtocolError("load_failed", f"{model.model_id}: cannot create session: {e}") from None
            model.session_key = key
        rid = req["id"]
        timeout = self.lock_timeout_s if req.get("lock_timeout_s") is None else float(req["lock_timeout_s"])

        def report(text: str) -> None:
            log.info("%s", text)
            if self.report is not None:
                self.report(rid, text)

        with measure_lock(self.lock_path, timeout, self.idle, report, self.busy_report_s) as waited:
            start = time.time()
            try:
                body = measure_report(
                    model.session,
                    req["shape"],
                    warmup=req["warmup"],
                    min_runs=req["min_runs"],
                    min_seconds=float(req["min_seconds"]),
                    seed=req["seed"],
                    cooldown_s=float(req["cooldown_s"]),
                )
            except Exception as e:
                text = f"{model.model_id}: inference failed on shape {req['shape']}: {e}"
                raise ProtocolError("run_failed", text) from None
            body["timed_span"] = [start, time.time()]
        body["lock_wait_s"] = waited
        if waited > 0.5:
            log.info("waited %.1f s for another measurement on this device", waited)
        # The span (epoch seconds) lets whoever shares the device check from this log that no two timings overlapped.
        log.info("measured %s %s: median %.3f ms over %d runs, timed %.3f-%.3f", model.model_id, req["shape"],
                 body["stats"]["median_ms"], body["stats"]["count"], *body["timed_span"])
        return body

    def unload(self, model_id: str) -> Dict[str, Any]:
        model = self._model(model_id)
        del self.models[model_id]
        if all(m.path != model.path for m in self.models.values()):
            self._delete(model.path)
        log.info("unloaded %s", model_id)
        return {}

    def cleanup(self) -> None:
        """Drop every session, delete every model file this agent was handed and its upload folder. Idempotent."""
        self.models.clear()
        for path in sorted(self.files):
            self._delete(path)
        if self._owner_fd is not None:
            shutil.rmtree(self.upload_dir, ignore_errors=True)
            os.close(self._owner_fd)  # after the folder is gone: nobody may take it for a dead agent's before
            self._owner_fd = None

    def _clean_stale(self) -> None:
        """Remove the upload folders of agents that are gone: a killed agent's flock died with it."""
        if fcntl is None:
            return
        try:
            names = os.listdir(self.models_real)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.models_real, name)
            if path == self.upload_dir or not name.startswith((AGENT_DIR_PREFIX, NEW_DIR_PREFIX + AGENT_DIR_PREFIX)):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            if name.startswith(NEW_DIR_PREFIX) and time.time() - st.st_mtime < 60:
                continue  # another agent is setting it up right now
            if _owner_alive(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by an agent that is gone", path)

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


def _claim_upload_dir(models_dir: str) -> Tuple[str, Optional[int]]:
    """A fresh upload folder for this agent and the fd whose flock marks it as alive (None without fcntl)."""
    name = f"{AGENT_DIR_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    final = os.path.join(models_dir, name)
    if fcntl is None:
        os.mkdir(final, 0o700)
        return final, None
    # Set up under another name, so that no starting agent sees the folder before its owner lock is held.
    tmp = os.path.join(models_dir, NEW_DIR_PREFIX + name)
    os.mkdir(tmp, 0o700)
    fd = os.open(os.path.join(tmp, OWNER_FILE), os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, final)
    return final, fd


def _owner_alive(folder: str) -> bool:
    """Whether a live agent holds the owner lock of an upload folder."""
    assert fcntl is not None
    try:
        fd = os.open(os.path.join(folder, OWNER_FILE), os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock taken above


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@contextmanager
def measure_lock(
    path: Optional[str], timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, idle: Callable[[float], None] = time.sleep,
    report: Optional[Callable[[str], None]] = None, report_after_s: float = BUSY_REPORT_S,
) -> Iterator[float]:
    """Hold the device-wide measurement lock (an flock on `path`); yields the seconds waited for it.

    Waits at most timeout_s (ProtocolError "busy"), calling report() now and then and idle() between
    tries; a lock that others could hold or replace is refused (ProtocolError "lock_failed").
    Without fcntl (not POSIX) or with no path, measurements go on unlocked.
    """
    if fcntl is None or not path:
        yield 0.0
        return
    path = os.path.abspath(os.path.expanduser(path))
    fd = _open_lock(path)
    try:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        next_report = t0 + min(report_after_s, timeout_s / 2)
        while not _try_lock(fd, path):
            now = time.monotonic()
            if now >= deadline:
                raise ProtocolError("busy", f"{_holder(fd, path)}; gave up waiting after {timeout_s:g} s")
            if report is not None and now >= next_report:
                report(f"{_holder(fd, path)}; waiting up to {deadline - now:.0f} s more")
                next_report = now + BUSY_REPORT_EVERY_S
            idle(max(0.0, min(POLL_S, deadline - now)))
        waited = time.monotonic() - t0
        _set_holder(fd, f"{os.getpid()} {time.time():.3f}\n")
        try:
            yield waited
        finally:
            _set_holder(fd, "")
    finally:
        os.close(fd)  # closing drops the flock


def _open_lock(path: str) -> int:
    def refuse(text: str) -> ProtocolError:
        return ProtocolError("lock_failed", f"measurement lock {path}: {text}")

    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.stat(parent)
    except OSError as e:
        raise refuse(f"cannot create its folder ({e.strerror}); pass --lock with a writable path") from None
    if st.st_uid != os.geteuid():
        raise refuse(f"{parent} belongs to another user; keep the lock in a folder of your own")
    if st.st_mode & 0o022:
        raise refuse(f"others can write to {parent}, so they could hold or replace the lock; "
                     f"`chmod 700 {parent}` or keep the lock in a private folder")
    # O_NONBLOCK: opening a FIFO never waits for a writer; O_NOFOLLOW: a symlink is refused.
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refuse("is a symlink; remove it (the agent creates the lock itself)") from None
        raise refuse(f"cannot be opened ({e.strerror}); remove it (the agent creates the lock itself)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refuse("is not a regular file (a FIFO or a device?); remove it (the agent creates the lock itself)")
    return fd


def _try_lock(fd: int, path: str) -> bool:
    assert fcntl is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # e.g. a file system without flock
        raise ProtocolError("lock_failed", f"measurement lock {path}: cannot be locked ({e.strerror})") from None


def _set_holder(fd: int, text: str) -> None:
    """Who holds the lock since when ("<pid> <unix time>"), for the progress lines of those who wait."""
    try:
        os.ftruncate(fd, 0)
        if text:
            os.pwrite(fd, text.encode("ascii"), 0)
    except OSError:
        pass


def _holder(fd: int, path: str) -> str:
    try:
        pid_text, since_text = os.pread(fd, 64, 0).decode("ascii").split()
        pid, since = int(pid_text), float(since_text)
    except (OSError, ValueError):  # held by some other process, or just released
        return f"device busy: another autoseg measurement (or another process) holds the lock {path}"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return (f"device busy: another autoseg measurement holds the lock since {when} "
            f"(pid {pid}, {max(0.0, time.time() - since):.0f} s ago)")


# ---------------------------------------------------------------------------------------------------------


def serve(
    cache_dir: str = DEFAULT_CACHE_DIR, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    lock_path: Optional[str] = DEFAULT_LOCK, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    busy_report_s: float = BUSY_REPORT_S, nonce: str = "",
) -> int:
    """Serve requests from stdin until bye, EOF or the host going away; returns the exit code."""
    out = _claim_stdout()
    out.write(protocol.ready_line(nonce))  # first of all: the host skips whatever a shell rc printed before
    out.flush()
    reader = _LineReader(0, out.fileno())
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only, and onnxruntime logs to stderr

    def idle(seconds: float) -> None:
        if reader.host_gone(seconds):
            raise HostGone("the host went away (its SSH channel closed)")

    def report(rid: int, text: str) -> None:
        try:
            _send(out, protocol.progress(rid, text))
        except OSError:
            raise HostGone("the host went away (cannot write to it)") from None

    agent = Agent(cache_dir, max_model_bytes, lock_path, lock_timeout_s, busy_report_s, idle, report)
    atexit.register(agent.cleanup)
    _exit_on_signals()
    log.info("edge_agent %s serving (protocol %d), models in %s, limit %d bytes",
             __version__, protocol.PROTOCOL_VERSION, agent.upload_dir, agent.max_model_bytes)
    try:
        while True:
            line, too_long = reader.readline()
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
    except (HostGone, BrokenPipeError, ConnectionResetError) as e:
        log.warning("%s; exiting", e if isinstance(e, HostGone) else "the host closed the pipe")
        with suppress(OSError):  # closed now, so that no flush at exit complains about the gone reader
            out.close()
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


class _LineReader:
    """stdin as lines, read with os.read so that a waiting agent can also notice that its host left.

    Lines longer than MAX_LINE_BYTES are discarded and reported as too long; at most MAX_BUFFERED bytes
    are read ahead while a request is running.
    """

    MAX_BUFFERED = 4 * protocol.MAX_LINE_BYTES

    def __init__(self, fd: int, out_fd: Optional[int] = None) -> None:
        self.fd, self.out_fd = fd, out_fd
        self.buf = bytearray()
        self.eof = False
        self._discarding = False  # inside a line that is too long
        self._scan = 0  # bytes of buf known to hold no newline

    def readline(self) -> Tuple[Optional[bytes], bool]:
        """(line, too_long); (None, False) at EOF."""
        while True:
            i = self.buf.find(b"\n", self._scan)
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                self._scan = 0
                if self._discarding or len(line) > protocol.MAX_LINE_BYTES + 1:
                    self._discarding = False
                    return b"", True
                return line, False
            self._scan = len(self.buf)
            if len(self.buf) > protocol.MAX_LINE_BYTES:
                self._discarding = True
                del self.buf[:]
                self._scan = 0
            if self.eof:
                if self._discarding:
                    self._discarding = False
                    return b"", True
                if self.buf:
                    line = bytes(self.buf)
                    del self.buf[:]
                    return line, False
                return None, False
            self._read()

    def host_gone(self, timeout: float) -> bool:
        """Wait up to `timeout` s for input (buffering it); True once stdin is at EOF or stdout is broken."""
        if self.eof:
            return True
        if not hasattr(select, "poll"):
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if ready:
                self._read()
            return self.eof
        poller = select.poll()
        if len(self.buf) < self.MAX_BUFFERED:
            poller.register(self.fd, select.POLLIN)
        if self.out_fd is not None:
            poller.register(self.out_fd, 0)  # POLLERR / POLLHUP: nobody reads our replies any more
        for fd, events in poller.poll(timeout * 1000):
            if fd == self.out_fd and events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return True
            if fd == self.fd:
                self._read()
        return self.eof

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.buf += data
        else:
            self.eof = True


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
