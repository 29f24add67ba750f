"""The in-process `virnucpro embed` command: its file contract, and batched equals one at a time."""

import subprocess
import sys

import pytest
import torch

from virnucpro.engines.embed import embed_records, load_embedder, read_embeddings

PROTEINS = ["MKV", "ACDEFGHIKLMNPQRSTVWY" * 7, "W", "MSTNPKPQRKTKRNTNRRPQDVKFPGG" * 3, "LLLL" * 30]
NUCLEOTIDES = ["ACG", "ACGTTGCA" * 40, "GATTACA" * 71, "T" * 5, "CCGGAATT" * 62 + "A"]


def embed_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "virnucpro.cli", "embed", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "model, key, sequences",
    [("esm2", "esm2", PROTEINS), ("dnabert-s", "dnabert_s", NUCLEOTIDES)],
)
def test_embed_writes_ids_and_float32_rows_that_equal_one_sequence_at_a_time(
    tmp_path, test_models, model, key, sequences
):
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">seq{i} description\n{seq}\n" for i, seq in enumerate(sequences)))
    out = tmp_path / "out.pt"
    result = embed_cli(str(fasta), "--model", model, "--weights", str(test_models[key]), "--output", str(out))
    assert result.returncode == 0, result.stderr

    data = torch.load(out, weights_only=True)
    assert data["ids"] == [f"seq{i}" for i in range(len(sequences))]
    assert data["embeddings"].dtype == torch.float32
    embedder = load_embedder(key, test_models[key])
    assert data["embeddings"].shape == (len(sequences), embedder.dim)
    one_at_a_time = torch.cat([embedder.embed([sequence]).vectors for sequence in sequences])
    assert (data["embeddings"] - one_at_a_time).abs().max().item() <= 1e-5


def test_embed_without_weights_or_daemon_is_a_one_line_error(tmp_path):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKV\n")
    result = embed_cli(str(fasta), "--model", "esm2", "--output", str(tmp_path / "out.pt"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "needs --weights PATH" in result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_embed_with_a_missing_checkpoint_names_it(tmp_path):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKV\n")
    missing = tmp_path / "esm2_t36_3B_UR50D.pt"
    result = embed_cli(str(fasta), "--model", "esm2", "--weights", str(missing), "--output", str(tmp_path / "o.pt"))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_embed_records_with_replace_false_never_overwrites_an_existing_output(tmp_path, test_models):
    fasta = tmp_path / "in.faa"
    fasta.write_text(">a\nMKV\n>b\nW\n")
    out = tmp_path / "out.pt"
    embedder = load_embedder("esm2", test_models["esm2"])
    embed_records(embedder, fasta, out, replace=False)
    assert read_embeddings(out)[0] == ["a", "b"]
    used = out.read_bytes()
    fasta.write_text(">c\nMKV\n")
    with pytest.raises(FileExistsError):
        embed_records(embedder, fasta, out, replace=False)
    assert out.read_bytes() == used
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    embed_records(embedder, fasta, out)  # the default replaces it
    assert read_embeddings(out)[0] == ["c"]
