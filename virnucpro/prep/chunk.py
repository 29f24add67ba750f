"""Cut reads into chunks of the expected length, with the published overlap rule."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from virnucpro.atomic import atomic_output
from virnucpro.errors import UserError
from virnucpro.fasta import read_reads, write_fasta_record
from virnucpro.tables import format_end, format_row

EXPECTED_LENGTHS = (300, 500)
READS_TABLE_COLUMNS = ("read_id", "length", "chunks", "skip_reason")
READS_TABLE_HEADER = format_row(READS_TABLE_COLUMNS)
_NOT_IUPAC = re.compile(r"[^ACGTURYSWKMBDHVNacgturyswkmbdhvn]")


@dataclass(frozen=True)
class ChunkSummary:
    """Counts of one chunking run: input reads, chunks written, reads skipped."""

    reads: int
    chunks: int
    skipped: int


def chunk_bounds(read_length: int, expected_length: int) -> list[tuple[int, int]]:
    """The published chunks `[start, end)` of a read (ORIGINAL_METHOD.md §1).

    With n = ceil(L/c) chunks and rep = n*c - L letters to repeat, the step back of chunk
    k+1 against chunk k is lo+1 for the first `need` chunks and lo after; the last chunk is
    clipped at the read's end, so it can be shorter than c.
    """
    if read_length <= 0:
        raise ValueError(f"read length must be positive, got {read_length}")
    if expected_length <= 0:
        raise ValueError(f"expected length must be positive, got {expected_length}")
    n = -(-read_length // expected_length)
    rep = n * expected_length - read_length
    lo = rep // n
    need = rep - lo * (n - 1)
    bounds = []
    back = 0
    for k in range(n):
        start = k * expected_length - back
        bounds.append((start, min(start + expected_length, read_length)))
        back += lo + 1 if k < need else lo
    return bounds


def skip_reason(sequence: str) -> str:
    """Why a read cannot be chunked ('' if it can): empty, or a non-IUPAC nucleotide letter."""
    if not sequence:
        return "empty sequence"
    bad = _NOT_IUPAC.search(sequence)
    if bad is None:
        return ""
    char = bad.group()
    shown = char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
    return f"invalid sequence: character '{shown}' at position {bad.start() + 1}"


def chunk_fasta(
    input_path: Path, expected_length: int, output_path: Path, reads_table: Path | None = None
) -> ChunkSummary:
    """Write the chunks `{read_id}_chunk_{k}` of every valid read, and optionally a per-read table (the
    reads index: a counted table, ``virnucpro.tables``).

    Empty reads and reads with non-IUPAC letters are skipped with a reason in the table;
    duplicate read IDs and unreadable input raise UserError and leave no output.
    """
    if expected_length not in EXPECTED_LENGTHS:
        raise UserError(
            f"expected length {expected_length} is not supported. Use 300 or 500, "
            "the lengths of the published classifiers."
        )
    input_path = Path(input_path)
    first_seen: dict[str, int] = {}
    reads = chunks = skipped = 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(atomic_output(output_path))
        table = stack.enter_context(atomic_output(reads_table)) if reads_table else None
        if table:
            table.write(READS_TABLE_HEADER)
        for record in read_reads(input_path):
            earlier = first_seen.setdefault(record.id, record.number)
            if earlier != record.number:
                raise UserError(
                    f"{input_path}: record {record.number} ('{record.id}'): duplicate "
                    f"read ID, also used by record {earlier}. Give every read a "
                    "unique ID."
                )
            reads += 1
            reason = skip_reason(record.sequence)
            count = 0
            if reason:
                skipped += 1
            else:
                sequence = record.sequence
                for count, (start, end) in enumerate(chunk_bounds(len(sequence), expected_length), start=1):
                    write_fasta_record(out, f"{record.id}_chunk_{count}", sequence[start:end])
                chunks += count
            if table:
                table.write(format_row((record.id, len(record.sequence), count, reason)))
        if table:
            table.write(format_end(reads))
    return ChunkSummary(reads=reads, chunks=chunks, skipped=skipped)
