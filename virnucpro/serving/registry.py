"""The daemon registry: one small JSON file per daemon in the run folder (see docs/daemons.md).

An entry holds ``daemon_id, endpoint, server_key, pid, host, address, model, fingerprint, device,
precision, state, reason, started, heartbeat`` (and ``gpus``, the ``CUDA_VISIBLE_DEVICES`` the daemon
saw). ``state`` is a ``protocol.State``; ``failed`` comes with the ``reason``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from virnucpro import atomic
from virnucpro.serving.protocol import State
from virnucpro.serving.rundir import RunDir, private_dir

log = logging.getLogger(__name__)

STALE_AFTER = 120.0  # seconds without a heartbeat after which a daemon on another host counts as gone


def _run_dir(run_dir: RunDir | Path | str) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def write_entry(run_dir: RunDir | Path | str, entry: dict) -> Path:
    """Write (or replace) a daemon's entry atomically; returns its path."""
    run = _run_dir(run_dir)
    private_dir(run.registry)
    path = run.entry(entry["daemon_id"])
    atomic.write_json(path, entry, permissions=0o600)
    return path


def read_entry(run_dir: RunDir | Path | str, daemon_id: str) -> dict | None:
    """One daemon's entry, or None if it has none (or an unreadable one)."""
    path = _run_dir(run_dir).entry(daemon_id)
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable registry entry %s: %s", path, error)
        return None
    return entry if isinstance(entry, dict) and entry.get("daemon_id") == daemon_id else None


def remove_entry(run_dir: RunDir | Path | str, daemon_id: str) -> None:
    _run_dir(run_dir).entry(daemon_id).unlink(missing_ok=True)


def list_entries(run_dir: RunDir | Path | str, model: str | None = None) -> list[dict]:
    """Entries of live daemons (and of failed ones, which record why), optionally of one model.

    The entry of a daemon that died on this host without removing it is deleted here; that of a
    daemon on another host whose heartbeat is older than ``STALE_AFTER`` is skipped (its host may be gone).
    """
    run = _run_dir(run_dir)
    if not run.registry.is_dir():
        return []
    entries = []
    for path in sorted(run.registry.glob("*.json")):
        entry = read_entry(run, path.stem)
        if entry is None or (model is not None and entry.get("model") != model):
            continue
        if entry.get("state") != State.FAILED and not is_alive(entry):
            log.info("removing the entry of daemon %s (pid %s is gone)", entry["daemon_id"], entry.get("pid"))
            path.unlink(missing_ok=True)
            continue
        if entry.get("state") != State.FAILED and is_stale(entry):
            log.debug("skipping daemon %s on %s: no heartbeat for %.0f s", entry["daemon_id"], entry.get("host"),
                      STALE_AFTER)  # fmt: skip
            continue
        entries.append(entry)
    return entries


def is_alive(entry: dict) -> bool:
    """Whether the daemon's process exists: checked on this host; trusted on another (until a ping fails)."""
    if entry.get("host") != socket.gethostname():
        return True
    return pid_alive(entry.get("pid"))


def pid_alive(pid: object) -> bool:
    """Whether a process of this ID exists on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def heartbeat_age(entry: dict, now: float | None = None) -> float:
    """Seconds since the daemon last refreshed its entry (infinite if it never did)."""
    heartbeat = entry.get("heartbeat")
    if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool):
        return float("inf")
    return (time.time() if now is None else now) - heartbeat


def is_stale(entry: dict, now: float | None = None) -> bool:
    """Whether a daemon on another host has not refreshed its entry for ``STALE_AFTER`` seconds."""
    if entry.get("host") == socket.gethostname():
        return False
    return heartbeat_age(entry, now) > STALE_AFTER
