"""The whole method in one process (``virnucpro predict``, the counterpart of the published prediction.py):
chunk, translate, shard, embed with both models, classify and aggregate, each model loaded once.

It sits above every step it runs (``prep``, ``engines``, ``classify``, ``outputs``); nothing in the package
imports it but the CLI. The per-shard merge+classify and the prediction table are in
``virnucpro.classify.predictions``.
"""

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
    """Run the whole method in this process and write the sample's outputs (``layout.SampleFiles.outputs``)
    into ``output_dir``: each model is loaded once and used for every shard. The intermediates live in a
    scratch folder inside ``output_dir``, laid out as a sample's ``work/``, removed at the end."""
    from virnucpro.classify.classifier import load_classifier
    from virnucpro.classify.predictions import classify_embedded
    from virnucpro.engines.embed import embed_records, load_embedder, read_embeddings
    from virnucpro.layout import SampleFiles, shard_name
    from virnucpro.manifest import append_failure
    from virnucpro.outputs.aggregate import aggregate_sample
    from virnucpro.prep.chunk import chunk_fasta
    from virnucpro.prep.shard import shard_frames
    from virnucpro.prep.translate import translate_fasta
    from virnucpro.serving.rundir import RunDir

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = load_classifier(Path(classifier))
    embedders = {
        name: load_embedder(name, path, device, precision) for name, path in (("dnabert_s", dnabert_s), ("esm2", esm2))
    }
    sample = Path(input_path).name
    scratch_dir = tempfile.mkdtemp(prefix=".work-", dir=output_dir)
    scratch = SampleFiles.at(scratch_dir)  # the intermediates, as in a sample's folder
    manifest = RunDir(scratch_dir).failures  # the failures, as in a run folder
    try:
        chunk_fasta(Path(input_path), length, Path(scratch.chunked), reads_table=Path(scratch.reads_index))
        nucleotide, protein = Path(scratch.nucleotide_frames), Path(scratch.protein_frames)
        translate_fasta(Path(scratch.chunked), nucleotide, protein)
        count = shard_frames(nucleotide, protein, shard_size, Path(scratch.shards))
        predictions = []
        for index in range(count):
            shard = shard_name(index)
            embedded = {}
            for name, embedder in embedders.items():
                target = Path(scratch.embedding(shard, name))
                summary = embed_records(embedder, Path(scratch.shard_input(shard, name)), target)
                for sequence_id, reason in summary.failed.items():
                    append_failure(
                        manifest,
                        sample=sample,
                        stage=f"embed_{name}",
                        shard=shard,
                        sequence_id=sequence_id,
                        error_class="OutOfMemoryError",
                        message=reason,
                        attempts=1,
                    )
                embedded[name] = read_embeddings(target)
            prediction = Path(scratch.predictions(shard))
            classify_embedded(
                Path(scratch.shard_nucleotide(shard)), embedded["dnabert_s"], embedded["esm2"], model, prediction
            )
            predictions.append(prediction)
            log.info("shard %d/%d classified", index + 1, count)
        aggregate_sample(
            sample=sample,
            reads_table=Path(scratch.reads_index),
            nucleotide=nucleotide,
            predictions=predictions,
            manifest=manifest,
            output_dir=output_dir,
        )
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
