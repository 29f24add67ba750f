"""A sample's outputs: the two published files, the per-read table and the failure table; run statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from virnucpro.atomic import atomic_output
from virnucpro.classify.predictions import PREDICTION_HEADER
from virnucpro.errors import UserError
from virnucpro.fasta import read_fasta
from virnucpro.layout import SampleFiles
from virnucpro.prep.chunk import READS_TABLE_COLUMNS
from virnucpro.tables import end_count, format_row, read_rows, split_row, truncated

READS_COLUMNS = (
    "read_id",
    "length",
    "chunks",
    "frames",
    "frames_scored",
    "virus_chunks",
    "best_virus_score",
    "verdict",
    "reason",
)


def chunk_of(frame_id: str) -> str:
    """The chunk ID of a frame ID: the frame ID minus its last two characters, as published."""
    return frame_id[:-2]


def read_of(chunk_id: str) -> str:
    """The read ID of a chunk ID ``{read_id}_chunk_{k}``."""
    return chunk_id.rsplit("_chunk_", 1)[0]


@dataclass
class _ChunkScores:
    best_others: float
    best_virus: float

    @property
    def is_virus(self) -> bool:
        return self.best_virus >= self.best_others


@dataclass
class _ReadTally:
    frames: int = 0
    scored: int = 0


def aggregate_sample(
    *,
    sample: str,
    reads_table: Path,
    nucleotide: Path,
    predictions: list[Path],
    manifest: Path | None,
    output_dir: Path,
) -> None:
    """Write the sample's outputs into ``output_dir`` (``SampleFiles.outputs``: ``prediction_results.txt``,
    ``prediction_results_highestscore.csv``, ``reads.tsv``, ``failures.tsv``)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    files = SampleFiles.at(output_dir)
    reads = _read_reads_table(Path(reads_table))
    tallies = {read_id: _ReadTally() for read_id in reads}
    for frame in read_fasta(Path(nucleotide)):
        tally = tallies.get(read_of(chunk_of(frame.id)))
        if tally is None:
            raise UserError(f"{nucleotide}: frame '{frame.id}' belongs to no read of {reads_table}")
        tally.frames += 1

    chunks: dict[str, _ChunkScores] = {}
    with atomic_output(Path(files.prediction_results)) as out:
        out.write(PREDICTION_HEADER + "\n")
        for table in predictions:
            for frame_id, line, others, virus in _prediction_lines(Path(table)):
                out.write(line)
                tallies[read_of(chunk_of(frame_id))].scored += 1
                scores = chunks.get(chunk_of(frame_id))
                if scores is None:
                    chunks[chunk_of(frame_id)] = _ChunkScores(others, virus)
                else:
                    scores.best_others = max(scores.best_others, others)
                    scores.best_virus = max(scores.best_virus, virus)

    with atomic_output(Path(files.highest_scores)) as out:
        out.write("Modified_ID\tIs_Virus\n")
        for chunk_id in sorted(chunks):
            out.write(f"{chunk_id}\t{chunks[chunk_id].is_virus}\n")

    failures = _sample_failures(manifest, sample)
    failed_reads = {read_of(chunk_of(row["sequence_id"])) for row in failures if row.get("sequence_id")}
    failed_shards = bool([row for row in failures if not row.get("sequence_id")])
    read_chunks = _chunks_by_read(chunks)
    with atomic_output(Path(files.reads_table)) as out:
        out.write(format_row(READS_COLUMNS))
        for read_id, (length, chunk_count, skip_reason) in reads.items():
            tally = tallies[read_id]
            scores = read_chunks.get(read_id, [])
            verdict, reason = _verdict(
                skip_reason, chunk_count, tally, scores, read_id in failed_reads or failed_shards
            )
            best = max((chunk.best_virus for chunk in scores), default=None)
            row = (
                read_id,
                length,
                chunk_count,
                tally.frames,
                tally.scored,
                sum(chunk.is_virus for chunk in scores),
                "" if best is None else _format(best),
                verdict,
                reason,
            )
            out.write(format_row(row))

    _write_failures(Path(files.failures), failures)


def _verdict(
    skip_reason: str, chunks: int, tally: _ReadTally, scores: list[_ChunkScores], failed: bool
) -> tuple[str, str]:
    if skip_reason:
        return "unclassified", skip_reason
    if tally.frames == 0:
        return "unclassified", "no stop-free frame"
    if tally.scored == 0:
        return "unclassified", "embedding failed" if failed else "not scored"
    verdict = "virus" if any(chunk.is_virus for chunk in scores) else "others"
    if tally.scored < tally.frames:
        return verdict, f"{tally.frames - tally.scored} of {tally.frames} frames not scored"
    return verdict, ""


def _format(value: float) -> str:
    from virnucpro.classify.predictions import format_score

    return format_score(value)


def _chunks_by_read(chunks: dict[str, _ChunkScores]) -> dict[str, list[_ChunkScores]]:
    by_read: dict[str, list[_ChunkScores]] = {}
    for chunk_id, scores in chunks.items():
        by_read.setdefault(read_of(chunk_id), []).append(scores)
    return by_read


def _read_reads_table(path: Path) -> dict[str, tuple[int, int, str]]:
    what = "reads table (written by 'virnucpro chunk --reads-table')"
    reads: dict[str, tuple[int, int, str]] = {}
    for number, row in enumerate(read_rows(path, READS_TABLE_COLUMNS, what=what, counted=True), start=2):
        try:
            reads[row["read_id"]] = (int(row["length"]), int(row["chunks"]), row["skip_reason"])
        except ValueError:
            raise UserError(f"{path}: line {number}: length and chunks must be whole numbers") from None
    return reads


def _prediction_lines(path: Path):
    """Yield (frame ID, line, P(others), P(virus)) of a per-shard prediction table (a counted table)."""
    import numpy as np

    what = "prediction table"
    with open(path, encoding="utf-8", newline="") as handle:
        header = handle.readline().rstrip("\n")
        if header != PREDICTION_HEADER:
            raise UserError(f"{path}: not a prediction table (first line should be '{PREDICTION_HEADER}')")
        rows, end = 0, None
        for number, line in enumerate(handle, start=2):
            fields = split_row(line)
            if end is not None or not line.endswith("\n"):
                raise truncated(path, what)
            if (end := end_count(fields)) is not None:
                continue
            try:
                if len(fields) != 4:
                    raise ValueError("expected 4 tab-separated fields")
                others, virus = float(np.float32(fields[2])), float(np.float32(fields[3]))
            except ValueError as error:
                raise UserError(
                    f"{path}: line {number}: {error}; the {what} is corrupt: delete it and run again"
                ) from None
            rows += 1
            yield fields[0], line, others, virus
        if end != rows:
            raise truncated(path, what)


def _sample_failures(manifest: Path | None, sample: str) -> list[dict[str, str]]:
    if manifest is None or not Path(manifest).exists():
        return []
    from virnucpro.manifest import read_failures

    return [row for row in read_failures(Path(manifest)) if row.get("sample") == sample]


def _write_failures(path: Path, failures: list[dict[str, str]]) -> None:
    from virnucpro.manifest import MANIFEST_COLUMNS, escape_field

    with atomic_output(path) as out:
        out.write("\t".join(MANIFEST_COLUMNS) + "\n")
        for row in failures:
            out.write("\t".join(escape_field(row.get(column, "")) for column in MANIFEST_COLUMNS) + "\n")
