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

The failure manifest (``virnucpro.manifest``) is the one exception: its free-text messages may hold
tabs and newlines, so it escapes them; it is read with ``read_failures``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from virnucpro.errors import UserError

_FORBIDDEN = ("\t", "\n", "\r")


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


def read_rows(path: Path, columns: Iterable[str], *, what: str = "table") -> Iterator[dict[str, str]]:
    """The rows of a table as dicts keyed by its header, one at a time (the file is never held whole).

    The header must have every name in ``columns``; a row with another number of fields than the
    header is refused naming the line. A missing file or header is a UserError naming ``what``."""
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
            for number, line in enumerate(handle, start=2):
                fields = split_row(line)
                if len(fields) != width:
                    raise UserError(f"{path}: line {number}: {len(fields)} tab-separated fields, expected {width}")
                yield dict(zip(header, fields))
        except UnicodeDecodeError as error:
            raise UserError(f"{path}: not UTF-8 text ({error})") from None
