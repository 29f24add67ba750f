"""A run's history across its attempts (docs/daemons.md, "Run statistics"): what each attempt's daemons did
and lost, so that a resumed run's ``run_stats.json`` tells the whole story, not its last attempt's.

An attempt is one ``snakemake`` invocation (a session). The run's watch records its start and end in
``RUN/events.jsonl`` (``attempt_started``, ``attempt_ended``); its serve jobs leave a copy of their daemons'
statistics in ``RUN/sessions/<session>/``. The attempts of the current run are those after the last
attempt that ended well; at a run's start the watch forgets older ones (``prune_history``).
"""

from __future__ import annotations

import json
import shutil

from virnucpro import atomic
from virnucpro.serving.rundir import RunDir
from virnucpro.serving.stats import read_stats

ATTEMPT_STARTED, ATTEMPT_ENDED = "attempt_started", "attempt_ended"


def attempts_of_run(run: RunDir) -> list[str]:
    """The sessions (attempts) of the current run, oldest first: those after the last attempt that ended well
    (a run that succeeded is over; the next attempt starts a new one)."""
    attempts: list[str] = []
    for event in run.read_events():
        if event.get("event") == ATTEMPT_STARTED and isinstance(event.get("session"), str):
            attempts.append(event["session"])
        elif event.get("event") == ATTEMPT_ENDED and event.get("ok") and event.get("session") in attempts:
            attempts = attempts[attempts.index(event["session"]) + 1 :]
    return attempts


def prune_history(run: RunDir) -> None:
    """At a run's start: forget the attempts of runs that ended well (their events, their session folders);
    what the current run's attempts recorded stays for its statistics."""
    keep = set(attempts_of_run(run))
    events = [event for event in run.read_events() if event.get("session") in keep]
    if run.events.exists():
        atomic.write_text(run.events, "".join(json.dumps(event) + "\n" for event in events))
    if run.sessions.is_dir():
        for folder in run.sessions.iterdir():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)


def run_history(run: RunDir) -> list[dict]:
    """Every attempt of the current run, oldest first: its session, start, end, outcome, the statistics of
    its daemons (each with ``session``) and its events."""
    events = run.read_events()
    attempts = []
    for session in attempts_of_run(run):
        mine = [event for event in events if event.get("session") == session]
        started = next((event for event in mine if event.get("event") == ATTEMPT_STARTED), {})
        ended = next((event for event in mine if event.get("event") == ATTEMPT_ENDED), None)
        daemons = [{**read_stats(path), "session": session}
                   for path in sorted(run.session_dir(session).glob("*.stats.json"))]  # fmt: skip
        attempts.append({
            "session": session, "host": started.get("host"), "workdir": started.get("workdir"),
            "started": started.get("time"), "ended": ended.get("time") if ended else None,
            "outcome": ("succeeded" if ended.get("ok") else "failed") if ended else "running or killed",
            "daemons": daemons, "events": [event for event in mine if event.get("event") not in
                                           (ATTEMPT_STARTED, ATTEMPT_ENDED, "serve_started")],
        })  # fmt: skip
    return attempts
