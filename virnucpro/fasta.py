"""Streaming FASTA reading (plain or gzip, detected by content) and writing FASTA records."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, TextIO

from virnucpro.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
_BOM = "\ufeff"


@dataclass(frozen=True)
class FastaRecord:
    """One FASTA record: `id` is the header up to the first whitespace, `description` the whole
    header without '>', `number` the record's 1-based position in the file."""

    id: str
    description: str
    sequence: str
    number: int


def is_gzip(path: Path) -> bool:
    """Whether the file starts with the gzip magic bytes (whatever its name)."""
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _open_bytes(path: Path) -> BinaryIO:
    try:
        compressed = is_gzip(path)
        return gzip.open(path, "rb") if compressed else open(path, "rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror or exc}). "
                        "Check the path and its permissions.") from exc


def read_fasta(path: Path) -> Iterator[FastaRecord]:
    """Yield the records of a plain or gzip FASTA file one at a time.

    Sequence lines are joined with all whitespace removed; blank lines, line endings (LF or
    CRLF) and a leading UTF-8 byte-order mark are ignored. Text before the first header, a
    header without an ID, binary content and truncated or corrupt gzip data raise UserError.
    """
    path = Path(path)
    number = 0
    record_id = description = ""
    parts: list[str] = []
    line_no = 0

    def where() -> str:
        if number:
            return f"{path}: record {number} ('{record_id}'), line {line_no}"
        return f"{path}: line {line_no}"

    with _open_bytes(path) as handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                line_no += 1
                raise UserError(f"{where()}: the gzip data is truncated or corrupt ({exc}). "
                                "Re-create or re-download the file.") from exc
            line_no += 1
            if b"\0" in raw:
                raise UserError(f"{where()}: binary data (NUL byte), not FASTA text. "
                                "Give a plain or gzip-compressed FASTA file.")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{where()}: binary data (not UTF-8 text), not FASTA. "
                                "Give a plain or gzip-compressed FASTA file.") from exc
            if line_no == 1 and text.startswith(_BOM):
                text = text[1:]
            if text.startswith(">"):
                if number:
                    yield FastaRecord(record_id, description, "".join(parts), number)
                number += 1
                description = text[1:].strip()
                words = description.split(None, 1)
                record_id = words[0] if words else ""
                parts = []
                if not record_id:
                    raise UserError(f"{path}: record {number}, line {line_no}: the header has no "
                                    "read ID. Put an ID right after '>' on every header line.")
                continue
            sequence = "".join(text.split())
            if not sequence:
                continue
            if not number:
                raise UserError(f"{where()}: text before the first '>' header. A FASTA file must "
                                "start with a '>' header line; check that this is a FASTA file.")
            parts.append(sequence)
    if number:
        yield FastaRecord(record_id, description, "".join(parts), number)


def write_fasta_record(handle: TextIO, record_id: str, sequence: str) -> None:
    """Write a header line and the sequence on a single line."""
    handle.write(f">{record_id}\n{sequence}\n")
