"""The workflow with the SLURM profile (workflow/profiles/slurm) on a real single-node SLURM cluster,
started by scripts/slurm-cluster.sh: the same outputs as a local run, one model load per daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from runs import (
    BIN,
    DEMO_READS,
    IDLE_TIMEOUT,
    REPO,
    processes_in,
    ran_locally,
    serve_processes,
    slurm_jobs,
    snakemake,
    snakemake_command,
    wait_until,
    write_config,
    write_profile,
)

pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = REPO / "scripts" / "slurm-cluster.sh"
COMPARED = ("prediction_results.txt", "prediction_results_highestscore.csv")


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """Start the test cluster (installing SLURM if needed); the environment to reach it. Stopped at the end."""
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed and installing it (apt-get install slurm-wlm munge) needs root")
    # The test node's defaults (16 CPUs, 64,000 MB declared, not enforced) fit the profile as shipped.
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    started = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900
    )
    assert started.returncode == 0, started.stdout + started.stderr
    export = started.stdout.strip().splitlines()[-1]
    assert export.startswith("export SLURM_CONF="), started.stdout
    env["SLURM_CONF"] = export.split("=", 1)[1]
    yield env
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def runs(slurm_env, test_models, tmp_path_factory) -> dict[str, Path]:
    """The demo reads through the workflow twice: locally, and with the SLURM profile."""
    local = tmp_path_factory.mktemp("local-run")
    config = write_config(local, test_models, {"demo": str(DEMO_READS)})
    result = snakemake(local, "--cores", "3", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-10000:]

    cluster = tmp_path_factory.mktemp("slurm-run")
    config = write_config(cluster, test_models, {"demo": str(DEMO_READS)})
    profile = write_profile(cluster)
    result = snakemake(cluster, "--workflow-profile", str(profile), "--configfile", str(config), env=slurm_env)
    (cluster / "snakemake.out").write_text(result.stdout)
    assert result.returncode == 0, result.stdout[-10000:]
    return {"local": local, "slurm": cluster}


def test_the_slurm_run_gives_the_local_run_outputs_byte_for_byte(runs):
    for name in COMPARED:
        expected = (runs["local"] / "results" / "demo" / name).read_bytes()
        assert (runs["slurm"] / "results" / "demo" / name).read_bytes() == expected, name
    assert expected.count(b"\n") > 100


def test_each_daemon_was_a_slurm_job_that_loaded_its_model_once_and_served_over_tcp(runs):
    stats = json.loads((runs["slurm"] / "results" / "run_stats.json").read_text())
    daemons = {entry["daemon_id"]: entry for entry in stats["daemons"]}
    assert sorted(daemons) == ["dnabert_s-0", "esm2-0"]
    for daemon_id, entry in daemons.items():
        assert entry["model_loads"] == 1, daemon_id
        assert entry["shards"] >= 4, daemon_id
        assert entry["exit_reason"] == "stopped", daemon_id
        assert entry["transport"] == "tcp", daemon_id
        # SLURM's log of the serve job: it ran under sbatch (kept by slurm-keep-successful-logs)
        assert list((runs["slurm"] / "logs" / "slurm" / "rule_serve_model" / daemon_id).glob("*.log")), daemon_id


def test_the_clients_and_the_short_steps_ran_locally_the_daemons_and_the_aggregation_as_slurm_jobs(runs):
    out = (runs["slurm"] / "snakemake.out").read_text()
    for rule in ("embed_esm2", "embed_dnabert_s", "chunk_reads", "translate_chunks", "shard_frames", "classify_shard"):
        assert ran_locally(out, rule), rule
        assert not (runs["slurm"] / "logs" / "slurm" / f"rule_{rule}").exists(), rule
    for rule in ("serve_model", "aggregate_sample"):
        assert list((runs["slurm"] / "logs" / "slurm" / f"rule_{rule}").glob("*/*.log")), rule


def test_no_slurm_job_and_no_daemon_is_left_after_the_run(runs, slurm_env):
    assert slurm_jobs(slurm_env) == ""
    assert serve_processes(runs["slurm"]) == []


def test_a_run_that_failed_before_its_daemons_started_ends_them_without_waiting_for_their_idle_timeout(
    slurm_env, test_models, tmp_path
):
    # sbatch refuses the first job (a node feature that no node has): the run's watch writes the stop
    # token. The serve jobs are held in the queue until then (as if they waited for GPUs); once they
    # start they find the token changed since the run began, and do not start their daemons.
    config = write_config(tmp_path, test_models, {"demo": str(DEMO_READS)}, cluster_local_steps=[])
    profile = write_profile(
        tmp_path, chunk_reads={"constraint": "no_such_feature"}, serve_model={"slurm_extra": "--hold"}
    )
    command = snakemake_command(tmp_path, "--workflow-profile", str(profile), "--configfile", str(config))
    with open(tmp_path / "snakemake.out", "w") as out:
        run = subprocess.Popen(command, cwd=tmp_path, env=slurm_env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    # Released once the run's watch has written the stop token (a few seconds after the failure).
    while "virnucpro: stopping the model daemons:" not in (tmp_path / "snakemake.out").read_text():
        assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "snakemake.out").read_text()
        time.sleep(0.2)
    held = slurm_jobs(slurm_env).split()[::2]
    assert len(held) == 2  # the two serve jobs
    subprocess.run(["scontrol", "release", ",".join(held)], env=slurm_env, check=True, timeout=30)
    released = time.monotonic()
    run.wait(timeout=IDLE_TIMEOUT / 2)
    print(f"daemons started after the run failed: the run ended {time.monotonic() - released:.0f} s later")
    output = (tmp_path / "snakemake.out").read_text()
    assert run.returncode != 0 and "Error in rule chunk_reads" in output
    for log in (tmp_path / "logs" / "daemons").glob("*-0.log"):
        # serve-job's words: the run has ended, or (told a second earlier) the plan holds no embedding that
        # can still run once chunk_reads failed
        text = log.read_text()
        assert "; not starting the daemon" in text, text
        assert "the run is ending" in text or "its model has no work left in this run" in text, text
    assert slurm_jobs(slurm_env) == "" and serve_processes(tmp_path) == []


def test_a_job_limit_that_the_daemons_would_fill_is_refused_before_any_job(slurm_env, test_models, tmp_path):
    config = write_config(tmp_path, test_models, {"demo": str(DEMO_READS)})
    profile = write_profile(tmp_path)
    result = snakemake(tmp_path, "--workflow-profile", str(profile), "--jobs", "2", "--configfile", str(config),
                       env=slurm_env, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "--jobs 3" in result.stdout and "would take all 2 job slot(s)" in result.stdout
    assert not (tmp_path / "results").exists() and slurm_jobs(slurm_env) == ""


def test_a_job_that_failed_on_its_own_is_not_submitted_again_despite_the_profiles_retries(
    slurm_env, test_models, tmp_path
):
    # A duplicated read ID: chunk_reads, a SLURM job here, fails (exit status 1, SLURM state FAILED).
    duplicated = tmp_path / "dup.fa"
    duplicated.write_text(">r1\nACGTACGTAC\n>r1\nACGTACGTAC\n")
    config = write_config(tmp_path, test_models, {"bad": str(duplicated)}, cluster_local_steps=[])
    profile = write_profile(tmp_path)
    assert yaml.safe_load((profile / "config.yaml").read_text())["retries"] >= 1
    result = snakemake(tmp_path, "--workflow-profile", str(profile), "--configfile", str(config), env=slurm_env)
    assert result.returncode != 0 and "duplicate read ID" in result.stdout
    assert "Trying to restart job" not in result.stdout, result.stdout[-5000:]
    assert len(list((tmp_path / "logs" / "slurm" / "rule_chunk_reads").glob("*/*.log"))) == 1  # submitted once
    assert slurm_jobs(slurm_env) == "" and serve_processes(tmp_path) == []


def test_a_run_that_failed_after_its_daemons_stopped_resumes_without_submitting_a_daemon(
    runs, slurm_env, test_models, tmp_path, gate
):
    # The sample's aggregation (a SLURM job) is held at its input until both daemons have stopped, then
    # killed: the run fails with every embedding made. Its re-run must submit no serve job at all.
    config = write_config(tmp_path, test_models, {"demo": str(DEMO_READS)})
    profile = write_profile(tmp_path)
    work = tmp_path / "results" / "demo" / "work"
    command = snakemake_command(tmp_path, "--workflow-profile", str(profile), "--configfile", str(config))
    with open(tmp_path / "snakemake.out", "w") as out:
        run = subprocess.Popen(command, cwd=tmp_path, env=slurm_env, stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: (work / "chunked.fa").exists(), 300, "chunking done", run)
    held = gate(work / "reads_index.tsv")
    stats = tmp_path / "results" / "daemons"
    wait_until(lambda: len(list(stats.glob("*.stats.json"))) == 2 and not serve_processes(tmp_path), 600,
               "both daemons stopped with their statistics", run)  # fmt: skip
    wait_until(held.waiting, 300, "the aggregation (a SLURM job) waiting for its input", run)
    for pid, line in processes_in(tmp_path).items():
        if "virnucpro aggregate" in line:
            os.kill(pid, signal.SIGKILL)
    assert run.wait(timeout=300) != 0
    held.open()

    started = time.monotonic()
    result = snakemake(tmp_path, "--workflow-profile", str(profile), "--configfile", str(config), env=slurm_env)
    print(f"the re-run after the late failure took {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-10000:]
    assert "rule serve_model:" not in result.stdout and "embed_esm2:" not in result.stdout
    assert len(list((tmp_path / "logs" / "slurm" / "rule_serve_model").glob("*/*.log"))) == 2  # the first run's
    for name in COMPARED:
        assert (tmp_path / "results" / "demo" / name).read_bytes() == (
            runs["local"] / "results" / "demo" / name
        ).read_bytes()
    assert slurm_jobs(slurm_env) == "" and serve_processes(tmp_path) == []
