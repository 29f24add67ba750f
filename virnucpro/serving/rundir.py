"""The run folder (config key ``run_dir``, default ``.virnucpro``): the one place that names its paths.

Everything the daemons, their clients, the serve jobs and the workflow's main process share lives
here (docs/daemons.md, "Run folder"):

    registry/<daemon_id>.json   one entry per daemon (0700 folder, 0600 files)
    sockets/<daemon_id>.sock    ipc endpoints (0700)
    keys/{server,client}.key    the run's CURVE keys for tcp (0700 folder, 0600 files)
    requests/<request_id>.json  cross-daemon locks and ``done`` records of shards (0700)
    failures.tsv                the failure manifest (and failures.tsv.lock, its lock)
    stop, stop-<model>          stop tokens: a new content tells every daemon (of that model) to stop
    heartbeat                   the running workflow's heartbeat (JSON, rewritten every few seconds)
    settings.json               the running workflow's settings for its jobs (daemon specs, timeouts)
    events.jsonl                lifecycle events of the workflow runs (attempts, daemons lost, frozen)
    sessions/<session>/         one workflow run (attempt): a copy of its daemons' statistics
    devices/<device>.lock       in-process embedding jobs of a run take turns on a GPU
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
        """The run's stop token: every daemon of the run obeys it."""
        return self.root / "stop"

    def model_stop_file(self, model: str) -> Path:
        """The stop token of one model's daemons (the run stops a model's daemons once it has no work left)."""
        return self.root / f"stop-{model}"

    def stop_files(self, model: str | None = None) -> tuple[Path, ...]:
        """The stop files a daemon of ``model`` obeys (the run's, then its model's)."""
        return (self.stop_file,) if model is None else (self.stop_file, self.model_stop_file(model))

    @property
    def heartbeat(self) -> Path:
        return self.root / "heartbeat"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def sessions(self) -> Path:
        return self.root / "sessions"

    def session_dir(self, session: str) -> Path:
        return self.sessions / session

    def attempt_stats(self, session: str, daemon_id: str) -> Path:
        """A copy of a daemon's statistics in the history of one workflow run (attempt)."""
        return self.session_dir(session) / f"{daemon_id}.stats.json"

    def device_lock(self, device: str) -> Path:
        return self.root / "devices" / f"{device.replace(':', '-')}.lock"

    # --- operations on those paths -------------------------------------------------------------
    def read_stop_token(self, stop_file: Path | None = None) -> bytes | None:
        """The stop file's content (None if there is none, or it cannot be read)."""
        return read_token(stop_file or self.stop_file)

    def write_stop_token(self, stop_file: Path | None = None) -> None:
        """Replace the stop file's content by a token never written before: every daemon watching it stops."""
        atomic.write_text(stop_file or self.stop_file, f"stop {time.time():.6f} {secrets.token_hex(16)}\n")

    def stop_tokens(self, model: str | None = None, baseline: dict | None = None) -> StopTokens:
        """The stop files a daemon of ``model`` obeys, against ``baseline`` (a workflow run's recorded
        ``stop_baselines``: name -> token), else against their contents now."""
        files = self.stop_files(model)
        if baseline is None:
            return StopTokens(files)
        return StopTokens(files, tuple(_token_of(baseline.get(path.name)) for path in files))

    def stop_baselines(self, models: tuple[str, ...]) -> dict[str, str]:
        """The contents of the run's and the models' stop files now (file name -> token), for the settings."""
        return {
            path.name: (read_token(path) or b"").decode()
            for path in (self.stop_file, *map(self.model_stop_file, models))
        }

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


class StopTokens:
    """Stop files and their contents at a baseline: a new content in any of them means stop."""

    def __init__(self, files: tuple[Path, ...], baseline: tuple[bytes | None, ...] | None = None):
        self.files = tuple(Path(path) for path in files)
        self.baseline = tuple(baseline) if baseline is not None else self.read()

    def read(self) -> tuple[bytes | None, ...]:
        return tuple(read_token(path) for path in self.files)

    def changed(self) -> Path | None:
        """The first stop file whose content is no longer its baseline's, or None."""
        for path, now, then in zip(self.files, self.read(), self.baseline):
            if (now or b"") != (then or b""):
                return path
        return None


def _token_of(text: object) -> bytes | None:
    return text.encode() if isinstance(text, str) and text else None


def read_token(path: Path | None) -> bytes | None:
    """The content of a stop file (None if there is none, or it cannot be read)."""
    try:
        return Path(path).read_bytes() if path is not None else None
    except OSError:
        return None
