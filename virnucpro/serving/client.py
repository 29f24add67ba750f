"""The light client of the model daemons: find a ready daemon in the registry, send it a shard, wait.

See docs/daemons.md for the protocol. The client retries with backoff when daemons are busy, fails
over to another daemon (or a restarted one) if its daemon dies or goes silent, gives up early when
the run ends, and never waits longer than its timeout.
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

from virnucpro.serving import registry
from virnucpro.engines.embed import canonical_model_name
from virnucpro.errors import UserError
from virnucpro.manifest import append_failure

log = logging.getLogger(__name__)

CHECK_EVERY = 2.0  # seconds of silence between checks that the daemon's process still exists (on this host)
LOST_AFTER = 20.0  # seconds without any message (daemons send progress every 2 s) after which a daemon is lost
MAX_LOST = 2  # daemons lost while holding one shard before the shard counts as failed for good
RESTART_WAIT = 60.0  # after losing its daemon with no other alive: how long to wait for one to (re)start
BACKOFF_CAP = 30.0
PROGRESS_EVERY = 30.0
STATUS_TIMEOUT = 2.0
STOP_TIMEOUT = 5.0
REGISTRY_POLL = 0.5
SEND_TIMEOUT_MS = 2000
ON_FAILURE = ("fail", "record")


def request_embedding(
    run_dir: Path,
    model: str,
    input_path: Path,
    output_path: Path,
    *,
    sample: str = "",
    shard: str = "",
    timeout: float = 3600.0,
    on_failure: str = "fail",
    stop_file: Path | None = None,
    restart_wait: float = RESTART_WAIT,
) -> bool:
    """Have a daemon of ``model`` registered under ``run_dir`` embed ``input_path`` into ``output_path``.

    Returns True once embedded. A shard that fails for good (the daemon could not embed it, or it was
    lost with ``MAX_LOST`` daemons) is in the run's failure manifest; with ``on_failure="record"`` it gets
    an embedding file with no rows and False is returned, otherwise UserError. So is every other reason
    to give up: no daemon, the timeout, the ``stop_file`` changing (the run is ending).
    """
    if on_failure not in ON_FAILURE:
        raise UserError(f"unknown failure policy '{on_failure}': choose one of {', '.join(ON_FAILURE)}")
    model, run_dir = canonical_model_name(model), Path(run_dir)
    manifest = run_dir / "failures.tsv"
    request = {
        "op": "embed", "input": os.path.abspath(input_path), "output": os.path.abspath(output_path),
        "sample": sample, "shard": shard,
    }  # fmt: skip
    started = time.monotonic()
    deadline = give_up_at = started + timeout
    stop_token = registry.read_token(stop_file)
    avoid: set[tuple] = set()  # daemon instances not to ask again
    lost: list[str] = []
    busy = 0
    notes: dict[str, str] = {}  # daemon ID -> why it could not be reached

    def failed_for_good(message: str) -> bool:
        if on_failure == "fail":
            raise UserError(f"{message} (recorded in {manifest})")
        from virnucpro.engines.embed import write_empty_embeddings

        write_empty_embeddings(Path(output_path))
        log.warning("%s; recorded in %s; wrote %s with no rows (failure policy: record)", message, manifest,
                    output_path)  # fmt: skip
        return False

    context = zmq.Context()
    try:
        while True:
            entry = _wait_for_daemon(context, run_dir, model, avoid, started, give_up_at, stop_file, stop_token,
                                     notes)  # fmt: skip
            if entry is None and lost:
                message = (f"{input_path}: daemon(s) {', '.join(lost)} died while embedding it and no other {model} "
                           f"daemon was ready within {restart_wait:.0f} s")  # fmt: skip
                append_failure(manifest, sample=sample, stage=f"embed_{model}", shard=shard, error_class="DaemonLost",
                               message=message, attempts=len(lost), daemon=lost[-1])  # fmt: skip
                raise UserError(f"{message}; see the daemon logs in logs/daemons/ and restart the serve jobs")
            if entry is None:
                raise UserError(f"no ready {model} daemon answered within {time.monotonic() - started:.0f} s "
                                f"(registry: {run_dir / 'registry'}): are the serve jobs running? See the daemon "
                                f"logs in logs/daemons/{_failure_reasons(run_dir, model)}"
                                + "".join(f"; cannot reach {d}: {why}" for d, why in notes.items()))  # fmt: skip
            give_up_at, daemon = deadline, entry["daemon_id"]
            request.update(timeout=round(max(0.0, deadline - time.monotonic()), 3), attempt=len(lost) + 1)
            reply = _exchange(context, run_dir, entry, request, deadline)
            kind = reply.get("reply")
            if kind == "done":
                log.info("%s: embedded by daemon %s (%s sequences, %s tokens, %.2f s%s)", input_path, daemon,
                         reply.get("sequences"), reply.get("tokens"), reply.get("seconds") or 0.0,
                         ", done before" if reply.get("cached") else "")  # fmt: skip
                return True
            if kind == "failed":
                return failed_for_good(f"{input_path}: daemon {daemon} could not embed it with {model}: "
                                       f"{reply.get('error_class')}: {reply.get('message')}")  # fmt: skip
            if kind == "busy":
                busy += 1
                pause = min(BACKOFF_CAP, _number(reply.get("retry_after"), 1.0) * 1.5 ** min(busy - 1, 12))
                log.debug("daemon %s is busy (%s); retrying in about %.1f s", daemon, reply.get("message"), pause)
                time.sleep(max(0.0, min(pause * random.uniform(0.5, 1.0), deadline - time.monotonic())))
            elif kind == "stopping":
                log.info("daemon %s is stopping; looking for another %s daemon", daemon, model)
                avoid.add(_instance(entry))
            elif kind == "unreachable":  # it did not accept the shard: pick again (a dead daemon leaves the registry)
                log.info("daemon %s did not take the shard (%s); looking again", daemon, reply.get("message"))
            elif kind == "lost":
                avoid.add(_instance(entry))
                lost.append(daemon)
                if len(lost) >= MAX_LOST:
                    message = (f"{input_path}: {len(lost)} {model} daemons died while embedding it "
                               f"({', '.join(lost)}); the shard itself may be what kills them")  # fmt: skip
                    append_failure(manifest, sample=sample, stage=f"embed_{model}", shard=shard,
                                   error_class="DaemonLost", message=message, attempts=len(lost),
                                   daemon=daemon)  # fmt: skip
                    return failed_for_good(message)
                log.warning("daemon %s was lost while embedding %s; failing over", daemon, input_path)
                give_up_at = min(deadline, time.monotonic() + restart_wait)
            elif kind in ("expired", "timeout"):
                raise UserError(f"{input_path}: not embedded within the client's timeout of {timeout:.0f} s "
                                f"(last daemon: {daemon}); see the daemon logs in logs/daemons/, "
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
        replies = _ask_all(context, Path(run_dir), entries, {"op": "stop"}, STOP_TIMEOUT)
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


def _wait_for_daemon(context: zmq.Context, run_dir: Path, model: str, avoid: set[tuple], started: float,
                     until: float, stop_file: Path | None, stop_token: bytes | None,
                     notes: dict[str, str]) -> dict | None:  # fmt: skip
    """The least-loaded ready daemon of ``model``, waiting for one until ``until`` (then None; ``notes`` gets
    why daemons could not be reached). Gives up at once (UserError) when the stop file changes or every
    registered daemon of the model has failed."""
    last_progress = time.monotonic()
    while True:
        if stop_file is not None and registry.read_token(stop_file) != stop_token:
            raise UserError(f"the run is ending (its stop file {stop_file} changed): not waiting for a {model} daemon")
        entries = registry.list_entries(run_dir, model)
        if entries and all(entry.get("state") == "failed" for entry in entries):
            raise UserError(f"every {model} daemon of {run_dir} failed{_failure_reasons(run_dir, model)}")
        entries = [entry for entry in entries if entry.get("state") == "ready" and _instance(entry) not in avoid]
        statuses = _ask_all(context, run_dir, entries, {"op": "status"}, STATUS_TIMEOUT)
        loads = {
            daemon: _number(status.get("queued"), 0) + _number(status.get("running"), 0)
            for daemon, status in statuses.items()
            if status.get("reply") == "status" and status.get("state") == "ready"
        }  # fmt: skip
        if loads:
            lowest = min(loads.values())
            return random.choice([entry for entry in entries if loads.get(entry["daemon_id"]) == lowest])
        notes.update((daemon, status["message"]) for daemon, status in statuses.items()
                     if status.get("reply") == "unreachable")  # fmt: skip
        now = time.monotonic()
        if now >= until:
            return None
        if now - last_progress >= PROGRESS_EVERY:
            log.info("still waiting for a ready %s daemon in %s (%.0f s so far)", model, run_dir / "registry",
                     now - started)  # fmt: skip
            last_progress = now
        time.sleep(min(REGISTRY_POLL, max(0.0, until - now)))


def _failure_reasons(run_dir: Path, model: str) -> str:
    failed = [entry for entry in registry.list_entries(run_dir, model) if entry.get("state") == "failed"]
    return "".join(f"; daemon {entry['daemon_id']} failed: {entry.get('reason')}" for entry in failed)


def _ask_all(context: zmq.Context, run_dir: Path, entries: list[dict], message: dict,
             timeout: float) -> dict[str, dict]:  # fmt: skip
    """Send one message to several daemons at once; their first replies within ``timeout``, by daemon ID
    (``unreachable`` for a daemon that cannot be connected to)."""
    sockets: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    replies: dict[str, dict] = {}
    try:
        for entry in entries:
            try:
                sock = _connect(context, run_dir, entry)
            except (zmq.ZMQError, UserError) as error:
                replies[entry["daemon_id"]] = {"reply": "unreachable", "message": str(error)}
                continue
            sockets[sock] = entry["daemon_id"]
            try:
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


def _exchange(context: zmq.Context, run_dir: Path, entry: dict, request: dict, deadline: float) -> dict:
    """Send the request to one daemon and wait for its final answer, taking ``accepted`` and ``progress`` as
    signs of life; ``lost`` (it died or went silent after accepting), ``unreachable`` or ``timeout`` otherwise."""
    try:
        sock = _connect(context, run_dir, entry)
    except (zmq.ZMQError, UserError) as error:
        return {"reply": "unreachable", "message": str(error)}
    accepted = False
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
                if reply.get("reply") not in ("accepted", "progress"):
                    return reply
                accepted = True
                if heard - last_progress >= PROGRESS_EVERY:
                    log.info("daemon %s: %s is %s (%.0f s)", entry["daemon_id"], request["input"],
                             reply.get("state", "accepted"), heard - sent)  # fmt: skip
                    last_progress = heard
                continue
            if not registry.is_alive(entry) or now - heard > LOST_AFTER:
                return {"reply": "lost" if accepted else "unreachable", "message": "no sign of life"}
    except zmq.ZMQError as error:
        return {"reply": "lost" if accepted else "unreachable", "message": str(error)}
    finally:
        sock.close(linger=0)


def _connect(context: zmq.Context, run_dir: Path, entry: dict) -> zmq.Socket:
    """A DEALER socket connected to the daemon's endpoint, with the run's CURVE keys for ``tcp://``."""
    endpoint = str(entry.get("endpoint"))
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    try:
        if endpoint.startswith("tcp://"):
            server_key = entry.get("server_key")
            if not isinstance(server_key, str) or len(server_key) != 40:
                raise UserError(f"the registry entry of {entry.get('daemon_id')} has no server key for {endpoint}")
            public, secret = registry.curve_keys(run_dir, "client")
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key.encode(), public, secret
        elif not endpoint.startswith("ipc://"):
            raise UserError(f"unknown endpoint '{endpoint}' in the registry entry of {entry.get('daemon_id')}")
        sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _instance(entry: dict) -> tuple:
    """One run of a daemon (a restarted daemon keeps its ID but is another instance)."""
    return entry.get("daemon_id"), entry.get("host"), entry.get("pid"), entry.get("started")


def _number(value: object, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _decode(data: bytes) -> dict:
    """A daemon's reply as a dict; anything unreadable becomes an ``error`` reply."""
    try:
        reply = json.loads(data)
    except ValueError:
        return {"reply": "error", "message": "unreadable reply from the daemon"}
    return reply if isinstance(reply, dict) else {"reply": "error", "message": "unreadable reply from the daemon"}
