"""Splitting the paired nucleotide/protein frame files into shards of a fixed number of frames."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from virnucpro.errors import UserError
from virnucpro.fasta import read_fasta, write_fasta_record
from virnucpro.layout import ShardFiles, shard_name

DEFAULT_SHARD_SIZE = 10000
"""Frames per shard unless told otherwise (the configuration's ``shard_size`` default, too)."""


def shard_frames(nucleotide: Path, protein: Path, shard_size: int, output_dir: Path) -> int:
    """Write ``output_dir/shard_NNNNN.fa`` and ``.faa`` pairs of ``shard_size`` frames (``layout.ShardFiles``);
    return the count.

    The two inputs must list the same frame IDs in the same order (as ``translate`` writes them).
    The folder appears complete or not at all: shards are written to a temporary sibling first.
    """
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1, got {shard_size}")
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        count = _write_shards(Path(nucleotide), Path(protein), shard_size, staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return count


def _write_shards(nucleotide: Path, protein: Path, shard_size: int, staging: Path) -> int:
    count = 0
    nucleotide_out = protein_out = None
    files = ShardFiles(str(staging))
    proteins = read_fasta(protein)
    try:
        for position, frame in enumerate(read_fasta(nucleotide)):
            partner = next(proteins, None)
            if partner is None or partner.id != frame.id:
                found = "nothing" if partner is None else f"'{partner.id}'"
                raise UserError(
                    f"{protein}: frame {position + 1} should be '{frame.id}' (as in {nucleotide}) but is {found}; "
                    "both files must come from the same translate run"
                )
            if position % shard_size == 0:
                for handle in (nucleotide_out, protein_out):
                    if handle is not None:
                        handle.close()
                name = shard_name(count)
                nucleotide_out = open(files.nucleotide(name), "w")
                protein_out = open(files.protein(name), "w")
                count += 1
            write_fasta_record(nucleotide_out, frame.id, frame.sequence)
            write_fasta_record(protein_out, partner.id, partner.sequence)
        extra = next(proteins, None)
        if extra is not None:
            raise UserError(f"{protein}: frame '{extra.id}' has no partner in {nucleotide}")
    finally:
        for handle in (nucleotide_out, protein_out):
            if handle is not None:
                handle.close()
    return count
