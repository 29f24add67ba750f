"""The whole method in one process (the counterpart of the published prediction.py); the prediction table
and the per-shard merge+classify are in ``virnucpro.classify.predictions``."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from virnucpro.prep.shard import DEFAULT_SHARD_SIZE

log = logging.getLogger(__name__)


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
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> None:
    """Run the whole method in this process: each model is loaded once and used for every shard."""
    from virnucpro.classify.classifier import load_classifier
    from virnucpro.classify.predictions import classify_embedded
    from virnucpro.engines.embed import embed_records, load_embedder, read_embeddings
    from virnucpro.manifest import append_failure
    from virnucpro.outputs.aggregate import aggregate_sample
    from virnucpro.prep.chunk import chunk_fasta
    from virnucpro.prep.shard import shard_frames
    from virnucpro.prep.translate import translate_fasta

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = load_classifier(Path(classifier))
    embedders = {
        name: load_embedder(name, path, device, precision) for name, path in (("dnabert_s", dnabert_s), ("esm2", esm2))
    }
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
            classify_embedded(shard.with_suffix(".fa"), embedded["dnabert_s"], embedded["esm2"], model, prediction)
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
