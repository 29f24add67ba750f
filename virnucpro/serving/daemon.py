"""The model daemon: load one model once, then embed shard files sent over ZeroMQ (see docs/daemons.md).

The main thread owns the ROUTER socket and answers at once (ping, status, accepted, busy, error) and
sends a ``progress`` heartbeat for every accepted request; a worker thread owns the model and embeds
one shard at a time from a bounded queue, posting its events back over an in-process socket. Every
message is one JSON object, checked field by field; nothing is unpickled.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import zmq

from virnucpro.serving import registry
from virnucpro.engines.embed import canonical_model_name
from virnucpro.errors import UserError
from virnucpro.manifest import append_failure

log = logging.getLogger(__name__)

# op -> field -> (kind, required); kinds are checked by _check_field
FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "ping": {},
    "status": {},
    "stop": {},
    "embed": {
        "input": ("path", True), "output": ("path", True), "sample": ("text", False), "shard": ("text", False),
        "request_id": ("text", False), "timeout": ("seconds", False), "attempt": ("count", False),
    },
}  # fmt: skip
MAX_MESSAGE_BYTES = 64 * 1024
MAX_TEXT = 4096
QUEUE_LIMIT = 32
POLL_MILLISECONDS = 250
HEARTBEAT_SECONDS = 2.0  # a progress event to every requester of an accepted shard
REGISTRY_REFRESH_SECONDS = 15.0  # registry heartbeat (registry.STALE_AFTER is far above it)
STOP_FILE_CHECK_SECONDS = 1.0
DRAIN_GRACE_SECONDS = 25.0  # below SLURM's default KillWait of 30 s
SOCKET_PATH_LIMIT = 100  # bytes; sun_path holds 108 on Linux, 104 on macOS, with the final NUL
DAEMON_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ZAP_DOMAIN = b"virnucpro"


class ProtocolError(Exception):
    """A request that the daemon refuses; the message goes back in an ``error`` reply."""


def request_id(model: str, weights: str, precision: str, input_path: str, output_path: str) -> str:
    """The ID of an embedding request: the same shard (path and version), model, parameters and output
    give the same ID."""
    try:
        info = os.stat(input_path)
        version = [info.st_size, info.st_mtime_ns]
    except OSError:
        version = None
    key = [model, os.path.realpath(weights), precision, os.path.realpath(input_path), version,
           os.path.realpath(output_path)]  # fmt: skip
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def parse_request(frames: list[bytes]) -> dict:
    """Check one request (the frames after the sender's identity) and return it as a dict."""
    if len(frames) != 1:
        raise ProtocolError(f"expected one frame holding a JSON object, got {len(frames)} frames")
    if len(frames[0]) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frames[0])} bytes is over the limit of {MAX_MESSAGE_BYTES}")
    try:
        message = json.loads(frames[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError(f"message is not UTF-8 JSON ({_short(error)})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(message).__name__}")
    op = message.get("op")
    if not isinstance(op, str) or op not in FIELDS:
        raise ProtocolError(f"unknown op {_short(op)}: expected one of {', '.join(FIELDS)}")
    unknown = sorted(set(message) - {"op"} - set(FIELDS[op]))
    if unknown:
        raise ProtocolError(f"{op}: unknown field(s) {_short(', '.join(unknown))}")
    for name, (kind, required) in FIELDS[op].items():
        if message.get(name) is not None:
            _check_field(op, name, kind, message[name])
        elif required:
            raise ProtocolError(f"{op}: field '{name}' is required")
    return message


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


def _short(value: object, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, (str, BaseException)) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def socket_path(run_dir: Path, daemon_id: str) -> tuple[Path, bool]:
    """Where to bind the ``ipc://`` socket, in a private (0700) folder, and whether that folder is a
    temporary one (used when ``<run_dir>/sockets/`` would make the path too long for the OS)."""
    directory = Path(os.path.realpath(run_dir)) / "sockets"
    path = directory / f"{daemon_id}.sock"
    temporary = len(os.fsencode(path)) > SOCKET_PATH_LIMIT
    if temporary:
        path = Path(tempfile.mkdtemp(prefix="virnucpro-")) / f"{daemon_id[:40]}.sock"
    registry.private_dir(path.parent)
    return path, temporary


@dataclass
class _Job:
    request_id: str
    input: str
    output: str
    sample: str
    shard: str
    attempt: int
    deadline: float  # time.monotonic(); the job is dropped (``expired``) if it has not started by then
    accepted: float = field(default_factory=time.monotonic)
    requesters: list[bytes] = field(default_factory=list)


class _AllowKeys:
    """ZAP credentials provider: only the run's client public key(s) may connect."""

    def __init__(self, keys: set[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


class _Daemon:
    def __init__(self, *, model, weights, device, precision, run_dir, daemon_id, roots, idle_timeout,
                 cache_clear_every, stop_file, max_queue, drain_grace, transport, bind_host):  # fmt: skip
        self.model, self.weights, self.device, self.precision = model, Path(weights), device, precision
        self.run_dir, self.daemon_id, self.roots = Path(run_dir), daemon_id, roots
        self.idle_timeout, self.cache_clear_every = idle_timeout, max(1, cache_clear_every)
        self.max_queue, self.drain_grace = max(1, max_queue), drain_grace
        self.transport, self.bind_host = transport, bind_host
        self.manifest = self.run_dir / "failures.tsv"
        self.requests_dir = self.run_dir / "requests"
        self.stop_file = Path(stop_file) if stop_file else None
        self.stop_token = registry.read_token(self.stop_file)
        self.stop_file_checked = self.last_heartbeat = self.last_refresh = time.monotonic()
        self.jobs: dict[str, _Job] = {}
        self.running: str | None = None
        self.work: queue.Queue[_Job | None] = queue.Queue()
        self.stop_reason: str | None = None
        self.stop_began = 0.0
        self.signalled = False
        self.last_activity = time.monotonic()
        self.events_endpoint = f"inproc://events-{id(self)}"
        self.stats = {
            "model_loads": 0, "load_seconds": None, "shards": 0, "sequences": 0, "tokens": 0,
            "compute_seconds": 0.0, "cache_clears": 0, "failures": 0, "sequence_failures": 0, "cached": 0,
            "attached": 0, "expired": 0, "busy_replies": 0, "taken_over": 0, "handed_back": 0, "peak_queued": 0,
            "bad_messages": 0,
        }  # fmt: skip
        self.entry = {
            "daemon_id": daemon_id, "endpoint": "", "server_key": None, "pid": os.getpid(),
            "host": socket.gethostname(), "model": model, "device": device, "precision": precision,
            "state": "loading", "reason": "", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": time.time(),
        }  # fmt: skip

    # --- main thread: socket, bookkeeping, lifecycle -------------------------------------------
    def run(self, context: zmq.Context) -> tuple[str, bool]:
        """Serve until stopped; returns the exit reason (stopped, idle, signal, failed) and whether the
        worker is still busy with a shard that was handed back when the drain grace ran out."""
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)  # at exit, up to 1 s to deliver the last replies
        router.setsockopt(zmq.MAXMSGSIZE, 16 * MAX_MESSAGE_BYTES)
        events = context.socket(zmq.PAIR)
        events.setsockopt(zmq.LINGER, 0)
        auth, path, temporary = None, None, False
        try:
            if self.transport == "tcp":
                auth, endpoint = self._bind_tcp(context, router)
            else:
                path, temporary = socket_path(self.run_dir, self.daemon_id)
                endpoint = f"ipc://{path}"
                router.bind(endpoint)
            events.bind(self.events_endpoint)
            self._publish(endpoint=endpoint)
            log.info("daemon %s: %s on %s (%s), listening on %s, queue of %d", self.daemon_id, self.model,
                     self.device, self.precision, endpoint, self.max_queue)  # fmt: skip
            worker = threading.Thread(target=self._work, args=(context,), name="embed-worker", daemon=True)
            worker.start()
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            poller.register(events, zmq.POLLIN)
            while True:
                ready = dict(poller.poll(POLL_MILLISECONDS))
                if self.signalled and self.stop_reason is None:
                    self._begin_stop(router, "signal")
                if router in ready:
                    self._receive(router)
                if events in ready and self._drain_events(router, events):
                    break
                if self._stop_file_changed():
                    log.info("daemon %s: the stop file %s changed, stopping", self.daemon_id, self.stop_file)
                    self._begin_stop(router, "stopped")
                if self._idle():
                    log.info("daemon %s: idle for %.0f s, stopping", self.daemon_id, self.idle_timeout)
                    self._begin_stop(router, "idle")
                if self.stop_reason is not None and time.monotonic() - self.stop_began > self.drain_grace:
                    log.warning("daemon %s: drain grace of %.0f s over; handing back %d shard(s)", self.daemon_id,
                                self.drain_grace, len(self.jobs))  # fmt: skip
                    self._hand_back(router, list(self.jobs.values()))
                    break
                self._heartbeat(router)
            worker.join(timeout=5.0 if self.running is None else 0.0)
            return self.stop_reason or "stopped", worker.is_alive()
        finally:
            router.close()
            events.close()
            if auth is not None:
                auth.stop()
            if path is not None:
                path.unlink(missing_ok=True)
                if temporary:
                    shutil.rmtree(path.parent, ignore_errors=True)
            if self.entry["state"] != "failed":
                registry.remove_entry(self.run_dir, self.daemon_id)

    def _bind_tcp(self, context: zmq.Context, router: zmq.Socket):
        """CURVE server with a ZAP handler that lets in only the run's client key; returns it and the endpoint."""
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = registry.curve_keys(self.run_dir, "server", create=True)
        client_public, _ = registry.curve_keys(self.run_dir, "client", create=True)
        auth = ThreadAuthenticator(context, log=logging.getLogger("virnucpro.serving.daemon.auth"))
        auth.start()
        auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=_AllowKeys({client_public}))
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        router.curve_secretkey, router.curve_publickey, router.curve_server = secret, public, True
        port = router.bind_to_random_port(f"tcp://{self.bind_host}")
        host = socket.gethostname() if self.bind_host in ("*", "0.0.0.0") else self.bind_host
        self.entry["server_key"] = public.decode()
        return auth, f"tcp://{host}:{port}"

    def _publish(self, **changes) -> None:
        self.entry.update(changes, heartbeat=round(time.time(), 3))
        registry.write_entry(self.run_dir, self.entry)

    def _heartbeat(self, router: zmq.Socket) -> None:
        """Every few seconds: a ``progress`` reply to every requester, and a fresh registry entry."""
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_SECONDS:
            self.last_heartbeat = now
            for job in self.jobs.values():
                state = "running" if job.request_id == self.running else "queued"
                for identity in job.requesters:
                    self._send(router, identity, {"reply": "progress", "request_id": job.request_id, "state": state,
                                                  "seconds": round(now - job.accepted, 1)})  # fmt: skip
        if now - self.last_refresh >= REGISTRY_REFRESH_SECONDS:
            self.last_refresh = now
            try:
                self._publish()
            except OSError as error:
                log.warning("daemon %s: could not refresh the registry entry: %s", self.daemon_id, error)

    def _stop_file_changed(self) -> bool:
        now = time.monotonic()
        if self.stop_file is None or self.stop_reason is not None:
            return False
        if now - self.stop_file_checked < STOP_FILE_CHECK_SECONDS:
            return False
        self.stop_file_checked = now
        return registry.read_token(self.stop_file) != self.stop_token

    def _idle(self) -> bool:
        quiet = time.monotonic() - self.last_activity
        return (
            self.idle_timeout > 0 and self.stop_reason is None and self.entry["state"] == "ready"
            and not self.jobs and quiet > self.idle_timeout
        )  # fmt: skip

    def _receive(self, router: zmq.Socket) -> None:
        for _ in range(1000):  # then let the loop run its checks; the rest waits in the socket
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, frames = frames[0], frames[1:]
            try:
                message = parse_request(frames)
                reply = getattr(self, f"_op_{message['op']}")(router, identity, message)
            except ProtocolError as error:
                self.stats["bad_messages"] += 1
                log.warning("daemon %s: refused a request: %s", self.daemon_id, error)
                reply = {"reply": "error", "message": str(error)}
            except Exception as error:  # never let one request take the daemon down
                log.exception("daemon %s: error while handling a request", self.daemon_id)
                reply = {"reply": "error", "message": f"internal error: {type(error).__name__}: {_short(error)}"}
            self._send(router, identity, reply)

    def _send(self, router: zmq.Socket, identity: bytes, reply: dict) -> None:
        reply["daemon_id"] = self.daemon_id
        try:
            router.send_multipart([identity, json.dumps(reply).encode()], zmq.NOBLOCK)
        except zmq.ZMQError as error:
            log.warning("daemon %s: could not send a %s reply: %s", self.daemon_id, reply["reply"], error)

    def _op_ping(self, router, identity, message) -> dict:
        return {"reply": "pong", "state": self.entry["state"]}

    def _op_status(self, router, identity, message) -> dict:
        return {
            "reply": "status", "state": self.entry["state"], "model": self.model, "device": self.device,
            "queued": len(self.jobs) - (self.running is not None), "running": int(self.running is not None),
            "max_queue": self.max_queue, "shards_done": self.stats["shards"], "failures": self.stats["failures"],
        }  # fmt: skip

    def _op_stop(self, router, identity, message) -> dict:
        if self.stop_reason is None:
            log.info("daemon %s: asked to stop", self.daemon_id)
            self._begin_stop(router, "stopped")
        return {"reply": "stopping"}

    def _op_embed(self, router, identity, message) -> dict:
        if self.stop_reason is not None:
            return {"reply": "stopping", "message": f"daemon {self.daemon_id} is stopping"}
        if self.entry["state"] != "ready":
            return {"reply": "busy", "retry_after": 1.0, "message": f"daemon {self.daemon_id} is still loading"}
        input_path, output_path = self._allowed(message["input"], "input"), self._allowed(message["output"], "output")
        rid = request_id(self.model, str(self.weights), self.precision, input_path, output_path)
        if message.get("request_id") not in (None, rid):
            raise ProtocolError(f"request_id {_short(message['request_id'])} does not match this shard, model "
                                "and parameters")  # fmt: skip
        self.last_activity = now = time.monotonic()
        deadline = now + message["timeout"] if message.get("timeout") is not None else math.inf
        if rid in self.jobs:
            job = self.jobs[rid]
            job.requesters.append(identity)
            job.deadline = max(job.deadline, deadline)
            self.stats["attached"] += 1
            return {"reply": "accepted", "request_id": rid, "attached": True}
        record = _done_record(self.requests_dir / f"{rid}.json", output_path)
        if record is not None:
            self.stats["cached"] += 1
            return {**record, "request_id": rid, "cached": True}
        if deadline <= now:
            self.stats["expired"] += 1
            return {"reply": "expired", "request_id": rid, "message": "the request's deadline had passed"}
        if len(self.jobs) >= self.max_queue:
            self.stats["busy_replies"] += 1
            return {"reply": "busy", "retry_after": self._retry_after(),
                    "message": f"{len(self.jobs)} shard(s) queued, the limit is {self.max_queue}"}  # fmt: skip
        attempt = message.get("attempt") or 1
        job = _Job(rid, input_path, output_path, message.get("sample") or "", message.get("shard") or "", attempt,
                   deadline, requesters=[identity])  # fmt: skip
        self.jobs[rid] = job
        self.stats["peak_queued"] = max(self.stats["peak_queued"], len(self.jobs))
        if attempt > 1:
            self.stats["taken_over"] += 1
            log.info("daemon %s: taking over shard %s (attempt %d)", self.daemon_id, job.shard or job.input, attempt)
        self.work.put(job)
        return {"reply": "accepted", "request_id": rid, "attached": False}

    def _retry_after(self) -> float:
        """Seconds until a queue slot is likely free: the mean time of a shard so far (0.5 to 30 s)."""
        shards = self.stats["shards"]
        mean = self.stats["compute_seconds"] / shards if shards else 1.0
        return round(min(30.0, max(0.5, mean)), 2)

    def _allowed(self, path: str, what: str) -> str:
        """The real path of a request's file, if it lies under an allowed root."""
        if not os.path.isabs(path):
            raise ProtocolError(f"{what} path '{_short(path)}' must be absolute")
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, root]) == root for root in self.roots):
            raise ProtocolError(f"{what} path '{_short(path)}' is outside the allowed roots ({', '.join(self.roots)})")
        return real

    def _begin_stop(self, router: zmq.Socket, reason: str) -> None:
        """Stop accepting; hand back the queued shards (their clients go elsewhere); the current one finishes
        (within the drain grace)."""
        self.stop_reason, self.stop_began = reason, time.monotonic()
        if self.entry["state"] != "failed":
            self._publish(state="stopping")
        queued = []
        while True:
            try:
                job = self.work.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                queued.append(job)
        self._hand_back(router, queued)
        self.work.put(None)

    def _hand_back(self, router: zmq.Socket, jobs: list[_Job]) -> None:
        for job in jobs:
            self.jobs.pop(job.request_id, None)
            self.stats["handed_back"] += 1
            for identity in job.requesters:
                self._send(router, identity, {"reply": "stopping", "request_id": job.request_id})

    def _drain_events(self, router: zmq.Socket, events: zmq.Socket) -> bool:
        """Handle the worker's events; True once the worker has exited."""
        while True:
            try:
                event = events.recv_json(zmq.NOBLOCK)
            except zmq.Again:
                return False
            kind = event.pop("event")
            if kind == "exit":
                if self.stop_reason is None:  # the worker died of a bug: say so, exit non-zero
                    self._publish(state="failed", reason="the embedding thread stopped unexpectedly (see the log)")
                    self.stop_reason = "failed"
                return True
            if kind == "ready":
                self.stats.update(model_loads=1, load_seconds=event["load_seconds"])
                self.last_activity = time.monotonic()
                log.info("daemon %s: %s loaded from %s in %.1f s", self.daemon_id, self.model, self.weights,
                         event["load_seconds"])  # fmt: skip
                if self.stop_reason is None:
                    self._publish(state="ready")
            elif kind == "load_failed":
                log.error("daemon %s: could not load %s: %s", self.daemon_id, self.model, event["message"])
                self._publish(state="failed", reason=event["message"])
                self._begin_stop(router, "failed")
            elif kind == "started":
                self.running = event["request_id"]
            else:
                self._finish(router, event)

    def _finish(self, router: zmq.Socket, event: dict) -> None:
        reply, computed = event["reply"], event["computed"]
        job = self.jobs.pop(reply["request_id"], None)
        if self.running == reply["request_id"]:
            self.running = None
        self.last_activity = time.monotonic()
        self.stats["cache_clears"] += event["cache_clears"]
        kind = reply["reply"]
        if computed:
            self.stats["shards"] += 1
        if kind == "done" and computed:
            self.stats["sequences"] += reply["sequences"]
            self.stats["tokens"] += reply["tokens"]
            self.stats["compute_seconds"] += reply["seconds"]
            self.stats["sequence_failures"] += reply["failed_sequences"]
            rate = reply["tokens"] / reply["seconds"] if reply["seconds"] else 0.0
            log.info("daemon %s: shard %s: %d sequences, %d tokens in %.2f s (%.0f tokens/s)", self.daemon_id,
                     event["label"], reply["sequences"], reply["tokens"], reply["seconds"], rate)  # fmt: skip
        elif kind == "done":
            self.stats["cached"] += 1
        elif kind == "failed":
            self.stats["failures"] += 1
            log.error("daemon %s: shard %s failed: %s: %s", self.daemon_id, event["label"], reply["error_class"],
                      reply["message"])  # fmt: skip
        elif kind == "busy":
            self.stats["busy_replies"] += 1
        elif kind == "expired":
            self.stats["expired"] += 1
            log.info("daemon %s: shard %s dropped: its deadline passed before it started", self.daemon_id,
                     event["label"])  # fmt: skip
        for identity in job.requesters if job is not None else []:  # None: handed back already
            self._send(router, identity, dict(reply))

    # --- worker thread: owns the model ---------------------------------------------------------
    def _work(self, context: zmq.Context) -> None:
        events = context.socket(zmq.PAIR)
        events.setsockopt(zmq.LINGER, 0)
        events.connect(self.events_endpoint)
        try:
            from virnucpro.engines.embed import load_embedder

            started = time.monotonic()
            try:
                embedder = load_embedder(self.model, self.weights, device=self.device, precision=self.precision)
            except Exception as error:
                if not isinstance(error, UserError):
                    log.exception("daemon %s: loading failed", self.daemon_id)
                events.send_json({"event": "load_failed", "message": f"{type(error).__name__}: {error}"})
                return
            events.send_json({"event": "ready", "load_seconds": round(time.monotonic() - started, 3)})
            processed = 0
            while (job := self.work.get()) is not None:
                event = {"event": "finished", "label": job.shard or job.input, "computed": False, "cache_clears": 0}
                reply = {"request_id": job.request_id}
                if time.monotonic() > job.deadline:
                    events.send_json({**event, "reply": {**reply, "reply": "expired"}})
                    continue
                lock, record = self._claim(job)
                if lock is None:
                    events.send_json({**event, "reply": {**reply, **record}})
                    continue
                try:
                    events.send_json({"event": "started", "request_id": job.request_id})
                    processed += 1
                    clear = processed % self.cache_clear_every == 0
                    result, clears = self._embed(embedder, job, clear_after=clear)
                    if result["reply"] == "done" and lock >= 0:
                        os.ftruncate(lock, 0)
                        os.pwrite(lock, json.dumps(result).encode(), 0)
                finally:
                    if lock >= 0:
                        os.close(lock)  # releases the claim
                events.send_json({**event, "computed": True, "cache_clears": clears, "reply": {**reply, **result}})
        finally:
            events.send_json({"event": "exit"})
            events.close()

    def _claim(self, job: _Job) -> tuple[int | None, dict | None]:
        """Lock the request across daemons (``RUN/requests/<id>.json``, ``flock``): the locked descriptor
        (-1: go on unlocked), or None and the reply to give (done before, by any daemon; or ``busy``:
        another daemon is on it)."""
        path = self.requests_dir / f"{job.request_id}.json"
        try:
            descriptor = os.open(registry.private_dir(self.requests_dir) / path.name, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            log.warning("daemon %s: cannot lock %s (%s); embedding the shard unlocked", self.daemon_id, path, error)
            return -1, None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            if job.attempt > 1:  # its client lost a daemon on it, which may hold the lock, frozen
                log.warning("daemon %s: shard %s is locked by another daemon, but its client lost a daemon on it: "
                            "embedding it all the same", self.daemon_id, job.shard or job.input)  # fmt: skip
                return -1, None
            return None, {"reply": "busy", "retry_after": self._retry_after(),
                          "message": "another daemon is embedding this shard"}  # fmt: skip
        record = _done_record(path, job.output)
        if record is not None:
            os.close(descriptor)
            return None, {**record, "cached": True}
        return descriptor, None

    def _embed(self, embedder, job: _Job, clear_after: bool) -> tuple[dict, int]:
        """Embed one shard (retrying once after a CUDA out-of-memory error); returns the reply and the cache
        clears."""
        import torch

        from virnucpro.engines.embed import embed_records

        clears, started = 0, time.monotonic()
        fields = {"sample": job.sample, "stage": f"embed_{self.model}", "shard": job.shard, "daemon": self.daemon_id}
        for attempt in (1, 2):
            try:
                summary = embed_records(embedder, Path(job.input), Path(job.output))
            except Exception as error:
                if attempt == 1 and isinstance(error, torch.cuda.OutOfMemoryError):
                    log.warning("daemon %s: out of GPU memory on %s; clearing the cache and retrying", self.daemon_id,
                                job.input)  # fmt: skip
                    clears += self._clear_cache()
                    continue
                if not isinstance(error, UserError):
                    log.exception("daemon %s: embedding %s failed", self.daemon_id, job.input)
                message = str(error).strip() or repr(error)
                attempts = job.attempt - 1 + attempt
                self._record(error_class=type(error).__name__, message=message, attempts=attempts, **fields)
                if clear_after:
                    clears += self._clear_cache()
                return {"reply": "failed", "error_class": type(error).__name__, "message": message,
                        "attempts": attempts}, clears  # fmt: skip
            else:
                break
        seconds = time.monotonic() - started
        clears += summary.out_of_memory  # the engine cleared the cache after each out-of-memory error
        for sequence_id, reason in summary.failed.items():
            self._record(sequence_id=sequence_id, error_class="OutOfMemoryError", message=reason, attempts=1, **fields)
        if clear_after:
            clears += self._clear_cache()
        return {"reply": "done", "sequences": summary.sequences, "tokens": summary.tokens,
                "failed_sequences": len(summary.failed), "seconds": round(seconds, 6)}, clears  # fmt: skip

    def _record(self, **fields) -> None:
        try:
            append_failure(self.manifest, **fields)
        except OSError as error:
            log.error("daemon %s: could not write %s: %s", self.daemon_id, self.manifest, error)

    def _clear_cache(self) -> int:
        """Give cached GPU memory back (a no-op on the CPU, counted all the same); returns 1."""
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return 1

    def final_stats(self, exit_reason: str) -> dict:
        peak_gpu = None
        if self.device.startswith("cuda") and "torch" in sys.modules:
            peak_gpu = int(sys.modules["torch"].cuda.max_memory_allocated(self.device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = self.stats["compute_seconds"]
        return {
            "daemon_id": self.daemon_id, "model": self.model, "device": self.device, "precision": self.precision,
            "host": self.entry["host"], "pid": self.entry["pid"], "transport": self.transport,
            "max_queue": self.max_queue, **self.stats, "compute_seconds": round(seconds, 6),
            "tokens_per_second": round(self.stats["tokens"] / seconds, 3) if seconds else 0.0,
            "peak_host_memory_bytes": rss if sys.platform == "darwin" else rss * 1024,
            "peak_gpu_memory_bytes": peak_gpu, "exit_reason": exit_reason,
        }  # fmt: skip


def serve(
    model: str,
    weights: Path,
    *,
    device: str,
    run_dir: Path,
    stats_output: Path,
    daemon_id: str | None,
    precision: str,
    allowed_roots: list[Path],
    idle_timeout: float,
    cache_clear_every: int,
    stop_file: Path | None = None,
    max_queue: int = QUEUE_LIMIT,
    drain_grace: float = DRAIN_GRACE_SECONDS,
    transport: str = "ipc",
    bind_host: str = "*",
) -> None:
    """Run a daemon for one model until stopped (a ``stop`` message, or ``stop_file`` changed), idle or
    signalled; write its statistics to ``stats_output``."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    model = canonical_model_name(model)
    daemon_id = daemon_id or f"{model}-{socket.gethostname()}-{os.getpid()}"
    if not DAEMON_ID.fullmatch(daemon_id):
        raise UserError(f"daemon id '{daemon_id}': use letters, digits, '.', '_' and '-' only (at most 128)")
    if transport not in ("ipc", "tcp"):
        raise UserError(f"unknown transport '{transport}': choose ipc or tcp")
    if max_queue < 1 or drain_grace < 0:
        raise UserError("--max-queue must be at least 1 and --drain-grace at least 0")
    _wait_for_predecessor(Path(run_dir), daemon_id, drain_grace + 10.0)
    daemon = _Daemon(
        model=model, weights=weights, device=device, precision=precision, run_dir=run_dir, daemon_id=daemon_id,
        roots=[os.path.realpath(root) for root in allowed_roots], idle_timeout=idle_timeout,
        cache_clear_every=cache_clear_every, stop_file=stop_file, max_queue=max_queue, drain_grace=drain_grace,
        transport=transport, bind_host=bind_host,
    )  # fmt: skip

    def on_signal(number: int, _frame) -> None:
        log.info("daemon %s: %s received: finishing the current shard (at most %.0f s), then exiting", daemon_id,
                 signal.Signals(number).name, drain_grace)  # fmt: skip
        daemon.signalled = True

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {number: signal.signal(number, on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
    context = zmq.Context()
    try:
        reason, abandoned = daemon.run(context)  # if this raises, the context is left to the exiting process
        if not abandoned:
            context.term()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if reason == "failed":
        raise UserError(f"daemon {daemon_id} ({model} from {weights}) failed: {daemon.entry['reason']}")
    stats = daemon.final_stats(reason)
    _write_json_atomically(Path(stats_output), stats)
    log.info("daemon %s: exiting (%s) after %d shard(s), %d failure(s)", daemon_id, reason, stats["shards"],
             stats["failures"])  # fmt: skip
    if abandoned:
        # The worker is inside the model and its shard went back to its clients: leave now, after a
        # moment for ZeroMQ's I/O thread to deliver the last replies (no context.term(): the worker's
        # socket is still open).
        time.sleep(0.5)
        logging.shutdown()
        os._exit(0)


def _wait_for_predecessor(run_dir: Path, daemon_id: str, wait: float) -> None:
    """Refuse a daemon ID held by a live daemon; wait (at most ``wait`` s) for one that is stopping."""
    end = time.monotonic() + wait
    while True:
        existing = registry.read_entry(run_dir, daemon_id)
        if not existing or existing.get("state") == "failed" or not registry.is_alive(existing):
            return
        if existing.get("state") != "stopping" or time.monotonic() >= end:
            raise UserError(f"daemon id '{daemon_id}' is already registered in {run_dir}/registry by pid "
                            f"{existing.get('pid')} on {existing.get('host')} ({existing.get('state')}"
                            f"{f' for over {wait:.0f} s' if existing.get('state') == 'stopping' else ''}); "
                            "give each daemon its own --daemon-id")  # fmt: skip
        log.info("daemon %s: waiting for the previous daemon of this ID (pid %s) to finish stopping", daemon_id,
                 existing.get("pid"))  # fmt: skip
        time.sleep(0.2)


def _done_record(path: Path, output: str) -> dict | None:
    """The ``done`` reply recorded for a request, if there is one and its output file still exists."""
    try:
        record = json.loads(path.read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("reply") == "done" and os.path.exists(output):
        return record
    return None


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1)
            stream.write("\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
