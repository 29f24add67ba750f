"""Every file a step writes has the same ordinary permissions, 0644 (issue 10, case 7, first point:
embedding files were 0600, written through mkstemp, where the other outputs were 0644)."""

from __future__ import annotations

import os
from pathlib import Path

from virnucpro.cli import main

DEMO_READS = Path(__file__).resolve().parent / "data" / "demo_reads.fa"


def modes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): oct(path.stat().st_mode & 0o777) for path in folder.rglob("*") if path.is_file()
    }


def test_chunk_translate_shard_embed_classify_and_report_outputs_are_0644(tmp_path, test_models):
    umask = os.umask(0o022)
    try:
        w = tmp_path / "w"
        steps = [
            ["chunk", str(DEMO_READS), "--length", "500", "--output", f"{w}/chunked.fa", "--reads-table", f"{w}/index.tsv"],
            ["translate", f"{w}/chunked.fa", "--nucleotide-output", f"{w}/nuc.fa", "--protein-output", f"{w}/prot.faa"],
            ["shard", f"{w}/nuc.fa", f"{w}/prot.faa", "--shard-size", "1000", "--output-dir", f"{w}/shards"],
            ["embed", f"{w}/shards/shard_00000.faa", "--model", "esm2", "--weights", str(test_models["esm2"]),
             "--output", f"{w}/esm2.pt"],
            ["embed", f"{w}/shards/shard_00000.fa", "--model", "dnabert-s", "--weights", str(test_models["dnabert_s"]),
             "--output", f"{w}/dnabert_s.pt"],
            ["classify", f"{w}/shards/shard_00000.fa", "--dnabert-s", f"{w}/dnabert_s.pt", "--esm2", f"{w}/esm2.pt",
             "--classifier", str(test_models["classifier_500"]), "--output", f"{w}/p.tsv"],
            ["aggregate", "--sample", "s", "--reads-table", f"{w}/index.tsv", "--nucleotide", f"{w}/nuc.fa",
             "--predictions", f"{w}/p.tsv", "--output-dir", f"{w}/out"],
            ["report-plots", "--sample", "s", "--reads-table", f"{w}/out/reads.tsv", "--predictions",
             f"{w}/out/prediction_results.txt", "--failures", f"{w}/out/failures.tsv", "--output-dir", f"{w}/out/plots"],
        ]  # fmt: skip
        for step in steps:
            assert main(["-q", *step]) == 0, step
    finally:
        os.umask(umask)
    found = modes(w)
    assert "esm2.pt" in found and "dnabert_s.pt" in found and "out/plots/summary.html" in found
    assert {name: mode for name, mode in found.items() if mode != "0o644"} == {}
