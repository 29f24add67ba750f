"""The lifecycle rules of a run (docs/daemons.md, "Lifecycle in a run"), each on real snakemake runs
of the demo reads with real daemons: a re-run after a failed run starts the daemons it needs; a daemon
that dies or freezes is replaced or its work taken over; --keep-going keeps the daemons working;
embeddings depend on the model and the precision, predictions on the classifier, and on nothing else;
the failure manifest says what is true now."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from runs import (
    DEMO_READS,
    assert_same_outputs,
    daemon_pids,
    daemons_in,
    embeddings,
    kill_all_in,
    run_output,
    run_stats,
    run_workflow,
    shard_count,
    snakemake,
    start_run,
    wait_for_embeddings,
    wait_until,
    write_config,
)  # fmt: skip

from virnucpro.manifest import read_failures

pytestmark = pytest.mark.slow

SHARD_SIZE = 20  # the demo's 119 frames make 6 shards
CLIENT_TIMEOUT = 60  # a run that waits for a daemon that never comes fails within a minute, not an hour
TWO_DAEMONS_EACH = {"esm2": ["cpu", "cpu"], "dnabert_s": ["cpu", "cpu"]}
FREEZE_TIMEOUT = 15


def configure(workdir: Path, models: dict[str, Path], samples: dict[str, str] | None = None, **keys) -> Path:
    keys = {"shard_size": SHARD_SIZE, "client_timeout": CLIENT_TIMEOUT, **keys}
    return write_config(workdir, models, samples or {"demo": str(DEMO_READS)}, **keys)


def jobs_of(output: str, rule: str) -> int:
    """How many jobs of `rule` snakemake ran (or, in a dry run, would run)."""
    return sum(line.strip() in (f"rule {rule}:", f"localrule {rule}:") for line in output.splitlines())


@pytest.fixture
def workdir(tmp_path) -> Path:
    yield tmp_path
    kill_all_in(tmp_path)


@pytest.fixture
def reference(demo_reference) -> Path:
    return demo_reference


@pytest.fixture(scope="module")
def other_models(tmp_path_factory) -> dict[str, Path]:
    """Test models of other random weights (another seed), in the same formats."""
    from virnucpro.testmodels import make_test_models

    return make_test_models(tmp_path_factory.mktemp("other-models"), seed=7)


# --- 1. a re-run after a failed run -------------------------------------------------------------


def test_a_rerun_after_a_failed_run_starts_only_the_daemons_it_needs_and_finishes(workdir, test_models, reference):
    broken = workdir / "500_model.pth"
    broken.write_bytes(b"not a classifier")  # every classify job fails, after the daemons served shards
    configure(workdir, dict(test_models, classifier_500=broken))
    failed = run_workflow(workdir)
    assert failed.returncode != 0 and "Error in rule classify_shard" in failed.stdout
    assert list((workdir / "results" / "daemons").glob("*.stats.json"))  # what made every re-run hang, once

    shutil.copy(test_models["classifier_500"], broken)
    shards = [path.stem for path in (workdir / "results" / "demo" / "work" / "shards").glob("*.fa")]
    made = {path.name for path in embeddings(workdir)}
    unmade = {model for model in ("esm2", "dnabert_s") for shard in shards if f"{shard}.{model}.pt" not in made}
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert_same_outputs(workdir, reference)
    served = {line.split("--daemon-id ")[1].split("-")[0] for line in result.stdout.splitlines()
              if line.startswith("Shell command: virnucpro serve-job")}  # fmt: skip
    assert served == unmade  # the daemons of the models with embeddings left, and no other
    stats = run_stats(workdir)
    assert [(attempt["outcome"], attempt["model_loads"]) for attempt in stats["attempts"]] == [
        ("failed", 2),
        ("running or killed", len(unmade)),
    ]


def test_daemons_do_not_idle_out_while_the_run_still_prepares_their_shards(workdir, test_models, reference):
    configure(workdir, test_models, idle_timeout=5)  # below the time chunking, translating, sharding take
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert_same_outputs(workdir, reference)
    assert {entry["exit_reason"] for entry in run_stats(workdir)["daemons"]} == {"stopped"}


# --- 2. and 4. a daemon that dies or freezes -----------------------------------------------------


def test_a_killed_daemon_does_not_end_the_run_its_twin_takes_its_work(workdir, test_models, reference):
    configure(workdir, test_models, daemons=TWO_DAEMONS_EACH)
    run = start_run(workdir, cores=5)
    wait_for_embeddings(workdir, run, 2)
    [victim] = wait_until(lambda: daemon_pids(workdir, "esm2-1"), 120, "daemon esm2-1 running", run)
    os.kill(victim, signal.SIGKILL)
    assert run.wait(timeout=600) == 0, run_output(workdir)[-10000:]
    assert_same_outputs(workdir, reference)
    stats = run_stats(workdir)
    [lost] = stats["daemons_lost"]
    assert (lost["daemon"], lost["event"], lost["pid"]) == ("esm2-1", "lost", victim)
    assert daemons_in(workdir) == {}


def test_a_frozen_daemon_is_killed_and_nothing_it_held_is_computed_twice(workdir, test_models, reference):
    configure(workdir, test_models, daemons=TWO_DAEMONS_EACH, freeze_timeout=FREEZE_TIMEOUT)
    run = start_run(workdir, cores=5)
    wait_for_embeddings(workdir, run, 2)
    [frozen] = wait_until(lambda: daemon_pids(workdir, "esm2-1"), 120, "daemon esm2-1 running", run)
    os.kill(frozen, signal.SIGSTOP)
    assert run.wait(timeout=600) == 0, run_output(workdir)[-10000:]
    assert frozen not in daemons_in(workdir)  # killed, not left stopped to wake up later
    assert_same_outputs(workdir, reference)
    predictions = workdir / "results" / "demo" / "work" / "predictions"
    for embedding in embeddings(workdir):  # none rewritten after the classifier read it
        shard = embedding.name.split(".")[0]
        assert embedding.stat().st_mtime_ns <= (predictions / f"{shard}.tsv").stat().st_mtime_ns, embedding.name
    [event] = run_stats(workdir)["daemons_lost"]
    assert (event["daemon"], event["event"]) == ("esm2-1", "frozen")


def test_the_last_daemon_of_a_model_lost_is_restarted_by_its_serve_job(workdir, test_models, reference):
    configure(workdir, test_models)
    run = start_run(workdir)
    wait_for_embeddings(workdir, run, 2)
    [victim] = wait_until(lambda: daemon_pids(workdir, "dnabert_s-0"), 120, "daemon dnabert_s-0 running", run)
    os.kill(victim, signal.SIGKILL)
    assert run.wait(timeout=600) == 0, run_output(workdir)[-10000:]
    assert_same_outputs(workdir, reference)
    assert "Trying to restart job" in run_output(workdir)
    stats = {entry["daemon_id"]: entry for entry in run_stats(workdir)["daemons"]}
    assert stats["dnabert_s-0"]["model_loads"] == 1 and stats["dnabert_s-0"]["exit_reason"] == "stopped"
    assert [event["daemon"] for event in run_stats(workdir)["daemons_lost"]] == ["dnabert_s-0"]


# --- 3. --keep-going -----------------------------------------------------------------------------


def test_keep_going_keeps_the_daemons_working_for_the_other_samples(workdir, test_models, reference):
    duplicated = workdir / "dup.fa"
    duplicated.write_text(">r1\nACGTACGTAC\n>r1\nACGTACGTAC\n")  # fails at once: duplicate read ID
    configure(workdir, test_models, {"demo": str(DEMO_READS), "bad": str(duplicated)})
    result = run_workflow(workdir, "--keep-going")
    assert result.returncode != 0 and "duplicate read ID" in result.stdout
    assert_same_outputs(workdir, reference)  # the good sample was embedded, classified, aggregated
    assert daemons_in(workdir) == {}


def test_a_serve_job_that_fails_once_the_run_is_stopping_is_not_restarted(workdir, test_models, gate):
    # The bad sample's reads are held (a file lease) until the daemons are up; then the only ESM-2 daemon is
    # frozen and the reads let go: chunk_reads fails (duplicate read ID), the run decides to stop, and the
    # frozen daemon's serve job kills it and fails (it held its model's last daemon), which would have it
    # restarted (daemon_restarts) were the run going on.
    held = gate(workdir / "dup.fa", ">r1\nACGTACGTAC\n>r1\nACGTACGTAC\n")
    configure(workdir, test_models, {"demo": str(DEMO_READS), "bad": str(held.path)}, freeze_timeout=FREEZE_TIMEOUT)
    run = start_run(workdir)
    wait_until(lambda: len(daemons_in(workdir)) == 2 and len(registry_ready(workdir)) == 2, 120, "daemons ready", run)
    [frozen] = daemon_pids(workdir, "esm2-0")
    os.kill(frozen, signal.SIGSTOP)
    held.open()
    assert run.wait(timeout=600) != 0
    output = run_output(workdir)
    assert "duplicate read ID" in output and "Error in rule serve_model" in output, output[-10000:]
    assert "Trying to restart job" not in output
    assert daemons_in(workdir) == {}


def registry_ready(workdir: Path) -> list[str]:
    from virnucpro.serving import registry

    return [entry["daemon_id"] for entry in registry.list_entries(workdir / ".virnucpro") if entry["state"] == "ready"]


# --- 5. and 7. what decides that a shard is embedded again ----------------------------------------


def copy_of(reference: Path, workdir: Path) -> Path:
    shutil.copytree(reference, workdir, symlinks=True, dirs_exist_ok=True)
    return workdir


def reconfigure(workdir: Path, **changes) -> None:
    path = workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if key.startswith("models."):
            config["models"][key.split(".", 1)[1]] = value
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))


def test_another_model_re_embeds_every_shard_and_gives_that_models_outputs(workdir, tmp_path_factory, reference,
                                                                           other_models):  # fmt: skip
    fresh = tmp_path_factory.mktemp("fresh-other-models")
    configure(fresh, other_models)
    assert run_workflow(fresh).returncode == 0
    copy_of(reference, workdir)
    reconfigure(workdir, **{"models.esm2": str(other_models["esm2"]), "models.dnabert_s": str(other_models["dnabert_s"]),
                            "models.classifier": str(other_models["classifier_500"])})  # fmt: skip
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    shards = shard_count(workdir)
    assert jobs_of(result.stdout, "embed_esm2") == jobs_of(result.stdout, "embed_dnabert_s") == shards
    assert_same_outputs(workdir, fresh)


def test_a_model_replaced_in_place_re_embeds(workdir, reference, other_models, test_models, tmp_path):
    copy_of(reference, workdir)
    models = tmp_path / "models"
    shutil.copytree(Path(test_models["dnabert_s"]), models / "DNABERT-S")
    reconfigure(workdir, **{"models.dnabert_s": str(models / "DNABERT-S")})
    assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml")).stdout
    for name in os.listdir(other_models["dnabert_s"]):  # the same path, other weights
        shutil.copy(Path(other_models["dnabert_s"]) / name, models / "DNABERT-S" / name)
    dry = snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"))
    assert jobs_of(dry.stdout, "embed_dnabert_s") == shard_count(workdir), dry.stdout[-5000:]
    assert jobs_of(dry.stdout, "embed_esm2") == 0


@pytest.mark.parametrize("key, value, redone", [
    ("precision", "bf16", ("embed_esm2", "embed_dnabert_s", "classify_shard")),
    ("models.classifier", "other", ("classify_shard",)),
])  # fmt: skip
def test_precision_and_classifier_decide_what_is_redone(workdir, reference, other_models, key, value, redone):
    copy_of(reference, workdir)
    reconfigure(workdir, **{key: str(other_models["classifier_500"]) if value == "other" else value})
    dry = snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"))
    assert dry.returncode == 0, dry.stdout[-5000:]
    for rule in ("embed_esm2", "embed_dnabert_s", "classify_shard"):
        assert jobs_of(dry.stdout, rule) == (shard_count(workdir) if rule in redone else 0), rule


@pytest.mark.parametrize("changes", [
    {"client_timeout": 7200}, {"failure_policy": "fail"}, {"transport": "tcp"}, {"idle_timeout": 30},
    {"orphan_timeout": 60}, {"freeze_timeout": 0}, {"daemon_restarts": 5}, {"cache_clear_every": 3},
    {"embedding_mode": "in_process"}, {"daemons": TWO_DAEMONS_EACH}, {"run_dir": ".virnucpro-elsewhere"},
    {"esm2_engine": "all"},
])  # fmt: skip
def test_settings_that_cannot_change_a_result_redo_nothing(workdir, reference, changes):
    copy_of(reference, workdir)
    reconfigure(workdir, **changes)
    dry = snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"))
    assert dry.returncode == 0, dry.stdout[-5000:]
    for rule in ("embed_esm2", "embed_dnabert_s", "classify_shard", "aggregate_sample"):
        assert jobs_of(dry.stdout, rule) == 0, rule
    if "daemons" not in changes:  # other daemons only make the run statistics be collected again
        assert "Nothing to be done" in dry.stdout, dry.stdout[-5000:]


# --- 6. the manifest says what is true now ------------------------------------------------------


def test_a_shard_that_failed_then_succeeded_leaves_no_failure_behind(workdir, test_models, reference):
    configure(workdir, test_models, failure_policy="fail")
    prepared = snakemake(
        workdir, "--cores", "3", "--configfile", str(workdir / "config.yaml"), "--until", "shard_frames"
    )
    assert prepared.returncode == 0, prepared.stdout[-5000:]
    shard = workdir / "results" / "demo" / "work" / "shards" / "shard_00002.faa"
    good = shard.read_bytes()
    with open(shard, "r+b") as handle:  # in place: the checkpoint's folder stays as it was
        handle.write(b"not a FASTA file\n")
        handle.truncate()
    failed = run_workflow(workdir)
    assert failed.returncode != 0
    [entry] = read_failures(workdir / ".virnucpro" / "failures.tsv")
    assert (entry["shard"], entry["stage"]) == ("shard_00002", "embed_esm2")

    with open(shard, "r+b") as handle:
        handle.write(good)
        handle.truncate()
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert read_failures(workdir / ".virnucpro" / "failures.tsv") == []
    assert (workdir / "results" / "demo" / "failures.tsv").read_text().count("\n") == 1  # the header alone
    assert_same_outputs(workdir, reference)  # reads.tsv too: no read is left 'embedding failed'
