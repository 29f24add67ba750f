"""The per-shard prediction table (``prediction_results.txt``'s format) and the per-shard merge+classify.

A prediction table is ``PREDICTION_HEADER`` then one row per classified frame: its ID, ``virus`` or
``others``, and the two softmax scores [P(others), P(virus)] in the published text (``format_score``),
then its end line (a counted table, ``virnucpro.tables``: the aggregation finds one cut short).
``classify_shard`` is what the workflow runs per shard; the one-process ``predict`` (``predict.py``) and
the per-sample aggregation (``virnucpro.outputs.aggregate``) build on this module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from virnucpro.atomic import atomic_output
from virnucpro.errors import UserError
from virnucpro.fasta import read_fasta
from virnucpro.tables import format_end

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREDICTION_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2"
"""The header line of a prediction table, as the published ``prediction_results.txt`` has it."""


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

    return classify_embedded(
        nucleotide, read_embeddings(dnabert_s), read_embeddings(esm2), load_classifier(classifier), output
    )


def classify_embedded(nucleotide: Path, dnabert, esm, model, output: Path) -> int:
    """Merge a shard's embeddings (``(ids, vectors)`` pairs, already read) by ID, classify every frame with a
    loaded ``model``, write the prediction table ``output``; return the rows written."""
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
        handle.write(format_end(len(rows)))
    return len(rows)
