"""Every line-ending convention (LF, CRLF, a lone CR as old Mac files have, and a mix of them) is read the
same way, for reads (FASTA and FASTQ, plain and gzip) and for sample sheets (a byte-order mark included);
and the start-up checks say which kind of path (file or folder) each model path must be (issue 17)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from runs import ABSENT_MODELS, DEMO_READS, line_with, run_workflow, snakemake, write_config
from test_fastq import fastq_text

from virnucpro.cli import main
from virnucpro.fasta import read_fasta, read_reads

CONVENTIONS = ("lf", "crlf", "cr", "mixed")


def with_endings(text: str, convention: str) -> bytes:
    """``text`` (LF line endings) with every line ending written the ``convention``'s way; ``mixed`` cycles
    through LF, CRLF and CR, line by line."""
    lines = text.split("\n")
    if convention == "mixed":
        endings = ["\n", "\r\n", "\r"]
        return (
            "".join(line + endings[number % 3] for number, line in enumerate(lines[:-1])).encode() + lines[-1].encode()
        )
    ending = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}[convention]
    return ending.join(lines).encode()


def demo_records() -> list[tuple[str, str, str, int]]:
    return [(r.id, r.description, r.sequence, r.number) for r in read_fasta(DEMO_READS)]


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("kind", ["fasta", "fastq"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_every_line_ending_convention_gives_the_records_of_lf(tmp_path, convention, kind, packed):
    text = DEMO_READS.read_text() if kind == "fasta" else fastq_text(DEMO_READS, width=60)
    data = with_endings(text, convention)
    path = tmp_path / f"reads.{kind}"
    path.write_bytes(gzip.compress(data) if packed else data)
    records = [(r.id, r.description, r.sequence, r.number) for r in read_reads(path)]
    assert records == demo_records()


def test_a_carriage_return_at_a_read_buffers_edge_is_one_line_ending(tmp_path):
    """A CRLF split across two reads of the stream is one line ending, not a blank line more (FASTQ counts
    quality letters line by line)."""
    head = ">r0\n" + "A" * (8192 - 4 - 1)  # the CR is the 8192nd byte, its LF the 8193rd
    path = tmp_path / "edge.fa"
    path.write_bytes((head + "\r\n>r1\r\nACGT\r").encode())
    assert [(r.id, len(r.sequence)) for r in read_reads(path)] == [("r0", 8187), ("r1", 4)]


def test_chunk_cuts_lone_cr_reads_as_it_cuts_lf_reads(tmp_path):
    """Issue 17, case 3: `virnucpro chunk` gave 0 chunks for the demo reads written with lone CRs."""
    outputs = {}
    for convention in ("lf", "cr"):
        reads = tmp_path / f"{convention}.fa"
        reads.write_bytes(with_endings(DEMO_READS.read_text(), convention))
        out = tmp_path / convention
        assert main(["-q", "chunk", str(reads), "--length", "500", "--output", str(out / "chunked.fa"),
                     "--reads-table", str(out / "reads_index.tsv")]) == 0  # fmt: skip
        outputs[convention] = ((out / "chunked.fa").read_bytes(), (out / "reads_index.tsv").read_bytes())
    assert outputs["cr"] == outputs["lf"]
    assert outputs["lf"][0].count(b">") == 117


# --- sample sheets --------------------------------------------------------------------------------


def sheet_text(samples: dict[str, Path]) -> str:
    return "sample\tfasta\n" + "".join(f"{name}\t{path}\n" for name, path in samples.items())


def stand_in_models(folder: Path) -> dict[str, Path]:
    """Paths of the right kinds for the start-up checks (a dry run loads no model)."""
    models = {"esm2": folder / "esm2.pt", "dnabert_s": folder / "DNABERT-S", "classifier_500": folder / "c.pth"}
    models["esm2"].write_text("x")
    models["dnabert_s"].mkdir()
    models["classifier_500"].write_text("x")
    return models


@pytest.mark.parametrize("bom", [False, True], ids=["no-bom", "bom"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_a_sample_sheet_is_read_whatever_its_line_endings_and_byte_order_mark(tmp_path, convention, bom):
    sheet = tmp_path / "samples.tsv"
    sheet.write_bytes(
        b"\xef\xbb\xbf" * bom + with_endings(sheet_text({"s1": DEMO_READS, "s2": DEMO_READS}), convention)
    )
    config = write_config(tmp_path, stand_in_models(tmp_path), {}, sample_sheet=str(sheet))
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    chunk_jobs = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("wildcards: sample=")]
    assert sorted(set(chunk_jobs)) == ["wildcards: sample=s1", "wildcards: sample=s2"], result.stdout[-3000:]
    assert line_with(result.stdout, "input: ").strip() == f"input: {DEMO_READS}"


def test_a_sample_sheet_that_is_not_utf8_text_is_refused_in_one_line(tmp_path):
    sheet = tmp_path / "samples.tsv"
    sheet.write_bytes(b"sample\tfasta\ns1\t\xff\xfe.fa\n")
    config = write_config(tmp_path, ABSENT_MODELS, {}, sample_sheet=str(sheet))
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert "not tab-separated UTF-8 text" in line_with(result.stdout, f"sample sheet {sheet}")


# --- model paths of the wrong kind ------------------------------------------------------------------


@pytest.mark.parametrize("key, kind", [("esm2", "folder"), ("dnabert_s", "file"), ("classifier", "folder")])
def test_a_model_path_of_the_wrong_kind_is_refused_at_start_in_one_line(tmp_path, key, kind):
    """Issue 17, case 7: a folder given as models.esm2 passed the start-up check, and its serve job failed
    (and was retried) with 'not found'."""
    wrong = tmp_path / "wrong"
    if kind == "folder":
        wrong.mkdir()
    else:
        wrong.write_text("not a model")
    models = stand_in_models(tmp_path)
    models["classifier_500" if key == "classifier" else key] = wrong
    config = write_config(tmp_path, models, {"demo": str(DEMO_READS)})
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    expected = "folder" if kind == "file" else "file"
    line = line_with(result.stdout, f"config key 'models.{key}'")
    assert f"{wrong} is a {kind}, but it must be a {expected}" in line, line


# --- a whole run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_of_samples_in_every_convention_gives_the_outputs_of_lf(tmp_path, test_models):
    """Issue 17, case 3: lone-CR reads gave one reads.tsv row ('empty sequence') for 60 reads, rc 0. A sample
    sheet with a byte-order mark and lone CRs lists the demo reads as LF FASTA, lone-CR FASTA, CRLF FASTQ.gz
    and mixed FASTA.gz: every sample's outputs are those of the LF one, byte for byte."""
    reads = tmp_path / "reads"
    reads.mkdir()
    fasta, fastq = DEMO_READS.read_text(), fastq_text(DEMO_READS, width=60)
    files = {
        "lf": reads / "lf.fa",
        "cr": reads / "cr.fa",
        "crlf_fq": reads / "crlf.fq.gz",
        "mixed_gz": reads / "mixed.fa.gz",
    }
    files["lf"].write_bytes(with_endings(fasta, "lf"))
    files["cr"].write_bytes(with_endings(fasta, "cr"))
    files["crlf_fq"].write_bytes(gzip.compress(with_endings(fastq, "crlf")))
    files["mixed_gz"].write_bytes(gzip.compress(with_endings(fasta, "mixed")))
    sheet = tmp_path / "samples.tsv"
    sheet.write_bytes(b"\xef\xbb\xbf" + with_endings(sheet_text(files), "cr"))
    write_config(tmp_path, test_models, {}, sample_sheet=str(sheet), shard_size=60)
    result = run_workflow(tmp_path)
    assert result.returncode == 0, result.stdout[-10000:]
    names = ("prediction_results.txt", "prediction_results_highestscore.csv", "reads.tsv")
    expected = {name: (tmp_path / "results" / "lf" / name).read_bytes() for name in names}
    assert expected["reads.tsv"].count(b"\n") == 1 + len(demo_records())
    for sample in files:
        assert {name: (tmp_path / "results" / sample / name).read_bytes() for name in names} == expected, sample
