"""The model daemon: load one model once, then embed shard files sent over ZeroMQ (docs/daemons.md).

The main thread owns the ROUTER socket and answers at once (ping, status, accepted, busy, error) and
sends a ``progress`` heartbeat for every accepted request; the model thread (``worker.Worker``)
embeds one shard at a time and posts its events back over an in-process socket.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import zmq

from virnucpro.engines.embed import model_files
from virnucpro.errors import UserError
from virnucpro.fingerprint import model_fingerprint
from virnucpro.serving import registry, timing, transport
from virnucpro.serving.confine import Confinement
from virnucpro.serving.progress import DaemonMeter
from virnucpro.serving.protocol import (
    EmbedRequest,
    Op,
    ProtocolError,
    Reply,
    State,
    encode,
    parse_request,
    request_id,
    short,
)  # fmt: skip
from virnucpro.serving.rundir import SESSION_VARIABLE, RunDir, StopTokens
from virnucpro.serving.spec import DaemonSpec
from virnucpro.serving.stats import DaemonCounters, final_stats, write_stats
from virnucpro.serving.worker import Job, Worker, WorkerEvent, done_record

log = logging.getLogger(__name__)

DESCRIPTOR_LIMIT = 65536


class Daemon:
    """One daemon process: its ROUTER socket, its registry entry and its model thread, per its spec."""

    def __init__(self, spec: DaemonSpec, run: RunDir):
        self.spec, self.rundir = spec, run
        self.model, self.device, self.daemon_id = spec.model, spec.device, spec.daemon_id
        self.confinement = Confinement(list(spec.allowed_roots), never_write=[run.root, *model_files(spec.weights)])
        self.fingerprint = model_fingerprint(spec.weights)
        self.stops = StopTokens((spec.stop_file,)) if spec.stop_file is not None else run.stop_tokens(spec.model)
        self.stop_file_checked = self.last_heartbeat = self.last_refresh = time.monotonic()
        self.refresh_warned = -math.inf
        self.jobs: dict[str, Job] = {}
        self.running: str | None = None
        self.stop_reason: str | None = None
        self.stop_began = 0.0
        self.signalled = False
        self.last_activity = time.monotonic()
        self.events_endpoint = f"inproc://events-{id(self)}"
        self.counters = DaemonCounters()
        self.meter = DaemonMeter()  # progress hook (serving/progress.py): the entry's "progress"
        self.worker: Worker | None = None
        self.entry = {
            "daemon_id": spec.daemon_id, "endpoint": "", "server_key": None, "pid": os.getpid(),
            "host": socket.gethostname(), "address": None, "model": spec.model, "fingerprint": self.fingerprint,
            "device": spec.device, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "precision": spec.precision,
            "state": State.LOADING.value, "reason": "",
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heartbeat": time.time(),
            "session": os.environ.get(SESSION_VARIABLE),
        }  # fmt: skip

    # --- the main loop ---------------------------------------------------------------------------
    def loop(self, context: zmq.Context) -> tuple[str, bool]:
        """Serve until stopped; the exit reason (stopped, idle, signal, failed) and whether the model
        thread is still busy with a shard that was handed back when the drain grace ran out."""
        events = context.socket(zmq.PAIR)
        events.setsockopt(zmq.LINGER, 0)
        binding = None
        try:
            binding = transport.bind(context, self.rundir, self.daemon_id, self.spec.transport, self.spec.bind_host)
            router = binding.router
            events.bind(self.events_endpoint)
            self._publish(endpoint=binding.endpoint, server_key=binding.server_key, address=binding.address)
            log.info("daemon %s: %s on %s (%s), listening on %s, queue of %d", self.daemon_id, self.model,
                     self.device, self.spec.precision, binding.endpoint, self.spec.max_queue)  # fmt: skip
            thread = self._start_worker(context)
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            poller.register(events, zmq.POLLIN)
            while True:
                ready = dict(poller.poll(int(timing.DAEMON_POLL * 1000)))
                if self.signalled and self.stop_reason is None:
                    self._begin_stop(router, "signal")
                if router in ready:
                    self._receive(router)
                if events in ready and self._drain_events(router, events):
                    break
                changed = self._stop_file_changed()
                if changed is not None:
                    log.info("daemon %s: the stop file %s changed, stopping", self.daemon_id, changed)
                    self._begin_stop(router, "stopped")
                if self._idle():
                    log.info("daemon %s: idle for %.0f s, stopping", self.daemon_id, self.spec.idle_timeout)
                    self._begin_stop(router, "idle")
                if self.stop_reason is not None and time.monotonic() - self.stop_began > self.spec.drain_grace:
                    log.warning("daemon %s: drain grace of %.0f s over; handing back %d shard(s)", self.daemon_id,
                                self.spec.drain_grace, len(self.jobs))  # fmt: skip
                    self._hand_back(router, list(self.jobs.values()))
                    break
                self._heartbeat(router)
            thread.join(timeout=timing.WORKER_EXIT_WAIT if self.running is None else 0.0)
            return self.stop_reason or "stopped", thread.is_alive()
        finally:
            events.close()
            if binding is not None:
                binding.close()
            if self.entry["state"] != State.FAILED:
                registry.remove_entry(self.rundir, self.daemon_id)

    def _start_worker(self, context: zmq.Context) -> threading.Thread:
        """The model thread, posting its events over its own end of the in-process socket."""
        events = context.socket(zmq.PAIR)
        events.setsockopt(zmq.LINGER, 0)
        events.connect(self.events_endpoint)
        self.worker = Worker(self.spec, self.rundir, self.confinement, post=events.send_json)

        def work() -> None:
            try:
                self.worker.run()
            finally:
                events.close()

        thread = threading.Thread(target=work, name="embed-worker", daemon=True)
        thread.start()
        return thread

    def _publish(self, **changes) -> None:
        queued, running = len(self.jobs) - (self.running is not None), int(self.running is not None)
        counters = self.counters
        progress = self.meter.snapshot(shards=counters.shards, frames=counters.sequences, tokens=counters.tokens,
                                       queued=queued, running=running)  # fmt: skip  # progress hook
        self.entry.update(changes, heartbeat=round(time.time(), 3), progress=progress)
        registry.write_entry(self.rundir, self.entry)

    def _heartbeat(self, router: zmq.Socket) -> None:
        """Every few seconds: a ``progress`` reply to every requester, and a fresh registry entry."""
        now = time.monotonic()
        if now - self.last_heartbeat >= timing.PROGRESS_EVERY:
            self.last_heartbeat = now
            for job in self.jobs.values():
                state = "running" if job.request_id == self.running else "queued"
                for identity in job.requesters:
                    self._send(router, identity, {"reply": Reply.PROGRESS.value, "request_id": job.request_id,
                                                  "state": state, "seconds": round(now - job.accepted, 1)})  # fmt: skip
        if now - self.last_refresh >= timing.ENTRY_REFRESH_EVERY:
            try:
                self._publish()
            except OSError as error:  # e.g. no descriptor free for a moment: tried again at the next pass
                if now - self.refresh_warned >= timing.ENTRY_REFRESH_EVERY:
                    self.refresh_warned = now
                    log.warning("daemon %s: could not refresh the registry entry: %s", self.daemon_id, error)
            else:
                self.last_refresh = now

    def _stop_file_changed(self) -> Path | None:
        """The stop file that changed (checked every STOP_CHECK_EVERY), or None."""
        now = time.monotonic()
        if self.stop_reason is not None or now - self.stop_file_checked < timing.STOP_CHECK_EVERY:
            return None
        self.stop_file_checked = now
        return self.stops.changed()

    def _idle(self) -> bool:
        quiet = time.monotonic() - self.last_activity
        return (
            self.spec.idle_timeout > 0 and self.stop_reason is None and self.entry["state"] == State.READY
            and not self.jobs and quiet > self.spec.idle_timeout
        )  # fmt: skip

    # --- requests --------------------------------------------------------------------------------
    def _receive(self, router: zmq.Socket) -> None:
        for _ in range(1000):  # then let the loop run its checks; the rest waits in the socket
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, frames = frames[0], frames[1:]
            try:
                message = parse_request(frames)
                reply = self._handle(router, identity, message)
            except ProtocolError as error:
                self.counters.bad_messages += 1
                log.warning("daemon %s: refused a request: %s", self.daemon_id, error)
                reply = {"reply": Reply.ERROR.value, "message": str(error)}
            except Exception as error:  # never let one request take the daemon down
                log.exception("daemon %s: error while handling a request", self.daemon_id)
                reply = {
                    "reply": Reply.ERROR.value,
                    "message": f"internal error: {type(error).__name__}: {short(error)}",
                }
            self._send(router, identity, reply)

    def _handle(self, router: zmq.Socket, identity: bytes, message: dict) -> dict:
        op = message["op"]
        if op is Op.PING:
            return {"reply": Reply.PONG.value, "state": self.entry["state"]}
        if op is Op.STATUS:
            return {
                "reply": Reply.STATUS.value, "state": self.entry["state"], "model": self.model, "device": self.device,
                "fingerprint": self.fingerprint, "queued": len(self.jobs) - (self.running is not None),
                "running": int(self.running is not None), "max_queue": self.spec.max_queue,
                "shards_done": self.counters.shards, "failures": self.counters.failures,
            }  # fmt: skip
        if op is Op.STOP:
            if self.stop_reason is None:
                log.info("daemon %s: asked to stop", self.daemon_id)
                self._begin_stop(router, "stopped")
            return {"reply": Reply.STOPPING.value}
        return self._embed(identity, EmbedRequest.from_message(message))

    def _embed(self, identity: bytes, request: EmbedRequest) -> dict:
        if self.stop_reason is not None:
            return {"reply": Reply.STOPPING.value, "message": f"daemon {self.daemon_id} is stopping"}
        if self.entry["state"] != State.READY:
            return {
                "reply": Reply.BUSY.value,
                "retry_after": 1.0,
                "message": f"daemon {self.daemon_id} is still loading",
            }
        if request.fingerprint not in (None, self.fingerprint):
            raise ProtocolError(f"daemon {self.daemon_id} holds {self.model} {self.fingerprint} ({self.spec.weights}), "
                                f"not the requested {short(request.fingerprint)}")  # fmt: skip
        input_path = self.confinement.check(request.input, "input")
        output_path = self.confinement.check(request.output, "output")
        if output_path == input_path:
            raise ProtocolError(f"output path '{short(request.output)}' is the input: refused")
        rid = request_id(self.model, self.fingerprint, self.spec.precision, input_path, output_path)
        if request.request_id not in (None, rid):
            raise ProtocolError(f"request_id {short(request.request_id)} does not match this shard, model "
                                "and parameters")  # fmt: skip
        self.last_activity = now = time.monotonic()
        deadline = now + request.timeout if request.timeout is not None else math.inf
        if rid in self.jobs:
            job = self.jobs[rid]
            job.requesters.append(identity)
            job.deadline = max(job.deadline, deadline)
            self.counters.attached += 1
            return {"reply": Reply.ACCEPTED.value, "request_id": rid, "attached": True}
        record = done_record(self.rundir.request_record(rid), output_path)
        if record is not None:
            self.counters.cached += 1
            return {**record, "request_id": rid, "cached": True}
        if deadline <= now:
            self.counters.expired += 1
            return {"reply": Reply.EXPIRED.value, "request_id": rid, "message": "the request's deadline had passed"}
        if len(self.jobs) >= self.spec.max_queue:
            self.counters.busy_replies += 1
            return {"reply": Reply.BUSY.value, "retry_after": self._retry_after(),
                    "message": f"{len(self.jobs)} shard(s) queued, the limit is {self.spec.max_queue}"}  # fmt: skip
        job = Job(rid, input_path, output_path, request.sample, request.shard, request.attempt, deadline,
                  requesters=[identity], replace=os.path.lexists(output_path))  # fmt: skip
        self.jobs[rid] = job
        self.counters.peak_queued = max(self.counters.peak_queued, len(self.jobs))
        if request.attempt > 1:
            self.counters.taken_over += 1
            log.info("daemon %s: taking over shard %s (attempt %d)", self.daemon_id, job.label, request.attempt)
        self.worker.submit(job)
        return {"reply": Reply.ACCEPTED.value, "request_id": rid, "attached": False}

    def _retry_after(self) -> float:
        """Seconds until a queue slot is likely free: the mean time of a shard so far (within RETRY_AFTER_BOUNDS)."""
        low, high = timing.RETRY_AFTER_BOUNDS
        return round(min(high, max(low, self.counters.mean_shard_seconds())), 2)

    def _send(self, router: zmq.Socket, identity: bytes, reply: dict) -> None:
        reply["daemon_id"] = self.daemon_id
        try:
            router.send_multipart([identity, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as error:
            log.warning("daemon %s: could not send a %s reply: %s", self.daemon_id, reply["reply"], error)

    # --- stopping --------------------------------------------------------------------------------
    def _begin_stop(self, router: zmq.Socket, reason: str) -> None:
        """Stop accepting; hand back the queued shards (their clients go elsewhere); the current one
        finishes (within the drain grace)."""
        self.stop_reason, self.stop_began = reason, time.monotonic()
        if self.entry["state"] != State.FAILED:
            self._publish(state=State.STOPPING.value)
        self._hand_back(router, self.worker.take_queued())
        self.worker.close()

    def _hand_back(self, router: zmq.Socket, jobs: list[Job]) -> None:
        for job in jobs:
            self.jobs.pop(job.request_id, None)
            self.counters.handed_back += 1
            for identity in job.requesters:
                self._send(router, identity, {"reply": Reply.STOPPING.value, "request_id": job.request_id})

    # --- the model thread's events ---------------------------------------------------------------
    def _drain_events(self, router: zmq.Socket, events: zmq.Socket) -> bool:
        """Handle the model thread's events; True once it has exited."""
        while True:
            try:
                event = events.recv_json(zmq.NOBLOCK)
            except zmq.Again:
                return False
            kind = WorkerEvent(event.pop("event"))
            if kind is WorkerEvent.EXIT:
                if self.stop_reason is None:  # the model thread died of a bug: say so, exit non-zero
                    self._publish(state=State.FAILED.value, reason="the embedding thread stopped unexpectedly")
                    self.stop_reason = "failed"
                return True
            if kind is WorkerEvent.READY:
                self.counters.model_loads, self.counters.load_seconds = 1, event["load_seconds"]
                self.last_activity = time.monotonic()
                log.info("daemon %s: %s loaded from %s in %.1f s", self.daemon_id, self.model, self.spec.weights,
                         event["load_seconds"])  # fmt: skip
                if self.stop_reason is None:
                    self._publish(state=State.READY.value)
            elif kind is WorkerEvent.LOAD_FAILED:
                log.error("daemon %s: could not load %s: %s", self.daemon_id, self.model, event["message"])
                self._publish(state=State.FAILED.value, reason=event["message"])
                self._begin_stop(router, "failed")
            elif kind is WorkerEvent.STARTED:
                self.running = event["request_id"]
            else:
                self._finish(router, event)

    def _finish(self, router: zmq.Socket, event: dict) -> None:
        reply, computed = event["reply"], event["computed"]
        job = self.jobs.pop(reply["request_id"], None)
        if self.running == reply["request_id"]:
            self.running = None
        self.last_activity = time.monotonic()
        self.counters.cache_clears += event["cache_clears"]
        kind = Reply(reply["reply"])
        if computed:
            self.counters.shards += 1
        if kind is Reply.DONE and computed and not reply.get("cached"):
            self.counters.sequences += reply["sequences"]
            self.counters.tokens += reply["tokens"]
            self.counters.compute_seconds += reply["seconds"]
            self.counters.sequence_failures += reply["failed_sequences"]
            if job is not None:
                self.meter.shard_done(job.input)  # progress hook: the bytes behind these tokens
            rate = reply["tokens"] / reply["seconds"] if reply["seconds"] else 0.0
            log.info("daemon %s: shard %s: %d sequences, %d tokens in %.2f s (%.0f tokens/s)", self.daemon_id,
                     event["label"], reply["sequences"], reply["tokens"], reply["seconds"], rate)  # fmt: skip
        elif kind is Reply.DONE:
            self.counters.cached += 1
        elif kind is Reply.FAILED:
            self.counters.failures += 1
            log.error("daemon %s: shard %s failed: %s: %s", self.daemon_id, event["label"], reply["error_class"],
                      reply["message"])  # fmt: skip
        elif kind is Reply.BUSY:
            self.counters.busy_replies += 1
            reply["retry_after"] = self._retry_after()
        elif kind is Reply.EXPIRED:
            self.counters.expired += 1
            log.info("daemon %s: shard %s dropped: its deadline passed before it started", self.daemon_id,
                     event["label"])  # fmt: skip
        for identity in job.requesters if job is not None else []:  # None: handed back already
            self._send(router, identity, dict(reply))

    def final_stats(self, exit_reason: str) -> dict:
        identity = {
            "daemon_id": self.daemon_id, "model": self.model, "fingerprint": self.fingerprint, "device": self.device,
            "gpus": self.entry["gpus"], "precision": self.spec.precision, "host": self.entry["host"],
            "address": self.entry["address"], "pid": self.entry["pid"], "transport": self.spec.transport,
            "max_queue": self.spec.max_queue, "session": self.entry["session"],
        }  # fmt: skip
        return final_stats(identity, self.counters, exit_reason, self.device)


def serve(spec: DaemonSpec, run_dir: Path, stats_output: Path) -> None:
    """Run the daemon of ``spec`` until stopped (a ``stop`` message, or a stop file changed: by default the
    run folder's and its model's), idle or signalled; write its statistics to ``stats_output``."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    spec = spec.checked()
    if not spec.weights.exists():
        raise UserError(f"{spec.weights}: model not found")
    run = RunDir(run_dir)
    _raise_descriptor_limit()
    _wait_for_predecessor(run, spec.daemon_id, spec.drain_grace + timing.KILL_GRACE)
    daemon = Daemon(spec, run)
    daemon.confinement.protect(stats_output)

    def on_signal(number: int, _frame) -> None:
        log.info("daemon %s: %s received: finishing the current shard (at most %.0f s), then exiting",
                 spec.daemon_id, signal.Signals(number).name, spec.drain_grace)  # fmt: skip
        daemon.signalled = True

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {number: signal.signal(number, on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
    context = zmq.Context()
    try:
        reason, abandoned = daemon.loop(context)  # if this raises, the context is left to the exiting process
        if not abandoned:
            context.term()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if reason == "failed":
        raise UserError(f"daemon {spec.daemon_id} ({spec.model} from {spec.weights}) failed: {daemon.entry['reason']}")
    stats = daemon.final_stats(reason)
    write_stats(Path(stats_output), stats)
    log.info("daemon %s: exiting (%s) after %d shard(s), %d failure(s)", spec.daemon_id, reason, stats["shards"],
             stats["failures"])  # fmt: skip
    if abandoned:
        # The model thread is inside the model and its shard went back to its clients: leave now, after a
        # moment for ZeroMQ's I/O thread to deliver the last replies (no context.term(): the thread's
        # socket is still open).
        time.sleep(0.5)
        logging.shutdown()
        os._exit(0)


def _raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard one (at most DESCRIPTOR_LIMIT): connections that
    never authenticate hold descriptors until their handshake times out, and the daemon must still be able
    to open its shards and refresh its registry entry meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DESCRIPTOR_LIMIT if hard == resource.RLIM_INFINITY else min(hard, DESCRIPTOR_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _wait_for_predecessor(run: RunDir, daemon_id: str, wait: float) -> None:
    """Refuse a daemon ID held by a live daemon; wait (at most ``wait`` s) for one that is stopping."""
    end = time.monotonic() + wait
    while True:
        existing = registry.read_entry(run, daemon_id)
        if not existing or existing.get("state") == State.FAILED or not registry.is_alive(existing):
            return
        if existing.get("state") != State.STOPPING or time.monotonic() >= end:
            raise UserError(f"daemon id '{daemon_id}' is already registered in {run.registry} by pid "
                            f"{existing.get('pid')} on {existing.get('host')} ({existing.get('state')}"
                            f"{f' for over {wait:.0f} s' if existing.get('state') == State.STOPPING else ''}); "
                            "give each daemon its own --daemon-id")  # fmt: skip
        log.info("daemon %s: waiting for the previous daemon of this ID (pid %s) to finish stopping", daemon_id,
                 existing.get("pid"))  # fmt: skip
        time.sleep(0.2)
