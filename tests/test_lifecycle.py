"""The daemons' lifecycle when a run does not end well, on real snakemake runs of the demo reads:
a failing shard job, an interrupt (SIGINT), snakemake killed with everything it started, snakemake
alone killed. The daemons must be gone within a bounded grace, and a re-run must finish the work
without embedding again the shards that were done, with the outputs of an uninterrupted run.

(A run with --cores = daemons + 1, and a configuration refused at start because it could not make
progress, are in test_workflow.py.) Run with -s to see the graces measured.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from runs import (
    DEMO_READS,
    assert_same_outputs,
    daemons_in,
    kill_all_in,
    run_stats,
    run_workflow,
    seconds_until_no_daemon,
    serve_jobs_in,
    shard_count,
    snakemake,
    start_run,
    wait_for_embeddings,
    wait_until,
    write_config,
)

from virnucpro.serving.runwatch import descendants
from virnucpro.serving.timing import AFTER_ERROR, DRAIN_GRACE
from virnucpro.serving.timing import RUN_HEARTBEAT_EVERY as HEARTBEAT_EVERY

pytestmark = pytest.mark.slow

SHARD_SIZE = 20  # the demo's 119 frames make 6 shards, so a run can be cut in the middle of its embeddings
ORPHAN_TIMEOUT = 10  # config key orphan_timeout for these runs
# What the mechanism bounds (the measured graces are printed, run with -s): the stop token is written
# at once (after an interrupt) or AFTER_ERROR s after a failed job, each daemon checks it every second
# and may finish its shard for at most its drain grace.
STOP_BOUND = AFTER_ERROR + DRAIN_GRACE + 5


def rerun(workdir: Path) -> dict:
    """Re-run (after --unlock) until done; the run statistics of the re-run."""
    unlocked = snakemake(workdir, "--unlock", "--configfile", str(workdir / "config.yaml"), timeout=120)
    assert unlocked.returncode == 0, unlocked.stdout[-5000:]
    result = run_workflow(workdir, "--rerun-incomplete")
    assert result.returncode == 0, result.stdout[-10000:]
    return run_stats(workdir)


def assert_resumed(workdir: Path, stats: dict, reference: Path) -> None:
    """The re-run loaded each model once, embedded fewer shards than the run has, and gave the
    outputs of the uninterrupted run."""
    total = 2 * shard_count(workdir)
    session = stats["attempts"][-1]["session"]
    daemons = [entry for entry in stats["daemons"] if entry["session"] == session]
    assert [entry["model_loads"] for entry in daemons] == [1, 1]
    served = sum(entry["shards"] for entry in daemons)
    assert 0 < served < total, f"the re-run embedded {served} of {total} shard files"
    print(f"{workdir.name}: the re-run embedded {served} of {total} shard files")
    assert_same_outputs(workdir, reference)


@pytest.fixture
def run_dir(tmp_path, test_models) -> Path:
    """A fresh working directory with the config of these runs; processes left in it are ended after the test."""
    write_config(tmp_path, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE, orphan_timeout=ORPHAN_TIMEOUT)
    yield tmp_path
    kill_all_in(tmp_path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, test_models) -> Path:
    """An uninterrupted run of the same configuration."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(workdir, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE)
    result = snakemake(workdir, "--cores", "3", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-10000:]
    assert shard_count(workdir) == 6
    return workdir


def test_a_failing_shard_job_ends_the_run_and_its_daemons_within_seconds(run_dir, test_models):
    broken = run_dir / "500_model.pth"
    broken.write_bytes(b"not a classifier")  # every classify job fails, while the daemons serve
    models = dict(test_models, classifier_500=broken)
    write_config(run_dir, models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE)
    run = start_run(run_dir, cores=4)
    deadline = time.monotonic() + 300
    while "Error in rule classify_shard" not in (run_dir / "snakemake.out").read_text():
        assert run.poll() is None and time.monotonic() < deadline, (run_dir / "snakemake.out").read_text()[-5000:]
        time.sleep(0.1)
    failed = time.monotonic()
    grace = seconds_until_no_daemon(run_dir, failed, limit=30)
    run.wait(timeout=60)
    ended = time.monotonic() - failed
    assert run.returncode != 0
    print(f"failing shard job: daemons gone {grace:.1f} s, snakemake exited {ended:.1f} s after the failure")
    assert grace < STOP_BOUND and ended < 2 * STOP_BOUND
    for log in (run_dir / "logs" / "daemons").glob("*-0.log"):
        assert "exiting (stopped)" in log.read_text(), log.name  # stopped by the failing job, not idle


def test_an_interrupt_stops_the_daemons_at_once_and_a_rerun_resumes(run_dir, reference):
    run = start_run(run_dir)
    wait_for_embeddings(run_dir, run, 4)
    interrupted = time.monotonic()
    run.send_signal(signal.SIGINT)  # to snakemake alone, as a job manager would
    grace = seconds_until_no_daemon(run_dir, interrupted, limit=30)
    run.wait(timeout=60)
    exited = time.monotonic() - interrupted
    assert run.returncode != 0
    print(f"SIGINT: daemons gone after {grace:.1f} s, snakemake exited after {exited:.1f} s")
    assert grace < STOP_BOUND and exited < 2 * STOP_BOUND
    assert_resumed(run_dir, rerun(run_dir), reference)


def test_killing_snakemake_and_all_it_started_leaves_no_daemon_and_a_rerun_resumes(run_dir, reference):
    run = start_run(run_dir)
    wait_for_embeddings(run_dir, run, 4)
    pids = [run.pid, *descendants(run.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    run.wait(timeout=10)
    seconds_until_no_daemon(run_dir, time.monotonic(), limit=5)
    registered = list((run_dir / ".virnucpro" / "registry").glob("*.json"))
    assert registered  # the killed daemons could not remove their entries: the re-run copes
    assert_resumed(run_dir, rerun(run_dir), reference)


def test_a_daemon_outlives_its_killed_snakemake_by_the_orphan_timeout_at_most(run_dir):
    run = start_run(run_dir)
    wait_for_embeddings(run_dir, run, 4)
    run.kill()  # snakemake alone: its jobs, the serve jobs among them, live on
    killed = time.monotonic()
    run.wait(timeout=10)
    assert daemons_in(run_dir)
    grace = seconds_until_no_daemon(run_dir, killed, limit=ORPHAN_TIMEOUT + 30)
    print(f"SIGKILL of snakemake alone: daemons gone after {grace:.1f} s (orphan_timeout {ORPHAN_TIMEOUT} s)")
    assert ORPHAN_TIMEOUT - HEARTBEAT_EVERY - 1 <= grace <= ORPHAN_TIMEOUT + 10
    wait_until(lambda: not serve_jobs_in(run_dir), 60, "the serve jobs ended after their daemons")
    for log in (run_dir / "logs" / "daemons").glob("*-0.log"):
        assert "the run that started daemon" in log.read_text(), log.name
    assert not list((run_dir / "results" / "daemons").glob("*.stats.json"))  # no statistics of a dead run
