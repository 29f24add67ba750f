"""The daemons' wire protocol, shared by both ends (docs/daemons.md, "Protocol").

A client sends one frame holding one JSON object with an ``op``; every reply is one JSON frame with
``reply`` (its kind) and ``daemon_id``. Nothing is ever unpickled. This module names the ops, the reply
kinds and the fields, checks requests, and computes the request ID; the daemon and the client import
it, and neither spells a kind as a string literal.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from enum import Enum

MAX_MESSAGE_BYTES = 64 * 1024
MAX_TEXT = 4096


class Op(str, Enum):
    PING = "ping"
    STATUS = "status"
    STOP = "stop"
    EMBED = "embed"


class Reply(str, Enum):
    """Reply kinds on the wire, and the client's own verdicts on an exchange (the last three)."""

    PONG = "pong"
    STATUS = "status"
    ACCEPTED = "accepted"
    PROGRESS = "progress"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"
    BUSY = "busy"
    STOPPING = "stopping"
    ERROR = "error"
    # never sent by a daemon: what a client concludes
    LOST = "lost"  # the daemon died or went silent after accepting the shard
    UNREACHABLE = "unreachable"  # it could not be connected to, or did not accept the shard
    TIMEOUT = "timeout"  # the client's deadline passed


class State(str, Enum):
    """A daemon's state, in its registry entry and its ``pong``/``status`` replies."""

    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


SIGNS_OF_LIFE = (Reply.ACCEPTED, Reply.PROGRESS)

# op -> field -> (kind, required); kinds are checked by _check_field
FIELDS: dict[Op, dict[str, tuple[str, bool]]] = {
    Op.PING: {},
    Op.STATUS: {},
    Op.STOP: {},
    Op.EMBED: {
        "input": ("path", True), "output": ("path", True), "sample": ("text", False), "shard": ("text", False),
        "request_id": ("text", False), "timeout": ("seconds", False), "attempt": ("count", False),
        "fingerprint": ("text", False),
    },
}  # fmt: skip


class ProtocolError(Exception):
    """A request that the daemon refuses; the message goes back in an ``error`` reply."""


@dataclass(frozen=True)
class EmbedRequest:
    """One shard to embed: ``input`` FASTA to ``output`` embedding file (absolute paths).

    ``fingerprint`` is the model identity the client expects (a daemon holding another model refuses);
    ``attempt`` is 1 plus the daemons the client lost while they held this shard; ``timeout`` is the
    client's deadline in seconds from now."""

    input: str
    output: str
    sample: str = ""
    shard: str = ""
    timeout: float | None = None
    attempt: int = 1
    fingerprint: str | None = None
    request_id: str | None = None

    def to_message(self) -> dict:
        message = {"op": Op.EMBED.value, "input": self.input, "output": self.output, "sample": self.sample,
                   "shard": self.shard, "attempt": self.attempt}  # fmt: skip
        for name in ("timeout", "fingerprint", "request_id"):
            if getattr(self, name) is not None:
                message[name] = getattr(self, name)
        return message

    @classmethod
    def from_message(cls, message: dict) -> EmbedRequest:
        """From a message that ``parse_request`` accepted."""
        return cls(
            input=message["input"], output=message["output"], sample=message.get("sample") or "",
            shard=message.get("shard") or "", timeout=message.get("timeout"), attempt=message.get("attempt") or 1,
            fingerprint=message.get("fingerprint"), request_id=message.get("request_id"),
        )  # fmt: skip


def encode(message: dict) -> bytes:
    """A message or reply as its one frame."""
    return json.dumps(message).encode()


def parse_request(frames: list[bytes]) -> dict:
    """Check one request (the frames after the sender's identity); the message, with ``op`` an Op."""
    if len(frames) != 1:
        raise ProtocolError(f"expected one frame holding a JSON object, got {len(frames)} frames")
    if len(frames[0]) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frames[0])} bytes is over the limit of {MAX_MESSAGE_BYTES}")
    try:
        message = json.loads(frames[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError(f"message is not UTF-8 JSON ({short(error)})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(message).__name__}")
    try:
        op = Op(message.get("op"))
    except ValueError:
        raise ProtocolError(f"unknown op {short(message.get('op'))}: expected one of "
                            f"{', '.join(op.value for op in Op)}") from None  # fmt: skip
    unknown = sorted(set(message) - {"op"} - set(FIELDS[op]))
    if unknown:
        raise ProtocolError(f"{op.value}: unknown field(s) {short(', '.join(unknown))}")
    for name, (kind, required) in FIELDS[op].items():
        if message.get(name) is not None:
            _check_field(op.value, name, kind, message[name])
        elif required:
            raise ProtocolError(f"{op.value}: field '{name}' is required")
    return {**message, "op": op}


def decode_reply(data: bytes) -> dict:
    """A daemon's reply as a dict; anything unreadable becomes an ``error`` reply."""
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        return {"reply": Reply.ERROR.value, "message": "unreadable reply from the daemon"}
    return reply


def kind_of(reply: dict) -> Reply | None:
    """The kind of a reply, or None for one this version does not know."""
    try:
        return Reply(reply.get("reply"))
    except ValueError:
        return None


def request_id(model: str, fingerprint: str, precision: str, input_path: str, output_path: str) -> str:
    """The ID of an embedding request: the same shard (path and version), model, parameters and output
    give the same ID."""
    try:
        info = os.stat(input_path)
        version = [info.st_size, info.st_mtime_ns]
    except OSError:
        version = None
    key = [model, fingerprint, precision, os.path.realpath(input_path), version, os.path.realpath(output_path)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def short(value: object, limit: int = 80) -> str:
    """A value shortened for a message."""
    text = repr(value) if not isinstance(value, (str, BaseException)) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_field(op: str, name: str, kind: str, value: object) -> None:
    if kind in ("path", "text"):
        if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value or kind == "path" and not value:
            raise ProtocolError(f"{op}: field '{name}' must be a {'non-empty ' if kind == 'path' else ''}string "
                                f"of at most {MAX_TEXT} characters, without NUL")  # fmt: skip
    elif kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e9:
            raise ProtocolError(f"{op}: field '{name}' must be a number of seconds from 0 to 1e9")
    elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ProtocolError(f"{op}: field '{name}' must be an integer from 1 to 1000")
