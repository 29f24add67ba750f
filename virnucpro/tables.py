"""The tab-separated tables the project writes and reads: one format for all of them.

A table is UTF-8 text: a header line, then one line per row; fields are joined by a tab, lines end
with a newline, and there is **no quoting and no escaping**. A field never holds a tab, a newline
or a carriage return, so a line splits back into exactly its fields, whatever else a field holds
(``"``, ``#``, ``,``, ``\\``, non-ASCII letters). Read IDs qualify: an ID is a header's first word, so
it holds no whitespace at all. Writing a field that holds one of the three characters is a bug,
refused with ValueError, never written as a corrupt line.

This is why the csv module is not used: its default dialect quotes a field that starts with ``"`` on
reading (an ID ``"a`` swallowed the following lines), and quotes fields on writing, which the
published tool's plain ``f"{id}\\t..."`` lines never do.

A **counted** table (the intermediates read by a later step: the reads index, the per-shard predictions)
ends with one more line, ``#end<TAB><rows>`` (``format_end``): a copy cut short anywhere, even between
two lines, is found where it is read (``read_rows(..., counted=True)``) or, from its last bytes alone,
before a run starts (``table_damage``). The user-facing tables (``reads.tsv`` ...) have no end line.

The failure manifest (``virnucpro.manifest``) is the one exception: its free-text messages may hold
tabs and newlines, so it escapes them; it is read with ``read_failures``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from virnucpro.errors import UserError

_FORBIDDEN = ("\t", "\n", "\r")
END = "#end"
"""The first field of a counted table's last line; the second is the number of rows above it."""


def format_row(fields: Iterable[object]) -> str:
    """One table line (with its newline) from ``fields`` (each written with ``str``)."""
    texts = [str(field) for field in fields]
    for text in texts:
        if any(char in text for char in _FORBIDDEN):
            raise ValueError(f"a table field cannot hold a tab, newline or carriage return: {text!r}")
    return "\t".join(texts) + "\n"


def split_row(line: str) -> list[str]:
    """The fields of one table line (its line ending removed)."""
    return line.rstrip("\n").rstrip("\r").split("\t")


def format_end(rows: int) -> str:
    """The last line of a counted table of ``rows`` rows."""
    return f"{END}\t{rows}\n"


def end_count(fields: list[str]) -> int | None:
    """The number of rows that a line's ``fields`` say, if they are a counted table's end line."""
    if len(fields) == 2 and fields[0] == END and fields[1].isdigit():
        return int(fields[1])
    return None


def truncated(path: Path, what: str) -> UserError:
    """The error for a counted table that was cut short or damaged."""
    return UserError(f"{path}: the {what} is truncated or corrupt (no end line, or rows missing); "
                     "delete it and run again")  # fmt: skip


def table_damage(path: Path) -> str | None:
    """Why a counted table looks cut short, judged from its last bytes alone (its last line must be its end
    line); None if it looks whole."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 64))
            tail = handle.read()
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    lines = tail.split(b"\n")
    if len(lines) < 2 or lines[-1] != b"" or end_count(lines[-2].decode("utf-8", "replace").split("\t")) is None:
        return "its last line is not its end line"
    return None


def read_rows(
    path: Path, columns: Iterable[str], *, what: str = "table", counted: bool = False
) -> Iterator[dict[str, str]]:
    """The rows of a table as dicts keyed by its header, one at a time (the file is never held whole).

    The header must have every name in ``columns``; a row with another number of fields than the
    header is refused naming the line. A missing file or header is a UserError naming ``what``. A
    ``counted`` table must end with its end line, which counts the rows above it (UserError otherwise,
    raised after the rows read so far)."""
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    with handle:
        try:
            first = handle.readline()
            if not first:
                raise UserError(f"{path}: empty file, expected a {what} with a header line")
            header = split_row(first)
            missing = [column for column in columns if column not in header]
            if missing:
                raise UserError(f"{path}: not a {what}: missing column(s) {', '.join(missing)} in the header line")
            width = len(header)
            rows, end = 0, None
            for number, line in enumerate(handle, start=2):
                fields = split_row(line)
                if counted and (end is not None or not line.endswith("\n")):
                    raise truncated(path, what)  # a line after the end line, or a last line cut short
                if counted and len(fields) != width and (end := end_count(fields)) is not None:
                    continue
                if len(fields) != width:
                    raise UserError(f"{path}: line {number}: {len(fields)} tab-separated fields, expected {width}")
                rows += 1
                yield dict(zip(header, fields))
            if counted and end != rows:
                raise truncated(path, what)
        except UnicodeDecodeError as error:
            raise UserError(f"{path}: not UTF-8 text ({error})") from None
