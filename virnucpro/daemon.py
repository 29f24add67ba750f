"""The model daemon: load one model once, then embed shard files sent over ZeroMQ (see docs/daemons.md).

The main thread owns the ROUTER socket and answers at once (ping, status, accepted, busy, error);
a worker thread owns the model and embeds one shard at a time from a bounded queue, posting its
events back over an in-process socket. Every message is one JSON object; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from virnucpro import registry
from virnucpro.embed import canonical_model_name
from virnucpro.errors import UserError
from virnucpro.manifest import append_failure

log = logging.getLogger(__name__)

OPS = ("ping", "status", "embed", "stop")
EMBED_FIELDS = {"input": True, "output": True, "sample": False, "shard": False, "request_id": False}
MAX_MESSAGE_BYTES = 64 * 1024
QUEUE_LIMIT = 32
RETRY_AFTER_SECONDS = 2.0
POLL_MILLISECONDS = 250
STOP_FILE_CHECK_SECONDS = 1.0
SOCKET_PATH_LIMIT = 100  # bytes; sun_path holds 108 on Linux, 104 on macOS, with the final NUL
DAEMON_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ProtocolError(Exception):
    """A request that the daemon refuses; the message goes back in an ``error`` reply."""


def request_id(model: str, input_path: str, output_path: str, precision: str) -> str:
    """The ID of an embedding request: the same shard, model and parameters give the same ID."""
    key = [model, os.path.realpath(input_path), os.path.realpath(output_path), precision]
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
        raise ProtocolError(f"message is not UTF-8 JSON ({error})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(message).__name__}")
    op = message.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown op {op!r}: expected one of {', '.join(OPS)}")
    if op == "embed":
        for name, required in EMBED_FIELDS.items():
            value = message.get(name)
            if value is None and not required:
                continue
            if not isinstance(value, str) or not value and required:
                raise ProtocolError(f"embed: field '{name}' must be a {'non-empty ' if required else ''}string")
    return message


def socket_path(run_dir: Path, daemon_id: str) -> tuple[Path, bool]:
    """Where to bind the ``ipc://`` socket, in a private (0700) folder, and whether that folder is a
    temporary one (used when ``<run_dir>/sockets/`` would make the path too long for the OS)."""
    directory = Path(os.path.realpath(run_dir)) / "sockets"
    path = directory / f"{daemon_id}.sock"
    temporary = len(os.fsencode(path)) > SOCKET_PATH_LIMIT
    if temporary:
        path = Path(tempfile.mkdtemp(prefix="virnucpro-")) / f"{daemon_id[:40]}.sock"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    return path, temporary


@dataclass
class _Job:
    request_id: str
    input: str
    output: str
    sample: str
    shard: str
    requesters: list[bytes] = field(default_factory=list)


class _Daemon:
    def __init__(
        self, model, weights, device, precision, run_dir, daemon_id, roots, idle_timeout, cache_clear_every, stop_file
    ):
        self.model, self.weights, self.device, self.precision = model, Path(weights), device, precision
        self.run_dir, self.daemon_id, self.roots = Path(run_dir), daemon_id, roots
        self.idle_timeout, self.cache_clear_every = idle_timeout, max(1, cache_clear_every)
        self.manifest = self.run_dir / "failures.tsv"
        self.stop_file = Path(stop_file) if stop_file else None
        self.stop_token = _read_token(self.stop_file)
        self.stop_file_checked = time.monotonic()
        self.jobs: dict[str, _Job] = {}
        self.done: dict[str, dict] = {}
        self.running: str | None = None
        self.work: queue.Queue[_Job | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self.stop_reason: str | None = None
        self.signalled = False
        self.last_activity = time.monotonic()
        self.events_endpoint = f"inproc://events-{id(self)}"
        self.stats = {
            "model_loads": 0, "load_seconds": None, "shards": 0, "sequences": 0, "tokens": 0,
            "compute_seconds": 0.0, "cache_clears": 0, "failures": 0,
        }  # fmt: skip
        self.entry = {
            "daemon_id": daemon_id, "endpoint": "", "pid": os.getpid(), "host": socket.gethostname(),
            "model": model, "device": device, "precision": precision, "state": "loading", "reason": "",
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }  # fmt: skip

    # --- main thread: socket, bookkeeping, lifecycle -------------------------------------------
    def run(self, context: zmq.Context) -> str:
        """Serve until stopped; returns the exit reason (stopped, idle, signal, failed)."""
        path, temporary = socket_path(self.run_dir, self.daemon_id)
        endpoint = f"ipc://{path}"
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, 16 * MAX_MESSAGE_BYTES)
        events = context.socket(zmq.PAIR)
        events.setsockopt(zmq.LINGER, 0)
        try:
            router.bind(endpoint)
            events.bind(self.events_endpoint)
            self._publish(endpoint=endpoint)
            log.info("daemon %s: %s on %s (%s), listening on %s", self.daemon_id, self.model, self.device,
                     self.precision, endpoint)  # fmt: skip
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
            worker.join()
            return self.stop_reason or "stopped"
        finally:
            router.close()
            events.close()
            path.unlink(missing_ok=True)
            if temporary:
                shutil.rmtree(path.parent, ignore_errors=True)
            if self.entry["state"] != "failed":
                registry.remove_entry(self.run_dir, self.daemon_id)

    def _publish(self, **changes) -> None:
        self.entry.update(changes)
        registry.write_entry(self.run_dir, self.entry)

    def _stop_file_changed(self) -> bool:
        now = time.monotonic()
        if self.stop_file is None or self.stop_reason is not None:
            return False
        if now - self.stop_file_checked < STOP_FILE_CHECK_SECONDS:
            return False
        self.stop_file_checked = now
        return _read_token(self.stop_file) != self.stop_token

    def _idle(self) -> bool:
        quiet = time.monotonic() - self.last_activity
        return (
            self.idle_timeout > 0 and self.stop_reason is None and self.entry["state"] == "ready"
            and not self.jobs and quiet > self.idle_timeout
        )  # fmt: skip

    def _receive(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, frames = frames[0], frames[1:]
            try:
                message = parse_request(frames)
                reply = getattr(self, f"_op_{message['op']}")(router, identity, message)
            except ProtocolError as error:
                log.warning("daemon %s: refused a request: %s", self.daemon_id, error)
                reply = {"reply": "error", "message": str(error)}
            except Exception as error:  # never let one request take the daemon down
                log.exception("daemon %s: error while handling a request", self.daemon_id)
                reply = {"reply": "error", "message": f"internal error: {type(error).__name__}: {error}"}
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
            "shards_done": self.stats["shards"], "failures": self.stats["failures"],
        }  # fmt: skip

    def _op_stop(self, router, identity, message) -> dict:
        if self.stop_reason is None:
            log.info("daemon %s: asked to stop", self.daemon_id)
            self._begin_stop(router, "stopped")
        return {"reply": "stopping"}

    def _op_embed(self, router, identity, message) -> dict:
        if self.stop_reason is not None:
            return {"reply": "stopping", "message": f"daemon {self.daemon_id} is stopping"}
        input_path, output_path = self._allowed(message["input"], "input"), self._allowed(message["output"], "output")
        rid = request_id(self.model, input_path, output_path, self.precision)
        if message.get("request_id") not in (None, rid):
            raise ProtocolError(f"request_id {message['request_id']!r} does not match this shard, model and precision")
        self.last_activity = time.monotonic()
        if rid in self.jobs:
            self.jobs[rid].requesters.append(identity)
            return {"reply": "accepted", "request_id": rid, "attached": True}
        if rid in self.done and os.path.exists(output_path):
            return {"reply": "done", "request_id": rid, **self.done[rid], "cached": True}
        job = _Job(rid, input_path, output_path, message.get("sample") or "", message.get("shard") or "", [identity])
        try:
            self.work.put_nowait(job)
        except queue.Full:
            return {"reply": "busy", "retry_after": RETRY_AFTER_SECONDS, "message": f"{QUEUE_LIMIT} shards queued"}
        self.jobs[rid] = job
        return {"reply": "accepted", "request_id": rid, "attached": False}

    def _allowed(self, path: str, what: str) -> str:
        """The real path of a request's file, if it lies under an allowed root."""
        if not os.path.isabs(path):
            raise ProtocolError(f"{what} path '{path}' must be absolute")
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, root]) == root for root in self.roots):
            raise ProtocolError(f"{what} path '{path}' is outside the allowed roots ({', '.join(self.roots)})")
        return real

    def _begin_stop(self, router: zmq.Socket, reason: str) -> None:
        """Stop accepting; hand back the queued shards (their clients go elsewhere); the current one finishes."""
        self.stop_reason = reason
        if self.entry["state"] != "failed":
            self._publish(state="stopping")
        while True:
            try:
                job = self.work.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                del self.jobs[job.request_id]
                for identity in job.requesters:
                    self._send(router, identity, {"reply": "stopping", "request_id": job.request_id})
        self.work.put(None)

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
                self._finish(router, kind, event)

    def _finish(self, router: zmq.Socket, kind: str, event: dict) -> None:
        job = self.jobs.pop(event.pop("request_id"))
        self.running = None
        self.last_activity = time.monotonic()
        self.stats["cache_clears"] += event.pop("cache_clears")
        self.stats["shards"] += 1
        if kind == "done":
            self.stats["sequences"] += event["sequences"]
            self.stats["tokens"] += event["tokens"]
            self.stats["compute_seconds"] += event["seconds"]
            self.done[job.request_id] = event
            rate = event["tokens"] / event["seconds"] if event["seconds"] else 0.0
            log.info("daemon %s: shard %s: %d sequences, %d tokens in %.2f s (%.0f tokens/s)", self.daemon_id,
                     job.shard or job.input, event["sequences"], event["tokens"], event["seconds"], rate)  # fmt: skip
        else:
            self.stats["failures"] += 1
            log.error("daemon %s: shard %s failed: %s: %s", self.daemon_id, job.shard or job.input,
                      event["error_class"], event["message"])  # fmt: skip
        for identity in job.requesters:
            self._send(router, identity, {"reply": kind, "request_id": job.request_id, **event})

    # --- worker thread: owns the model ---------------------------------------------------------
    def _work(self, context: zmq.Context) -> None:
        events = context.socket(zmq.PAIR)
        events.setsockopt(zmq.LINGER, 0)
        events.connect(self.events_endpoint)
        try:
            from virnucpro.embed import load_embedder

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
                events.send_json({"event": "started", "request_id": job.request_id})
                processed += 1
                events.send_json(self._embed(embedder, job, clear_after=processed % self.cache_clear_every == 0))
        finally:
            events.send_json({"event": "exit"})
            events.close()

    def _embed(self, embedder, job: _Job, clear_after: bool) -> dict:
        """Embed one shard (retrying once after a CUDA out-of-memory error); returns the worker's event."""
        import torch

        from virnucpro.embed import embed_records

        clears, started = 0, time.monotonic()
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
                try:
                    append_failure(self.manifest, sample=job.sample, stage=f"embed_{self.model}", shard=job.shard,
                                   error_class=type(error).__name__, message=message, attempts=attempt,
                                   daemon=self.daemon_id)  # fmt: skip
                except OSError as manifest_error:
                    log.error("daemon %s: could not write %s: %s", self.daemon_id, self.manifest, manifest_error)
                if clear_after:
                    clears += self._clear_cache()
                return {"event": "failed", "request_id": job.request_id, "error_class": type(error).__name__,
                        "message": message, "attempts": attempt, "cache_clears": clears}  # fmt: skip
            else:
                break
        seconds = time.monotonic() - started
        clears += summary.out_of_memory  # the engine cleared the cache after each out-of-memory error
        for sequence_id, reason in summary.failed.items():
            try:
                append_failure(self.manifest, sample=job.sample, stage=f"embed_{self.model}", shard=job.shard,
                               sequence_id=sequence_id, error_class="OutOfMemoryError", message=reason, attempts=1,
                               daemon=self.daemon_id)  # fmt: skip
            except OSError as manifest_error:
                log.error("daemon %s: could not write %s: %s", self.daemon_id, self.manifest, manifest_error)
        if clear_after:
            clears += self._clear_cache()
        return {"event": "done", "request_id": job.request_id, "sequences": summary.sequences,
                "tokens": summary.tokens, "seconds": round(seconds, 6), "cache_clears": clears}  # fmt: skip

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
            "host": self.entry["host"], "pid": self.entry["pid"], **self.stats,
            "compute_seconds": round(seconds, 6),
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
) -> None:
    """Run a daemon for one model until stopped (a ``stop`` message, or ``stop_file`` changed), idle or
    signalled; write its statistics to ``stats_output``."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    model = canonical_model_name(model)
    daemon_id = daemon_id or f"{model}-{socket.gethostname()}-{os.getpid()}"
    if not DAEMON_ID.fullmatch(daemon_id):
        raise UserError(f"daemon id '{daemon_id}': use letters, digits, '.', '_' and '-' only (at most 128)")
    existing = registry.read_entry(run_dir, daemon_id)
    if existing and existing.get("state") != "failed" and registry.is_alive(existing):
        raise UserError(f"daemon id '{daemon_id}' is already registered in {run_dir}/registry by pid "
                        f"{existing.get('pid')} on {existing.get('host')}; "
                        "give each daemon its own --daemon-id")  # fmt: skip
    roots = [os.path.realpath(root) for root in allowed_roots]
    daemon = _Daemon(
        model, weights, device, precision, run_dir, daemon_id, roots, idle_timeout, cache_clear_every, stop_file
    )

    def on_signal(number: int, _frame) -> None:
        log.info("daemon %s: %s received: finishing the current shard, then exiting", daemon_id,
                 signal.Signals(number).name)  # fmt: skip
        daemon.signalled = True

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {number: signal.signal(number, on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
    context = zmq.Context()
    try:
        reason = daemon.run(context)  # if this raises, the context is left to the exiting process
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


def _read_token(path: Path | None) -> bytes | None:
    """The content of the stop file (None if there is none, or it cannot be read)."""
    try:
        return path.read_bytes() if path else None
    except OSError:
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
