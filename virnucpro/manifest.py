"""The failure manifest: what could not be done, as it stands now, shared safely by many processes.

Schema (tab-separated, one header line, UTF-8):
``time sample stage shard sequence_id error_class message attempts daemon``.
``time`` is UTC ISO 8601; a field unknown to the writer is empty. Inside a field, backslash, tab,
newline and carriage return are written as ``\\\\``, ``\\t``, ``\\n`` and ``\\r``; ``read_failures``
undoes that.

The manifest says what is true now: ``record_embed_failures`` replaces every entry of one shard and
stage by that shard's latest outcome (none once it is embedded). Writers hold an exclusive ``flock`` on
``<manifest>.lock`` and append in one write, or replace the file atomically when entries go; readers
hold a shared one, so they always see whole entries.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from virnucpro import atomic
from virnucpro.errors import UserError

MANIFEST_COLUMNS = ("time", "sample", "stage", "shard", "sequence_id", "error_class", "message", "attempts", "daemon")
HEADER = "\t".join(MANIFEST_COLUMNS) + "\n"

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_field(value: object) -> str:
    """One value as a TSV field: text with backslash, tab, newline and CR escaped."""
    return "".join(_ESCAPES.get(char, char) for char in str(value))


def unescape_field(field: str) -> str:
    """Undo ``escape_field``."""
    out, chars = [], iter(field)
    for char in chars:
        out.append(_UNESCAPES.get(next(chars, ""), "\\") if char == "\\" else char)
    return "".join(out)


def append_failure(path: Path, **fields: object) -> None:
    """Add one entry (missing fields empty, ``time`` now), creating the manifest if needed."""
    with _locked(path):
        _append(Path(path), [_entry(fields)])


def record_embed_failures(
    path: Path,
    *,
    sample: str,
    stage: str,
    shard: str,
    daemon: str = "",
    shard_error: tuple[str, str, int] | None = None,
    sequence_failures: dict[str, str] | None = None,
) -> None:
    """Make the manifest's entries for one shard's embedding (``sample``, ``stage``, ``shard``) its latest
    outcome: ``shard_error`` (error class, message, attempts) when the shard could not be embedded, else
    one ``OutOfMemoryError`` entry per sequence of ``sequence_failures`` (ID -> reason), or none at all."""
    key = {"sample": sample, "stage": stage, "shard": shard}
    new = []
    if shard_error is not None:
        error_class, message, attempts = shard_error
        new.append(_entry({**key, "error_class": error_class, "message": message, "attempts": attempts,
                           "daemon": daemon}))  # fmt: skip
    for sequence_id, reason in (sequence_failures or {}).items():
        new.append(_entry({**key, "sequence_id": sequence_id, "error_class": "OutOfMemoryError", "message": reason,
                           "attempts": 1, "daemon": daemon}))  # fmt: skip
    path = Path(path)
    if not new and not path.exists():
        return
    with _locked(path):
        entries = _read(path)
        kept = [entry for entry in entries if any(entry[name] != value for name, value in key.items())]
        if len(kept) == len(entries):
            _append(path, new)  # nothing to take back: no rewrite
        else:
            _write(path, kept + new)


def read_failures(path: Path) -> list[dict[str, str]]:
    """All entries of a manifest as dicts keyed by ``MANIFEST_COLUMNS``; a missing file has none. Under a
    shared lock (``<manifest>.lock``, created if needed): for the run's manifest, which daemons may be writing."""
    if not Path(path).exists():
        return []
    with _locked(path, shared=True):
        return _read(Path(path))


def read_failure_table(path: Path) -> list[dict[str, str]]:
    """The entries of a finished table in the manifest's format that no process writes any more (a sample's
    ``failures.tsv``), read without a lock, so that nothing appears beside it; a missing file has none."""
    return _read(Path(path))


def _entry(fields: dict) -> dict[str, str]:
    unknown = set(fields) - set(MANIFEST_COLUMNS)
    if unknown:
        raise ValueError(f"unknown manifest field(s): {', '.join(sorted(unknown))}")
    fields = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
    return {column: str(fields.get(column, "")) for column in MANIFEST_COLUMNS}


@contextmanager
def _locked(path: Path, shared: bool = False) -> Iterator[None]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _append(path: Path, entries: list[dict[str, str]]) -> None:
    """Append entries in one write (the header first if the file is new or empty); under the lock."""
    if not entries:
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        header = HEADER if os.fstat(descriptor).st_size == 0 else ""
        data = (header + "".join(_line(entry) for entry in entries)).encode("utf-8")
        while data:
            data = data[os.write(descriptor, data) :]
    finally:
        os.close(descriptor)


def _line(entry: dict[str, str]) -> str:
    return "\t".join(escape_field(entry[column]) for column in MANIFEST_COLUMNS) + "\n"


def _read(path: Path) -> list[dict[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    except FileNotFoundError:
        return []
    if not lines:
        return []
    if lines[0] + "\n" != HEADER:
        raise UserError(f"{path}: not a failure manifest (first line must be the header: {' '.join(MANIFEST_COLUMNS)})")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(MANIFEST_COLUMNS):
            raise UserError(f"{path}, line {number}: {len(values)} fields, expected {len(MANIFEST_COLUMNS)}")
        entries.append({column: unescape_field(value) for column, value in zip(MANIFEST_COLUMNS, values)})
    return entries


def _write(path: Path, entries: list[dict[str, str]]) -> None:
    atomic.write_text(path, HEADER + "".join(_line(entry) for entry in entries))
