"""The run's watch: the daemons' lifecycle as seen from the workflow's main snakemake process.

Started in ``onstart`` (docs/daemons.md, "Lifecycle in a run"), it

- refuses a run folder that another live run uses, stops whatever daemons an earlier run left, and
  publishes this run's settings (every daemon's spec, the stop-token baselines) for its jobs;
- checks the plan against the daemons: a model with embedding work but no serve job in the plan (a
  target that does not pull the daemons in) is embedded in its jobs (locally) or refused (on a
  cluster); a model with serve jobs but no work has them stopped before they load anything;
- beats the run's heartbeat, follows snakemake's job events and the plan, and stops a model's daemons
  (its stop token) once the plan holds no embedding of it that can still run; all daemons a few
  seconds after a failed job (unless the run keeps going), after ``idle_timeout`` with nothing but
  serve jobs running, or at once on SIGINT, SIGTERM or SIGHUP;
- ends the run (SIGINT to snakemake and its local jobs) within seconds when the run folder cannot be
  written (a full disk), naming the path: a heartbeat that stopped would otherwise orphan the serve jobs
  while snakemake waits.

It owns the decision "the run has nothing left for a daemon"; the serve job owns "the daemon is dead"
(``servejob``), the clients only "this exchange is lost" (``client``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from virnucpro import atomic
from virnucpro.cluster.losses import JobLosses, Verdict
from virnucpro.errors import UserError, environmental
from virnucpro.layout import DAEMON_STATS_SUFFIX, RunFiles
from virnucpro.serving import registry, timing
from virnucpro.serving.history import ATTEMPT_ENDED, ATTEMPT_STARTED, prune_history
from virnucpro.serving.plan import SnakemakePlan
from virnucpro.serving.progress import ProgressReport
from virnucpro.serving.protocol import State
from virnucpro.serving.rundir import RunDir
from virnucpro.serving.spec import DaemonSpec
from virnucpro.serving.stats import LOSS_EVENTS
from virnucpro.serving.worker import prune_request_records

log = logging.getLogger(__name__)

LEAST_FREE_BYTES = 64 * 1024  # below this, the disk of the run folder or of the logs counts as full
_DAEMON_OUTPUT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)" + re.escape(DAEMON_STATS_SUFFIX))  # a serve job's output
RUN_STATS = RunFiles().run_stats  # the default target: it pulls the serve jobs into the plan


def new_session() -> str:
    """A fresh ID for a workflow run (its jobs inherit it as ``$VIRNUCPRO_SESSION``)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


class RunWatch:
    """The workflow run's side of the daemons' lifecycle; ``start`` it in snakemake's ``onstart``, ``close`` it
    in ``onsuccess`` and ``onerror``."""

    def __init__(self, run: RunDir, session: str, *, idle_timeout: float, daemon_restarts: int, job_settings: dict,
                 serve_rule: str = "serve_model", guarded: tuple[Path, ...] = (),
                 losses: JobLosses | None = None):  # fmt: skip
        self.run, self.session = run, session
        self.specs: dict[str, DaemonSpec] = {}  # given to start: a spec's transport depends on the executor
        self.models: tuple[str, ...] = ()
        self.idle_timeout, self.daemon_restarts = idle_timeout, daemon_restarts
        self.job_settings = job_settings
        self.serve_rule = serve_rule
        self.losses = losses  # tells a job lost with its node from one that failed on its own (cluster runs)
        self.guarded = (run.root, *guarded)  # folders whose disk must not fill up: jobs could not say why
        self.keep_going = False
        self.plan: SnakemakePlan | None = None
        self.serve_failures: dict[str, int] = {}  # daemon ID -> how often its serve job failed
        self.running: set[int] = set()  # IDs of the jobs running now, serve jobs left out
        self.failed_at: float | None = None  # when the last job (not a serve job, unless restarted no more) failed
        self.failure = "a job failed"
        self.started_at = 0.0  # when the last job (not a serve job) started
        self.quiet_since: float | None = None
        self.stopped: set[str] = set()  # models whose daemons were told to stop ("*": all)
        self.ended = threading.Event()
        self.fatal_reported = False
        self.reported: set[str] = set()  # daemons whose failure to start was said
        self.lock = threading.Lock()

    # --- start --------------------------------------------------------------------------------------
    def start(self, logger: logging.Logger, *, specs: dict[str, DaemonSpec], plan: SnakemakePlan | None,
              keep_going: bool, local: bool, workdir: str) -> None:  # fmt: skip
        """Take the run folder for this run and start watching (see the module's doc) its daemons ``specs``.
        UserError, before anything changed, if the folder is another live run's or the plan needs daemons it
        does not hold."""
        self.specs = specs
        self.models = tuple(dict.fromkeys(spec.model for spec in specs.values()))
        self.run.root.mkdir(parents=True, exist_ok=True)
        refuse_if_in_use(self.run, self.session)
        full = full_disk(self.guarded)
        if full is not None:
            raise UserError(f"{full}; free space there and run again")
        self.plan, self.keep_going = plan, keep_going
        in_process, idle_models = self._reconcile(local)
        from virnucpro.serving.client import stop_daemons

        stop_daemons(self.run.root)  # a fresh run-wide token: every daemon of an earlier run stops
        wait_for_leftover_daemons(self.run)
        log.debug("pruned %d request record(s) of earlier runs", prune_request_records(self.run))
        prune_history(self.run)
        self.run.write_settings({
            **self.job_settings, "session": self.session, "stop_baselines": self.run.stop_baselines(self.models),
            "daemons": {daemon: spec.to_dict() for daemon, spec in self.specs.items()},
            "daemon_restarts": self.daemon_restarts, "in_process": in_process,
        })  # fmt: skip
        for model in idle_models:
            self.stop_model(model, "its embeddings are all made: its daemons are not started")
        self.run.record_event(event=ATTEMPT_STARTED, session=self.session, host=socket.gethostname(),
                              pid=os.getpid(), workdir=workdir)  # fmt: skip
        logger.addHandler(_JobEvents(self))
        self.progress = ProgressReport(self.run, self.job_settings.get("progress", {}), say=logger.info)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, self._on_signal(signal.getsignal(number)))
        threading.Thread(target=self._beat, name="virnucpro-run-watch", daemon=True).start()

    def _reconcile(self, local: bool) -> tuple[dict[str, dict], list[str]]:
        """Which models embed in their jobs (no daemon in the plan, locally), and which have daemons in the plan
        but nothing to embed; UserError on a cluster for a model with work and no daemon."""
        snapshot = self.plan.snapshot() if self.plan is not None else None
        if snapshot is None:
            return {}, []
        in_process, idle = {}, []
        for model in self.models:
            daemons = [daemon for daemon, spec in self.specs.items() if spec.model == model]
            planned = any(daemon in snapshot.serve_jobs for daemon in daemons)
            if model in snapshot.models_with_work and not planned:
                if not local:
                    raise UserError(f"the targets need {model} embeddings, but its daemons are not part of this plan "
                                    f"(only {RUN_STATS}, the default target, starts them): on a cluster, run "
                                    f"without targets or add {RUN_STATS} to them")  # fmt: skip
                log.warning("virnucpro: no %s daemon is part of this plan (only %s, the default target, starts them): "
                            "each embedding job loads the model itself (slower); run without targets to use the "
                            "daemons", model, RUN_STATS)  # fmt: skip
                in_process[model] = self.specs[daemons[0]].to_dict()
            elif planned and model not in snapshot.models_with_work:
                idle.append(model)
        return in_process, idle

    # --- what the jobs do -----------------------------------------------------------------------------
    def job_started(self, jobid: int, rule: str) -> None:
        if rule != self.serve_rule:
            with self.lock:
                self.running.add(jobid)
                self.started_at = time.monotonic()

    def job_ended(self, jobid: int, rule: str | None, failed: bool, why: str | None = None) -> None:
        with self.lock:
            self.running.discard(jobid)
            if failed and rule != self.serve_rule:
                self.failed_at, self.failure = time.monotonic(), why or "a job failed"

    def judge(self, record: logging.LogRecord) -> Verdict | None:
        """A failed job's verdict (None without ``losses``): lost with its node and submitted again, or the
        run's failure; nothing is submitted again once the run is stopping."""
        if self.losses is None:
            return None
        with self.lock:
            stopping = "*" in self.stopped or (self.failed_at is not None and not self.keep_going)
        return self.losses.judge(record, stopping)

    def serve_job_failed(self, daemon_id: str, started: float, detail: str | None = None) -> None:
        """A serve job that failed took its daemon with it, unless its serve job said what happened: record
        the loss (a node lost, the job killed by the cluster) with what the registry knew of the daemon. A
        serve job that snakemake restarts no more (``daemon_restarts``) is a failed job of the run."""
        failures = self.serve_failures[daemon_id] = self.serve_failures.get(daemon_id, 0) + 1
        entry = registry.read_entry(self.run, daemon_id) or {}
        if failures > self.daemon_restarts:
            where = f" on {entry['host']}" if entry.get("host") else ""
            with self.lock:
                self.failed_at = time.monotonic()
                self.failure = (f"the serve job of daemon {daemon_id}{where} failed with no restart left "
                                f"(config key daemon_restarts: {self.daemon_restarts})")  # fmt: skip
        if any(event.get("daemon") == daemon_id and event.get("time", 0) >= started
               and event.get("event") in LOSS_EVENTS
               for event in self.run.read_events() if event.get("session") == self.session):  # fmt: skip
            return
        if entry.get("state") == State.FAILED:  # it could not start (no loss): its entry tells the clients why
            return
        self.run.record_event(event="lost", daemon=daemon_id, model=entry.get("model"), host=entry.get("host"),
                              address=entry.get("address"), gpus=entry.get("gpus"), pid=entry.get("pid"),
                              session=self.session, last_heartbeat=entry.get("heartbeat"),
                              progress=entry.get("progress"),
                              detail=detail or "its serve job failed (its node or job was lost)")  # fmt: skip
        # Gone with its job: clients stop asking it at once, not once its heartbeat is stale (a daemon that
        # is still alive after all rewrites its entry within ENTRY_REFRESH_EVERY).
        registry.remove_entry(self.run, daemon_id)

    # --- stopping ------------------------------------------------------------------------------------
    def stop_daemons(self, why: str) -> None:
        """Every daemon of the run stops (a fresh run-wide stop token)."""
        if "*" not in self.stopped:
            self.stopped.add("*")
            log.warning("virnucpro: stopping the model daemons: %s", why)
        self.run.write_stop_token()

    def stop_model(self, model: str, why: str) -> None:
        """The daemons of ``model`` stop (a fresh stop token of that model)."""
        if model not in self.stopped:
            self.stopped.add(model)
            log.info("virnucpro: stopping the %s daemons: %s", model, why)
            self.run.write_stop_token(self.run.model_stop_file(model))

    def close(self, success: bool) -> None:
        """The run is over (``onsuccess``/``onerror``): stop beating, record how the attempt ended."""
        self.ended.set()
        try:
            self.run.record_event(event=ATTEMPT_ENDED, session=self.session, ok=success)
        except OSError as error:
            log.warning("virnucpro: could not record the end of the run in %s: %s", self.run.events, error)

    # --- the heartbeat thread ------------------------------------------------------------------------
    def _beat(self) -> None:
        beat = 0
        while not self.ended.is_set():
            try:
                atomic.write_json(self.run.heartbeat, {"session": self.session, "beat": beat, "time": time.time(),
                                                       "host": socket.gethostname(), "pid": os.getpid(),
                                                       "workdir": os.getcwd()})  # fmt: skip
                beat += 1
                full = full_disk(self.guarded)
                if full is not None:
                    raise OSError(errno.ENOSPC, full)
                self._check_daemons()
                self._check_plan()
                self._check_quiet()
                self.progress.tick()  # a line per model every progress_every s while the daemons embed
            except OSError as error:
                self.fatal(error)
            self.ended.wait(timing.RUN_HEARTBEAT_EVERY)

    def _check_daemons(self) -> None:
        """Say once, in the run's output, why a daemon of this run could not start."""
        for entry in registry.list_entries(self.run):
            daemon = entry["daemon_id"]
            if (
                entry.get("state") == State.FAILED
                and entry.get("session") == self.session
                and daemon not in self.reported
            ):
                self.reported.add(daemon)
                log.error("virnucpro: daemon %s cannot start: %s (not retried: a restart would not help)", daemon,
                          entry.get("reason"))  # fmt: skip

    def _check_plan(self) -> None:
        """Stop each model's daemons once the plan has no embedding of it left that can run."""
        if self.plan is None or "*" in self.stopped:
            return
        snapshot = self.plan.snapshot()
        if snapshot is None:
            return
        for model in self.models:
            if model not in snapshot.models_with_work and model not in self.stopped:
                self.stop_model(model, "no embedding of it is left in the plan")

    def _check_quiet(self) -> None:
        """Stop the daemons once the run has nothing left for them (see the module's doc)."""
        with self.lock:
            busy, failed_at, started_at = bool(self.running), self.failed_at, self.started_at
        now = time.monotonic()
        self.quiet_since = None if busy else self.quiet_since or now
        if "*" in self.stopped:
            return
        if (
            failed_at is not None
            and not self.keep_going
            and started_at < failed_at
            and now - failed_at >= timing.AFTER_ERROR
        ):
            self.stop_daemons(f"{self.failure} and the run does not keep going")
        elif self.quiet_since is not None:
            limit = timing.AFTER_ERROR if failed_at is not None else self.idle_timeout
            if limit > 0 and now - self.quiet_since >= limit:
                self.stop_daemons(f"no other job has run for {limit:.0f} s"
                                  + (" since a job failed" if failed_at else " (config key idle_timeout)"))  # fmt: skip

    def fatal(self, error: BaseException) -> None:
        """The run cannot go on (its run folder cannot be written, a guarded disk is full): say why in one line,
        and end the run as Ctrl-C in its terminal would: SIGINT to snakemake and to its local jobs (snakemake
        does not stop them itself; the serve jobs stop their daemons, waiting clients give up). Raises
        nothing."""
        if self.fatal_reported:
            return
        self.fatal_reported = True
        cause = error.strerror if isinstance(error, OSError) and error.filename is None else None
        cause = cause or environmental(error) or error
        log.error("virnucpro: the run cannot go on: %s; fix it and run again (the run resumes)", cause)
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGINT)
            except OSError:  # it ended meanwhile
                pass
        os.kill(os.getpid(), signal.SIGINT)

    def _on_signal(self, previous: Callable | int | None):
        def handler(number, frame):
            try:
                self.stop_daemons(f"snakemake got {signal.Signals(number).name}")
            except OSError as error:  # the stop token cannot be written: the serve jobs stop their daemons
                log.warning("virnucpro: could not write the stop token %s: %s", self.run.stop_file, error)
            if callable(previous):
                previous(number, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
                os.kill(os.getpid(), number)

        return handler


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (its children, theirs, ...), read from ``/proc``; none where there is no
    ``/proc``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


class _JobEvents(logging.Handler):
    """Feeds snakemake's job events (job_info, job_finished, job_error) to a RunWatch; never raises into
    snakemake."""

    def __init__(self, watch: RunWatch):
        super().__init__()
        self.watch = watch
        self.rules: dict[int, str] = {}
        self.started: dict[int, float] = {}  # job ID -> time.time() it started

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._handle(record)
        except OSError as error:
            self.watch.fatal(error)
        except Exception:  # a bug here must not stop snakemake's own logging
            log.exception("virnucpro: error in the run's watch")

    def _handle(self, record: logging.LogRecord) -> None:
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
            if rule == self.watch.serve_rule and daemon:
                loss = verdict.loss if verdict else None
                detail = f"its node {loss.node or '(unknown)'} was lost ({loss.state})" if loss else None
                self.watch.serve_job_failed(daemon.group(1), self.started.get(record.jobid, 0.0), detail)


def refuse_if_in_use(run: RunDir, session: str) -> None:
    """UserError naming the run folder if another workflow run is alive in it: on this host its process
    exists and beats; on another host its heartbeat changes within ``timing.LIVE_RUN_CHECK``."""
    beat = _read_heartbeat(run)
    if beat is None or beat.get("session") in (None, session):
        return
    age = time.time() - float(beat.get("time") or 0)
    if beat.get("host") == socket.gethostname():
        alive = registry.pid_alive(beat.get("pid")) and age < 3 * timing.RUN_HEARTBEAT_EVERY + 5
    elif age > 10 * timing.LIVE_RUN_CHECK:
        alive = False
    else:
        time.sleep(timing.LIVE_RUN_CHECK)
        alive = _read_heartbeat(run) != beat
    if alive:
        raise UserError(f"the run folder {run.root} is in use by another running workflow (pid {beat.get('pid')} "
                        f"on {beat.get('host')}, in {beat.get('workdir')}): wait for it to end, or give this run "
                        "another folder (config key run_dir)")  # fmt: skip


def full_disk(folders: tuple[Path, ...], least: int = LEAST_FREE_BYTES) -> str | None:
    """ "FOLDER: no space left on device (N bytes free)" for the first folder (or, before it exists, its nearest
    existing parent) whose file system has less than ``least`` bytes free for this user; None if none."""
    for folder in folders:
        existing = Path(folder)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            stats = os.statvfs(existing)
        except OSError:
            continue
        free = stats.f_bavail * stats.f_frsize
        if free < least:
            return f"{folder}: {os.strerror(errno.ENOSPC)} ({free:,} bytes free)"
    return None


def _read_heartbeat(run: RunDir) -> dict | None:
    try:
        beat = json.loads(run.heartbeat.read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def wait_for_leftover_daemons(run: RunDir, wait: float = timing.LEFTOVER_WAIT) -> None:
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
        time.sleep(timing.REGISTRY_POLL)
