"""Small random-weight models written in exactly the published file formats, for tests and the demo."""

from __future__ import annotations

import json
from pathlib import Path

from virnucpro.atomic import write_text

DNABERT_HIDDEN = 64
ESM_DIM = 64


def make_test_models(output_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write an ESM-2 checkpoint, a DNABERT-S snapshot and both classifiers; return (and record) their paths."""
    from virnucpro.classify.classifier import write_published_classifier
    from virnucpro.engines.dnabert import write_random_snapshot
    from virnucpro.engines.esm2 import write_random_checkpoint

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "esm2": write_random_checkpoint(
            output_dir / "esm2_t2_64_test.pt", num_layers=2, embed_dim=ESM_DIM, attention_heads=4, seed=seed
        ),
        "dnabert_s": write_random_snapshot(
            output_dir / "DNABERT-S", hidden_size=DNABERT_HIDDEN, num_layers=2, num_heads=4, seed=seed
        ),
    }
    for length in (300, 500):
        paths[f"classifier_{length}"] = write_published_classifier(
            output_dir / f"{length}_model.pth", input_dim=DNABERT_HIDDEN + ESM_DIM, seed=seed + length
        )
    write_text(output_dir / "models.json", json.dumps({name: str(path) for name, path in paths.items()}, indent=2) + "\n")
    return paths
