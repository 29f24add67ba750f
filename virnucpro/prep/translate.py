"""Six-frame translation of chunks, keeping the stop-free frames (published semantics)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from virnucpro.atomic import atomic_output
from virnucpro.fasta import read_fasta, write_fasta_record

# NCBI translation table 1, codons in TCAG order (TTT, TTC, TTA, TTG, TCT, ...).
_BASES = "TCAG"
_AMINO_ACIDS = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
_COMPLEMENT = str.maketrans("ACGT", "TGCA")
_STOP_CODON = re.compile("(?=TAA|TAG|TGA)")


def _codon_table() -> dict[str, str]:
    """Every A/C/G/T codon, in any letter case, to its amino acid ('*' for a stop)."""
    table = {}
    for codon, amino_acid in zip(itertools.product(_BASES, repeat=3), _AMINO_ACIDS):
        for spelling in itertools.product(*((base, base.lower()) for base in codon)):
            table["".join(spelling)] = amino_acid
    return table


CODON_TABLE = _codon_table()


@dataclass(frozen=True)
class Frame:
    """A kept frame: its ID, its nucleotide slice and its protein."""

    id: str
    nucleotide: str
    protein: str


@dataclass(frozen=True)
class TranslateSummary:
    """Counts of one translation run: chunks read, frames kept."""

    chunks: int
    frames: int


def translate_codons(seq: str) -> str:
    """Translate codon by codon from the start; a codon with a letter other than A/C/G/T is dropped."""
    get = CODON_TABLE.get
    return "".join([get(seq[i : i + 3], "") for i in range(0, len(seq) - 2, 3)])


def _offsets_with_stop(seq: str) -> set[int]:
    """The offsets (0, 1, 2) whose frame reads a stop codon in an upper-case sequence."""
    offsets: set[int] = set()
    for match in _STOP_CODON.finditer(seq):
        offsets.add(match.start() % 3)
        if len(offsets) == 3:
            break
    return offsets


def six_frames(chunk_id: str, sequence: str) -> list[Frame]:
    """The kept frames of a chunk (non-empty, stop-free protein) in order F1 F2 F3 R1 R2 R3.

    The nucleotide slice is `seq[i-1 : i + 3p]` (p = protein length), one letter longer than
    the codons read unless clipped: the published off-by-one, kept for compatibility.
    """
    forward = sequence.upper()
    reverse = forward.translate(_COMPLEMENT)[::-1]
    frames = []
    for strand, seq in (("F", forward), ("R", reverse)):
        with_stop = _offsets_with_stop(seq)
        for i in (1, 2, 3):
            if i - 1 in with_stop:
                continue
            protein = translate_codons(seq[i - 1 :])
            if protein:
                frames.append(Frame(f"{chunk_id}{strand}{i}", seq[i - 1 : i + 3 * len(protein)], protein))
    return frames


def translate_fasta(chunked_path: Path, nucleotide_output: Path, protein_output: Path) -> TranslateSummary:
    """Write the kept frames' nucleotide slices and proteins, in chunk order then frame order."""
    chunks = frames = 0
    with atomic_output(nucleotide_output) as nucleotides, atomic_output(protein_output) as proteins:
        for record in read_fasta(Path(chunked_path)):
            chunks += 1
            for frame in six_frames(record.id, record.sequence):
                write_fasta_record(nucleotides, frame.id, frame.nucleotide)
                write_fasta_record(proteins, frame.id, frame.protein)
                frames += 1
    return TranslateSummary(chunks=chunks, frames=frames)
