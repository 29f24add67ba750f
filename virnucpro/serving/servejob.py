"""A workflow's serve job (``virnucpro serve-job``, rule ``serve_model``): one daemon of the run, as its child.

The serve job reads its daemon's spec from the run's settings, starts ``virnucpro serve --from-run``,
copies the daemon's log into the job's log and into the attempts log (so that a restarted job keeps
what the earlier attempts printed), and watches, every ``timing.SERVE_CHECK_EVERY``:

- the run gone (its heartbeat unchanged for ``orphan_timeout``, or a later run owns the run folder):
  it stops the daemon and exits ``RUN_GONE``, leaving no statistics (a later run starts its own);
- the stop tokens (the run's, the model's) changed: the daemon drains; past ``drain_grace`` +
  ``timing.KILL_GRACE`` it is killed;
- the daemon frozen (its registry entry older than ``freeze_timeout``): it is killed (SIGKILL, which a
  stopped process cannot ignore).

The serve job owns the decision "this daemon is dead": it records the loss (``lost``/``frozen`` event)
and says in its exit status (``ServeJobExit``) what follows from it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from enum import IntEnum
from pathlib import Path
from typing import IO

from virnucpro.errors import EXIT_USER_ERROR
from virnucpro.serving import registry, timing, transport
from virnucpro.serving.protocol import State
from virnucpro.serving.rundir import RunDir, StopTokens
from virnucpro.serving.spec import DaemonSpec, spec_of_run
from virnucpro.serving.stats import read_stats, write_stats

log = logging.getLogger(__name__)


class ServeJobExit(IntEnum):
    """A serve job's exit status: what became of its daemon."""

    DONE = 0
    """It stopped when told (statistics written); or it was lost while another daemon of its model takes its
    work over; or it could not start (its registry entry says why; a restart would not help)."""
    REPLACE = 1
    """It was lost and was its model's last daemon: a restart of the serve job (rule ``retries``) replaces it."""
    RUN_GONE = 3
    """The run that started it is gone: the daemon was stopped; no statistics."""


class _RunGone(Exception):
    pass


def serve_job(run_dir: Path, daemon_id: str, stats_output: Path, attempts_log: Path | None = None) -> int:
    """Run the daemon ``daemon_id`` of the workflow run that owns ``run_dir`` as a child and watch it and the
    run (see the module's doc); the exit status (a ``ServeJobExit``)."""
    run = RunDir(run_dir)
    spec = spec_of_run(run.root, daemon_id)
    settings = run.read_settings()
    session = settings["session"]
    attempt = 1 + sum(1 for event in run.read_events() if event.get("event") == "serve_started"
                      and event.get("session") == session and event.get("daemon") == daemon_id)  # fmt: skip
    restarts = int(settings.get("daemon_restarts", 0))
    run.record_event(event="serve_started", daemon=daemon_id, model=spec.model, session=session, attempt=attempt,
                     host=socket.gethostname(), job_pid=os.getpid())  # fmt: skip
    stops = run.stop_tokens(spec.model, settings.get("stop_baselines"))
    _clear_earlier_entry(run, daemon_id, session)
    stopped = stops.changed()
    if stopped is not None:
        why = "the run is ending" if stopped == run.stop_file else "its model has no work left in this run"
        _write_final(run, stats_output, {"daemon_id": daemon_id, "model": spec.model, "model_loads": 0, "shards": 0,
                                         "session": session, "attempt": attempt,
                                         "exit_reason": f"not started: {why}"})  # fmt: skip
        _say(f"virnucpro serve-job: {daemon_id}: {why}; not starting the daemon")
        return ServeJobExit.DONE
    log_file = _open_attempts_log(attempts_log, attempt, session, daemon_id)
    command = [sys.executable, "-m", "virnucpro", "serve", "--from-run", "--run-dir", str(run.root),
               "--daemon-id", daemon_id, "--stats-output", str(stats_output)]  # fmt: skip
    child = subprocess.Popen(command, stderr=subprocess.PIPE)
    last_line: list[bytes] = []
    copier = threading.Thread(target=_copy_lines, args=(child.stderr, [sys.stderr.buffer, log_file], last_line),
                              daemon=True)  # fmt: skip
    copier.start()
    watcher = _Watcher(run, child, spec, session, stops)
    previous = {number: signal.signal(number, watcher.on_signal)
                for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}  # fmt: skip
    try:
        code = watcher.watch()
    except _RunGone as gone:  # no statistics of it: a later run must start its own daemons
        Path(stats_output).unlink(missing_ok=True)
        _say(f"virnucpro serve-job: {gone}")
        return ServeJobExit.RUN_GONE
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if child.poll() is not None:  # a daemon killed (frozen) or dead could not remove its ipc socket
            transport.remove_dead_socket(run, daemon_id, child.pid)
        copier.join(timeout=timing.KILL_GRACE)
        if log_file is not None:
            log_file.close()
    events = _events_of(run, session, daemon_id)
    if code == 0:
        _write_final(run, stats_output, {**read_stats(stats_output), "session": session, "attempt": attempt,
                                         "events": events})  # fmt: skip
        return ServeJobExit.DONE
    entry = registry.read_entry(run, daemon_id)
    failed_entry = entry is not None and entry.get("state") == State.FAILED and entry.get("pid") == child.pid
    if failed_entry or code == EXIT_USER_ERROR:
        reason = (entry or {}).get("reason") if failed_entry else _reason(last_line, code)
        _write_final(run, stats_output, {"daemon_id": daemon_id, "model": spec.model, "host": socket.gethostname(),
                                         "model_loads": 0, "shards": 0, "session": session, "attempt": attempt,
                                         "exit_reason": f"cannot start: {reason}", "events": events})  # fmt: skip
        _say(f"virnucpro serve-job: daemon {daemon_id} cannot start: {reason} (not retried: a restart would not help)")
        return ServeJobExit.DONE
    how = "froze and was killed" if watcher.frozen else f"died ({_describe_exit(code)})"
    progress = entry.get("progress") if entry is not None and entry.get("pid") == child.pid else None
    run.record_event(event="frozen" if watcher.frozen else "lost", daemon=daemon_id, model=spec.model,
                     host=socket.gethostname(), pid=child.pid, session=session, attempt=attempt, detail=how,
                     progress=progress)  # fmt: skip
    others = [entry["daemon_id"] for entry in registry.list_entries(run, spec.model)
              if entry["daemon_id"] != daemon_id and entry.get("state") in (State.LOADING, State.READY)]  # fmt: skip
    if others:
        _write_final(run, stats_output, {"daemon_id": daemon_id, "model": spec.model, "host": socket.gethostname(),
                                         "model_loads": 0, "shards": 0, "exit_reason": "lost", "session": session,
                                         "attempt": attempt, "events": _events_of(run, session, daemon_id)})  # fmt: skip
        _say(f"virnucpro serve-job: daemon {daemon_id} {how}; {', '.join(others)} take(s) its work over")
        return ServeJobExit.DONE
    if attempt <= restarts:
        then = f"a restart of this serve job replaces it (attempt {attempt + 1} of {restarts + 1})"
    else:
        then = f"no restart is left (config key daemon_restarts: {restarts}); a re-run resumes"
    _say(f"virnucpro serve-job: daemon {daemon_id} {how} and no other {spec.model} daemon is running: {then}")
    return ServeJobExit.REPLACE


class _Watcher:
    def __init__(self, run: RunDir, child: subprocess.Popen, spec: DaemonSpec, session: str, stops: StopTokens):
        self.run, self.child, self.spec, self.session, self.stops = run, child, spec, session, stops
        self.kill_after = spec.drain_grace + timing.KILL_GRACE
        self.started = time.monotonic()
        self.stopping_since: float | None = None
        self.last_beat, self.beat_changed = None, time.monotonic()
        self.frozen = False
        self.registered = False  # its registry entry was seen
        self.signalled: int | None = None

    def on_signal(self, number: int, _frame) -> None:
        self.signalled = number
        self._send(signal.SIGTERM)

    def watch(self) -> int:
        """The daemon's exit status, once it has exited; _RunGone if the run went first."""
        while True:
            try:
                return self.child.wait(timeout=timing.SERVE_CHECK_EVERY)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self.signalled is not None or self.stops.changed() is not None:
                self.stopping_since = self.stopping_since or now
                if now - self.stopping_since > self.kill_after:
                    self._send(signal.SIGKILL)
            else:
                gone = self._run_gone(now)
                if gone:
                    self._send(signal.SIGTERM)
                    self._wait_or_kill()
                    raise _RunGone(f"the run that started daemon {self.spec.daemon_id} is gone ({gone}); stopped it")
            if not self.frozen and self._frozen(now):  # stopping or not: a frozen daemon never drains
                log.error("serve job %s: the daemon (pid %d) has not refreshed its registry entry for %.0f s: "
                          "killing it", self.spec.daemon_id, self.child.pid, self.spec.freeze_timeout)  # fmt: skip
                self.frozen = True
                self._send(signal.SIGKILL)

    def _run_gone(self, now: float) -> str | None:
        try:
            beat = json.loads(self.run.heartbeat.read_text())
        except (OSError, ValueError):
            beat = None
        if isinstance(beat, dict) and beat.get("session") not in (None, self.session):
            return f"a later run, {beat.get('session')}, owns the run folder"
        if beat != self.last_beat:
            self.last_beat, self.beat_changed = beat, now
        if now - self.beat_changed > self.spec.orphan_timeout:
            return f"its heartbeat {self.run.heartbeat} has not changed for {self.spec.orphan_timeout:.0f} s"
        return None

    def _frozen(self, now: float) -> bool:
        if self.spec.freeze_timeout <= 0:
            return False
        entry = registry.read_entry(self.run, self.spec.daemon_id)
        if entry is None or entry.get("pid") != self.child.pid:
            if self.registered:  # it removed its entry: it is leaving
                return False
            return now - self.started > self.spec.freeze_timeout + timing.START_GRACE  # stuck while starting?
        self.registered = True
        return registry.heartbeat_age(entry) > self.spec.freeze_timeout

    def _send(self, number: int) -> None:
        try:
            os.kill(self.child.pid, number)
        except ProcessLookupError:
            pass

    def _wait_or_kill(self) -> None:
        try:
            self.child.wait(timeout=self.kill_after)
        except subprocess.TimeoutExpired:
            self._send(signal.SIGKILL)
            self.child.wait()


def _write_final(run: RunDir, stats_output: Path, stats: dict) -> None:
    """The serve job's output, and its copy in the history of this attempt (``history.run_history``)."""
    write_stats(run.attempt_stats(stats["session"], stats["daemon_id"]), stats)
    write_stats(stats_output, stats)


def _open_attempts_log(path: Path | None, attempt: int, session: str, daemon_id: str) -> IO[bytes] | None:
    """The attempts log, emptied at a run's first attempt, with a header line for this attempt (None if no
    path was given, or it cannot be written: the job's own log still has the lines)."""
    if path is None:
        return None
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "wb" if attempt == 1 else "ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"=== {stamp} {daemon_id}: attempt {attempt} of run {session} on {socket.gethostname()} ===\n"
                     .encode())  # fmt: skip
        handle.flush()
        return handle
    except OSError as error:
        _say(f"virnucpro serve-job: cannot write {path}: {error.strerror}")
        return None


def _copy_lines(source: IO[bytes], targets: list[IO[bytes] | None], last_line: list[bytes]) -> None:
    """Copy the daemon's log lines to each target as they come (a target that fails is dropped); keep the
    last one in ``last_line``."""
    live = [target for target in targets if target is not None]
    for line in iter(source.readline, b""):
        last_line[:] = [line]
        for target in list(live):
            try:
                target.write(line)
                target.flush()
            except (OSError, ValueError):
                live.remove(target)
    source.close()


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
    return [event for event in run.read_events() if event.get("session") == session
            and event.get("daemon") == daemon_id and event.get("event") != "serve_started"]  # fmt: skip


def _say(message: str) -> None:
    """One line on stderr (the job's log), if it can be written: a full log disk must not end the job."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def _reason(last_line: list[bytes], code: int) -> str:
    """Why a daemon could not start: its last line ("virnucpro serve: error: ..."), else its exit status."""
    text = last_line[0].decode(errors="replace").strip() if last_line else ""
    return text.split("error: ", 1)[-1] if text else _describe_exit(code)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
