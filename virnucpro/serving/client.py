"""The light client of the model daemons: find a ready daemon in the registry, send it a shard, wait.

``DaemonPool`` hides the sockets: it picks the least-loaded ready daemon of a model and runs one
exchange with it, telling a long shard (``accepted``, ``progress``) from a lost daemon. The loop of
``request_embedding`` only decides what to do with each outcome: retry with backoff when daemons are
busy, fail over when one is lost, give up early when the run ends, never wait past the timeout.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import zmq

from virnucpro.engines.embed import canonical_model_name
from virnucpro.errors import EnvironmentalError, UserError
from virnucpro.manifest import record_embed_failures
from virnucpro.serving import registry, timing
from virnucpro.serving.protocol import SIGNS_OF_LIFE, EmbedRequest, Op, Reply, State, decode_reply, encode, kind_of
from virnucpro.serving.rundir import RunDir, StopTokens
from virnucpro.serving.stats import LOSS_EVENTS
from virnucpro.serving.transport import ask_all, connect

log = logging.getLogger(__name__)

MAX_LOST = 2  # daemons lost while holding one shard before the shard counts as failed for good
ON_FAILURE = ("fail", "record")


class RunEnding(UserError):
    """A stop token of the model's daemons changed (the run is ending): no shard will be served."""


class DaemonPool:
    """The daemons of one model registered in a run folder, as seen by one client."""

    def __init__(self, context: zmq.Context, run: RunDir, model: str, stops: StopTokens, *,
                 precision: str | None = None, fingerprint: str | None = None, session: str | None = None,
                 restart_wait: float | None = timing.RESTART_WAIT):  # fmt: skip
        self.context, self.run, self.model, self.stops = context, run, model, stops
        self.session, self.restart_wait = session, restart_wait
        self.precision, self.fingerprint = precision, fingerprint
        self.avoid: set[tuple] = set()  # daemon instances not to ask again
        self.unreachable: dict[str, str] = {}  # daemon ID -> why it could not be reached

    def check_run(self) -> None:
        """RunEnding once a stop token of the model's daemons differs from its baseline."""
        changed = self.stops.changed()
        if changed is None:
            return
        if changed == self.run.stop_file or len(self.stops.files) == 1:
            raise RunEnding(
                f"the run is ending (its stop file {changed} changed): not waiting for a {self.model} daemon"
            )
        raise RunEnding(f"the {self.model} daemons are stopping (the stop file {changed} changed): not waiting for one")

    def pick(self, until: float, started: float) -> dict | None:
        """The least-loaded ready daemon of the model, waiting for one until ``until`` (then None)."""
        last_progress = time.monotonic()
        none_since: float | None = None  # since when the model has had no daemon, after one was lost
        while True:
            self.check_run()
            entries = registry.list_entries(self.run, self.model)
            if entries and all(entry.get("state") == State.FAILED for entry in entries):
                raise UserError(f"every {self.model} daemon of {self.run.root} failed{self.failure_reasons()}")
            if any(entry.get("state") != State.FAILED for entry in entries) or not self.losses():
                none_since = None
            elif self.restart_wait is not None:  # inside a workflow run its watch ends the run if none can come
                none_since = none_since or time.monotonic()
                if time.monotonic() - none_since >= self.restart_wait:
                    lost = self.losses()[-1]
                    raise UserError(f"no {self.model} daemon can be had: {lost.get('daemon')} on "
                                    f"{lost.get('host')} was lost ({lost.get('detail')}) and none came back "
                                    f"within {self.restart_wait:.0f} s; see logs/daemons/ (a re-run resumes)")  # fmt: skip
            entries = [entry for entry in entries if self._suits(entry)]
            statuses = ask_all(self.context, self.run, entries, {"op": Op.STATUS.value}, timing.STATUS_ANSWER)
            loads = {
                daemon: _number(status.get("queued"), 0) + _number(status.get("running"), 0)
                for daemon, status in statuses.items()
                if kind_of(status) is Reply.STATUS and status.get("state") == State.READY
            }  # fmt: skip
            if loads:
                lowest = min(loads.values())
                return random.choice([entry for entry in entries if loads.get(entry["daemon_id"]) == lowest])
            self.unreachable.update((daemon, status["message"]) for daemon, status in statuses.items()
                                    if kind_of(status) is Reply.UNREACHABLE)  # fmt: skip
            now = time.monotonic()
            if now >= until:
                return None
            if now - last_progress >= timing.CLIENT_LOG_EVERY:
                log.info("still waiting for a ready %s daemon in %s (%.0f s so far)", self.model, self.run.registry,
                         now - started)  # fmt: skip
                last_progress = now
            time.sleep(min(timing.REGISTRY_POLL, max(0.0, until - now)))

    def losses(self) -> list[dict]:
        """The losses of daemons of the model in this workflow run (none outside a workflow)."""
        if self.session is None:
            return []
        return [event for event in self.run.read_events() if event.get("session") == self.session
                and event.get("model") == self.model and event.get("event") in LOSS_EVENTS]  # fmt: skip

    def _suits(self, entry: dict) -> bool:
        return (
            entry.get("state") == State.READY and instance(entry) not in self.avoid
            and self.precision in (None, entry.get("precision")) and self.fingerprint in (None, entry.get("fingerprint"))
        )  # fmt: skip

    def exchange(self, entry: dict, request: EmbedRequest, deadline: float) -> dict:
        """Send the request to one daemon and wait for its final answer, taking ``accepted`` and ``progress``
        as signs of life; ``lost`` (it died or went silent after accepting), ``unreachable`` or ``timeout``
        otherwise."""
        try:
            sock = connect(self.context, self.run, entry)
        except (zmq.ZMQError, UserError) as error:
            return {"reply": Reply.UNREACHABLE.value, "message": str(error)}
        accepted = False
        try:
            sock.send(encode(request.to_message()))
            sent = heard = last_progress = time.monotonic()
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return {"reply": Reply.TIMEOUT.value}
                if sock.poll(int(min(timing.SILENCE_CHECK_EVERY, deadline - now) * 1000) + 1):
                    reply = decode_reply(sock.recv())
                    heard = time.monotonic()
                    if kind_of(reply) not in SIGNS_OF_LIFE:
                        return reply
                    accepted = True
                    if heard - last_progress >= timing.CLIENT_LOG_EVERY:
                        log.info("daemon %s: %s is %s (%.0f s)", entry["daemon_id"], request.input,
                                 reply.get("state", "accepted"), heard - sent)  # fmt: skip
                        last_progress = heard
                    continue
                if not registry.is_alive(entry) or now - heard > timing.LOST_AFTER:
                    return {
                        "reply": (Reply.LOST if accepted else Reply.UNREACHABLE).value,
                        "message": "no sign of life",
                    }
        except zmq.ZMQError as error:
            return {"reply": (Reply.LOST if accepted else Reply.UNREACHABLE).value, "message": str(error)}
        finally:
            sock.close(linger=0)

    def failure_reasons(self) -> str:
        failed = [entry for entry in registry.list_entries(self.run, self.model) if entry.get("state") == State.FAILED]
        return "".join(f"; daemon {entry['daemon_id']} failed: {entry.get('reason')}" for entry in failed)


def request_embedding(
    run_dir: Path,
    model: str,
    input_path: Path,
    output_path: Path,
    *,
    sample: str = "",
    shard: str = "",
    timeout: float | None = None,
    on_failure: str | None = None,
    stop_file: Path | None = None,
    restart_wait: float = timing.RESTART_WAIT,
    precision: str | None = None,
    fingerprint: str | None = None,
) -> bool:
    """Have a daemon of ``model`` registered under ``run_dir`` embed ``input_path`` into ``output_path``.

    Returns True once embedded. ``timeout`` and ``on_failure`` default to the running workflow's settings
    (``RUN/settings.json``), else 3600 s and ``fail``. Only daemons of ``precision`` and model
    ``fingerprint`` (when given) are asked. A shard that fails for good (the daemon could not embed it, or
    it was lost with ``MAX_LOST`` daemons) is in the run's failure manifest; with ``on_failure="record"``
    it gets an embedding file with no rows and False is returned, otherwise UserError. So is every other
    reason to give up: no daemon, the timeout, the model's daemons stopping (a stop token changed since the
    run started, or since this call when outside a workflow). Inside a workflow run a client waits for a
    lost daemon's replacement until its timeout (the run's watch ends the run when none can come);
    outside one, ``restart_wait`` seconds.
    """
    run = RunDir(run_dir)
    settings = run.read_settings()
    timeout = float(timeout if timeout is not None else settings.get("client_timeout", timing.CLIENT_TIMEOUT))
    on_failure = on_failure or settings.get("on_failure", "fail")
    if on_failure not in ON_FAILURE:
        raise UserError(f"unknown failure policy '{on_failure}': choose one of {', '.join(ON_FAILURE)}")
    model = canonical_model_name(model)
    stops = StopTokens((Path(stop_file),)) if stop_file else run.stop_tokens(model, settings.get("stop_baselines"))
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)  # the daemon writes into existing folders only
    request = EmbedRequest(input=os.path.abspath(input_path), output=os.path.abspath(output_path), sample=sample,
                           shard=shard, fingerprint=fingerprint)  # fmt: skip
    shard_key = {"sample": sample, "stage": f"embed_{model}", "shard": shard}
    started = time.monotonic()
    deadline = give_up_at = started + timeout
    lost: list[str] = []
    lost_at = started
    busy = 0

    def failed_for_good(message: str) -> bool:
        if on_failure == "fail":
            raise UserError(f"{message} (recorded in {run.failures})")
        from virnucpro.engines.embed import write_empty_embeddings

        write_empty_embeddings(Path(output_path))
        log.warning("%s; recorded in %s; wrote %s with no rows (failure policy: record)", message, run.failures,
                    output_path)  # fmt: skip
        return False

    context = zmq.Context()
    try:
        in_workflow = settings.get("session") is not None
        pool = DaemonPool(context, run, model, stops, precision=precision, fingerprint=fingerprint,
                          session=settings.get("session"), restart_wait=None if in_workflow else restart_wait)  # fmt: skip
        while True:
            entry = pool.pick(give_up_at, started)
            if entry is None and lost:
                message = (f"{input_path}: daemon(s) {', '.join(lost)} died while embedding it and no other {model} "
                           f"daemon was ready within {give_up_at - lost_at:.0f} s")  # fmt: skip
                record_embed_failures(run.failures, **shard_key, daemon=lost[-1],
                                      shard_error=("DaemonLost", message, len(lost)))  # fmt: skip
                raise UserError(f"{message}; see the daemon logs in logs/daemons/ and restart the serve jobs")
            if entry is None:
                raise UserError(f"no ready {model} daemon answered within {time.monotonic() - started:.0f} s "
                                f"(registry: {run.registry}): are the serve jobs running? See the daemon logs in "
                                f"logs/daemons/{pool.failure_reasons()}"
                                + "".join(f"; cannot reach {d}: {why}" for d, why in pool.unreachable.items()))  # fmt: skip
            give_up_at, daemon = deadline, entry["daemon_id"]
            request = EmbedRequest(**{**request.__dict__, "timeout": round(max(0.0, deadline - time.monotonic()), 3),
                                      "attempt": len(lost) + 1})  # fmt: skip
            reply = pool.exchange(entry, request, deadline)
            kind = kind_of(reply)
            if kind is Reply.DONE:
                log.info("%s: embedded by daemon %s (%s sequences, %s tokens, %.2f s%s)", input_path, daemon,
                         reply.get("sequences"), reply.get("tokens"), reply.get("seconds") or 0.0,
                         ", done before" if reply.get("cached") else "")  # fmt: skip
                return True
            if kind is Reply.FAILED and reply.get("environmental"):  # not the shard: never recorded as bad
                raise EnvironmentalError(f"daemon {daemon} could not embed {input_path}: {reply.get('message')}")
            if kind is Reply.FAILED:
                return failed_for_good(f"{input_path}: daemon {daemon} could not embed it with {model}: "
                                       f"{reply.get('error_class')}: {reply.get('message')}")  # fmt: skip
            if kind is Reply.BUSY:
                busy += 1
                pause = min(timing.BACKOFF_CAP, _number(reply.get("retry_after"), 1.0) * 1.5 ** min(busy - 1, 12))
                log.debug("daemon %s is busy (%s); retrying in about %.1f s", daemon, reply.get("message"), pause)
                time.sleep(max(0.0, min(pause * random.uniform(0.5, 1.0), deadline - time.monotonic())))
            elif kind is Reply.STOPPING:
                log.info("daemon %s is stopping; looking for another %s daemon", daemon, model)
                pool.avoid.add(instance(entry))
            elif kind is Reply.UNREACHABLE:  # it did not accept the shard: pick again (a dead one leaves the registry)
                log.info("daemon %s did not take the shard (%s); looking again", daemon, reply.get("message"))
            elif kind is Reply.LOST:
                pool.avoid.add(instance(entry))
                lost.append(daemon)
                if len(lost) >= MAX_LOST:
                    message = (f"{input_path}: {len(lost)} {model} daemons died while embedding it "
                               f"({', '.join(lost)}); the shard itself may be what kills them")  # fmt: skip
                    record_embed_failures(run.failures, **shard_key, daemon=daemon,
                                          shard_error=("DaemonLost", message, len(lost)))  # fmt: skip
                    return failed_for_good(message)
                log.warning("daemon %s was lost while embedding %s; failing over", daemon, input_path)
                lost_at = time.monotonic()
                give_up_at = deadline if in_workflow else min(deadline, lost_at + restart_wait)
            elif kind in (Reply.EXPIRED, Reply.TIMEOUT):
                raise UserError(f"{input_path}: not embedded within the client's timeout of {timeout:.0f} s "
                                f"(last daemon: {daemon}); see the daemon logs in logs/daemons/, "
                                "or raise the timeout")  # fmt: skip
            else:
                raise UserError(f"{input_path}: daemon {daemon} refused the request: {reply.get('message', reply)}")
    finally:
        context.destroy(linger=0)


def embed_for_run(run_dir: Path, model: str, input_path: Path, output_path: Path, **options) -> bool:
    """An embedding job of a workflow run: through a daemon (``request_embedding``, with ``options``), or in
    this process when the run's settings say that no daemon of the model is part of its plan (a target
    that does not pull them in; ``runwatch.RunWatch``), taking turns on a GPU with the run's other jobs."""
    run = RunDir(run_dir)
    settings = run.read_settings()
    fallback = settings.get("in_process", {}).get(canonical_model_name(model))
    if not fallback:
        return request_embedding(run_dir, model, input_path, output_path, **options)
    import fcntl

    from virnucpro.engines.embed import embed_shard
    from virnucpro.serving.spec import DaemonSpec

    spec = DaemonSpec.from_dict(fallback)
    log.warning("no %s daemon is part of this run's plan: embedding %s in this job (loads the model)", spec.model,
                input_path)  # fmt: skip
    lock_path = run.device_lock(spec.device)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        if spec.device != "cpu":
            fcntl.flock(lock, fcntl.LOCK_EX)  # one job at a time on a GPU, as a daemon would be
        summary = embed_shard(input_path, spec.model, spec.weights, output_path, device=spec.device,
                              precision=spec.precision, manifest=run.failures, sample=options.get("sample", ""),
                              shard=options.get("shard", ""), on_failure=settings.get("on_failure", "fail"))  # fmt: skip
    return summary is not None


def stop_daemons(run_dir: Path, model: str | None = None, stop_file: Path | None = None) -> int:
    """Tell the daemons of ``run_dir`` (of one ``model``, if given) to stop: a fresh stop token (in ``stop_file``,
    else the run's, or the model's: every daemon watching it stops within ``timing.STOP_CHECK_EVERY``,
    registered or not yet, whatever happens to messages), then a ``stop`` message to each live registered
    daemon. Returns how many acknowledged within ``timing.STOP_ANSWER``; it never hangs."""
    run = RunDir(run_dir)
    model = canonical_model_name(model) if model else None
    if stop_file is not None:
        run.write_stop_token(Path(stop_file))
    else:
        run.write_stop_token(run.model_stop_file(model) if model else None)
    entries = [entry for entry in registry.list_entries(run, model) if entry.get("state") != State.FAILED]
    context = zmq.Context()
    try:
        replies = ask_all(context, run, entries, {"op": Op.STOP.value}, timing.STOP_ANSWER)
    finally:
        context.destroy(linger=0)
    for entry in entries:
        acknowledged = kind_of(replies.get(entry["daemon_id"], {})) is Reply.STOPPING
        log.log(logging.INFO if acknowledged else logging.WARNING, "daemon %s (%s, pid %s) %s", entry["daemon_id"],
                entry.get("model"), entry.get("pid"), "is stopping" if acknowledged else "did not answer")  # fmt: skip
    return sum(kind_of(reply) is Reply.STOPPING for reply in replies.values())


def instance(entry: dict) -> tuple:
    """One run of a daemon (a restarted daemon keeps its ID but is another instance)."""
    return entry.get("daemon_id"), entry.get("host"), entry.get("pid"), entry.get("started")


def _number(value: object, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
