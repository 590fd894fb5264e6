"""JSON-lines messages between the autoseg host and the edge agent (one object per line, UTF-8).

Shared by both sides: autoseg imports this module, so there is one definition of the messages.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Optional, Union

PROTOCOL_VERSION = 1
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
)
# A request line longer than this is refused without being parsed (requests are tiny).
MAX_LINE_BYTES = 1 << 20
# Refuse measurement inputs above this many elements (1 GiB of float32) rather than exhaust RAM.
MAX_INPUT_ELEMENTS = 1 << 28

# Defaults for the optional measure fields (same values as autoseg.latency.MeasureSettings).
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
    """Parse one line into a message object; checks JSON, object-ness and the protocol version."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError("bad_request", f"line longer than {MAX_LINE_BYTES} bytes")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("bad_request", f"line is not UTF-8: {e}") from None
    try:
        msg = json.loads(line)
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


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
