"""The run folder (config key ``run_dir``, default ``.virnucpro``): the one place that names its paths.

Everything the daemons, their clients, the serve jobs and the workflow's main process share lives
here (docs/daemons.md, "Run folder"):

    registry/<daemon_id>.json   one entry per daemon (0700 folder, 0600 files)
    sockets/<daemon_id>.sock    ipc endpoints (0700)
    keys/{server,client}.key    the run's CURVE keys for tcp (0700 folder, 0600 files)
    requests/<request_id>.json  cross-daemon locks and ``done`` records of shards (0700)
    failures.tsv                the failure manifest (and failures.tsv.lock, its lock)
    stop                        the stop token: a new content tells every daemon to stop
    heartbeat                   the running workflow's heartbeat (JSON, rewritten every few seconds)
    settings.json               the running workflow's settings for its jobs (timeouts, policies)
    events.jsonl                daemon lifecycle events (lost, frozen, restarted), one JSON per line
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from virnucpro import atomic

SESSION_VARIABLE = "VIRNUCPRO_SESSION"  # the workflow run (session) a job belongs to, set by its main process


def private_dir(path: Path) -> Path:
    """A folder only its owner can enter (0700), created if needed."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: Path | str):
        object.__setattr__(self, "root", Path(root))

    # --- daemons -------------------------------------------------------------------------------
    @property
    def registry(self) -> Path:
        return self.root / "registry"

    def entry(self, daemon_id: str) -> Path:
        return self.registry / f"{daemon_id}.json"

    @property
    def sockets(self) -> Path:
        return self.root / "sockets"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    def key(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    @property
    def requests(self) -> Path:
        return self.root / "requests"

    def request_record(self, request_id: str) -> Path:
        return self.requests / f"{request_id}.json"

    # --- shared by the run ---------------------------------------------------------------------
    @property
    def failures(self) -> Path:
        return self.root / "failures.tsv"

    @property
    def stop_file(self) -> Path:
        return self.root / "stop"

    @property
    def heartbeat(self) -> Path:
        return self.root / "heartbeat"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    # --- operations on those paths -------------------------------------------------------------
    def read_stop_token(self, stop_file: Path | None = None) -> bytes | None:
        """The stop file's content (None if there is none, or it cannot be read)."""
        return read_token(stop_file or self.stop_file)

    def write_stop_token(self, stop_file: Path | None = None) -> None:
        """Replace the stop file's content by a token never written before: every daemon watching it stops."""
        atomic.write_text(stop_file or self.stop_file, f"stop {time.time():.6f} {secrets.token_hex(16)}\n")

    def read_settings(self) -> dict:
        """The running workflow's settings, for a job of that run: empty unless this process belongs to the
        session that wrote them (``$VIRNUCPRO_SESSION``, which the workflow's jobs inherit)."""
        session = os.environ.get(SESSION_VARIABLE)
        try:
            settings = json.loads(self.settings.read_text())
        except (OSError, ValueError):
            return {}
        return settings if isinstance(settings, dict) and session and settings.get("session") == session else {}

    def write_settings(self, settings: dict) -> None:
        atomic.write_json(self.settings, settings)

    def record_event(self, **event: object) -> None:
        """Append one lifecycle event (with its time) to ``events.jsonl``; one line per write, so concurrent
        writers never interleave."""
        line = json.dumps({"time": round(time.time(), 3), **event}) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line.encode())
        finally:
            os.close(descriptor)

    def read_events(self) -> list[dict]:
        try:
            lines = self.events.read_text().splitlines()
        except OSError:
            return []
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def read_token(path: Path | None) -> bytes | None:
    """The content of a stop file (None if there is none, or it cannot be read)."""
    try:
        return Path(path).read_bytes() if path is not None else None
    except OSError:
        return None
