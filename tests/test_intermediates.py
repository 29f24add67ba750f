# ruff: noqa: F811 (test_run_rules's fixtures workdir and reference are used here too)
"""Intermediates verified where they are read, and re-runs that never rest on a file that is gone (issue 17,
cases 1, 2 and 4): the documented retry of a shard that failed under failure_policy continue; an embedding,
prediction table or reads index that is truncated or corrupt, named in one line; a missing intermediate made
again (with every step after it) instead of "Nothing to be done"; a report after a run with a failed sample.
Real snakemake runs of the demo reads with the test models; the files are damaged as a careless user would."""

from __future__ import annotations

import gzip
import hashlib
import html
import os
import re
from pathlib import Path

import pytest
import torch
from runs import DEMO_READS, assert_same_outputs, line_with, run_workflow, snakemake
from test_run_rules import configure, copy_of, jobs_of, reference, workdir  # noqa: F401 (fixtures too)

from virnucpro.cli import main
from virnucpro.engines.embed import embedding_file_damage, read_embeddings, write_embeddings
from virnucpro.errors import UserError
from virnucpro.layout import RunFiles, SampleFiles
from virnucpro.manifest import read_failures
from virnucpro.tables import read_rows, table_damage

DEMO = SampleFiles("demo")  # relative to the run's folder, as the run's messages name the files


# --- the checks themselves --------------------------------------------------------------------------


def test_an_embedding_file_cut_short_or_with_damaged_bytes_is_named_when_read(tmp_path):
    path = tmp_path / "shard_00001.esm2.pt"
    vectors = torch.arange(64 * 30, dtype=torch.float32).reshape(30, 64)
    write_embeddings(path, [f"f{index}" for index in range(30)], vectors)
    whole = path.read_bytes()
    assert embedding_file_damage(path, whole=True) is None
    path.write_bytes(whole[:5000])  # the issue's `truncate -s 5000`: torch said OSError [Errno 22]
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: the embedding file is truncated or corrupt"):
        read_embeddings(path)
    assert "not a whole zip archive" in embedding_file_damage(path)
    damaged = bytearray(whole)
    start = whole.find(vectors.numpy().tobytes()[:64])
    damaged[start + 100] ^= 0x40  # one bit of one vector: torch reads it without a word
    path.write_bytes(bytes(damaged))
    assert embedding_file_damage(path) is None  # its structure is whole ...
    assert embedding_file_damage(path, whole=True) == "its checksum does not match its content"  # ... its content not
    with pytest.raises(UserError, match="truncated or corrupt .its checksum does not match"):
        read_embeddings(path)


def test_a_counted_table_cut_between_two_lines_is_found(tmp_path):
    reads = tmp_path / "reads.fa"
    reads.write_text("".join(f">r{index}\n{'ACGT' * 30}\n" for index in range(5)))
    index = tmp_path / "reads_index.tsv"
    assert main(["-q", "chunk", str(reads), "--length", "500", "--output", str(tmp_path / "c.fa"),
                 "--reads-table", str(index)]) == 0  # fmt: skip
    assert table_damage(index) is None and len(list(read_rows(index, ("read_id",), counted=True))) == 5
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-2]))  # a row and the end line gone: every line left is whole
    assert table_damage(index) == "its last line is not its end line"
    with pytest.raises(UserError, match="reads table is truncated or corrupt"):
        list(read_rows(index, ("read_id",), what="reads table", counted=True))


# --- real runs ----------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file under ``folder`` (the snakemake and run folders aside): content digest and mtime."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not {".snakemake", ".virnucpro"} & set(path.relative_to(folder).parts)
    }


def dry_run(workdir: Path):
    return snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"))


@pytest.mark.slow
def test_the_documented_retry_of_a_shard_that_failed_under_continue_redoes_it(workdir, test_models, reference):
    """Issue 17, case 1: a shard fails under failure_policy continue (its file unreadable for a while), the
    cause goes away, its embedding files are deleted as config/README.md says: the re-run embeds it, classifies
    it and writes the sample's tables again; reads.tsv is the undisturbed run's and the manifest is empty.
    (It said "Nothing to be done", and the shard's reads stayed 'embedding failed'.)"""
    configure(workdir, test_models)
    prepared = snakemake(workdir, "--cores", "3", "--configfile", str(workdir / "config.yaml"),
                         "--until", "shard_frames")  # fmt: skip
    assert prepared.returncode == 0, prepared.stdout[-5000:]
    shard = workdir / DEMO.shard_protein("shard_00002")
    good, stamp = shard.read_bytes(), shard.stat()
    shard.write_bytes(b"not a FASTA file\n")  # a transient fault: the file read back wrong for a while
    failed = run_workflow(workdir)
    assert failed.returncode == 0, failed.stdout[-10000:]  # continue: the run completes
    [entry] = read_failures(workdir / ".virnucpro" / "failures.tsv")
    assert (entry["shard"], entry["stage"]) == ("shard_00002", "embed_esm2")
    assert "embedding failed" in (workdir / DEMO.reads_table).read_text()

    shard.write_bytes(good)  # the fault is gone: the file is as it was, its time too (restored from a copy)
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    for embedding in (workdir / DEMO.embeddings).glob("shard_00002.*.pt"):
        embedding.unlink()  # what config/README.md says to do
    retried = run_workflow(workdir)
    assert retried.returncode == 0, retried.stdout[-10000:]
    for rule, jobs in (("embed_esm2", 1), ("embed_dnabert_s", 1), ("classify_shard", 1), ("aggregate_sample", 1)):
        assert jobs_of(retried.stdout, rule) == jobs, (rule, retried.stdout[-5000:])
    assert_same_outputs(workdir, reference)
    assert read_failures(workdir / ".virnucpro" / "failures.tsv") == []
    assert (workdir / DEMO.failures).read_text().count("\n") == 1  # the header alone
    assert "Nothing to be done" in dry_run(workdir).stdout


def cut_embedding(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(5000)


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the vectors: the zip structure stays whole
    path.write_bytes(bytes(data))


def cut_table(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))  # its last row and its end line: every line left is whole


DAMAGE = {
    "embedding cut short": (DEMO.embedding("shard_00001", "esm2"), cut_embedding, "not a whole zip archive"),
    "embedding bytes damaged": (DEMO.embedding("shard_00004", "dnabert_s"), flip_a_bit, "its checksum"),
    "prediction table cut short": (DEMO.predictions("shard_00003"), cut_table, "its last line is not its end line"),
    "reads index cut short": (DEMO.reads_index, cut_table, "its last line is not its end line"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_intermediate_is_named_in_one_line_and_made_again_once_deleted(workdir, reference, case):
    """Issue 17, case 2: `truncate -s 5000` of an embedding made the re-run fail with a 20-line traceback
    that did not name the file; a table cut short was aggregated as it was (its reads 'not scored'). Now the
    run stops before any job, naming the file and what to do, and a dry run says the same and changes
    nothing; the file deleted, the run makes it again and gives the undisturbed outputs."""
    relative, damage, why = DAMAGE[case]
    copy_of(reference, workdir)
    damage(workdir / relative)
    before = snapshot(workdir)
    for result in (dry_run(workdir), run_workflow(workdir)):
        assert result.returncode != 0, result.stdout[-5000:]
        line = line_with(result.stdout, "truncated or corrupt")
        assert f"{relative} ({why}" in line and "Delete this file and run again" in line, line
        assert "Traceback" not in result.stdout
        assert snapshot(workdir) == before  # nothing deleted, nothing written
    (workdir / relative).unlink()
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert_same_outputs(workdir, reference)
    assert "Nothing to be done" in dry_run(workdir).stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "missing", [DEMO.predictions("shard_00003"), DEMO.embedding("shard_00002", "esm2"), DEMO.chunked]
)
def test_a_missing_intermediate_is_made_again_with_every_step_after_it(workdir, reference, missing):
    """Issue 17, case 2: with a shard's prediction gone (its classify job failed after a damaged embedding),
    the next run said "Nothing to be done". A dry run changes nothing and plans the file and what follows."""
    copy_of(reference, workdir)
    (workdir / missing).unlink()
    before = snapshot(workdir)
    dry = dry_run(workdir)
    assert dry.returncode == 0 and "Nothing to be done" not in dry.stdout, dry.stdout[-5000:]
    assert jobs_of(dry.stdout, "aggregate_sample") == 1
    assert snapshot(workdir) == before
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert (workdir / missing).exists()
    assert_same_outputs(workdir, reference)
    assert "Nothing to be done" in dry_run(workdir).stdout


@pytest.mark.slow
def test_a_report_after_a_run_with_a_failed_sample_shows_the_finished_one_and_why_the_other_failed(
    workdir, test_models, reference
):
    """Issue 17, case 4: `snakemake --report` after a --keep-going run with a failed sample gave no report
    ("File results/bad/plots/scores.png marked for report but does not exist")."""
    duplicated = workdir / "dup.fa.gz"
    duplicated.write_bytes(gzip.compress(b">r1\nACGTACGTAC\n>r1\nACGTACGTAC\n"))
    configure(workdir, test_models, {"demo": str(DEMO_READS), "bad": str(duplicated)})
    result = run_workflow(workdir, "--keep-going")
    assert result.returncode != 0 and "duplicate read ID" in result.stdout
    assert_same_outputs(workdir, reference)
    before = snapshot(workdir)
    report = snakemake(workdir, "--report", str(workdir / "report.html"), "--configfile", str(workdir / "config.yaml"))
    assert report.returncode == 0, report.stdout[-5000:]
    page = (workdir / "report.html").read_text()
    for path in DEMO.plots.files:
        assert path in page, path
    bad = SampleFiles("bad")
    assert f"{bad.folder}/" not in page.replace(bad.plots.folder, "")  # nothing of it as a result
    assert "Samples not finished" in page
    items = [re.sub(r"<[^>]+>", "", item) for item in re.findall(r"<li>(.*?)</li>", html.unescape(page))]
    [listed] = [item for item in items if item.startswith("bad: ")]
    assert "virnucpro chunk: error:" in listed and "duplicate read ID" in listed, listed
    assert "logs/chunk/bad.log" in listed, listed
    # A report makes nothing else. (The serve jobs' statistics that the failed run left are deleted when any
    # later snakemake starts, a report or a dry run too: daemons.smk, clear_stale_outputs.)
    after = {name: value for name, value in snapshot(workdir).items() if name != "report.html"}
    assert without_daemon_stats(after) == without_daemon_stats(before)


def without_daemon_stats(files: dict[str, tuple]) -> dict[str, tuple]:
    return {name: value for name, value in files.items() if not name.startswith(f"{RunFiles().daemons}/")}
