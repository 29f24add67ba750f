"""Read IDs with quotes, '#', ',', backslashes, non-ASCII letters, HTML markup: every table the project
writes and reads keeps them exactly (issue 10, case 2: an ID `"a` once swallowed the next reads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virnucpro.cli import main
from virnucpro.errors import UserError
from virnucpro.fasta import read_fasta
from virnucpro.layout import SampleFiles
from virnucpro.manifest import append_failure, read_failures
from virnucpro.outputs.aggregate import aggregate_sample, chunk_of, read_of
from virnucpro.outputs.report import summarize_sample, summary_page
from virnucpro.prep.chunk import chunk_fasta
from virnucpro.tables import format_row, read_rows

DEMO_READS = Path(__file__).resolve().parent / "data" / "demo_reads.fa"
ODD_IDS = ['"a', "b", 'c"', "d", "x#y", "p,q", "back\\slash", "ünï", "<i>&amp;", "it's", "r_chunk_2", '""']
READS_COLUMNS = ["read_id", "length", "chunks", "frames", "frames_scored", "virus_chunks", "best_virus_score",
                 "verdict", "reason"]  # fmt: skip


def coding_reads(count: int) -> list[str]:
    """Sequences of demo reads that have stop-free frames."""
    sequences = [record.sequence for record in read_fasta(DEMO_READS) if "coding-like" in record.description]
    return sequences[:count]


def write_reads(path: Path, ids: list[str], sequences: list[str]) -> Path:
    path.write_text("".join(f">{read_id} some description\n{sequence}\n" for read_id, sequence in zip(ids, sequences)))
    return path


def lines(path: Path | str) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, test_models):
    """`virnucpro predict` of the same reads twice: with the odd IDs, and with plain IDs r0, r1, ..."""
    root = tmp_path_factory.mktemp("odd-ids")
    sequences = coding_reads(len(ODD_IDS))
    plain_ids = [f"r{index}" for index in range(len(ODD_IDS))]
    # and two reads without a verdict: no stop-free frame, and a quote in the sequence (a skip reason with a quote)
    no_frame = next(record.sequence for record in read_fasta(DEMO_READS) if record.id == "demo_read_no_frame")
    extra_ids, extra_sequences = ['no"frame', "bad,seq"], [no_frame, 'ACG"TACGT']
    outputs = {}
    for name, ids in (("odd", ODD_IDS + extra_ids), ("plain", plain_ids + ["e0", "e1"])):
        reads = write_reads(root / f"{name}.fa", ids, sequences + extra_sequences)
        out = root / name
        assert main(["-q", "predict", str(reads), "--length", "300", "--esm2", str(test_models["esm2"]),
                     "--dnabert-s", str(test_models["dnabert_s"]), "--classifier", str(test_models["classifier_300"]),
                     "--output-dir", str(out), "--shard-size", "7"]) == 0  # fmt: skip
        outputs[name] = (SampleFiles.at(out), ids)
    return outputs


def test_every_read_appears_once_in_reads_tsv_with_its_exact_id(runs):
    out, ids = runs["odd"]
    rows = list(read_rows(Path(out.reads_table), READS_COLUMNS))
    assert [row["read_id"] for row in rows] == ids
    assert len(lines(out.reads_table)) == len(ids) + 1
    by_id = {row["read_id"]: row for row in rows}
    for read_id in ODD_IDS:
        assert int(by_id[read_id]["frames"]) > 0 and by_id[read_id]["verdict"] in ("virus", "others"), read_id
    assert by_id['no"frame']["reason"] == "no stop-free frame"
    assert by_id["bad,seq"]["reason"] == "invalid sequence: character '\"' at position 4"


def test_the_outputs_are_those_of_plain_ids_with_only_the_ids_changed(runs):
    """The IDs change nothing but themselves: same rows, same scores, same verdicts, same order."""
    (odd, odd_ids), (plain, plain_ids) = runs["odd"], runs["plain"]
    rename = dict(zip(plain_ids, odd_ids))

    def renamed(line: str) -> str:
        first, rest = line.split("\t", 1)
        read_id, _, chunk = first.rpartition("_chunk_") if "_chunk_" in first else (first, "", "")
        return f"{rename[read_id]}_chunk_{chunk}\t{rest}" if chunk else f"{rename[read_id]}\t{rest}"

    for made, table in ((odd.reads_table, plain.reads_table), (odd.prediction_results, plain.prediction_results)):
        expected = [lines(table)[0]] + [renamed(line) for line in lines(table)[1:]]
        assert lines(made) == expected, made
    assert sorted(lines(odd.highest_scores)[1:]) == sorted(renamed(line) for line in lines(plain.highest_scores)[1:])


def test_the_published_files_write_ids_as_they_are_with_no_quoting(runs):
    """As the published tool's f"{id}\\t..." lines: an ID is written verbatim, never quoted or escaped."""
    out, _ = runs["odd"]
    frames = [line.split("\t")[0] for line in lines(out.prediction_results)[1:]]
    assert {read_of(chunk_of(frame)) for frame in frames} == set(ODD_IDS)
    assert any(line.startswith('"a_chunk_1') for line in lines(out.prediction_results))
    assert any(line.startswith('c"_chunk_1\t') for line in lines(out.highest_scores))
    assert any(line.startswith("back\\slash_chunk_1") for line in lines(out.prediction_results))


def test_the_report_summary_keeps_the_ids_and_escapes_them_in_html(runs):
    out, ids = runs["odd"]
    summary = summarize_sample("odd", Path(out.reads_table), Path(out.prediction_results), Path(out.failures))
    assert summary.reads == len(ids)
    assert [row["read_id"] for row in summary.preview] == ids
    assert {row["read_id"] for row in summary.top_reads} <= set(ODD_IDS)
    page = summary_page(summary)
    assert "&lt;i&gt;&amp;amp;" in page and "<i>" not in page
    assert "&quot;a" in page and "back\\slash" in page and "ünï" in page


def test_the_reads_index_round_trips_odd_ids(tmp_path):
    reads = write_reads(tmp_path / "reads.fa", ODD_IDS, coding_reads(len(ODD_IDS)))
    chunk_fasta(reads, 500, tmp_path / "chunks.fa", reads_table=tmp_path / "index.tsv")
    rows = list(read_rows(tmp_path / "index.tsv", ("read_id", "length", "chunks", "skip_reason"), counted=True))
    assert [row["read_id"] for row in rows] == ODD_IDS
    assert {read_of(record.id) for record in read_fasta(tmp_path / "chunks.fa")} == set(ODD_IDS)


def test_aggregate_reads_failures_of_odd_ids_and_writes_them_back_exactly(tmp_path):
    index = tmp_path / "index.tsv"
    index.write_text('read_id\tlength\tchunks\tskip_reason\n"a\t300\t1\t\nc"\t300\t1\t\n#end\t2\n', encoding="utf-8")
    nucleotide = tmp_path / "nuc.fa"
    nucleotide.write_text('>"a_chunk_1F1\nACG\n>c"_chunk_1F1\nACG\n')
    predictions = tmp_path / "p.tsv"
    predictions.write_text('Sequence_ID\tPrediction\tscore1\tscore2\nc"_chunk_1F1\tvirus\t0.25\t0.75\n#end\t1\n')
    manifest = tmp_path / "failures.tsv"
    append_failure(manifest, sample="s", stage="embed_esm2", shard="shard_00000", sequence_id='"a_chunk_1F1',
                   error_class="OutOfMemoryError", message="too long\tfor memory", attempts=1)  # fmt: skip
    out = SampleFiles.at(tmp_path / "out")
    aggregate_sample(sample="s", reads_table=index, nucleotide=nucleotide, predictions=[predictions],
                     manifest=manifest, output_dir=Path(out.folder))  # fmt: skip
    rows = {row["read_id"]: row for row in read_rows(Path(out.reads_table), READS_COLUMNS)}
    assert list(rows) == ['"a', 'c"']
    assert (rows['"a']["verdict"], rows['"a']["reason"]) == ("unclassified", "embedding failed")
    assert (rows['c"']["verdict"], rows['c"']["best_virus_score"]) == ("virus", "0.75")
    [failure] = read_failures(Path(out.failures))
    assert failure["sequence_id"] == '"a_chunk_1F1' and failure["message"] == "too long\tfor memory"


def test_a_table_field_never_holds_a_tab_or_a_line_break(tmp_path):
    assert format_row(['"a', "x#y", "p,q", "back\\slash", 3]) == '"a\tx#y\tp,q\tback\\slash\t3\n'
    for bad in ("a\tb", "a\nb", "a\rb"):
        with pytest.raises(ValueError):
            format_row(["ok", bad])
    path = tmp_path / "t.tsv"
    path.write_text('id\tn\n"a\t1\nb"\t2\n')
    assert list(read_rows(path, ("id",))) == [{"id": '"a', "n": "1"}, {"id": 'b"', "n": "2"}]
    path.write_text('id\tn\n"a\t1\textra\n')
    with pytest.raises(UserError, match="line 2: 3 tab-separated fields, expected 2"):
        list(read_rows(path, ("id",)))
