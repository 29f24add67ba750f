"""No daemon without work, and no wait for a daemon nobody starts (docs/daemons.md, "Lifecycle in a run",
rules 1 and 2), on real snakemake runs of the demo reads with real daemons: a re-run whose remaining work
needs no embedding plans no serve job; a model whose embeddings are made gets no daemon; any target and
any working directory are served; a dry run changes nothing; a run folder in use is refused; a daemon
that cannot start is not retried; every attempt of a serve job keeps its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from runs import (
    DEMO_READS,
    assert_same_outputs,
    daemon_pids,
    daemons_in,
    gate_esm2_shards,
    kill_all_in,
    line_with,
    processes_in,
    run_output,
    run_stats,
    run_workflow,
    snakemake,
    snakemake_command,
    snakemake_env,
    start_run,
    wait_until,
    write_config,
)  # fmt: skip

pytestmark = pytest.mark.slow

SHARD_SIZE = 20  # the demo's 119 frames make 6 shards
CLIENT_TIMEOUT = 60


def configure(workdir: Path, models: dict[str, Path], **keys) -> Path:
    keys = {"shard_size": SHARD_SIZE, "client_timeout": CLIENT_TIMEOUT, **keys}
    return write_config(workdir, models, {"demo": str(DEMO_READS)}, **keys)


def jobs_of(output: str, rule: str) -> int:
    """How many jobs of `rule` snakemake ran (or, in a dry run, would run)."""
    return sum(line.strip() in (f"rule {rule}:", f"localrule {rule}:") for line in output.splitlines())


def tree(workdir: Path) -> dict[str, tuple[int, int]]:
    """Every file under `workdir` (but snakemake's own bookkeeping and the test's output) with its size and
    modification time."""
    found = {}
    for path in workdir.rglob("*"):
        relative = path.relative_to(workdir)
        if path.is_file() and relative.parts[0] not in (".snakemake", "snakemake.out"):
            found[str(relative)] = (path.stat().st_size, path.stat().st_mtime_ns)
    return found


def serve_starts(workdir: Path) -> list[dict]:
    events = (workdir / ".virnucpro" / "events.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, events) if event.get("event") == "serve_started"]


def kill_once_loaded(workdir: Path, run: subprocess.Popen, daemon_id: str) -> None:
    """SIGKILL the daemon once it has loaded its model (its attempts log says so)."""
    [daemon] = wait_until(lambda: daemon_pids(workdir, daemon_id), 300, f"daemon {daemon_id} running", run)
    log = workdir / "logs" / "daemons" / f"{daemon_id}.attempts.log"
    wait_until(lambda: "loaded from" in log.read_text(), 300, f"{daemon_id} loaded its model", run)
    os.kill(daemon, signal.SIGKILL)


@pytest.fixture
def workdir(tmp_path) -> Path:
    yield tmp_path / "work"
    kill_all_in(tmp_path / "work")


@pytest.fixture
def reference(demo_reference) -> Path:
    return demo_reference


def test_a_run_that_fails_after_its_daemons_stopped_resumes_without_any_daemon(workdir, test_models, reference,
                                                                             gate):  # fmt: skip
    configure(workdir, test_models)
    reads_index = workdir / "results" / "demo" / "work" / "reads_index.tsv"
    run = start_run(workdir)
    wait_until(lambda: (workdir / "results" / "demo" / "work" / "chunked.fa").exists(), 300, "chunking done", run)
    held = gate(reads_index)  # the sample's aggregation blocks on it, after every embedding is made
    stats = workdir / "results" / "daemons"
    wait_until(lambda: len(list(stats.glob("*.stats.json"))) == 2 and not daemons_in(workdir), 300,
               "both daemons stopped with their statistics", run)  # fmt: skip
    wait_until(held.waiting, 120, "the aggregation waiting for its input", run)
    aggregate = [pid for pid, line in processes_in(workdir).items() if "virnucpro aggregate" in line]
    for pid in aggregate:
        os.kill(pid, signal.SIGKILL)
    assert run.wait(timeout=300) != 0
    held.open()

    before = tree(workdir)
    planned = snakemake(workdir, "-n", "--cores", "3", "--configfile", str(workdir / "config.yaml"))
    assert planned.returncode == 0, planned.stdout[-5000:]
    assert jobs_of(planned.stdout, "serve_model") == 0, planned.stdout[-5000:]
    assert tree(workdir) == before  # a dry run deletes (and writes) nothing

    resumed = run_workflow(workdir)
    assert resumed.returncode == 0, resumed.stdout[-10000:]
    assert jobs_of(resumed.stdout, "serve_model") == 0 and jobs_of(resumed.stdout, "embed_esm2") == 0
    assert_same_outputs(workdir, reference)
    attempts = run_stats(workdir)["attempts"]
    assert [(attempt["model_loads"], attempt["shards"]) for attempt in attempts] == [(2, 12), (0, 0)]
    assert run_stats(workdir)["shards"] == 12  # the whole run's story, both attempts


def test_a_model_whose_embeddings_are_made_gets_no_daemon(workdir, test_models, reference):
    configure(workdir, test_models)
    assert run_workflow(workdir).returncode == 0
    for path in (workdir / "results" / "demo" / "work" / "embeddings").glob("shard_00002.esm2.*"):
        path.unlink()  # one ESM-2 embedding (and its record) to make again, and nothing of DNABERT-S
    for path in (workdir / "results" / "demo").glob("*.*"):
        path.unlink()

    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert_same_outputs(workdir, reference)
    assert line_with(result.stdout, "serve-job --run-dir").count("--daemon-id esm2-0") == 1
    assert [event["daemon"] for event in serve_starts(workdir)] == ["esm2-0"]


def test_a_single_target_is_embedded_without_a_wait_for_daemons(tmp_path, test_models, reference):
    target, until = tmp_path / "target", tmp_path / "until"
    configure(target, test_models)
    result = snakemake(target, "results/demo/reads.tsv", "--cores", "3", "--configfile",
                       str(target / "config.yaml"), timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-10000:]
    assert "no esm2 daemon is part of this plan" in result.stdout
    assert "still waiting for a ready" not in result.stdout
    assert_same_outputs(target, reference)

    configure(until, test_models)
    result = snakemake(until, "--cores", "3", "--configfile", str(until / "config.yaml"), "--until",
                       "aggregate_sample", timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-10000:]
    assert "no dnabert_s daemon is part of this plan" in result.stdout
    assert "still waiting for a ready" not in result.stdout
    kill_all_in(target)
    kill_all_in(until)


def test_a_run_from_another_folder_leaves_nothing_there_and_never_disturbs_the_run_of_that_folder(
    tmp_path, test_models, reference
):
    here, there = tmp_path / "here", tmp_path / "there"
    configure(here, test_models)
    configure(there, test_models)
    local = start_run(here)
    wait_until(lambda: len(daemon_pids(here, "esm2-0")) == 1, 300, "the run of `here` serving", local)
    elsewhere = subprocess.run(
        snakemake_command(there, "--cores", "3", "--configfile", str(there / "config.yaml")),
        cwd=here, env=snakemake_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )  # fmt: skip
    assert elsewhere.returncode == 0, elsewhere.stdout[-10000:]
    assert local.wait(timeout=900) == 0, run_output(here)[-10000:]
    assert_same_outputs(here, reference)
    assert_same_outputs(there, reference)
    heartbeat = json.loads((here / ".virnucpro" / "heartbeat").read_text())
    assert heartbeat["workdir"] == str(here)  # the run of `there` never wrote into `here`'s run folder
    empty = tmp_path / "empty"
    empty.mkdir()
    rerun = subprocess.run(snakemake_command(there, "--cores", "3", "--configfile", str(there / "config.yaml"),
                                             "--forcerun", "collect_run_stats"),
                           cwd=empty, env=snakemake_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    assert list(empty.iterdir()) == []  # nothing left in the folder it was started from
    assert "later run" not in run_output(here)
    kill_all_in(here)


def test_a_run_folder_in_use_by_a_live_run_is_refused_in_one_line(tmp_path, test_models, reference, gate,
                                                                  long_leases):  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    shared = tmp_path / "shared-run-folder"
    configure(first, test_models, run_dir=str(shared), client_timeout=900)  # its clients wait on the gates
    configure(second, test_models, run_dir=str(shared))
    run = start_run(first)
    try:
        # The first run stays alive until the test is done: its ESM-2 shards are held (no start-up check of
        # a later run reads a shard whose embedding is not made).
        held = gate_esm2_shards(first, gate, run=run)
        wait_until(lambda: daemon_pids(first, "esm2-0"), 300, "the first run serving", run)
        refused = run_workflow(second)
        assert refused.returncode != 0
        line = line_with(refused.stdout, "is in use by another running workflow")
        assert str(shared) in line and str(first) in line
        assert not (second / "results" / "demo" / "reads.tsv").exists()
        # snakemake --unlock in the first folder, then a run there: refused the same way
        assert snakemake(first, "--unlock", "--configfile", str(first / "config.yaml")).returncode == 0
        again = run_workflow(first)
        assert again.returncode != 0 and "is in use by another running workflow" in again.stdout
        assert run.poll() is None
        for each in held:
            each.open()
        assert run.wait(timeout=900) == 0, run_output(first)[-10000:]
        assert_same_outputs(first, reference)
    finally:
        kill_all_in(first)


def test_a_daemon_that_cannot_start_is_not_retried_and_the_run_says_why(workdir, test_models):
    broken = workdir / "esm2_t2_64_test.pt"
    workdir.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")  # passes the start-up check (it exists), cannot be loaded
    # The clients' timeout is long (10 min): had they waited it out, the run would fail on it, and say so.
    configure(workdir, dict(test_models, esm2=broken), daemon_restarts=2, client_timeout=600)
    result = run_workflow(workdir, timeout=900)
    assert result.returncode != 0
    assert "not embedded within the client's timeout" not in result.stdout
    line = line_with(result.stdout, "virnucpro: daemon esm2-0 cannot start")
    assert "not retried" in line and "esm2_t2_64_test.pt" in line, line
    assert "every esm2 daemon" in result.stdout  # the waiting clients gave up at once, with the reason
    assert [event["daemon"] for event in serve_starts(workdir)].count("esm2-0") == 1
    assert "cannot start" in (workdir / "logs" / "daemons" / "esm2-0.log").read_text()


def test_every_attempt_of_a_serve_job_keeps_its_log_and_says_what_comes_next(workdir, test_models, reference):
    configure(workdir, test_models, daemon_restarts=1)
    run = start_run(workdir)
    kill_once_loaded(workdir, run, "esm2-0")
    assert run.wait(timeout=900) == 0, run_output(workdir)[-10000:]
    assert_same_outputs(workdir, reference)
    attempts = (workdir / "logs" / "daemons" / "esm2-0.attempts.log").read_text()
    assert "esm2-0: attempt 1 of run" in attempts and "esm2-0: attempt 2 of run" in attempts
    assert attempts.index("loaded from") < attempts.index("attempt 2 of run")  # the first attempt's lines kept
    assert "a restart of this serve job replaces it (attempt 2 of 2)" in run_output(workdir)


def test_with_no_restart_left_the_message_says_so(workdir, test_models):
    configure(workdir, test_models, daemon_restarts=0)
    run = start_run(workdir)
    kill_once_loaded(workdir, run, "esm2-0")
    assert run.wait(timeout=900) != 0
    output = run_output(workdir)
    assert "no restart is left (config key daemon_restarts: 0)" in output
    assert "a restart of this serve job" not in output
    assert daemons_in(workdir) == {}
