"""A daemon's model thread (virnucpro.serving.worker.Worker) driven without sockets: a real small ESM-2
model, jobs submitted to its queue, its events collected from the ``post`` callable it is given."""

from __future__ import annotations

import json
import math
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_helpers import assert_same_as_in_process, fasta_ids, proteins, wait_for, write_proteins

from virnucpro.engines.embed import read_embeddings
from virnucpro.manifest import read_failures
from virnucpro.serving.confine import Confinement
from virnucpro.serving.rundir import RunDir
from virnucpro.serving.spec import DaemonSpec
from virnucpro.serving.worker import Job, Worker, done_record

EVENT_TIMEOUT = 120.0


class Driven:
    """A Worker running in its own thread; its events in order."""

    def __init__(self, run_dir: Path, weights: Path, daemon_id: str = "esm2-test"):
        self.events: queue.Queue[dict] = queue.Queue()
        confinement = Confinement([run_dir.parent / "data"], never_write=[run_dir, weights])
        spec = DaemonSpec(daemon_id=daemon_id, model="esm2", weights=weights)
        self.worker = Worker(spec, RunDir(run_dir), confinement, post=self.events.put)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def next(self) -> dict:
        try:
            return self.events.get(timeout=EVENT_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no event from the worker within {EVENT_TIMEOUT} s") from None

    def finish(self, job: Job) -> dict:
        """Submit a job and return its ``finished`` event (after a ``started`` one if it was computed)."""
        self.worker.submit(job)
        event = self.next()
        if event["event"] == "started":
            assert event["request_id"] == job.request_id
            event = self.next()
            assert event["event"] == "finished" and event["computed"] is True, event
        else:
            assert event["event"] == "finished" and event["computed"] is False, event
        assert event["reply"]["request_id"] == job.request_id
        return event

    def close(self) -> None:
        self.worker.close()
        self.thread.join(EVENT_TIMEOUT)
        assert not self.thread.is_alive()
        assert self.next() == {"event": "exit"}


@pytest.fixture
def driven(models, tmp_path):
    started: list[Driven] = []

    def start(**kwargs) -> Driven:
        started.append(Driven(tmp_path / "run", kwargs.pop("weights", models["esm2"]), **kwargs))
        return started[-1]

    yield start
    for each in started:
        each.worker.close()


def ready(driven_worker: Driven) -> Driven:
    event = driven_worker.next()
    assert event["event"] == "ready" and event["load_seconds"] >= 0, event
    return driven_worker


def test_the_worker_loads_once_embeds_a_shard_and_answers_it_from_its_record_after(driven, models, tmp_path):
    worker = ready(driven())
    fasta = write_proteins(tmp_path / "data" / "shard_00001.faa", 7, seed=1)
    output = tmp_path / "data" / "shard_00001.pt"
    job = Job("rid-1", str(fasta), str(output), "s1", "shard_00001")
    finished = worker.finish(job)
    reply = finished["reply"]
    assert reply["reply"] == "done" and reply["sequences"] == 7 and reply["failed_sequences"] == 0
    assert reply["tokens"] > 7 and reply["seconds"] > 0 and "cached" not in reply
    assert finished["label"] == "shard_00001" and finished["cache_clears"] == 0
    assert_same_as_in_process(output, fasta, "esm2", models["esm2"])
    record = RunDir(tmp_path / "run").request_record("rid-1")
    assert record.parent.stat().st_mode & 0o777 == 0o700
    assert done_record(record, str(output)) == {k: v for k, v in reply.items() if k != "request_id"}

    # the same request again (from any daemon of the run): answered from the record, not computed
    again = worker.finish(Job("rid-1", str(fasta), str(output), "s1", "shard_00001"))
    assert again["reply"]["reply"] == "done" and again["reply"]["cached"] is True
    assert again["reply"]["sequences"] == 7
    assert worker.worker.processed == 1
    # ... unless its output is gone: then it is computed again
    output.unlink()
    assert done_record(record, str(output)) is None
    assert worker.finish(Job("rid-1", str(fasta), str(output)))["computed"] is True
    assert read_embeddings(output)[0] == fasta_ids(fasta)
    worker.close()


def test_a_job_whose_deadline_passed_is_dropped_before_it_starts(driven, tmp_path):
    worker = ready(driven())
    fasta = write_proteins(tmp_path / "data" / "late.faa", 3, seed=2)
    job = Job("rid-late", str(fasta), str(tmp_path / "data" / "late.pt"), deadline=time.monotonic() - 1)
    finished = worker.finish(job)
    assert finished["reply"]["reply"] == "expired" and finished["computed"] is False
    assert not (tmp_path / "data" / "late.pt").exists()
    worker.close()


def test_a_shard_locked_by_another_process_is_busy_unless_its_client_lost_a_daemon_on_it(driven, tmp_path):
    worker = ready(driven())
    fasta = write_proteins(tmp_path / "data" / "locked.faa", 4, seed=3)
    output = tmp_path / "data" / "locked.pt"
    record = RunDir(tmp_path / "run").request_record("rid-locked")
    record.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(  # another daemon computing this very shard
        [sys.executable, "-c", "import fcntl, sys\nhandle = open(sys.argv[1], 'a')\n"
         "fcntl.flock(handle, fcntl.LOCK_EX)\nprint('locked', flush=True)\nsys.stdin.read()", str(record)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        busy = worker.finish(Job("rid-locked", str(fasta), str(output), attempt=1))
        assert busy["reply"]["reply"] == "busy" and busy["reply"]["retry_after"] > 0 and busy["computed"] is False
        assert not output.exists()
        # attempt 2: the client lost a daemon on this shard, which may hold the lock, frozen
        taken_over = worker.finish(Job("rid-locked", str(fasta), str(output), attempt=2))
        assert taken_over["reply"]["reply"] == "done" and taken_over["reply"]["sequences"] == 4
        assert read_embeddings(output)[0] == fasta_ids(fasta)
    finally:
        holder.stdin.close()
        holder.wait(30)
    # once the lock is free, the request is computed or answered normally
    assert worker.finish(Job("rid-locked", str(fasta), str(output)))["reply"]["reply"] == "done"
    worker.close()


def test_an_output_that_appeared_while_the_shard_was_computed_is_never_overwritten(driven, gate, tmp_path):
    worker = ready(driven())
    shard = gate(tmp_path / "data" / "shard_00002.faa", proteins("shard_00002", 6, seed=4))
    output = tmp_path / "data" / "shard_00002.pt"
    worker.worker.submit(Job("rid-2", str(shard.path), str(output), "s1", "shard_00002"))
    assert worker.next() == {"event": "started", "request_id": "rid-2"}
    wait_for(shard.waiting, 60, "the worker opening its input")
    output.write_bytes(b"written by another daemon that took the shard over")  # while it waits for its input
    shard.open()
    finished = worker.next()
    assert finished["event"] == "finished" and finished["computed"] is True
    assert finished["reply"]["reply"] == "done" and finished["reply"]["cached"] is True
    assert output.read_bytes() == b"written by another daemon that took the shard over"
    assert read_failures(tmp_path / "run" / "failures.tsv") == []
    worker.close()


def test_a_failed_shard_is_in_the_manifest_until_it_is_embedded(driven, tmp_path):
    worker = ready(driven())
    fasta = tmp_path / "data" / "shard_00003.faa"
    fasta.parent.mkdir(parents=True)
    fasta.write_text("not FASTA\n")
    output = tmp_path / "data" / "shard_00003.pt"
    failed = worker.finish(Job("rid-3a", str(fasta), str(output), "s1", "shard_00003", attempt=2))
    reply = failed["reply"]
    assert reply["reply"] == "failed" and reply["error_class"] == "UserError" and reply["attempts"] == 2
    [entry] = read_failures(tmp_path / "run" / "failures.tsv")
    assert (entry["sample"], entry["stage"], entry["shard"], entry["daemon"]) == ("s1", "embed_esm2", "shard_00003",
                                                                                  "esm2-test")  # fmt: skip
    assert entry["attempts"] == "2" and not output.exists()
    assert done_record(RunDir(tmp_path / "run").request_record("rid-3a"), str(output)) is None

    write_proteins(fasta, 3, seed=5)  # fixed; a new request (the shard file changed)
    assert worker.finish(Job("rid-3b", str(fasta), str(output), "s1", "shard_00003"))["reply"]["reply"] == "done"
    assert read_failures(tmp_path / "run" / "failures.tsv") == []  # the current state: nothing failed
    worker.close()


def test_a_model_that_cannot_be_loaded_is_reported_and_the_worker_ends(driven, tmp_path):
    broken = tmp_path / "esm2_broken.pt"
    broken.write_bytes(b"not a checkpoint")
    worker = driven(weights=broken)
    event = worker.next()
    assert event["event"] == "load_failed" and "esm2_broken.pt" in event["message"], event
    assert worker.next() == {"event": "exit"}
    worker.thread.join(10)
    assert not worker.thread.is_alive()


def test_queued_jobs_can_be_taken_back_before_they_start(tmp_path):
    spec = DaemonSpec(daemon_id="esm2-test", model="esm2", weights=tmp_path / "w.pt")
    worker = Worker(spec, RunDir(tmp_path / "run"), Confinement([tmp_path], never_write=[]), post=lambda event: None)
    jobs = [Job(f"rid-{i}", f"/in/{i}.faa", f"/out/{i}.pt", deadline=math.inf) for i in range(3)]
    for job in jobs:
        worker.submit(job)
    assert worker.take_queued() == jobs and worker.take_queued() == []
    assert json.loads(json.dumps(jobs[0].label)) == "/in/0.faa"  # no shard name: the input labels it


def test_an_output_that_existed_when_the_shard_was_asked_for_is_computed_again(driven, tmp_path):
    worker = ready(driven())
    fasta = write_proteins(tmp_path / "data" / "shard_00004.faa", 3, seed=6)
    output = tmp_path / "data" / "shard_00004.pt"
    output.write_bytes(b"an old embedding file, of another model")
    finished = worker.finish(Job("rid-4", str(fasta), str(output), replace=True))
    assert finished["reply"]["reply"] == "done" and "cached" not in finished["reply"]
    assert read_embeddings(output)[0] == fasta_ids(fasta)
    worker.close()
