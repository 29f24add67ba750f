"""The report's plots: the numbers they show, computed from small tables, and the PNG files drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virnucpro.cli import main
from virnucpro.errors import UserError
from virnucpro.layout import PlotFiles, RunFiles
from virnucpro.outputs.report import (
    best_read_scores,
    daemon_metrics,
    daemons_plot,
    failure_counts,
    frame_scores,
    read_table,
    sample_plots,
    summarize_sample,
    verdict_counts,
    viral_fraction,
    write_summary_page,
)

PNG = b"\x89PNG\r\n\x1a\n"
READS = (
    "read_id\tlength\tchunks\tframes\tframes_scored\tvirus_chunks\tbest_virus_score\tverdict\treason\n"
    "r1\t500\t1\t2\t2\t1\t0.9\tvirus\t\n"
    "r2\t500\t1\t1\t1\t0\t0.2\tothers\t\n"
    "r3\t500\t1\t3\t2\t1\t0.7\tvirus\t1 of 3 frames not scored\n"
    "r4\t12\t0\t0\t0\t0\t\tunclassified\tinvalid sequence: 'J' at 3\n"
    "r5\t500\t1\t0\t0\t0\t\tunclassified\tno stop-free frame\n"
    "r6\t500\t1\t0\t0\t0\t\tunclassified\tinvalid sequence: 'Z' at 9\n"
)
PREDICTIONS = "Sequence_ID\tPrediction\tscore1\tscore2\nr1_chunk_1F1\tvirus\t0.1\t0.9\nr2_chunk_1R2\tothers\t0.8\t0.2\n"
FAILURES_HEADER = "time\tsample\tstage\tshard\tsequence_id\terror_class\tmessage\tattempts\tdaemon\n"
FAILURES = FAILURES_HEADER + (
    "t\ts\tembed_esm2\tshard_00001\t\tOutOfMemoryError\tm\t2\tesm2-0\n"
    "t\ts\tembed_esm2\tshard_00002\t\tOutOfMemoryError\tm\t2\tesm2-0\n"
    "t\ts\tembed_dnabert_s\tshard_00001\t\tDaemonLost\tm\t1\t\n"
)


@pytest.fixture
def tables(tmp_path):
    paths = {"reads": tmp_path / "reads.tsv", "predictions": tmp_path / "p.txt", "failures": tmp_path / "f.tsv"}
    paths["reads"].write_text(READS)
    paths["predictions"].write_text(PREDICTIONS)
    paths["failures"].write_text(FAILURES)
    return paths


def test_verdicts_count_virus_others_and_each_reason_for_no_verdict_without_its_details(tables):
    reads = read_table(tables["reads"], ("verdict",))
    assert verdict_counts(reads) == {
        "virus": 2, "others": 1, "no verdict: invalid sequence": 2, "no verdict: no stop-free frame": 1,
    }  # fmt: skip


def test_the_viral_fraction_is_over_all_input_reads(tables):
    assert viral_fraction(read_table(tables["reads"], ("verdict",))) == pytest.approx(2 / 6)
    assert viral_fraction([]) == 0.0


def test_scores_are_the_reads_best_scores_and_the_frames_score2(tables):
    assert best_read_scores(read_table(tables["reads"], ())) == [0.9, 0.2, 0.7]
    assert frame_scores(read_table(tables["predictions"], ())) == [0.9, 0.2]


def test_failures_are_counted_per_stage_and_error_class_most_frequent_first(tables):
    counts = failure_counts(read_table(tables["failures"], ()))
    assert list(counts.items()) == [("embed_esm2: OutOfMemoryError", 2), ("embed_dnabert_s: DaemonLost", 1)]


def test_daemon_metrics_are_throughput_load_time_and_shards():
    stats = {"daemons": [{"daemon_id": "esm2-0", "tokens_per_second": 1500.5, "load_seconds": 59.0, "shards": 7},
                         {"daemon_id": "dnabert_s-0", "tokens_per_second": None, "load_seconds": None, "shards": 0}]}  # fmt: skip
    assert daemon_metrics(stats) == [("esm2-0", 1500.5, 59.0, 7), ("dnabert_s-0", 0.0, 0.0, 0)]


def test_a_table_without_a_needed_column_is_refused_naming_it(tmp_path):
    path = tmp_path / "reads.tsv"
    path.write_text("read_id\tverdict\nr1\tvirus\n")
    with pytest.raises(UserError, match="best_virus_score"):
        read_table(path, ("read_id", "best_virus_score"))


def test_sample_plots_and_the_daemons_plot_are_png_files(tables, tmp_path):
    paths = sample_plots("s", tables["reads"], tables["predictions"], tables["failures"], tmp_path / "plots")
    assert [str(path) for path in paths] == list(PlotFiles(str(tmp_path / "plots")).pngs)
    stats = tmp_path / "run_stats.json"
    stats.write_text(json.dumps({"daemons": [{"daemon_id": "esm2-0", "tokens_per_second": 10.0, "load_seconds": 2}]}))
    paths.append(daemons_plot(stats, tmp_path / "plots"))
    assert str(paths[-1]) == RunFiles(str(tmp_path / "plots")).daemons_plot
    for path in paths:
        assert path.read_bytes().startswith(PNG), path
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no leftovers


def test_a_sample_without_failures_still_gets_its_failures_plot(tables, tmp_path):
    tables["failures"].write_text(FAILURES_HEADER)
    paths = sample_plots("s", tables["reads"], tables["predictions"], tables["failures"], tmp_path)
    assert paths[2].read_bytes().startswith(PNG)


def test_the_command_needs_a_sample_or_run_statistics(tmp_path, capsys):
    assert main(["report-plots", "--output-dir", str(tmp_path)]) == 2
    assert "--sample" in capsys.readouterr().err
    assert main(["report-plots", "--output-dir", str(tmp_path), "--sample", "s"]) == 2
    assert "--reads-table" in capsys.readouterr().err


# --- the summary page: bounded, whatever the number of reads (issue 10, case 9) ---------------------


def synthetic_tables(tmp_path, reads: int):
    """A sample of ``reads`` reads: read i has best virus score (i % 1000) / 1000 and two frames."""
    folder = tmp_path / f"sample-{reads}"
    folder.mkdir()
    header = READS.split("\n", 1)[0] + "\n"
    with open(folder / "reads.tsv", "w") as out:
        out.write(header)
        for i in range(reads):
            score = (i % 1000) / 1000
            verdict = "virus" if score >= 0.5 else "others"
            out.write(f"read{i}\t500\t1\t2\t2\t{int(score >= 0.5)}\t{score}\t{verdict}\t\n")
    with open(folder / "p.txt", "w") as out:
        out.write(PREDICTIONS.split("\n", 1)[0] + "\n")
        for i in range(reads):
            score = (i % 1000) / 1000
            for frame in ("F1", "R2"):
                out.write(f"read{i}_chunk_1{frame}\t{'virus' if score > 0.5 else 'others'}\t{1 - score}\t{score}\n")
    (folder / "f.tsv").write_text(FAILURES)
    return folder / "reads.tsv", folder / "p.txt", folder / "f.tsv"


def test_the_summary_counts_verdicts_and_lists_the_top_reads_and_a_preview(tmp_path):
    summary = summarize_sample("s", *synthetic_tables(tmp_path, 3000), top=5, preview=3)
    assert (summary.reads, summary.chunks, summary.frames, summary.frames_scored) == (3000, 3000, 6000, 6000)
    assert summary.verdicts == {"virus": 1500, "others": 1500}
    assert summary.predicted_frames == 6000 and sum(summary.frame_score_bins) == 6000
    assert sum(summary.read_score_bins) == 3000 and summary.read_score_bins[0] == 150
    # the best score 0.999 is held by reads 999, 1999, 2999: ties in input order
    assert [row["read_id"] for row in summary.top_reads] == ["read999", "read1999", "read2999", "read998", "read1998"]
    assert [row["read_id"] for row in summary.preview] == ["read0", "read1", "read2"]
    assert summary.failures == 3 and summary.failure_counts["embed_esm2: OutOfMemoryError"] == 2


def test_the_summary_page_does_not_grow_with_the_reads(tmp_path):
    sizes = []
    for reads in (500, 20000):
        summary = summarize_sample("s", *synthetic_tables(tmp_path, reads))
        path = write_summary_page(summary, tmp_path / f"out-{reads}")
        page = path.read_text()
        assert page.count("<tr>") < 250 and f"of {reads} reads" in page
        sizes.append(path.stat().st_size)
    assert abs(sizes[1] - sizes[0]) < 2000, sizes
    assert sizes[1] < 100_000


def test_reading_a_samples_tables_leaves_nothing_beside_them(tables, tmp_path):
    before = sorted(path.name for path in tmp_path.iterdir())
    assert summarize_sample("s", tables["reads"], tables["predictions"], tables["failures"]).failures == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # no f.tsv.lock: it is not the live manifest


def test_the_command_writes_the_plots_and_the_summary_page(tables, tmp_path):
    out = tmp_path / "plots"
    assert main(["-q", "report-plots", "--sample", "s", "--reads-table", str(tables["reads"]), "--predictions",
                 str(tables["predictions"]), "--failures", str(tables["failures"]), "--output-dir", str(out),
                 "--top", "2", "--preview", "1"]) == 0  # fmt: skip
    assert sorted(str(path) for path in out.iterdir()) == sorted(PlotFiles(str(out)).files)
    page = Path(PlotFiles(str(out)).summary_page).read_text()
    assert "Top-scoring reads (2)" in page and "First 1 of 6 reads" in page and "DaemonLost" in page
    assert all(oct(path.stat().st_mode & 0o777) == "0o644" for path in out.iterdir())
