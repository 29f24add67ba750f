"""The run folder's shared state: the daemon registry and the run's CURVE keys (see docs/daemons.md).

Registry: one small JSON file per daemon under ``<run_dir>/registry/`` (folder 0700, files 0600), with
``daemon_id, endpoint, server_key, pid, host, model, device, precision, state, reason, started, heartbeat``.
``state`` is ``loading``, ``ready``, ``stopping`` or ``failed`` (then ``reason`` says why).
Keys: ``<run_dir>/keys/{server,client}.key`` (folder 0700, files 0600), for the ``tcp://`` transport.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from virnucpro.errors import UserError

log = logging.getLogger(__name__)

STALE_AFTER = 120.0  # seconds without a heartbeat after which a daemon on another host counts as gone
KEY_NAMES = ("server", "client")


def private_dir(path: Path) -> Path:
    """A folder only its owner can enter (0700), created if needed."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def registry_dir(run_dir: Path) -> Path:
    """The registry folder of a run, created private (0700) if needed."""
    return private_dir(Path(run_dir) / "registry")


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

    The entry of a daemon that died on this host without removing it is deleted here; that of a
    daemon on another host whose heartbeat is older than ``STALE_AFTER`` is skipped (its host may be gone).
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
        if entry.get("state") != "failed" and is_stale(entry):
            log.debug("skipping daemon %s on %s: no heartbeat for %.0f s", entry["daemon_id"], entry.get("host"),
                      STALE_AFTER)  # fmt: skip
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
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    return True


def is_stale(entry: dict, now: float | None = None) -> bool:
    """Whether a daemon on another host has not refreshed its entry for ``STALE_AFTER`` seconds."""
    if entry.get("host") == socket.gethostname():
        return False
    heartbeat = entry.get("heartbeat")
    if not isinstance(heartbeat, (int, float)):
        return True
    return (time.time() if now is None else now) - heartbeat > STALE_AFTER


def read_token(path: Path | None) -> bytes | None:
    """The content of a stop file (None if there is none, or it cannot be read)."""
    try:
        return Path(path).read_bytes() if path is not None else None
    except OSError:
        return None


def curve_keys(run_dir: Path, name: str, create: bool = False) -> tuple[bytes, bytes]:
    """The run's CURVE key pair ``name`` (``server`` or ``client``) as Z85 (public, secret).

    With ``create``, a missing pair is made (safely, if several daemons start at once). A key file
    that others may read, or that is missing or unreadable, is a UserError.
    """
    if name not in KEY_NAMES:
        raise ValueError(f"unknown key pair {name!r}")
    directory = private_dir(Path(run_dir) / "keys") if create else Path(run_dir) / "keys"
    path = directory / f"{name}.key"
    if create and not path.exists():
        import zmq

        public, secret = zmq.curve_keypair()
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(handle, "w") as stream:  # mkstemp makes it 0600
                json.dump({"public": public.decode(), "secret": secret.decode()}, stream)
            os.link(temporary, path)  # fails if another process made it first: then use theirs
        except FileExistsError:
            pass
        finally:
            Path(temporary).unlink(missing_ok=True)
    try:
        if os.stat(path).st_mode & 0o077 or os.stat(directory).st_mode & 0o077:
            raise UserError(f"{path}: key file or folder readable by others; make them private (chmod 600, 700)")
        data = json.loads(path.read_text())
        public, secret = data["public"].encode(), data["secret"].encode()
    except FileNotFoundError:
        raise UserError(f"{path}: no CURVE key for the tcp transport (a tcp daemon of this run writes it)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: unreadable CURVE key file ({error})") from None
    if len(public) != 40 or len(secret) != 40:
        raise UserError(f"{path}: unreadable CURVE key file (keys must be 40 Z85 characters)")
    return public, secret
