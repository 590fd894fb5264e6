"""JSON-lines messages between the autoseg host and the edge agent (one object per line, UTF-8).

Shared by both sides: autoseg imports this module, so there is one definition of the messages, of their
bounds (line length, nesting depth) and of the schema every reply is checked against.

Framing: the agent's first line is `ready_line(nonce)`, the nonce given on its command line; whatever a
shell start-up file printed before it is not protocol. Then each request gets one reply (`ok` true or
false), possibly preceded by `progress` messages with the same id (e.g. while waiting for a busy device).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Dict, Optional, Union

PROTOCOL_VERSION = 3
OPS = ("hello", "load", "measure", "unload", "bye")
ERROR_CODES = (
    "bad_request",
    "version",
    "unknown_op",
    "not_found",
    "hash_mismatch",
    "too_large",
    "outside_cache",
    "load_failed",
    "run_failed",
    "busy",  # another measurement held the device's measurement lock for longer than the timeout
    "lock_failed",  # the measurement lock cannot be used (not a regular file, a shared directory, ...)
    "provider_unavailable",  # an execution provider asked for is missing and CPU was not allowed instead
)
# A line longer than this is refused without being parsed (messages are small).
MAX_LINE_BYTES = 1 << 20
# JSON nested deeper than this is refused before parsing (json.loads recurses; real messages nest 3 deep).
MAX_DEPTH = 32
# Refuse measurement inputs above this many elements (1 GiB of float32) rather than exhaust RAM.
MAX_INPUT_ELEMENTS = 1 << 28

# Defaults for the optional measure fields (same values as autoseg.devices.MeasureSettings).
MEASURE_DEFAULTS: Dict[str, Any] = {
    "threads": None,
    "providers": ["CPUExecutionProvider"],
    "warmup": 5,
    "min_runs": 20,
    "min_seconds": 0.5,
    "cooldown_s": 0.0,
    "seed": 0,
}


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``code`` is one of ERROR_CODES, ``id`` the request id if known."""

    def __init__(self, code: str, message: str, id: Optional[int] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


def encode(obj: Dict[str, Any]) -> bytes:
    """One message as a UTF-8 JSON line (strict JSON: non-finite floats become null)."""
    return (json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def decode(line: Union[bytes, str]) -> Dict[str, Any]:
    """Parse one line into a message object; checks size, nesting, JSON, object-ness and the protocol version."""
    text = check_line(line)
    try:
        msg = json.loads(text)
    except RecursionError:  # cannot happen after check_line; a last guard all the same
        raise ProtocolError("bad_request", "line is nested too deeply") from None
    except ValueError as e:
        raise ProtocolError("bad_request", f"line is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_request", f"message must be a JSON object, got {type(msg).__name__}")
    msg_id = msg.get("id")
    if not _is_int(msg_id):
        msg_id = None
    if "v" not in msg:
        raise ProtocolError("version", f"missing protocol version 'v' (expected {PROTOCOL_VERSION})", msg_id)
    if not _is_int(msg["v"]) or msg["v"] != PROTOCOL_VERSION:
        text = f"protocol version {msg['v']!r} not supported (expected {PROTOCOL_VERSION})"
        raise ProtocolError("version", text, msg_id)
    return msg


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def check_line(line: Union[bytes, str]) -> str:
    """The line as text if it may be parsed: at most MAX_LINE_BYTES, UTF-8, nested at most MAX_DEPTH deep.

    Both sides call this before json.loads, which recurses once per level and dies on `[[[[...`.
    """
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError("bad_request", f"line longer than {MAX_LINE_BYTES} bytes")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("bad_request", f"line is not UTF-8: {e}") from None
    else:
        text = line
        if len(text) > MAX_LINE_BYTES:
            raise ProtocolError("bad_request", f"line longer than {MAX_LINE_BYTES} characters")
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return text
    depth = 0
    for m in _BRACKETS.finditer(_STRING.sub('""', text)):  # brackets inside strings are text
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise ProtocolError("bad_request", f"line is JSON nested deeper than {MAX_DEPTH} levels")
    return text


def parse_request(line: Union[bytes, str]) -> Dict[str, Any]:
    """Decode and validate a request; returns it with optional fields filled in. Raises ProtocolError."""
    msg = decode(line)
    if not _is_int(msg.get("id")):
        raise ProtocolError("bad_request", "field 'id' must be an integer")
    msg_id = msg["id"]
    op = msg.get("op")
    if op is None:
        raise ProtocolError("bad_request", "missing field 'op'", msg_id)
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "field 'op' must be a string", msg_id)
    if op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {op!r} (known: {', '.join(OPS)})", msg_id)
    if op == "load":
        _need_str(msg, "path")
        sha = _need_str(msg, "sha256").lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ProtocolError("bad_request", "field 'sha256' must be 64 hex digits", msg_id)
        msg["sha256"] = sha
    elif op == "unload":
        _need_str(msg, "model_id")
    elif op == "measure":
        _check_measure(msg)
    return msg


def request(op: str, id: int, **fields: Any) -> Dict[str, Any]:
    msg = {"v": PROTOCOL_VERSION, "id": id, "op": op}
    msg.update(fields)
    return msg


def ok(id: Optional[int], **fields: Any) -> Dict[str, Any]:
    msg: Dict[str, Any] = {"v": PROTOCOL_VERSION, "id": id, "ok": True}
    msg.update(fields)
    return msg


def error(id: Optional[int], code: str, message: str) -> Dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": id, "ok": False, "error": {"code": code, "message": message}}


def progress(id: int, message: str) -> Dict[str, Any]:
    """A line for the host's log while request `id` is still running (its reply comes later)."""
    return {"v": PROTOCOL_VERSION, "id": id, "progress": message}


def ready_line(nonce: str) -> bytes:
    """The agent's first line: the host skips everything before it (shell start-up files may print)."""
    return encode({"v": PROTOCOL_VERSION, "ready": "edge_agent", "nonce": nonce})


# -- replies: one schema, checked by the host (and by the tests) ------------------------------------------


def decode_reply(line: Union[bytes, str]) -> Dict[str, Any]:
    """Parse and check one line from the agent: a reply (ok true/false) or a progress message."""
    msg = decode(line)
    msg_id = msg.get("id")
    if msg_id is not None and not _is_int(msg_id):
        raise ProtocolError("bad_reply", f"field 'id' must be an integer or null, got {_show(msg_id)}")
    if "progress" in msg:
        if not _is_int(msg_id) or not isinstance(msg["progress"], str):
            raise ProtocolError("bad_reply", "a progress message needs an integer 'id' and a string 'progress'")
        return msg
    if not isinstance(msg.get("ok"), bool):
        raise ProtocolError("bad_reply", "message is neither a reply (no boolean 'ok') nor a progress message")
    if not msg["ok"]:
        err = msg.get("error")
        if not (isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str)):
            raise ProtocolError("bad_reply", "an error reply needs 'error': {'code': str, 'message': str}")
        if err["code"] not in ERROR_CODES:
            raise ProtocolError("bad_reply", f"unknown error code {err['code']!r}")
    elif not _is_int(msg_id):
        raise ProtocolError("bad_reply", "a successful reply needs an integer 'id'")
    return msg


def check_reply(msg: Dict[str, Any], op: str) -> Dict[str, Any]:
    """A successful reply to `op` must carry every field the host reads, with the right type."""
    if msg.get("ok"):
        for key, (check, what) in _REPLY_FIELDS.get(op, {}).items():
            _check_field(msg, key, check, what, op)
        if op == "measure":
            for key, (check, what) in _STATS_FIELDS.items():
                _check_field(msg["stats"], key, check, what, op, prefix="stats.")
    return msg


def _check_field(obj: Dict[str, Any], key: str, check: Callable[[Any], bool], what: str, op: str,
                 prefix: str = "") -> None:
    if key not in obj:
        raise ProtocolError("bad_reply", f"{op} reply: field '{prefix}{key}' is missing")
    if not check(obj[key]):
        raise ProtocolError("bad_reply", f"{op} reply: field '{prefix}{key}' must be {what}, got {_show(obj[key])}")


def _show(x: Any) -> str:
    text = json.dumps(x) if isinstance(x, (str, int, float, bool, type(None))) else type(x).__name__
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _need_str(msg: Dict[str, Any], key: str) -> str:
    val = msg.get(key)
    if val is None:
        raise ProtocolError("bad_request", f"missing field {key!r}", msg["id"])
    if not isinstance(val, str) or not val:
        raise ProtocolError("bad_request", f"field {key!r} must be a non-empty string", msg["id"])
    return val


def _check_measure(msg: Dict[str, Any]) -> None:
    msg_id = msg["id"]

    def bad(text: str) -> ProtocolError:
        return ProtocolError("bad_request", text, msg_id)

    _need_str(msg, "model_id")
    shape = msg.get("shape")
    if shape is None:
        raise bad("missing field 'shape'")
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
        raise bad("field 'shape' must be a non-empty list of positive integers")
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_INPUT_ELEMENTS:
        raise bad(f"field 'shape' has {numel} elements (limit {MAX_INPUT_ELEMENTS})")
    for key, default in MEASURE_DEFAULTS.items():
        if msg.get(key) is None and key != "threads":
            msg[key] = list(default) if isinstance(default, list) else default
    threads = msg.get("threads")
    if threads is not None and not (_is_int(threads) and threads > 0):
        raise bad("field 'threads' must be a positive integer or null")
    msg["threads"] = threads
    providers = msg["providers"]
    if not isinstance(providers, list) or not all(isinstance(p, str) and p for p in providers):
        raise bad("field 'providers' must be a list of provider names")
    for key in ("warmup", "seed"):
        if not (_is_int(msg[key]) and msg[key] >= 0):
            raise bad(f"field {key!r} must be a non-negative integer")
    if not (_is_int(msg["min_runs"]) and msg["min_runs"] >= 1):
        raise bad("field 'min_runs' must be a positive integer")
    for key in ("min_seconds", "cooldown_s"):
        if not (_is_number(msg[key]) and msg[key] >= 0):
            raise bad(f"field {key!r} must be a non-negative number")
    wait = msg.get("lock_timeout_s")
    if wait is not None and not (_is_number(wait) and wait >= 0):
        raise bad("field 'lock_timeout_s' must be a non-negative number or null")


def _is_name(x: Any) -> bool:
    """One path component: no separators, not '.' or '..'."""
    if not isinstance(x, str) or x in ("", ".", ".."):
        return False
    return not any(c in x for c in "/\\\x00")


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


_INT = (lambda x: _is_int(x) and x >= 0, "a non-negative integer")
_STR = (lambda x: isinstance(x, str) and bool(x), "a non-empty string")
_NUM = (lambda x: _is_number(x) and x >= 0, "a non-negative number")
_OPT_NUM = (_opt(_is_number), "a number or null")
_REPLY_FIELDS: Dict[str, Dict[str, Any]] = {
    "hello": {
        "protocol": _INT, "agent_version": _STR, "fingerprint": (lambda x: isinstance(x, dict), "an object"),
        "fingerprint_id": _STR, "cache_dir": _STR, "models_dir": _STR, "max_model_bytes": _INT,
        "upload_dir": (_is_name, "a plain folder name"), "pid": _INT,
    },
    "load": {"model_id": _STR, "inputs": (lambda x: isinstance(x, list), "a list"), "size_bytes": _INT},
    "measure": {
        "stats": (lambda x: isinstance(x, dict), "an object"),
        "providers_used": (lambda x: isinstance(x, list) and all(isinstance(p, str) for p in x), "a list of names"),
        "cpu_others": _OPT_NUM, "temp_before_c": _OPT_NUM, "temp_after_c": _OPT_NUM,
        "throttled": (_opt(lambda x: isinstance(x, bool)), "true, false or null"),
        "lock_wait_s": _NUM,
    },
    "unload": {},
    "bye": {},
}
_STATS_FIELDS: Dict[str, Any] = {
    "min_ms": _NUM, "median_ms": _NUM, "mean_ms": _NUM, "p90_ms": _NUM, "p99_ms": _NUM,
    "std_ms": (_opt(lambda x: _is_number(x) and x >= 0), "a non-negative number or null"),
    "count": (lambda x: _is_int(x) and x >= 1, "a positive integer"),
}


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
