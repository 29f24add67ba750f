"""The daemons' lifecycle inside a workflow run (docs/daemons.md, "Lifecycle in a run").

Two sides, both written down there as rules and tested on real snakemake runs:

- ``RunWatch``, in the workflow's main snakemake process: at start it stops whatever an earlier run
  left, records this run's settings and stop-token baseline, then beats the run's heartbeat, watches
  snakemake's job events, and tells the daemons to stop (a fresh stop token) once the run has nothing
  left for them: nothing but serve jobs running for ``idle_timeout`` seconds; a few seconds after a
  job failed, when no job started since (without ``--keep-going`` snakemake starts none but retries),
  or nothing but serve jobs ran for those seconds (with it); at once on SIGINT, SIGTERM or SIGHUP.
- ``serve_job``, the command of a serve job (``virnucpro serve-job``): runs the daemon as its child
  and ends it when the run is gone (heartbeat), when it outlives a stop, or when it freezes (SIGKILL,
  which a stopped process cannot ignore); then says what became of it in its exit status: 0 with
  statistics when it stopped, or when it was lost but other daemons of its model take its work over;
  1 when it was the model's last daemon (so that snakemake's ``retries:`` start a replacement); 2 when
  it could not start (a bad model: retrying would not help).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from virnucpro import atomic
from virnucpro.errors import UserError
from virnucpro.serving import registry, transport
from virnucpro.serving.protocol import State
from virnucpro.serving.rundir import SESSION_VARIABLE, RunDir, read_token
from virnucpro.serving.stats import read_stats, write_stats
from virnucpro.serving.worker import prune_request_records

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 2.0  # seconds between two heartbeats of the run
CHECK_EVERY = 0.5  # seconds between two checks of a serve job
AFTER_ERROR = 5.0  # seconds after a failed job (no other job started since) before the daemons stop
LEFTOVER_WAIT = 120.0  # seconds to wait at start for the daemons of an earlier run to exit
KILL_GRACE = 10.0  # seconds past its drain grace that a daemon may take to exit before it is killed
_DAEMON_OUTPUT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\.stats\.json")  # a serve job's output names its daemon
DRAIN_GRACE = 25.0  # seconds a stopping daemon may take to finish its shard (serve --drain-grace)
EXIT_LOST_LAST = 1
EXIT_CANNOT_START = 2


def new_session() -> str:
    """A fresh ID for a workflow run (its jobs inherit it as ``$VIRNUCPRO_SESSION``)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


# --- the main snakemake process --------------------------------------------------------------------


class RunWatch:
    """The workflow run's side of the daemons' lifecycle; ``start`` it in snakemake's ``onstart``."""

    def __init__(self, run: RunDir, session: str, *, idle_timeout: float, keep_going: bool, settings: dict,
                 daemon_rules: tuple[str, ...] = ("serve_model",), daemon_restarts: int | None = None,
                 losses=None):  # fmt: skip
        self.run, self.session = run, session
        self.losses = losses  # virnucpro.cluster.losses.JobLosses: tells a job lost with its node from its own error
        self.idle_timeout, self.keep_going = idle_timeout, keep_going
        self.settings, self.daemon_rules = settings, daemon_rules
        self.daemon_restarts = daemon_restarts  # the serve rule's retries: a serve job failed once more is failed
        self.serve_failures: dict[str, int] = {}  # daemon ID -> how often its serve job failed
        self.running: set[int] = set()  # IDs of the jobs running now, serve jobs left out
        self.failed_at: float | None = None  # when the last job (not a serve job, unless restarted no more) failed
        self.failure = "a job failed"
        self.started_at = 0.0  # when the last job (not a serve job) started
        self.quiet_since: float | None = None
        self.stopped = False
        self.lock = threading.Lock()

    def start(self, logger: logging.Logger) -> None:
        """Stop the daemons an earlier run left, publish this run's settings and stop-token baseline, then
        watch: the heartbeat thread, snakemake's job events (through ``logger``) and the signals."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        from virnucpro.serving.client import stop_daemons

        stop_daemons(self.run.root)  # a fresh token: every daemon of an earlier run stops
        wait_for_leftover_daemons(self.run)
        log.debug("pruned %d request record(s) of earlier runs", prune_request_records(self.run))
        baseline = (read_token(self.run.stop_file) or b"").decode()
        self.run.write_settings({**self.settings, "session": self.session, "stop_baseline": baseline})
        logger.addHandler(_JobEvents(self))
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, self._on_signal(signal.getsignal(number)))
        threading.Thread(target=self._beat, name="virnucpro-run-watch", daemon=True).start()

    def job_started(self, jobid: int, rule: str) -> None:
        if rule not in self.daemon_rules:
            with self.lock:
                self.running.add(jobid)
                self.started_at = time.monotonic()

    def job_ended(self, jobid: int, rule: str | None, failed: bool, why: str | None = None) -> None:
        with self.lock:
            self.running.discard(jobid)
            if failed and rule not in self.daemon_rules:
                self.failed_at, self.failure = time.monotonic(), why or "a job failed"

    def judge(self, record: logging.LogRecord):
        """A failed job's verdict (``virnucpro.cluster.losses.Verdict``; None without ``losses``): lost with its
        node and submitted again, or the run's failure; nothing is submitted again once the run is stopping."""
        if self.losses is None:
            return None
        with self.lock:
            stopping = self.stopped or (self.failed_at is not None and not self.keep_going)
        return self.losses.judge(record, stopping)

    def serve_job_failed(self, daemon_id: str, started: float, detail: str | None = None) -> None:
        """A serve job that failed took its daemon with it, unless its serve job said what happened: record
        the loss (a node lost, the job killed by the cluster) with what the registry knew of the daemon. A
        serve job that snakemake restarts no more (``daemon_restarts``) is a failed job of the run."""
        failures = self.serve_failures[daemon_id] = self.serve_failures.get(daemon_id, 0) + 1
        entry = registry.read_entry(self.run, daemon_id) or {}
        if self.daemon_restarts is not None and failures > self.daemon_restarts:
            where = f" on {entry['host']}" if entry.get("host") else ""
            with self.lock:
                self.failed_at = time.monotonic()
                self.failure = (f"the serve job of daemon {daemon_id}{where} failed with no restart left "
                                "(config key daemon_restarts; a re-run resumes)")  # fmt: skip
        if any(event.get("daemon") == daemon_id and event.get("time", 0) >= started
               for event in self.run.read_events() if event.get("session") == self.session):  # fmt: skip
            return
        if entry.get("state") == State.FAILED:  # it could not start (no loss): its entry tells the clients why
            return
        self.run.record_event(event="lost", daemon=daemon_id, model=entry.get("model"), host=entry.get("host"),
                              address=entry.get("address"), gpus=entry.get("gpus"), pid=entry.get("pid"),
                              session=self.session, last_heartbeat=entry.get("heartbeat"),
                              detail=detail or "its serve job failed (its node or job was lost)")  # fmt: skip
        # Gone with its job: clients stop asking it at once, not once its heartbeat is stale (a daemon that
        # is still alive after all rewrites its entry within 5 s).
        registry.remove_entry(self.run, daemon_id)

    def stop_daemons(self, why: str) -> None:
        if not self.stopped:
            self.stopped = True
            log.warning("virnucpro: stopping the model daemons: %s", why)
        self.run.write_stop_token()

    def _beat(self) -> None:
        beat = 0
        while True:
            try:
                atomic.write_json(self.run.heartbeat, {"session": self.session, "beat": beat, "time": time.time()})
            except OSError as error:  # a file system hiccup: try again at the next beat
                log.warning("could not write the run's heartbeat %s: %s", self.run.heartbeat, error)
            beat += 1
            self._check_quiet()
            time.sleep(HEARTBEAT_EVERY)

    def _check_quiet(self) -> None:
        """Stop the daemons once the run has nothing left for them (see the module's doc)."""
        with self.lock:
            busy, failed_at, started_at = bool(self.running), self.failed_at, self.started_at
        now = time.monotonic()
        self.quiet_since = None if busy else self.quiet_since or now
        if self.stopped:
            return
        if failed_at is not None and not self.keep_going and started_at < failed_at and now - failed_at >= AFTER_ERROR:
            self.stop_daemons(f"{self.failure} and the run does not keep going")
        elif self.quiet_since is not None:
            limit = AFTER_ERROR if failed_at is not None else self.idle_timeout
            if limit > 0 and now - self.quiet_since >= limit:
                self.stop_daemons(f"no other job has run for {limit:.0f} s"
                                  + (" since a job failed" if failed_at else " (config key idle_timeout)"))  # fmt: skip

    def _on_signal(self, previous):
        def handler(number, frame):
            self.stop_daemons(f"snakemake got {signal.Signals(number).name}")
            if callable(previous):
                previous(number, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
                os.kill(os.getpid(), number)

        return handler


class _JobEvents(logging.Handler):
    """Feeds snakemake's job events (job_info, job_finished, job_error) to a RunWatch."""

    def __init__(self, watch: RunWatch):
        super().__init__()
        self.watch = watch
        self.rules: dict[int, str] = {}
        self.started: dict[int, float] = {}  # job ID -> time.time() it started

    def emit(self, record: logging.LogRecord) -> None:
        event = str(getattr(record, "event", ""))
        if event == "job_info":
            self.rules[record.jobid] = record.rule_name
            self.started[record.jobid] = time.time()
            self.watch.job_started(record.jobid, record.rule_name)
        elif event == "job_finished":
            self.watch.job_ended(record.job_id, self.rules.get(record.job_id), failed=False)
        elif event == "job_error":
            rule = getattr(record, "rule_name", None)
            verdict = self.watch.judge(record)
            failed = verdict is None or verdict.fails_the_run
            self.watch.job_ended(record.jobid, rule, failed=failed, why=verdict.why if verdict else None)
            daemon = _DAEMON_OUTPUT.search(str(getattr(record, "output", "")))
            if rule in self.watch.daemon_rules and daemon:
                loss = verdict.loss if verdict else None
                detail = f"its node {loss.node or '(unknown)'} was lost ({loss.state})" if loss else None
                self.watch.serve_job_failed(daemon.group(1), self.started.get(record.jobid, 0.0), detail)


def wait_for_leftover_daemons(run: RunDir, wait: float = LEFTOVER_WAIT) -> None:
    """Wait (boundedly) until the registered daemons of an earlier run have exited."""
    deadline = time.monotonic() + wait
    while True:
        live = [f"{entry['daemon_id']} (pid {entry.get('pid')} on {entry.get('host')})"
                for entry in registry.list_entries(run) if entry.get("state") != State.FAILED]  # fmt: skip
        if not live:
            return
        if time.monotonic() > deadline:
            log.warning("daemon(s) of an earlier run still registered after %.0f s: %s", wait, ", ".join(live))
            return
        time.sleep(0.5)


def clear_stale_outputs(paths: list[str], locks_dir: Path) -> list[str]:
    """Remove the serve jobs' outputs that an earlier run left (it failed before collecting them), so that
    this run starts its daemons; not while another snakemake holds the working directory's lock. Returns
    the paths removed."""
    if locks_dir.is_dir() and any(locks_dir.iterdir()):
        return []
    removed = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


# --- a serve job ---------------------------------------------------------------------------------


class _Ended(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def serve_job(run_dir: Path, daemon_id: str, stats_output: Path, allowed_roots: list[Path]) -> int:
    """Run the daemon ``daemon_id`` of the workflow run that owns ``run_dir`` as a child (``virnucpro serve``
    with the settings the run recorded for it) and watch it and the run (see the module's doc); the exit
    status for the serve job."""
    run = RunDir(run_dir)
    settings = run.read_settings()
    session = settings.get("session")
    if session is None:
        raise UserError(f"serve-job: no running workflow owns {run.root} (no settings for session "
                        f"${SESSION_VARIABLE}={os.environ.get(SESSION_VARIABLE)}): use 'virnucpro serve' "
                        "outside a workflow")  # fmt: skip
    daemon = settings.get("daemons", {}).get(daemon_id)
    if not isinstance(daemon, dict):
        raise UserError(f"serve-job: the run's settings ({run.settings}) name no daemon '{daemon_id}'")
    model = daemon["model"]
    orphan_timeout, freeze_timeout = float(daemon["orphan_timeout"]), float(daemon["freeze_timeout"])
    drain_grace = float(daemon.get("drain_grace", DRAIN_GRACE))
    serve_args = [
        "--model", model, "--weights", str(daemon["weights"]), "--device", daemon["device"],
        "--precision", daemon["precision"], "--run-dir", str(run.root), "--stats-output", str(stats_output),
        "--daemon-id", daemon_id, "--idle-timeout", "0", "--cache-clear-every", str(daemon["cache_clear_every"]),
        "--drain-grace", str(drain_grace), "--transport", daemon["transport"],
        "--bind-host", daemon.get("bind_host", "*"),
    ]  # fmt: skip
    for root in allowed_roots:
        serve_args += ["--allowed-root", str(root)]
    baseline = str(settings.get("stop_baseline", "")).encode()
    _clear_earlier_entry(run, daemon_id, session)
    if (read_token(run.stop_file) or b"") != baseline:
        write_stats(stats_output, {"daemon_id": daemon_id, "model": model, "model_loads": 0, "shards": 0,
                                   "exit_reason": "not started: the run was ending"})  # fmt: skip
        log.info("serve job %s: the run is ending; not starting the daemon", daemon_id)
        return 0
    command = [sys.executable, "-m", "virnucpro", "serve", *serve_args]
    child = subprocess.Popen(command)
    watcher = _Watcher(run, child, daemon_id, session, orphan_timeout, freeze_timeout, drain_grace, baseline)
    previous = {number: signal.signal(number, watcher.on_signal) for number in (signal.SIGTERM, signal.SIGINT,
                                                                                 signal.SIGHUP)}  # fmt: skip
    try:
        code = watcher.watch()
    except _Ended as ended:  # the run is gone: no statistics of it (a later run must start its daemons)
        Path(stats_output).unlink(missing_ok=True)
        print(f"virnucpro serve-job: {ended}", file=sys.stderr)
        return ended.code
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if child.poll() is not None:  # a daemon killed (frozen) or dead could not remove its ipc socket
            transport.remove_dead_socket(run, daemon_id, child.pid)
    if code == 0:
        stats = read_stats(stats_output)
        write_stats(stats_output, {**stats, "session": session, "events": _events_of(run, session, daemon_id)})
        return 0
    if code == EXIT_CANNOT_START:
        return EXIT_CANNOT_START
    how = "froze and was killed" if watcher.frozen else f"died ({_describe_exit(code)})"
    run.record_event(event="frozen" if watcher.frozen else "lost", daemon=daemon_id, model=model,
                     host=socket.gethostname(), pid=child.pid, session=session, detail=how)  # fmt: skip
    others = [entry["daemon_id"] for entry in registry.list_entries(run, model)
              if entry["daemon_id"] != daemon_id and entry.get("state") in (State.LOADING, State.READY)]  # fmt: skip
    if others:
        write_stats(stats_output, {"daemon_id": daemon_id, "model": model, "host": socket.gethostname(),
                                   "model_loads": 0, "shards": 0, "exit_reason": "lost", "session": session,
                                   "events": _events_of(run, session, daemon_id)})  # fmt: skip
        print(f"virnucpro serve-job: daemon {daemon_id} {how}; {', '.join(others)} take(s) its work over",
              file=sys.stderr)  # fmt: skip
        return 0
    print(f"virnucpro serve-job: daemon {daemon_id} {how} and no other {model} daemon is running: "
          "a restart of this serve job (retries) replaces it", file=sys.stderr)  # fmt: skip
    return EXIT_LOST_LAST


class _Watcher:
    def __init__(self, run: RunDir, child: subprocess.Popen, daemon_id: str, session: str, orphan_timeout: float,
                 freeze_timeout: float, drain_grace: float, baseline: bytes):  # fmt: skip
        self.run, self.child, self.daemon_id, self.session = run, child, daemon_id, session
        self.orphan_timeout, self.freeze_timeout = orphan_timeout, freeze_timeout
        self.kill_after = drain_grace + KILL_GRACE
        self.baseline = baseline
        self.started = time.monotonic()
        self.stopping_since: float | None = None
        self.last_beat, self.beat_changed = None, time.monotonic()
        self.frozen = False
        self.signalled: int | None = None

    def on_signal(self, number: int, _frame) -> None:
        self.signalled = number
        self._terminate()

    def watch(self) -> int:
        while True:
            try:
                return self.child.wait(timeout=CHECK_EVERY)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self.signalled is not None or self._stop_token_changed():
                self.stopping_since = self.stopping_since or now
                if now - self.stopping_since > self.kill_after:
                    self._kill()
                continue
            gone = self._run_gone(now)
            if gone:
                self._terminate()
                self._wait_or_kill()
                raise _Ended(1, f"the run that started daemon {self.daemon_id} is gone ({gone}); stopped it")
            if self._frozen(now):
                log.error("serve job %s: the daemon (pid %d) has not refreshed its registry entry for %.0f s: "
                          "killing it", self.daemon_id, self.child.pid, self.freeze_timeout)  # fmt: skip
                self.frozen = True
                self._kill()

    def _stop_token_changed(self) -> bool:
        return (read_token(self.run.stop_file) or b"") != self.baseline

    def _run_gone(self, now: float) -> str | None:
        try:
            beat = json.loads(self.run.heartbeat.read_text())
        except (OSError, ValueError):
            beat = None
        if isinstance(beat, dict) and beat.get("session") not in (None, self.session):
            return f"a later run, {beat.get('session')}, owns the run folder"
        if beat != self.last_beat:
            self.last_beat, self.beat_changed = beat, now
        if now - self.beat_changed > self.orphan_timeout:
            return f"its heartbeat {self.run.heartbeat} has not changed for {self.orphan_timeout:.0f} s"
        return None

    def _frozen(self, now: float) -> bool:
        if self.freeze_timeout <= 0:
            return False
        entry = registry.read_entry(self.run, self.daemon_id)
        if entry is None or entry.get("pid") != self.child.pid:
            return now - self.started > self.freeze_timeout + 60.0  # never registered: stuck while starting
        return registry.heartbeat_age(entry) > self.freeze_timeout

    def _terminate(self) -> None:
        try:
            os.kill(self.child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _kill(self) -> None:
        try:
            os.kill(self.child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _wait_or_kill(self) -> None:
        try:
            self.child.wait(timeout=self.kill_after)
        except subprocess.TimeoutExpired:
            self._kill()
            self.child.wait()


def _clear_earlier_entry(run: RunDir, daemon_id: str, session: str) -> None:
    """Remove an entry of this daemon ID left by an earlier attempt of this serve job (snakemake restarts a
    job only once it failed: that daemon is gone, e.g. with its node, even if its heartbeat is recent), or
    by a daemon that is gone."""
    entry = registry.read_entry(run, daemon_id)
    if entry is None:
        return
    if entry.get("session") == session or not registry.is_alive(entry) or registry.is_stale(entry):
        registry.remove_entry(run, daemon_id)


def _events_of(run: RunDir, session: str, daemon_id: str) -> list[dict]:
    return [
        event for event in run.read_events() if event.get("session") == session and event.get("daemon") == daemon_id
    ]


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
