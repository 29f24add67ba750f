"""The report's plots: the numbers they show, computed from small tables, and the PNG files drawn."""

from __future__ import annotations

import json

import pytest

from virnucpro.cli import main
from virnucpro.errors import UserError
from virnucpro.outputs.report import (
    best_read_scores,
    daemon_metrics,
    daemons_plot,
    failure_counts,
    frame_scores,
    read_table,
    sample_plots,
    verdict_counts,
    viral_fraction,
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
    assert [path.name for path in paths] == ["scores.png", "verdicts.png", "failures.png"]
    stats = tmp_path / "run_stats.json"
    stats.write_text(json.dumps({"daemons": [{"daemon_id": "esm2-0", "tokens_per_second": 10.0, "load_seconds": 2}]}))
    paths.append(daemons_plot(stats, tmp_path / "plots"))
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
