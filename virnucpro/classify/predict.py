"""Classifying frames from their two embeddings, and the whole method in one process."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from virnucpro.atomic import atomic_output
from virnucpro.errors import UserError
from virnucpro.fasta import read_fasta

if TYPE_CHECKING:
    import torch

PREDICTION_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2"

log = logging.getLogger(__name__)


def format_score(value: float) -> str:
    """The published text of a score: the shortest text that reads back as the same float32."""
    import numpy as np

    return str(np.float32(value))


def prediction_rows(ids: list[str], probabilities: torch.Tensor) -> list[str]:
    """Rows of ``prediction_results.txt`` for frames and their softmax [P(others), P(virus)]."""
    rows = []
    for frame_id, (others, virus) in zip(ids, probabilities.tolist()):
        label = "virus" if virus > others else "others"
        rows.append(f"{frame_id}\t{label}\t{format_score(others)}\t{format_score(virus)}")
    return rows


def merge_features(
    ids: list[str], dnabert: tuple[list[str], torch.Tensor], esm: tuple[list[str], torch.Tensor]
) -> tuple[list[str], torch.Tensor, list[str]]:
    """``[DNABERT-S | ESM-2]`` per frame ID, joined by ID (never by position), in the order of ``ids``.

    Returns the IDs that have both embeddings, their features, and the IDs that lack one.
    """
    import torch

    indexes = [{frame_id: row for row, frame_id in enumerate(embedded_ids)} for embedded_ids, _ in (dnabert, esm)]
    kept = [frame_id for frame_id in ids if all(frame_id in index for index in indexes)]
    missing = [frame_id for frame_id in ids if not all(frame_id in index for index in indexes)]
    parts = [
        vectors[torch.tensor([index[frame_id] for frame_id in kept], dtype=torch.long)]
        for index, (_, vectors) in zip(indexes, (dnabert, esm))
    ]
    return kept, torch.cat(parts, dim=1).to(torch.float32), missing


def classify_shard(nucleotide: Path, dnabert_s: Path, esm2: Path, classifier: Path, output: Path) -> int:
    """Merge one shard's embeddings by ID, classify every frame, write its prediction rows."""
    from virnucpro.classify.classifier import load_classifier
    from virnucpro.engines.embed import read_embeddings

    return _classify(nucleotide, read_embeddings(dnabert_s), read_embeddings(esm2), load_classifier(classifier), output)


def _classify(nucleotide: Path, dnabert, esm, model, output: Path) -> int:
    from virnucpro.classify.classifier import classify

    ids = [record.id for record in read_fasta(Path(nucleotide))]
    rows: list[str] = []
    ids, features, missing = merge_features(ids, dnabert, esm)
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        log.warning("%s: %d frame(s) lack an embedding and are not classified (%s)", nucleotide, len(missing), shown)
    if ids:
        expected = model.hidden_layer.in_features
        if features.shape[1] != expected:
            raise UserError(
                f"the embeddings give {features.shape[1]} features per frame but the classifier expects {expected}: "
                "are the classifier and the two embedding models from the same release?"
            )
        rows = prediction_rows(ids, classify(model, features))
    with atomic_output(Path(output)) as handle:
        handle.write(PREDICTION_HEADER + "\n")
        handle.writelines(row + "\n" for row in rows)
    return len(rows)


def predict(
    input_path: Path,
    length: int,
    *,
    esm2: Path,
    dnabert_s: Path,
    classifier: Path,
    output_dir: Path,
    device: str = "cpu",
    precision: str = "fp32",
    shard_size: int = 10000,
) -> None:
    """Run the whole method in this process: each model is loaded once and used for every shard."""
    from virnucpro.outputs.aggregate import aggregate_sample
    from virnucpro.prep.chunk import chunk_fasta
    from virnucpro.classify.classifier import load_classifier
    from virnucpro.engines.embed import embed_records, load_embedder, read_embeddings
    from virnucpro.manifest import append_failure
    from virnucpro.prep.shard import shard_frames
    from virnucpro.prep.translate import translate_fasta

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = load_classifier(Path(classifier))
    embedders = {name: load_embedder(name, path, device, precision) for name, path in (("dnabert_s", dnabert_s), ("esm2", esm2))}
    sample = Path(input_path).name
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=output_dir))
    manifest = work / "failures.tsv"
    try:
        reads_table = work / "reads_index.tsv"
        chunk_fasta(Path(input_path), length, work / "chunked.fa", reads_table=reads_table)
        nucleotide, protein = work / "identified_nucleotide.fa", work / "identified_protein.faa"
        translate_fasta(work / "chunked.fa", nucleotide, protein)
        count = shard_frames(nucleotide, protein, shard_size, work / "shards")
        predictions = []
        for index in range(count):
            shard = work / "shards" / f"shard_{index:05d}"
            embedded = {}
            for name, embedder in embedders.items():
                source = shard.with_suffix(".fa" if name == "dnabert_s" else ".faa")
                target = work / f"{shard.name}.{name}.pt"
                summary = embed_records(embedder, source, target)
                for sequence_id, reason in summary.failed.items():
                    append_failure(
                        manifest,
                        sample=sample,
                        stage=f"embed_{name}",
                        shard=shard.name,
                        sequence_id=sequence_id,
                        error_class="OutOfMemoryError",
                        message=reason,
                        attempts=1,
                    )
                embedded[name] = read_embeddings(target)
            prediction = work / f"{shard.name}.tsv"
            _classify(shard.with_suffix(".fa"), embedded["dnabert_s"], embedded["esm2"], model, prediction)
            predictions.append(prediction)
            log.info("shard %d/%d classified", index + 1, count)
        aggregate_sample(
            sample=sample,
            reads_table=reads_table,
            nucleotide=nucleotide,
            predictions=predictions,
            manifest=manifest,
            output_dir=output_dir,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
