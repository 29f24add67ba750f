"""The Snakemake workflow: lint, the checks of the configuration at start, and end-to-end runs on the
bundled demo reads with the small test models (daemon mode: one model load per daemon)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from runs import (
    ABSENT_MODELS,
    BIN,
    DEMO_READS,
    IDLE_TIMEOUT,
    daemons_in,
    line_with,
    pid_alive,
    read_ids,
    run_files,
    run_stats,
    sample_files,
    snakemake,
    write_config,
)

from virnucpro.layout import SampleFiles

# --- lint and checks at start (the models are checked only once the samples are) ----------------


def test_lint_reports_nothing(tmp_path):
    config = write_config(tmp_path, ABSENT_MODELS, {})
    result = snakemake(tmp_path, "--lint", "--configfile", str(config), timeout=120)
    assert result.returncode == 0, result.stdout
    assert "Congratulations" in result.stdout
    assert "Lints for" not in result.stdout


def test_a_missing_fasta_is_refused_naming_the_sample_and_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "reads.fa"
    config = write_config(tmp_path, ABSENT_MODELS, {"gut_01": str(missing)})
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    line = line_with(result.stdout, "FASTA file not found")
    assert "gut_01" in line and str(missing) in line


def test_an_unknown_config_key_is_refused_naming_the_key(tmp_path):
    config = write_config(tmp_path, ABSENT_MODELS, {"demo": str(DEMO_READS)}, shardsize=5)
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert "'shardsize' was unexpected" in line_with(result.stdout, "config")
    assert "Failed validating" not in result.stdout  # one line, not the schema dump


def test_a_length_other_than_300_or_500_is_refused(tmp_path):
    config = write_config(tmp_path, ABSENT_MODELS, {"demo": str(DEMO_READS)}, length=400)
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert "400" in line_with(result.stdout, "config key 'length'")


def test_an_unknown_esm2_engine_setting_is_refused_in_one_line(tmp_path):
    config = write_config(tmp_path, ABSENT_MODELS, {"demo": str(DEMO_READS)}, esm2_engine="packed,turbo")
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    line = line_with(result.stdout, "config key 'esm2_engine'")
    assert "unknown ESM-2 engine setting 'packed,turbo'" in line and "fused-qkv" in line


@pytest.mark.slow
def test_a_missing_model_is_refused_naming_the_key_and_how_to_get_test_models(tmp_path, test_models):
    models = dict(test_models, esm2=tmp_path / "esm2_t36_3B_UR50D.pt")
    config = write_config(tmp_path, models, {"demo": str(DEMO_READS)})
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    line = line_with(result.stdout, "models.esm2")
    assert str(models["esm2"]) in line and "virnucpro make-test-models" in line


@pytest.mark.parametrize("name", ["gut 01", "daemons"])
def test_a_bad_sample_name_is_refused(tmp_path, name):
    config = write_config(tmp_path, ABSENT_MODELS, {name: str(DEMO_READS)})
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert f"sample name '{name}'" in result.stdout


@pytest.mark.slow
def test_sample_sheet_paths_are_relative_to_the_sheet(tmp_path, test_models):
    sheet_dir = tmp_path / "sheets"
    (sheet_dir / "reads").mkdir(parents=True)
    shutil.copy(DEMO_READS, sheet_dir / "reads" / "s1.fa")
    (sheet_dir / "samples.tsv").write_text("sample\tfasta\ns1\treads/s1.fa\n")
    config = write_config(tmp_path, test_models, {}, sample_sheet=str(sheet_dir / "samples.tsv"))
    result = snakemake(tmp_path, "-n", "--cores", "3", "--configfile", str(config), timeout=120)
    assert result.returncode == 0, result.stdout
    line_with(result.stdout, f"input: {sheet_dir / 'reads' / 's1.fa'}")


def test_a_sample_in_both_the_mapping_and_the_sheet_is_refused(tmp_path):
    (tmp_path / "samples.tsv").write_text(f"sample\tfasta\ndemo\t{DEMO_READS}\n")
    sheet = str(tmp_path / "samples.tsv")
    config = write_config(tmp_path, ABSENT_MODELS, {"demo": str(DEMO_READS)}, sample_sheet=sheet)
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert "sample 'demo'" in line_with(result.stdout, "both")


def test_a_sample_listed_twice_in_the_sheet_is_refused(tmp_path):
    (tmp_path / "samples.tsv").write_text(f"sample\tfasta\ndemo\t{DEMO_READS}\ndemo\t{DEMO_READS}\n")
    config = write_config(tmp_path, ABSENT_MODELS, {}, sample_sheet=str(tmp_path / "samples.tsv"))
    result = snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert "line 3" in line_with(result.stdout, "listed twice")


@pytest.mark.slow
def test_too_few_cores_for_the_daemons_is_refused_before_any_job(tmp_path, test_models):
    config = write_config(tmp_path, test_models, {"demo": str(DEMO_READS)})
    result = snakemake(tmp_path, "--cores", "2", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert "--cores 3" in line_with(result.stdout, "daemon(s) would take all 2 job slot(s)")
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_more_gpu_daemons_than_gpus_is_refused_before_any_job(tmp_path, test_models):
    config = write_config(
        tmp_path, test_models, {"demo": str(DEMO_READS)}, daemons={"esm2": ["cuda:0", "cuda:1"], "dnabert_s": ["cpu"]}
    )
    result = snakemake(tmp_path, "--cores", "4", "--resources", "gpu=1", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    assert "--resources gpu=2" in line_with(result.stdout, "GPU daemon(s)")
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_cuda_daemon_on_a_machine_without_cuda_stops_the_run_with_one_line_naming_the_device(tmp_path, test_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    config = write_config(
        tmp_path, test_models, {"demo": str(DEMO_READS)}, daemons={"esm2": ["cuda"], "dnabert_s": ["cpu"]}
    )
    result = snakemake(tmp_path, "--cores", "3", "--resources", "gpu=1", "--configfile", str(config), timeout=300)
    assert result.returncode != 0
    said = line_with(result.stdout, "device 'cuda' requested but no CUDA GPU is visible here")
    assert "esm2" in said, said
    log = (tmp_path / "logs" / "daemons" / "esm2-0.log").read_text()
    assert "Traceback" not in log and "Traceback" not in result.stdout
    assert not daemons_in(tmp_path)


# --- end to end, daemon mode ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon_run(tmp_path_factory, test_models):
    """One daemon-mode run of the demo reads with --cores 3 (2 daemons + 1 slot for the rest)."""
    workdir = tmp_path_factory.mktemp("daemon-run")
    config = write_config(workdir, test_models, {"demo": str(DEMO_READS)})
    result = snakemake(workdir, "--cores", "3", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-10000:]
    assert "daemon=esm2-0" in result.stdout and "daemon=dnabert_s-0" in result.stdout
    return workdir


@pytest.mark.slow
def test_every_sample_output_exists(daemon_run):
    for path in sample_files(daemon_run).outputs:
        assert Path(path).is_file(), path
    assert Path(run_files(daemon_run).run_stats).is_file()


@pytest.mark.slow
def test_each_daemon_loaded_its_model_once_served_four_shards_or_more_and_was_stopped(daemon_run):
    stats = run_stats(daemon_run)
    daemons = {entry["daemon_id"]: entry for entry in stats["daemons"]}
    assert sorted(daemons) == ["dnabert_s-0", "esm2-0"]
    for daemon_id, entry in daemons.items():
        assert entry["model_loads"] == 1, daemon_id
        assert entry["shards"] >= 4, daemon_id
        assert entry["exit_reason"] == "stopped", daemon_id  # told to stop, not idled out


@pytest.mark.slow
def test_predictions_equal_the_one_process_predict_byte_for_byte(daemon_run, test_models, tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [
        str(BIN / "virnucpro"), "predict", str(DEMO_READS), "--length", "500",
        "--esm2", str(test_models["esm2"]), "--dnabert-s", str(test_models["dnabert_s"]),
        "--classifier", str(test_models["classifier_500"]), "--output-dir", str(tmp_path),
        "--shard-size", "25",  # the run's shard_size: frames are embedded in the same batches
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    made, run = SampleFiles.at(tmp_path), sample_files(daemon_run)
    for path, expected_path in (
        (run.prediction_results, made.prediction_results),
        (run.highest_scores, made.highest_scores),
    ):
        expected = Path(expected_path).read_bytes()
        assert Path(path).read_bytes() == expected, path
    assert expected.count(b"\n") > 100  # the demo reads give over a hundred chunks


@pytest.mark.slow
def test_reads_table_has_exactly_one_row_per_input_read(daemon_run):
    lines = Path(sample_files(daemon_run).reads_table).read_text().splitlines()
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    assert header[0] == "read_id"
    assert sorted(row[0] for row in rows) == sorted(read_ids(DEMO_READS))
    assert len(rows) == sum(line.startswith(">") for line in DEMO_READS.read_text().splitlines()) == 60


@pytest.mark.slow
def test_failures_table_has_its_header_and_no_failure(daemon_run):
    lines = Path(sample_files(daemon_run).failures).read_text().splitlines()
    assert len(lines) == 1
    columns = set(lines[0].split("\t"))
    assert {"sample", "stage", "shard", "sequence_id", "error_class", "message", "attempts", "time"} <= columns


@pytest.mark.slow
def test_the_daemons_are_gone_after_the_run(daemon_run):
    stats = run_stats(daemon_run)
    for entry in stats["daemons"]:
        assert not pid_alive(entry["pid"]), entry["daemon_id"]
    for path in (daemon_run / ".virnucpro" / "registry").glob("*.json"):
        assert not pid_alive(json.loads(path.read_text())["pid"]), path.name
    assert daemons_in(daemon_run) == {}
    files = run_files(daemon_run)
    assert sorted(str(path) for path in Path(files.daemons).iterdir()) == [
        files.daemon_stats("dnabert_s-0"),
        files.daemon_stats("esm2-0"),
    ]  # the serve jobs' outputs, and nothing else of the serving machinery


@pytest.mark.slow
def test_a_second_run_has_nothing_to_do(daemon_run, tmp_path):
    workdir = tmp_path / "again"
    shutil.copytree(daemon_run, workdir, symlinks=True)
    result = snakemake(workdir, "--cores", "3", "--configfile", str(workdir / "config.yaml"))
    assert result.returncode == 0, result.stdout
    assert "Nothing to be done" in result.stdout


@pytest.mark.slow
def test_a_rerun_that_needs_no_embedding_starts_no_daemon(daemon_run, tmp_path):
    workdir = tmp_path / "stats-again"
    shutil.copytree(daemon_run, workdir, symlinks=True)
    Path(run_files(workdir).run_stats).unlink()
    result = snakemake(workdir, "--cores", "3", "--configfile", str(workdir / "config.yaml"))
    assert result.returncode == 0, result.stdout
    assert "rule serve_model" not in result.stdout and "rule embed_" not in result.stdout
    assert "localrule collect_run_stats" in result.stdout and daemons_in(workdir) == {}
    stats = run_stats(workdir)
    assert [attempt["daemons"] for attempt in stats["attempts"]] == [[]]  # a new run: the first one ended well


@pytest.mark.slow
def test_a_failing_job_stops_the_daemons_without_waiting_for_their_idle_timeout(tmp_path, test_models):
    duplicated = tmp_path / "dup.fa"
    duplicated.write_text(">r1\nACGTACGTAC\n>r1\nACGTACGTAC\n")
    config = write_config(tmp_path, test_models, {"demo": str(DEMO_READS), "bad": str(duplicated)})
    started = time.monotonic()
    # --retries: a job that failed on its own (not lost with a cluster node) is not run again all the same
    result = snakemake(tmp_path, "--cores", "3", "--retries", "2", "--configfile", str(config))
    assert result.returncode != 0
    assert "duplicate read ID" in result.stdout and "Trying to restart job" not in result.stdout
    assert time.monotonic() - started < IDLE_TIMEOUT / 2
    assert daemons_in(tmp_path) == {}


@pytest.mark.slow
def test_the_run_draws_the_report_plots_and_the_report_renders_them(daemon_run):
    plots = [Path(path) for path in (*sample_files(daemon_run).plots.pngs, run_files(daemon_run).daemons_plot)]
    for plot in plots:
        assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), plot
    result = snakemake(daemon_run, "--report", "report.html", "--configfile", str(daemon_run / "config.yaml"))
    assert result.returncode == 0, result.stdout[-5000:]
    html = (daemon_run / "report.html").read_text()
    tables = (run_files(daemon_run).run_stats, sample_files(daemon_run).reads_table, sample_files(daemon_run).failures)
    for name in [plot.name for plot in plots] + [Path(path).name for path in tables]:
        assert name in html, name
    assert "viral fraction" in html  # a caption
