"""FASTQ input (issue 10, case 8): FASTQ and FASTQ.gz are read wherever reads are read, detected by
content, qualities dropped, multi-line records joined, truncated records refused in one line; the same
reads give the same records and the same outputs as FASTA."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from virnucpro.cli import main
from virnucpro.errors import UserError
from virnucpro.fasta import read_fasta, read_reads
from virnucpro.layout import RESULTS, SampleFiles
from virnucpro.prep.chunk import chunk_fasta

DEMO_READS = Path(__file__).resolve().parent / "data" / "demo_reads.fa"


def fastq_text(fasta: Path, width: int | None = None, repeat_header: bool = False, seed: int = 0) -> str:
    """The records of ``fasta`` as FASTQ, with random qualities that make the parse hard: quality lines
    that start with '@' or '+'. ``width`` wraps sequence and quality lines (multi-line FASTQ)."""
    rng = random.Random(seed)
    parts = []
    for record in read_fasta(fasta):
        quality = "".join(rng.choice("@+!#5?IJ") for _ in record.sequence)
        if quality:
            quality = "@" + quality[1:]
        parts.append(f"@{record.description}\n")
        for text in (record.sequence, None, quality):
            if text is None:
                parts.append(f"+{record.description if repeat_header else ''}\n")
            elif width and text:
                parts.extend(text[i : i + width] + "\n" for i in range(0, len(text), width))
            else:
                parts.append(text + "\n")
    return "".join(parts)


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def records(path: Path) -> list[tuple[str, str, str, int]]:
    return [(r.id, r.description, r.sequence, r.number) for r in read_reads(path)]


def fasta_records() -> list[tuple[str, str, str, int]]:
    return [(r.id, r.description, r.sequence, r.number) for r in read_fasta(DEMO_READS)]


@pytest.mark.parametrize("width", [None, 60, 7])
@pytest.mark.parametrize("repeat_header", [False, True])
def test_fastq_gives_the_records_of_the_same_reads_as_fasta(tmp_path, width, repeat_header):
    path = write(tmp_path / "reads.fq", fastq_text(DEMO_READS, width, repeat_header))
    assert records(path) == fasta_records()


def test_fastq_gzip_crlf_blank_lines_and_a_byte_order_mark_are_read_like_plain_fastq(tmp_path):
    text = "\ufeff\n" + fastq_text(DEMO_READS, 50).replace("\n@demo", "\n\n@demo").replace("\n", "\r\n")
    path = write(tmp_path / "reads.anything", gzip.compress(text.encode()))
    assert records(path) == fasta_records()


def test_read_reads_reads_fasta_as_read_fasta_does(tmp_path):
    assert records(DEMO_READS) == fasta_records()
    path = write(tmp_path / "reads.fq.gz", gzip.compress(DEMO_READS.read_bytes()))
    assert records(path) == fasta_records()


def test_a_fastq_record_with_an_empty_sequence_is_an_empty_read(tmp_path):
    path = write(tmp_path / "r.fq", "@e1 empty\n+\n@r2\nACGT\n+\nIIII\n@e3\n\n+\n\n")
    assert records(path) == [("e1", "e1 empty", "", 1), ("r2", "r2", "ACGT", 2), ("e3", "e3", "", 3)]


TRUNCATED = {
    "ends after the header": ("@r1 x\n", ["line 1", "record 1 ('r1')", "'+' line", "truncated"]),
    "ends in the sequence": (
        "@r1\nACGT\n+\nIIII\n@r2\nAC\n+\nII\n@r3\nACGT\n",
        ["record 3 ('r3'), line 10", "'+' line"],
    ),
    "ends in the quality": ("@r1\nACGTAC\n+\nIII\nII\n", ["line 5", "5 of the 6 quality letters", "truncated"]),
    "ends right after the '+' line": ("@r1\nACGT\n+\n", ["line 3", "0 of the 4 quality letters"]),
    "a header before the '+' line": ("@r1\nACGT\n@r2\nACGT\n+\nIIII\n", ["line 3", "record 1 ('r1')", "'@' header"]),
    "quality longer than the sequence": (
        "@r1\nACGT\n+\nIIIII\n",
        ["line 4", "quality line has 5 letters, the sequence 4"],
    ),
    "quality lines longer than the sequence": (
        "@r1\nACGTAC\n+\nIIII\nIII\n",
        ["line 4", "quality lines have 7 letters"],
    ),
    "quality missing, next record taken as quality": (
        "@r1\nACGT\n+\n@r2\nACGT\n+\nIIII\n",
        ["record 1 ('r1'), line 4", "no quality line", "line 4, read as quality, starts with '@'"],
    ),
    "text where a header should be": (
        "@r1\nAC\n+\nII\nACGT\n",
        ["line 5", "expected an '@' header line after record 1"],
    ),
    "a '+' line naming another read": ("@r1\nAC\n+r2\nII\n", ["line 3", "'+' line names 'r2'"]),
    "a header without an ID": ("@r1\nAC\n+\nII\n@ \nAC\n+\nII\n", ["record 2", "line 5", "no read ID"]),
}


def test_a_short_quality_line_is_named_with_its_true_length_in_its_own_record(tmp_path):
    """The quality line of r2 has 493 letters: the next header and sequence must not be counted as quality
    (they made the message say "993 quality letters for 500 sequence letters")."""
    text = "".join(f"@r{n} read {n}\n{'ACGT' * 125}\n+\n{'I' * (493 if n == 2 else 500)}\n" for n in range(1, 4))
    path = write(tmp_path / "reads.fq", text)
    with pytest.raises(UserError) as caught:
        records(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: record 2 ('r2'), line 8: the quality line has 493 letters, the sequence 500")
    assert "line 9, read as quality, starts with '@'" in message and "\n" not in message


@pytest.mark.parametrize("case", sorted(TRUNCATED))
def test_a_truncated_or_broken_fastq_record_is_a_one_line_error_naming_file_and_line(tmp_path, case):
    text, fragments = TRUNCATED[case]
    path = write(tmp_path / "reads.fq", text)
    with pytest.raises(UserError) as caught:
        records(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_truncated_fastq_gzip_file_is_an_error_naming_the_record(tmp_path):
    packed = gzip.compress(fastq_text(DEMO_READS).encode() * 20)
    path = write(tmp_path / "reads.fq.gz", packed[: len(packed) // 2])
    with pytest.raises(UserError, match=r"record \d+ \('demo_read_.*truncated or corrupt"):
        records(path)


def test_binary_data_is_refused_as_neither_fasta_nor_fastq(tmp_path):
    path = write(tmp_path / "reads.fq", b"@r1\nAC\x00GT\n+\nIIII\n")
    with pytest.raises(UserError, match="binary data.*FASTA or FASTQ"):
        records(path)


def test_chunk_writes_the_same_chunks_and_reads_index_from_fastq_and_fasta(tmp_path):
    outputs = {}
    fastq = write(tmp_path / "reads.fq", fastq_text(DEMO_READS, 60))
    fastq_gz = write(tmp_path / "reads.fq.gz", gzip.compress(fastq.read_bytes()))
    for source in (DEMO_READS, fastq, fastq_gz):
        out = tmp_path / source.name.replace(".", "_")
        chunk_fasta(source, 300, out / "chunks.fa", reads_table=out / "index.tsv")
        outputs[source.name] = ((out / "chunks.fa").read_bytes(), (out / "index.tsv").read_bytes())
    assert outputs["reads.fq"] == outputs[DEMO_READS.name] == outputs["reads.fq.gz"]


def test_chunk_refuses_a_truncated_fastq_and_writes_nothing(tmp_path):
    path = write(tmp_path / "reads.fq", "@r1\nACGT\n+\nIIII\n@r2\nACGT\n")
    with pytest.raises(UserError, match="line 6"):
        chunk_fasta(path, 500, tmp_path / "out" / "chunks.fa", reads_table=tmp_path / "out" / "index.tsv")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_predict_gives_byte_identical_outputs_from_fastq_fastq_gz_and_fasta(tmp_path, test_models):
    fastq = write(tmp_path / "demo.fq", fastq_text(DEMO_READS, 60, repeat_header=True))
    fastq_gz = write(tmp_path / "demo.fastq.gz", gzip.compress(fastq_text(DEMO_READS).encode()))
    made = {}
    for source in (DEMO_READS, fastq, fastq_gz):
        out = tmp_path / f"out-{source.name}"
        assert main(["-q", "predict", str(source), "--length", "500", "--esm2", str(test_models["esm2"]),
                     "--dnabert-s", str(test_models["dnabert_s"]), "--classifier", str(test_models["classifier_500"]),
                     "--output-dir", str(out), "--shard-size", "50"]) == 0  # fmt: skip
        made[source.name] = SampleFiles.at(out)
    results = {name: [Path(path).read_bytes() for path in files.outputs] for name, files in made.items()}
    assert results["demo.fq"] == results[DEMO_READS.name]
    assert results["demo.fastq.gz"] == results[DEMO_READS.name]
    assert Path(made[DEMO_READS.name].reads_table).read_bytes().count(b"\n") == 1 + len(fasta_records())


@pytest.mark.slow
def test_the_workflow_gives_the_same_outputs_for_fastq_gz_and_fasta(tmp_path, test_models):
    """A real (in-process) workflow run of two samples: the same four reads as FASTA and as FASTQ.gz."""
    import os
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parent.parent
    bin_dir = Path(sys.executable).parent
    reads = tmp_path / "four.fa"
    reads.write_text("".join(f">{r.description}\n{r.sequence}\n" for r in list(read_fasta(DEMO_READS))[:4]))
    write(tmp_path / "four.fq.gz", gzip.compress(fastq_text(reads, 60).encode()))
    config = {
        "samples": {"fa": str(reads), "fq": str(tmp_path / "four.fq.gz")},
        "length": 500,
        "models": {
            "esm2": str(test_models["esm2"]),
            "dnabert_s": str(test_models["dnabert_s"]),
            "classifier": str(test_models["classifier_500"]),
        },
        "embedding_mode": "in_process",
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    environment = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([str(bin_dir / "snakemake"), "--snakefile", str(repo / "workflow" / "Snakefile"),
                             "--directory", str(tmp_path), "--cores", "2", "--configfile", str(tmp_path / "config.yaml")],
                            cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:]
    fq, fa = (SampleFiles(sample, str(tmp_path / RESULTS)) for sample in ("fq", "fa"))
    for made, expected in zip(fq.outputs, fa.outputs):
        assert Path(made).read_bytes() == Path(expected).read_bytes(), made
    assert Path(fq.reads_table).read_text().count("\n") == 5
