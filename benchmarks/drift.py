"""Drift of bf16 and fp16 against fp32, per model, on the CPU (the measurement of docs/models.md, "Precision").

Models: the small random-weight test models (``make_test_models(seed=0)``: ESM-2 2 layers x 64, DNABERT-S
2 layers x 64), or ``--esm PATH`` for another ESM-2 checkpoint. Data: the stop-free frames of
``tests/data/demo_reads.fa`` at length 500 (as docs/models.md), and ``--long`` generated proteins of 300 to
1000 residues (where fair-esm's bf16 rotary tables round the positions above 256).

    .venv/bin/python -m benchmarks.drift [--esm PATH] [--long 16]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from benchmarks import _common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--esm", type=Path, help="an ESM-2 checkpoint (default: the small test model)")
    parser.add_argument("--long", type=int, default=16, help="generated proteins of 300-1000 residues")
    args = parser.parse_args()
    import torch

    from virnucpro.engines.embed import load_embedder
    from virnucpro.testmodels import make_test_models

    print(f"command: {_common.command_line()}")
    print(f"machine: {_common.machine()}")
    work = Path(tempfile.mkdtemp(prefix="virnucpro-drift-"))
    models = make_test_models(work / "models", seed=0)
    if args.esm:
        models["esm2"] = args.esm
    nucleotide, protein = _common.make_frames(_common.REPO / "tests" / "data" / "demo_reads.fa", 500, work)
    rng = random.Random(0)
    long = ["".join(rng.choice(_common.AMINO_ACIDS) for _ in range(rng.randint(300, 1000))) for _ in range(args.long)]
    data = {
        "esm2": {"demo frames (500)": _common.read_sequences(protein), "proteins 300-1000 aa": long},
        "dnabert_s": {"demo frames (500)": _common.read_sequences(nucleotide)},
    }
    header = f"{'model':<9} {'data':<22} {'prec':<5} {'n':>4} {'max abs':>9} {'max rel L2':>10} {'cos min':>9} {'cos mean':>9}"
    print(header)
    print("-" * len(header))
    for model, sets in data.items():
        for name, sequences in sets.items():
            reference = load_embedder(model, models[model]).embed(sequences).vectors
            for precision in ("bf16", "fp16"):
                low = load_embedder(model, models[model], precision=precision).embed(sequences).vectors
                cosine = torch.nn.functional.cosine_similarity(low, reference)
                relative = ((low - reference).norm(dim=1) / reference.norm(dim=1)).max().item()
                print(f"{model:<9} {name:<22} {precision:<5} {len(sequences):>4} {(low - reference).abs().max().item():>9.2e} "
                      f"{relative:>10.2e} {cosine.min().item():>9.6f} {cosine.mean().item():>9.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
