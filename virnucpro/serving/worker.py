"""The model thread of a daemon: loads the model once, then embeds one shard at a time.

It knows nothing of sockets: shards come in through ``submit``, and every event (a ``WorkerEvent``:
ready, load failed, started, finished, exit) goes out through the ``post`` callable it was given, so
it can be driven and tested on its own. What it promises (docs/daemons.md):
- a shard is computed by one daemon at a time: it holds an exclusive ``flock`` on the shard's request
  record while it computes, and writes the ``done`` reply there before it lets go;
- an output that appeared while it computed (another daemon took the shard over) is never overwritten;
- every outcome of a shard is in the failure manifest as it stands now (``record_embed_failures``).
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from virnucpro.errors import UserError, environmental
from virnucpro.manifest import record_embed_failures
from virnucpro.serving.confine import Confinement
from virnucpro.serving.protocol import Reply
from virnucpro.serving.rundir import RunDir, private_dir
from virnucpro.serving.spec import DaemonSpec

log = logging.getLogger(__name__)


class WorkerEvent(str, Enum):
    """What the model thread tells its daemon (the ``event`` field of each posted dict)."""

    READY = "ready"  # the model is loaded (load_seconds)
    LOAD_FAILED = "load_failed"  # it could not be (message); the thread exits
    STARTED = "started"  # a shard is being computed (request_id)
    FINISHED = "finished"  # a shard's outcome (reply, label, computed, cache_clears)
    EXIT = "exit"  # the thread is leaving


@dataclass
class Job:
    """An accepted shard: where it comes from and goes, and who waits for it."""

    request_id: str
    input: str
    output: str
    sample: str = ""
    shard: str = ""
    attempt: int = 1
    deadline: float = math.inf  # time.monotonic(); dropped (``expired``) if it has not started by then
    accepted: float = field(default_factory=time.monotonic)
    requesters: list[bytes] = field(default_factory=list)
    replace: bool = False  # its output existed when it was asked for: redo it (else never overwrite one)

    @property
    def label(self) -> str:
        return self.shard or self.input


class Worker:
    """Owns the model; ``run`` (in its own thread) loads it, then takes jobs until ``close``."""

    def __init__(self, spec: DaemonSpec, run: RunDir, confinement: Confinement, post: Callable[[dict], None]):
        self.spec, self.rundir, self.confinement = spec, run, confinement
        self.model, self.device, self.daemon_id = spec.model, spec.device, spec.daemon_id
        self.post = post
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.processed = 0

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def take_queued(self) -> list[Job]:
        """Remove and return the jobs not started yet."""
        jobs = []
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def close(self) -> None:
        """Let ``run`` return once the job in progress (if any) is done."""
        self.queue.put(None)

    def run(self) -> None:
        try:
            embedder = self._load()
            if embedder is None:
                return
            while (job := self.queue.get()) is not None:
                self._serve(embedder, job)
        finally:
            self.post({"event": WorkerEvent.EXIT.value})

    def _load(self):
        from virnucpro.engines.embed import load_embedder

        started = time.monotonic()
        try:
            embedder = load_embedder(self.model, self.spec.weights, device=self.device, precision=self.spec.precision,
                                     esm2_engine=self.spec.esm2_engine)  # fmt: skip
        except Exception as error:
            if not isinstance(error, UserError):
                log.exception("daemon %s: loading failed", self.daemon_id)
            self.post({"event": WorkerEvent.LOAD_FAILED.value, "message": f"{type(error).__name__}: {error}"})
            return None
        self.post({"event": WorkerEvent.READY.value, "load_seconds": round(time.monotonic() - started, 3)})
        return embedder

    def _serve(self, embedder, job: Job) -> None:
        event = {"event": WorkerEvent.FINISHED.value, "label": job.label, "computed": False, "cache_clears": 0}
        reply = {"request_id": job.request_id}
        if time.monotonic() > job.deadline:
            self.post({**event, "reply": {**reply, "reply": Reply.EXPIRED.value}})
            return
        lock, answer = self._claim(job)
        if lock is None:
            self.post({**event, "reply": {**reply, **answer}})
            return
        try:
            self.post({"event": WorkerEvent.STARTED.value, "request_id": job.request_id})
            self.processed += 1
            result, clears = self._embed(embedder, job, clear_after=self.processed % self.spec.cache_clear_every == 0)
            if result["reply"] == Reply.DONE and lock >= 0:
                os.ftruncate(lock, 0)
                os.pwrite(lock, json.dumps(result).encode(), 0)
        finally:
            if lock >= 0:
                os.close(lock)  # releases the claim
        self.post({**event, "computed": True, "cache_clears": clears, "reply": {**reply, **result}})

    def _claim(self, job: Job) -> tuple[int | None, dict | None]:
        """Lock the request across daemons: the locked descriptor (-1: go on unlocked), or None and the
        reply to give (done before, by any daemon; or ``busy``: another daemon is on it)."""
        path = self.rundir.request_record(job.request_id)
        try:
            private_dir(path.parent)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            log.warning("daemon %s: cannot lock %s (%s); embedding the shard unlocked", self.daemon_id, path, error)
            return -1, None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            if job.attempt > 1:  # its client lost a daemon on it, which may hold the lock, frozen
                log.warning("daemon %s: shard %s is locked by another daemon, but its client lost a daemon on it: "
                            "embedding it all the same", self.daemon_id, job.label)  # fmt: skip
                return -1, None
            return None, {"reply": Reply.BUSY.value, "retry_after": 1.0,
                          "message": "another daemon is embedding this shard"}  # fmt: skip
        record = done_record(path, job.output)
        if record is not None:
            os.close(descriptor)
            return None, {**record, "cached": True}
        return descriptor, None

    def _embed(self, embedder, job: Job, clear_after: bool) -> tuple[dict, int]:
        """Embed one shard (retrying once after a CUDA out-of-memory error); the reply and the cache clears."""
        import torch

        from virnucpro.engines.embed import embed_records

        clears, started = 0, time.monotonic()
        shard_key = {"sample": job.sample, "stage": f"embed_{self.model}", "shard": job.shard}
        for attempt in (1, 2):
            names: dict[str, str] = {}  # descriptor paths -> the files' names, for messages
            try:
                with (
                    self.confinement.output_folder(job.output) as folder,
                    self.confinement.open_input(job.input) as source,
                ):
                    target = folder / os.path.basename(job.output)
                    replace = job.replace  # decided when asked: an output that appears meanwhile is kept
                    names.update({str(source): job.input, str(folder): os.path.dirname(job.output)})
                    # the folder moved out of its root meanwhile: fail, write nothing there
                    in_place = functools.partial(self.confinement.check_in_place, folder)
                    summary = embed_records(embedder, source, target, replace=replace, before_commit=in_place)
            except FileExistsError:
                log.info("daemon %s: shard %s was written by another daemon meanwhile; keeping that file",
                         self.daemon_id, job.label)  # fmt: skip
                return {"reply": Reply.DONE.value, "sequences": 0, "tokens": 0, "failed_sequences": 0,
                        "seconds": 0.0, "cached": True}, clears  # fmt: skip
            except Exception as error:
                if attempt == 1 and isinstance(error, torch.cuda.OutOfMemoryError):
                    log.warning("daemon %s: out of GPU memory on %s; clearing the cache and retrying", self.daemon_id,
                                job.input)  # fmt: skip
                    clears += self._clear_cache()
                    continue
                cause = environmental(error)
                message = _named(str(cause or error).strip() or repr(error), names)
                if cause is not None:  # the machine, not the shard: no manifest entry; the client fails the job
                    log.error("daemon %s: shard %s: %s", self.daemon_id, job.label, message)
                    return {"reply": Reply.FAILED.value, "error_class": type(cause).__name__, "message": message,
                            "attempts": 1, "environmental": True}, clears  # fmt: skip
                if not isinstance(error, UserError):
                    log.exception("daemon %s: embedding %s failed", self.daemon_id, job.input)
                attempts = job.attempt - 1 + attempt
                self._record(shard_key, shard_error=(type(error).__name__, message, attempts))
                if clear_after:
                    clears += self._clear_cache()
                return {"reply": Reply.FAILED.value, "error_class": type(error).__name__, "message": message,
                        "attempts": attempts}, clears  # fmt: skip
            else:
                break
        seconds = time.monotonic() - started
        clears += summary.out_of_memory  # the engine cleared the cache after each out-of-memory error
        self._record(shard_key, sequence_failures=summary.failed)
        if clear_after:
            clears += self._clear_cache()
        return {"reply": Reply.DONE.value, "sequences": summary.sequences, "tokens": summary.tokens,
                "failed_sequences": len(summary.failed), "seconds": round(seconds, 6)}, clears  # fmt: skip

    def _record(self, shard_key: dict, **outcome) -> None:
        try:
            record_embed_failures(self.rundir.failures, **shard_key, daemon=self.daemon_id, **outcome)
        except OSError as error:
            log.error("daemon %s: could not write %s: %s", self.daemon_id, self.rundir.failures, error)

    def _clear_cache(self) -> int:
        """Give cached GPU memory back (a no-op on the CPU, counted all the same); returns 1."""
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return 1


def _named(message: str, names: dict[str, str]) -> str:
    """A message with the descriptor paths that files were used through replaced by the files' names."""
    for descriptor, name in sorted(names.items(), key=lambda item: -len(item[0])):
        message = message.replace(descriptor, name)
    return message


def done_record(path: Path, output: str) -> dict | None:
    """The ``done`` reply recorded for a request, if there is one and its output file still exists."""
    try:
        record = json.loads(path.read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("reply") == Reply.DONE and os.path.exists(output):
        return record
    return None


def prune_request_records(run: RunDir) -> int:
    """Remove the request records (``RUN/requests/*.json``) that no daemon holds locked (one that computes
    a shard holds its record's lock until it is done); the number removed. Called when a run starts, so
    that the folder does not grow by one file per shard and model forever; a shard asked for again
    afterwards is computed again, or found done by its output file."""
    try:
        paths = sorted(run.requests.glob("*.json"))
    except OSError:
        return 0
    removed = 0
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone already, or not a plain record
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)  # a daemon is on this shard
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        finally:
            os.close(descriptor)
    return removed
