"""The failure manifest: one TSV line per thing that could not be done, appended safely by many processes.

Schema (tab-separated, one header line, UTF-8):
``time sample stage shard sequence_id error_class message attempts daemon``.
``time`` is UTC ISO 8601; a field unknown to the writer is empty. Inside a field, backslash, tab,
newline and carriage return are written as ``\\\\``, ``\\t``, ``\\n`` and ``\\r``; ``read_failures``
undoes that.
"""

from __future__ import annotations

import fcntl
import os
from datetime import datetime, timezone
from pathlib import Path

from virnucpro.errors import UserError

MANIFEST_COLUMNS = ("time", "sample", "stage", "shard", "sequence_id", "error_class", "message", "attempts", "daemon")

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
    """Append one failure line (missing fields empty, ``time`` now), writing the header if the file is new."""
    unknown = set(fields) - set(MANIFEST_COLUMNS)
    if unknown:
        raise ValueError(f"unknown manifest field(s): {', '.join(sorted(unknown))}")
    fields.setdefault("time", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    line = "\t".join(escape_field(fields.get(column, "")) for column in MANIFEST_COLUMNS) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        header = "\t".join(MANIFEST_COLUMNS) + "\n" if os.fstat(descriptor).st_size == 0 else ""
        data = (header + line).encode("utf-8")
        while data:
            data = data[os.write(descriptor, data) :]
    finally:
        os.close(descriptor)


def read_failures(path: Path) -> list[dict[str, str]]:
    """All entries of a manifest as dicts keyed by ``MANIFEST_COLUMNS``; a missing file has none."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            lines = handle.read().split("\n")[:-1]
    except FileNotFoundError:
        return []
    if not lines:
        return []
    if tuple(lines[0].split("\t")) != MANIFEST_COLUMNS:
        raise UserError(f"{path}: not a failure manifest (first line must be the header: {' '.join(MANIFEST_COLUMNS)})")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(MANIFEST_COLUMNS):
            raise UserError(f"{path}, line {number}: {len(values)} fields, expected {len(MANIFEST_COLUMNS)}")
        entries.append({column: unescape_field(value) for column, value in zip(MANIFEST_COLUMNS, values)})
    return entries
