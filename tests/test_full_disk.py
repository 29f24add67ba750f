"""A full disk is the machine's fault, not the shard's: on a real file system that fills up in the
middle of a run (a small tmpfs holding results/, the run folder, or logs/), the run ends with one line
naming the path and the cause (never a hang), nothing is recorded as a bad shard, nothing is left that a
re-run would take as done, and a re-run after space is freed gives the outputs of an undisturbed run."""

from __future__ import annotations

import os
import subprocess

import pytest
from runs import (
    DEMO_READS,
    assert_same_outputs,
    daemons_in,
    embeddings,
    kill_all_in,
    line_with,
    run_output,
    run_workflow,
    snakemake,
    start_run,
    wait_until,
    write_config,
)  # fmt: skip

from virnucpro.engines.embed import read_embeddings
from virnucpro.manifest import read_failures

pytestmark = pytest.mark.slow

SHARD_SIZE = 20


@pytest.fixture
def small_disk(tmp_path):
    """A working directory whose results/ is a fresh 8 MB tmpfs (unmounted at the end)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    results = tmp_path / "results"
    results.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(results)], check=True)
    yield tmp_path
    kill_all_in(tmp_path)
    subprocess.run(["umount", "-l", str(results)], check=False)


def fill(folder) -> int:
    """Write a file into `folder` until its file system has no space left; the bytes written."""
    written = 0
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
                written += 65536
        except OSError as error:
            assert error.errno == 28, error  # ENOSPC
    return written


@pytest.fixture(scope="module")
def reference(tmp_path_factory, test_models):
    workdir = tmp_path_factory.mktemp("undisturbed")
    write_config(workdir, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE)
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    return workdir


def test_a_disk_that_fills_up_fails_the_run_cleanly_and_a_rerun_after_freeing_it_finishes(small_disk, test_models,
                                                                                        reference):  # fmt: skip
    workdir = small_disk
    write_config(workdir, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE, failure_policy="continue")
    prepared = snakemake(
        workdir, "--cores", "3", "--configfile", str(workdir / "config.yaml"), "--until", "shard_frames"
    )
    assert prepared.returncode == 0, prepared.stdout[-5000:]
    assert fill(workdir / "results") > 0

    failed = run_workflow(workdir)
    assert failed.returncode != 0
    logs = list((workdir / "logs" / "embed" / "demo").glob("*.log"))
    messages = [line for log in logs for line in log.read_text().splitlines() if "error:" in line]
    assert messages, failed.stdout[-5000:]
    for line in messages:
        assert "No space left on device" in line and "/results/demo/work/embeddings/shard_" in line, line
    assert not any("Traceback" in log.read_text() for log in logs)
    assert read_failures(workdir / ".virnucpro" / "failures.tsv") == []  # no shard was blamed
    for embedding in embeddings(workdir):  # whatever was written before the disk filled up is whole
        ids, _ = read_embeddings(embedding)
        assert ids, embedding.name

    (workdir / "results" / "filler").unlink()
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert_same_outputs(workdir, reference)


@pytest.fixture
def small_disk_at(tmp_path):
    """Mount a fresh 8 MB tmpfs at a folder of the working directory (unmounted at the end)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(name: str):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield mount
    kill_all_in(tmp_path)
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_run_folder_that_fills_up_ends_the_run_in_one_line_and_a_rerun_finishes(tmp_path, small_disk_at,
                                                                                  test_models, reference):  # fmt: skip
    workdir = tmp_path
    run_folder = small_disk_at(".virnucpro")
    write_config(workdir, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE)
    run = start_run(workdir)
    wait_until(lambda: list((run_folder / "registry").glob("*.json")), 300, "the daemons registered", run)
    assert fill(run_folder) > 0
    assert run.wait(timeout=300) != 0  # it ends: a run whose heartbeat cannot be written never hangs
    line = line_with(run_output(workdir), "the run cannot go on")
    assert str(run_folder) in line and "No space left on device" in line, line
    wait_until(lambda: not daemons_in(workdir), 120, "the daemons gone")

    (run_folder / "filler").unlink()
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert_same_outputs(workdir, reference)


def test_a_full_log_folder_never_hangs_the_run(tmp_path, small_disk_at, test_models, reference):
    workdir = tmp_path
    logs = small_disk_at("logs")
    assert fill(logs) > 0
    write_config(workdir, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE)
    result = run_workflow(workdir)  # within run_workflow's timeout: the failure mode was a hang
    assert daemons_in(workdir) == {}
    if result.returncode != 0:
        assert "No space left on device" in result.stdout, result.stdout[-5000:]
        (logs / "filler").unlink()
        result = run_workflow(workdir)
        assert result.returncode == 0, result.stdout[-10000:]
    assert_same_outputs(workdir, reference)
