"""The light client of the model daemons: find a ready daemon in the registry, send it a shard, wait.

See docs/daemons.md for the protocol. The client fails over to another daemon if its daemon dies,
and never waits longer than its timeout.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import time
from pathlib import Path

import zmq

from virnucpro import registry
from virnucpro.embed import canonical_model_name
from virnucpro.errors import UserError
from virnucpro.manifest import append_failure

log = logging.getLogger(__name__)

CHECK_EVERY = 2.0  # seconds of silence between liveness checks of the daemon working on our shard
LOST_AFTER = 20.0  # seconds without any answer after which a daemon counts as lost
PROGRESS_EVERY = 30.0
STATUS_TIMEOUT = 2.0
STOP_TIMEOUT = 5.0
REGISTRY_POLL = 0.5
SEND_TIMEOUT_MS = 2000


def request_embedding(
    run_dir: Path,
    model: str,
    input_path: Path,
    output_path: Path,
    *,
    sample: str = "",
    shard: str = "",
    timeout: float = 3600.0,
) -> None:
    """Have a daemon of ``model`` registered under ``run_dir`` embed ``input_path`` into ``output_path``."""
    model, run_dir = canonical_model_name(model), Path(run_dir)
    request = {
        "op": "embed", "input": os.path.abspath(input_path), "output": os.path.abspath(output_path),
        "sample": sample, "shard": shard,
    }  # fmt: skip
    started = time.monotonic()
    deadline = started + timeout
    avoid: set[str] = set()
    lost: list[str] = []
    context = zmq.Context()
    try:
        while True:
            entry = _wait_for_daemon(context, run_dir, model, avoid, started, deadline)
            daemon = entry["daemon_id"]
            reply = _exchange(context, entry, request, deadline)
            kind = reply.get("reply")
            if kind == "done":
                log.info("%s: embedded by daemon %s (%s sequences, %s tokens, %.2f s)", input_path, daemon,
                         reply.get("sequences"), reply.get("tokens"), reply.get("seconds") or 0.0)  # fmt: skip
                return
            if kind == "failed":
                raise UserError(f"{input_path}: daemon {daemon} could not embed it with {model}: "
                                f"{reply.get('error_class')}: {reply.get('message')} "
                                f"(recorded in {run_dir / 'failures.tsv'})")  # fmt: skip
            if kind == "busy":
                time.sleep(max(0.0, min(float(reply.get("retry_after") or 1.0), deadline - time.monotonic())))
            elif kind == "stopping":
                log.info("daemon %s is stopping; looking for another %s daemon", daemon, model)
                avoid.add(daemon)
            elif kind == "lost":
                avoid.add(daemon)
                lost.append(daemon)
                if not _ready_entries(run_dir, model, avoid):
                    message = (f"daemon(s) {', '.join(lost)} died while embedding {input_path} and no other "
                               f"{model} daemon is alive")  # fmt: skip
                    append_failure(run_dir / "failures.tsv", sample=sample, stage=f"embed_{model}", shard=shard,
                                   error_class="DaemonLost", message=message, attempts=len(lost),
                                   daemon=daemon)  # fmt: skip
                    raise UserError(f"{message}; see the daemon logs in logs/daemons/ and restart the serve jobs")
                log.warning("daemon %s was lost while embedding %s; failing over", daemon, input_path)
            elif kind == "timeout":
                raise UserError(f"{input_path}: daemon {daemon} did not finish it within the client's timeout "
                                f"of {timeout:.0f} s; see the daemon logs in logs/daemons/, "
                                "or raise the timeout")  # fmt: skip
            else:
                raise UserError(f"{input_path}: daemon {daemon} refused the request: {reply.get('message', reply)}")
    finally:
        context.destroy(linger=0)


def stop_daemons(run_dir: Path, model: str | None = None, stop_file: Path | None = None) -> int:
    """Ask every live daemon registered under ``run_dir`` (of one model, if given) to stop; returns how many
    acknowledged within a few seconds (it never hangs). With ``stop_file``, also write a fresh token
    there, which stops every daemon watching that file (registered or not yet)."""
    model = canonical_model_name(model) if model else None
    if stop_file is not None:
        write_stop_token(Path(stop_file))
    entries = [entry for entry in registry.list_entries(Path(run_dir), model) if entry.get("state") != "failed"]
    context = zmq.Context()
    try:
        replies = _ask_all(context, entries, {"op": "stop"}, STOP_TIMEOUT)
    finally:
        context.destroy(linger=0)
    for entry in entries:
        acknowledged = replies.get(entry["daemon_id"], {}).get("reply") == "stopping"
        log.log(logging.INFO if acknowledged else logging.WARNING, "daemon %s (%s, pid %s) %s", entry["daemon_id"],
                entry.get("model"), entry.get("pid"), "is stopping" if acknowledged else "did not answer")  # fmt: skip
    return sum(reply.get("reply") == "stopping" for reply in replies.values())


def write_stop_token(path: Path) -> None:
    """Replace the stop file's content, atomically, by a token never written before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    temporary.write_text(f"stop {time.time():.6f} {secrets.token_hex(16)}\n")
    os.replace(temporary, path)


def _ready_entries(run_dir: Path, model: str, avoid: set[str]) -> list[dict]:
    return [
        entry for entry in registry.list_entries(run_dir, model)
        if entry.get("state") == "ready" and entry.get("daemon_id") not in avoid
    ]  # fmt: skip


def _wait_for_daemon(context: zmq.Context, run_dir: Path, model: str, avoid: set[str], started: float,
                     deadline: float) -> dict:  # fmt: skip
    """The least-loaded ready daemon of ``model``, waiting for one to appear until the deadline."""
    last_progress = time.monotonic()
    while True:
        entries = _ready_entries(run_dir, model, avoid)
        statuses = _ask_all(context, entries, {"op": "status"}, STATUS_TIMEOUT)
        loads = {
            daemon: int(status.get("queued", 0)) + int(status.get("running", 0))
            for daemon, status in statuses.items()
            if status.get("reply") == "status" and status.get("state") == "ready"
        }  # fmt: skip
        if loads:
            lowest = min(loads.values())
            return random.choice([entry for entry in entries if loads.get(entry["daemon_id"]) == lowest])
        now = time.monotonic()
        if now >= deadline:
            failed = [entry for entry in registry.list_entries(run_dir, model) if entry.get("state") == "failed"]
            reasons = "".join(f"; daemon {entry['daemon_id']} failed: {entry.get('reason')}" for entry in failed)
            raise UserError(f"no ready {model} daemon answered within {now - started:.0f} s (registry: "
                            f"{run_dir / 'registry'}): are the serve jobs running? See the daemon logs in "
                            f"logs/daemons/{reasons}")  # fmt: skip
        if now - last_progress >= PROGRESS_EVERY:
            log.info("still waiting for a ready %s daemon in %s (%.0f s so far)", model, run_dir / "registry",
                     now - started)  # fmt: skip
            last_progress = now
        time.sleep(min(REGISTRY_POLL, max(0.0, deadline - now)))


def _ask_all(context: zmq.Context, entries: list[dict], message: dict, timeout: float) -> dict[str, dict]:
    """Send one message to several daemons at once; their first replies within ``timeout``, by daemon ID."""
    sockets: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    replies: dict[str, dict] = {}
    try:
        for entry in entries:
            try:
                sock = _connect(context, entry)
                sockets[sock] = entry["daemon_id"]
                sock.send_json(message)
            except zmq.ZMQError:
                continue
            poller.register(sock, zmq.POLLIN)
        end = time.monotonic() + timeout
        while poller.sockets and time.monotonic() < end:
            for sock, _ in poller.poll(max(1, int((end - time.monotonic()) * 1000))):
                poller.unregister(sock)
                replies[sockets[sock]] = _decode(sock.recv())
        return replies
    finally:
        for sock in sockets:
            sock.close(linger=0)


def _exchange(context: zmq.Context, entry: dict, request: dict, deadline: float) -> dict:
    """Send the request to one daemon and wait for its final answer; ``lost`` or ``timeout`` if none comes."""
    try:
        sock = _connect(context, entry)
    except zmq.ZMQError:
        return {"reply": "lost"}
    try:
        sock.send_json(request)
        sent = heard = last_progress = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                return {"reply": "timeout"}
            if sock.poll(int(min(CHECK_EVERY, deadline - now) * 1000) + 1):
                reply = _decode(sock.recv())
                heard = time.monotonic()
                if reply.get("reply") not in ("accepted", "pong"):
                    return reply
                continue
            if not registry.is_alive(entry) or now - heard > LOST_AFTER:
                return {"reply": "lost"}
            if now - last_progress >= PROGRESS_EVERY:
                log.info("daemon %s is working on %s (%.0f s)", entry["daemon_id"], request["input"], now - sent)
                last_progress = now
            sock.send_json({"op": "ping"})
    except zmq.ZMQError:
        return {"reply": "lost"}
    finally:
        sock.close(linger=0)


def _connect(context: zmq.Context, entry: dict) -> zmq.Socket:
    """A DEALER socket connected to the daemon's endpoint (ZMQError if the endpoint is unusable)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    try:
        sock.connect(str(entry.get("endpoint")))
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


def _decode(data: bytes) -> dict:
    """A daemon's reply as a dict; anything unreadable becomes an ``error`` reply."""
    try:
        reply = json.loads(data)
    except ValueError:
        return {"reply": "error", "message": "unreadable reply from the daemon"}
    return reply if isinstance(reply, dict) else {"reply": "error", "message": "unreadable reply from the daemon"}
