"""Streaming reading of reads (FASTA or FASTQ, plain or gzip, all detected by content) and writing
FASTA records."""

from __future__ import annotations

import gzip
import io
import itertools
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from virnucpro.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
_BOM = "\ufeff"
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as surrogateescape decodes them


@dataclass(frozen=True)
class FastaRecord:
    """One record (FASTA, or FASTQ without its quality): `id` is the header up to the first
    whitespace, `description` the whole header without '>' (or '@'), `number` the record's
    1-based position in the file."""

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
        raise UserError(
            f"{path}: cannot read the file ({exc.strerror or exc}). Check the path and its permissions."
        ) from exc


class _Where:
    """Where a reader is, for its messages: the file, and the record being read once there is one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.number = 0
        self.record_id = ""

    def __call__(self, line_no: int) -> str:
        if self.number:
            return f"{self.path}: record {self.number} ('{self.record_id}'), line {line_no}"
        return f"{self.path}: line {line_no}"


def _text_lines(path: Path, where: _Where, kind: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its line ending) of a plain or gzip file, read as a stream.

    Every line-ending convention ends a line: LF, CRLF and a lone CR (old Mac files), mixed in any way.
    Truncated or corrupt gzip data, NUL bytes and text that is not UTF-8 raise UserError; a leading
    byte-order mark is dropped."""
    line_no = 0
    # Universal newlines (newline=None) split on LF, CRLF and CR alike, also across read buffers. Bytes
    # that are not UTF-8 become lone surrogates (surrogateescape), found below line by line.
    with _open_bytes(path) as handle, io.TextIOWrapper(handle, "utf-8", "surrogateescape", newline=None) as text:
        lines = iter(text)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise UserError(
                    f"{where(line_no + 1)}: the gzip data is truncated or corrupt ({exc}). "
                    "Re-create or re-download the file."
                ) from exc
            line_no += 1
            if "\0" in line:
                raise UserError(
                    f"{where(line_no)}: binary data (NUL byte), not {kind} text. "
                    f"Give a plain or gzip-compressed {kind} file."
                )
            if not line.isascii() and _NOT_UTF8.search(line):
                raise UserError(
                    f"{where(line_no)}: binary data (not UTF-8 text), not {kind}. "
                    f"Give a plain or gzip-compressed {kind} file."
                )
            if line_no == 1 and line.startswith(_BOM):
                line = line[1:]
            yield line_no, line.rstrip("\n")


def _header(text: str, path: Path, number: int, line_no: int, marker: str) -> tuple[str, str]:
    """(read ID, description) of a header line; a header without an ID raises UserError."""
    description = text[1:].strip()
    words = description.split(None, 1)
    if not words:
        raise UserError(
            f"{path}: record {number}, line {line_no}: the header has no read ID. "
            f"Put an ID right after '{marker}' on every header line."
        )
    return words[0], description


def read_fasta(path: Path) -> Iterator[FastaRecord]:
    """Yield the records of a plain or gzip FASTA file one at a time.

    Sequence lines are joined with all whitespace removed; blank lines, line endings (LF or
    CRLF) and a leading UTF-8 byte-order mark are ignored. Text before the first header, a
    header without an ID, binary content and truncated or corrupt gzip data raise UserError.
    """
    path = Path(path)
    where = _Where(path)
    return _parse_fasta(path, _text_lines(path, where, "FASTA"), where, "FASTA")


def read_reads(path: Path) -> Iterator[FastaRecord]:
    """Yield the reads of a FASTA or FASTQ file, plain or gzip, one at a time.

    The format is detected by content: a file whose first non-blank line starts with '@' is FASTQ,
    any other is read as FASTA (``read_fasta``). FASTQ records may span several lines: sequence
    lines up to a line starting with '+', then quality lines until they hold as many letters as the
    sequence. Qualities are checked for their length only and then dropped, so a read gives the
    same record as FASTA or as FASTQ. A truncated record raises UserError naming the file and line.
    """
    path = Path(path)
    where = _Where(path)
    kind = "FASTA or FASTQ"
    lines = _text_lines(path, where, kind)
    head = []
    for line_no, text in lines:
        head.append((line_no, text))
        if text.strip():
            break
    stream = itertools.chain(head, lines)
    if head and head[-1][1].startswith("@"):
        yield from _parse_fastq(path, stream, where)
    else:
        yield from _parse_fasta(path, stream, where, kind)


def _parse_fasta(path: Path, lines: Iterator[tuple[int, str]], where: _Where, kind: str) -> Iterator[FastaRecord]:
    number = 0
    record_id = description = ""
    parts: list[str] = []
    for line_no, text in lines:
        if text.startswith(">"):
            if number:
                yield FastaRecord(record_id, description, "".join(parts), number)
            number += 1
            record_id, description = _header(text, path, number, line_no, ">")
            where.number, where.record_id = number, record_id
            parts = []
            continue
        sequence = "".join(text.split())
        if not sequence:
            continue
        if not number:
            hint = " (or, for FASTQ, an '@' header line)" if "FASTQ" in kind else ""
            raise UserError(
                f"{where(line_no)}: text before the first '>' header. A FASTA file must start "
                f"with a '>' header line{hint}; check that this is a {kind} file."
            )
        parts.append(sequence)
    if number:
        yield FastaRecord(record_id, description, "".join(parts), number)


def _parse_fastq(path: Path, lines: Iterator[tuple[int, str]], where: _Where) -> Iterator[FastaRecord]:
    number = 0
    line_no = 0
    lines = iter(lines)
    for line_no, text in lines:
        if not text.strip():
            continue
        if not text.startswith("@"):
            after = f" after record {number} ('{where.record_id}')" if number else ""
            raise UserError(
                f"{path}: line {line_no}: expected an '@' header line{after}, found other text. "
                "A FASTQ record is an '@' header, sequence lines, a '+' line and as many "
                "quality letters as sequence letters; check that the file is complete FASTQ."
            )
        number += 1
        record_id, description = _header(text, path, number, line_no, "@")
        where.number, where.record_id = number, record_id
        parts: list[str] = []
        for line_no, text in lines:
            if text.startswith("+"):
                break
            if text.startswith("@"):
                raise UserError(
                    f"{where(line_no)}: an '@' header before the record's '+' line: the record "
                    "is truncated. Re-create or re-download the file."
                )
            parts.append("".join(text.split()))
        else:
            raise UserError(
                f"{where(line_no)}: the file ends before the record's '+' line: the record is "
                "truncated. Re-create or re-download the file."
            )
        repeated = text[1:].strip()
        if repeated and repeated != description:
            raise UserError(
                f"{where(line_no)}: the '+' line names '{repeated}', not the record's header "
                f"'{description}'. Check that the file is intact FASTQ."
            )
        sequence = "".join(parts)
        quality, quality_lines, first_quality_line = 0, 0, line_no + 1
        header_like = None  # (quality letters, lines) before the first quality line that starts with '@'
        while quality < len(sequence):
            try:
                line_no, text = next(lines)
            except StopIteration:
                raise UserError(
                    f"{where(line_no)}: the file ends after {quality} of the {len(sequence)} "
                    "quality letters: the record is truncated. Re-create or re-download the "
                    "file."
                ) from None
            if header_like is None and text.startswith("@"):
                header_like = (quality, quality_lines, line_no)
            quality += len("".join(text.split()))
            quality_lines += 1
        if quality > len(sequence):
            raise UserError(_quality_mismatch(where(first_quality_line), quality, quality_lines, len(sequence),
                                              header_like))  # fmt: skip
        yield FastaRecord(record_id, description, sequence, number)


def _quality_mismatch(where: str, quality: int, lines: int, length: int, header_like: tuple | None) -> str:
    """The message for a FASTQ record whose quality lines add up to more letters than its sequence has.

    When a quality line starts with '@', the quality before it was likely short and that line the next
    record's header: the message gives the letters before it."""
    hint = ""
    if header_like is not None:
        quality, lines, line_no = header_like
        hint = f" (line {line_no}, read as quality, starts with '@': is it the next record's header?)"
    if lines == 0:
        has = f"the record has no quality line (its sequence has {length} letters)"
    else:
        lines_have = "quality line has" if lines == 1 else "quality lines have"
        has = f"the {lines_have} {quality} letters, the sequence {length}"
    return f"{where}: {has}{hint}. Check that the file is intact FASTQ."


def write_fasta_record(handle: TextIO, record_id: str, sequence: str) -> None:
    """Write a header line and the sequence on a single line."""
    handle.write(f">{record_id}\n{sequence}\n")
