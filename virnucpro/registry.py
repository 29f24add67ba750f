"""The daemon registry: one small JSON file per daemon under ``<run_dir>/registry/`` (folder 0700, files 0600).

An entry holds ``daemon_id, endpoint, pid, host, model, device, precision, state, reason, started``.
``state`` is ``loading``, ``ready``, ``stopping`` or ``failed`` (then ``reason`` says why).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def registry_dir(run_dir: Path) -> Path:
    """The registry folder of a run, created private (0700) if needed."""
    directory = Path(run_dir) / "registry"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory


def write_entry(run_dir: Path, entry: dict) -> Path:
    """Write (or replace) a daemon's entry atomically; returns its path."""
    directory = registry_dir(run_dir)
    path = directory / f"{entry['daemon_id']}.json"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(entry, stream, indent=1)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_entry(run_dir: Path, daemon_id: str) -> dict | None:
    """One daemon's entry, or None if it has none (or an unreadable one)."""
    path = Path(run_dir) / "registry" / f"{daemon_id}.json"
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable registry entry %s: %s", path, error)
        return None
    return entry if isinstance(entry, dict) and entry.get("daemon_id") == daemon_id else None


def remove_entry(run_dir: Path, daemon_id: str) -> None:
    (Path(run_dir) / "registry" / f"{daemon_id}.json").unlink(missing_ok=True)


def list_entries(run_dir: Path, model: str | None = None) -> list[dict]:
    """Entries of live daemons (and of failed ones, which record why), optionally of one model.

    The entry of a daemon that died on this host without removing it is deleted here.
    """
    directory = Path(run_dir) / "registry"
    if not directory.is_dir():
        return []
    entries = []
    for path in sorted(directory.glob("*.json")):
        entry = read_entry(run_dir, path.stem)
        if entry is None or (model is not None and entry.get("model") != model):
            continue
        if entry.get("state") != "failed" and not is_alive(entry):
            log.info("removing the entry of daemon %s (pid %s is gone)", entry["daemon_id"], entry.get("pid"))
            path.unlink(missing_ok=True)
            continue
        entries.append(entry)
    return entries


def is_alive(entry: dict) -> bool:
    """Whether the daemon's process exists: checked on this host; trusted on another (until a ping fails)."""
    if entry.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(entry["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (KeyError, TypeError, ValueError):
        return False
    return True
