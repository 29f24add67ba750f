"""A full disk is the machine's fault, not the shard's (issue 10, case 1): on a real file system that
fills up in the middle of a run (a small tmpfs holding results/), the embedding jobs fail with one
line naming the path and the cause, nothing is recorded as a bad shard, nothing is left that a re-run
would take as done, and a re-run after space is freed gives the outputs of an undisturbed run."""

from __future__ import annotations

import os
import subprocess

import pytest
from runs import (
    DEMO_READS,
    assert_same_outputs,
    embeddings,
    kill_all_in,
    run_workflow,
    snakemake,
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
