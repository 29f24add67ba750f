"""Daemons under faults, load and hostile input: real `virnucpro serve` processes and real ZeroMQ sockets.

Every test ends with nothing lost: each shard embedded exactly once per output (equal to the in-process
result), or in the failure manifest with every read of it accounted for. Shards that must be in progress
when a test acts are gates (daemon_helpers.Gate), held until the test opens them: no test depends on how
long a shard takes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
from daemon_helpers import (
    ask_json,
    fasta_ids,
    in_thread,
    proteins,
    receive_all,
    receive_until,
    status,
    wait_for,
    wait_running,
    write_proteins,
)

from virnucpro.cli import main
from virnucpro.engines.embed import embed_records, embed_shard, load_embedder, read_embeddings
from virnucpro.engines.embedded import Embedded
from virnucpro.errors import UserError
from virnucpro.manifest import read_failures
from virnucpro.serving import registry, timing
from virnucpro.serving.client import request_embedding, stop_daemons
from virnucpro.serving.confine import Confinement
from virnucpro.serving.protocol import MAX_MESSAGE_BYTES, ProtocolError, parse_request
from virnucpro.serving.rundir import RunDir
from virnucpro.serving.spec import DaemonSpec
from virnucpro.serving.transport import curve_keys
from virnucpro.serving.worker import Job, Worker

REFUSED_WITHIN = 2.0  # seconds a refused client waits for an answer that never comes


def references(weights: Path, model: str, fastas: list[Path], folder: Path) -> dict[Path, tuple[list, torch.Tensor]]:
    """In-process embeddings of each FASTA file, with one load of the model."""
    embedder = load_embedder(model, weights)
    folder.mkdir(parents=True, exist_ok=True)
    result = {}
    for fasta in fastas:
        embed_records(embedder, fasta, folder / f"{fasta.stem}.pt")
        result[fasta] = read_embeddings(folder / f"{fasta.stem}.pt")
    return result


def assert_equal_to_reference(output: Path, fasta: Path, reference: tuple[list, torch.Tensor]) -> None:
    ids, vectors = read_embeddings(output)
    assert ids == reference[0] == fasta_ids(fasta)  # every sequence exactly once, in order
    assert len(set(ids)) == len(ids)
    assert (vectors - reference[1]).abs().max().item() <= 1e-6


def accepted(endpoints: list[str]) -> int:
    """Shards queued or running over these daemons."""
    return sum(s["queued"] + s["running"] for s in map(status, endpoints))


def running_daemon(endpoints: list[str]) -> int | None:
    """The index of the daemon that is computing a shard, if any."""
    return next((i for i, endpoint in enumerate(endpoints) if status(endpoint)["running"]), None)


# --- hostile input ----------------------------------------------------------------------------------
def fuzz_message(rng: random.Random, data: Path) -> list[bytes]:
    """One malformed (or harmless) request: random bytes, wrong frames, wrong JSON, wrong fields, bad paths."""
    values = [None, True, 0, -1, 1e308, 2**70, "", "x" * 5000, "a\x00b", [], {}, [[[]]], {"op": "ping"},
              math.nan, math.inf, -math.inf, "../../etc/passwd", "/etc/passwd", "relative.faa"]  # fmt: skip
    bad_paths = ["/etc/passwd", f"{data}/../escape.faa", "relative.faa", f"{data}/a\x00b.faa", "", "/" + "x" * 5000,
                 f"{data}/escape/out.pt"]  # fmt: skip
    kind = rng.randrange(9)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 300))]
    if kind == 1:
        return [rng.randbytes(rng.randrange(0, 50)) for _ in range(rng.randrange(2, 5))]
    if kind == 2:
        return [json.dumps(rng.choice([[1, 2], "op", 3.5, None, True, [{"op": "ping"}]])).encode()]
    if kind == 3:
        return [b"[" * rng.randrange(1000, 60000)]
    if kind == 4:  # NaN and infinities as JSON allows them in Python, and huge numbers
        return [rng.choice([b'{"op": NaN}', b'{"op": "embed", "input": "/a", "output": "/b", "timeout": NaN}',
                            b'{"op": "embed", "input": "/a", "output": "/b", "timeout": Infinity}',
                            b'{"op": "ping", "x": ' + b"9" * 5000 + b"}"])]  # fmt: skip
    if kind == 5:  # a known op with unknown or ill-typed fields ("stop" never alone: that is a real stop)
        op = rng.choice(["ping", "status", "stop", "embed", "Ping", "", "exec", "__class__"])
        message = {"op": op, rng.choice(["x", "input", "timeout", "attempt", "op2", "\x00"]): rng.choice(values)}
        if op == "stop" and len(message) == 1:
            message["x"] = 1
        return [json.dumps(message).encode()]
    if kind == 6:  # embed with a bad path or a bad optional field
        message = {"op": "embed", "input": rng.choice(bad_paths), "output": rng.choice(bad_paths)}
        if rng.random() < 0.5:
            message[rng.choice(["sample", "shard", "request_id", "timeout", "attempt"])] = rng.choice(values[1:])
        return [json.dumps(message).encode()]
    if kind == 7:
        return [rng.randbytes(MAX_MESSAGE_BYTES + rng.randrange(1, 1000))]  # over the limit, under ZeroMQ's
    return [json.dumps({"op": rng.choice(["ping", "status"])}).encode()]  # harmless, answered normally


def test_a_fuzz_of_malformed_messages_is_answered_one_by_one_and_the_daemon_serves_on(shared, tmp_path):
    endpoint, data = shared["endpoint"], shared["data"]
    data.mkdir(parents=True, exist_ok=True)
    (data / "escape").symlink_to(tmp_path, target_is_directory=True)
    rng = random.Random(20240611)
    kinds: dict[str, int] = {}
    started, sent = time.monotonic(), 0
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        while sent < 2000 and time.monotonic() - started < 20:
            sock.send_multipart(fuzz_message(rng, data))
            sent += 1
            assert sock.poll(5000), f"no answer to message {sent}"
            reply = json.loads(sock.recv())
            assert isinstance(reply, dict) and reply["daemon_id"] == "esm2-shared"
            kinds[reply["reply"]] = kinds.get(reply["reply"], 0) + 1
        # over ZeroMQ's own limit (1 MiB): the connection is dropped, nothing is answered
        sock.send(b"{" * (2 * 1024 * 1024))
        assert not sock.poll(1000)
    assert sent >= 500, f"only {sent} messages in 20 s"
    assert set(kinds) <= {"error", "pong", "status"} and kinds["error"] > sent / 2, kinds
    assert shared["daemon"].process.poll() is None
    status = ask_json(endpoint, {"op": "status"})
    assert status["state"] == "ready" and status["queued"] == status["running"] == 0
    fasta = write_proteins(data / "after_fuzz.faa", 10, seed=40)
    assert request_embedding(shared["run_dir"], "esm2", fasta, data / "after_fuzz.pt", timeout=60) is True
    assert_equal_to_reference(data / "after_fuzz.pt", fasta, references(shared["weights"], "esm2", [fasta],
                                                                        tmp_path / "ref")[fasta])  # fmt: skip
    assert not list(tmp_path.glob("*.pt")) and not (data / "escape.faa").exists()


@pytest.mark.parametrize(
    "message, complaint",
    [
        ({"op": "ping", "extra": 1}, "unknown field"),
        ({"op": "embed", "input": "/a.faa", "output": "/a.pt", "timeout": -1}, "timeout"),
        ({"op": "embed", "input": "/a.faa", "output": "/a.pt", "timeout": True}, "timeout"),
        ({"op": "embed", "input": "/a.faa", "output": "/a.pt", "attempt": 0}, "attempt"),
        ({"op": "embed", "input": "/a.faa", "output": "/a.pt", "attempt": 1.5}, "attempt"),
        ({"op": "embed", "input": "/a\x00.faa", "output": "/a.pt"}, "input"),
        ({"op": "embed", "input": "/a.faa", "output": "/" + "p" * 5000}, "output"),
        ({"op": "embed", "input": "/a.faa"}, "'output' is required"),
    ],
)
def test_each_field_is_checked_for_its_type_and_range(message, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        parse_request([json.dumps(message).encode()])


def test_a_client_without_the_runs_curve_keys_gets_no_answer_from_a_tcp_daemon(start_daemon, models, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemon = start_daemon(run_dir, "esm2-tcp", "esm2", models["esm2"], [data], "--transport", "tcp", "--bind-host",
                          "127.0.0.1")  # fmt: skip
    entry = daemon.wait_ready()
    assert entry["endpoint"].startswith("tcp://127.0.0.1:") and len(entry["server_key"]) == 40
    keys = run_dir / "keys"
    assert keys.stat().st_mode & 0o777 == 0o700
    assert {path.name: path.stat().st_mode & 0o777 for path in keys.iterdir()} == {"server.key": 0o600,
                                                                                   "client.key": 0o600}  # fmt: skip
    client_public, client_secret = curve_keys(RunDir(run_dir), "client")
    stranger_public, stranger_secret = zmq.curve_keypair()

    def answered(within: float = REFUSED_WITHIN, **curve: bytes) -> bool:
        with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            for name, value in curve.items():
                setattr(sock, name, value)
            sock.connect(entry["endpoint"])
            sock.send_json({"op": "ping"})
            return bool(sock.poll(int(within * 1000)))

    server_key = entry["server_key"].encode()
    assert not answered()  # no CURVE at all
    assert not answered(curve_serverkey=server_key, curve_publickey=stranger_public, curve_secretkey=stranger_secret)
    assert not answered(curve_serverkey=zmq.curve_keypair()[0], curve_publickey=client_public,
                        curve_secretkey=client_secret)  # fmt: skip
    assert answered(15, curve_serverkey=server_key, curve_publickey=client_public, curve_secretkey=client_secret)

    fasta = write_proteins(data / "over_tcp.faa", 12, seed=41)
    assert request_embedding(run_dir, "esm2", fasta, data / "over_tcp.pt", timeout=60) is True
    assert_equal_to_reference(data / "over_tcp.pt", fasta,
                              references(models["esm2"], "esm2", [fasta], tmp_path / "ref")[fasta])  # fmt: skip
    stop_daemons(run_dir)  # the stop token reaches it whatever becomes of the acknowledgement
    assert daemon.wait_exit() == 0
    assert daemon.final_stats()["transport"] == "tcp" and daemon.final_stats()["shards"] == 1


def test_curve_keys_are_made_once_private_and_refused_when_others_can_read_them(tmp_path):
    run = RunDir(tmp_path)
    first = curve_keys(run, "server", create=True)
    assert curve_keys(run, "server", create=True) == first == curve_keys(run, "server")
    assert curve_keys(tmp_path, "server") == first  # a run folder given as a path
    assert zmq.curve_public(first[1]) == first[0]
    with pytest.raises(UserError, match="no CURVE key"):
        curve_keys(run, "client")
    os.chmod(tmp_path / "keys" / "server.key", 0o644)
    with pytest.raises(UserError, match="readable by others"):
        curve_keys(run, "server")


# --- deadlines, progress, giving up -----------------------------------------------------------------
def test_accepted_shards_get_progress_and_expired_ones_are_dropped_before_they_start(shared, gate):
    endpoint, data = shared["endpoint"], shared["data"]
    big = gate(data / "progress_big.faa", proteins("progress_big", 50, seed=42, length=(140, 160)))
    late = write_proteins(data / "progress_late.faa", 5, seed=43)
    with zmq.Context() as context, context.socket(zmq.DEALER) as first, context.socket(zmq.DEALER) as second:
        for sock in (first, second):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        first.send_json({"op": "embed", "input": str(big.path), "output": str(data / "progress_big.pt"),
                         "timeout": 120})  # fmt: skip
        # the big shard is running, held at its gate, until the test has seen what it waits for
        big_replies = receive_until(first, lambda reply: reply["reply"] == "progress" and reply["state"] == "running")
        second.send_json({"op": "embed", "input": str(late), "output": str(data / "progress_late.pt"),
                          "timeout": 0.3})  # fmt: skip
        # queued behind it for longer than its deadline (the daemon's own count of seconds)
        late_replies = receive_until(second, lambda reply: reply.get("seconds", 0) > 0.5)
        big.open()
        late_replies += receive_all(second, {"expired", "done"}, timeout=120)
        big_replies += receive_all(first, {"done"}, timeout=120)
    assert [reply["reply"] for reply in late_replies][0] == "accepted" and late_replies[-1]["reply"] == "expired"
    assert [reply["state"] for reply in late_replies if reply["reply"] == "progress"][0] == "queued"
    assert not (data / "progress_late.pt").exists()
    assert big_replies[0]["reply"] == "accepted"
    assert any(reply["reply"] == "progress" and reply["state"] == "running" for reply in big_replies), big_replies
    assert big_replies[-1]["reply"] == "done"
    assert read_embeddings(data / "progress_big.pt")[0] == fasta_ids(big.path)
    immediate = ask_json(endpoint, {"op": "embed", "input": str(late), "output": str(data / "x.pt"), "timeout": 0})
    assert immediate["reply"] == "expired"


def test_a_waiting_client_gives_up_when_the_stop_file_changes_or_every_daemon_failed(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.write_stop_token()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    registry.write_entry(run, {"daemon_id": "esm2-dead", "model": "esm2", "host": socket.gethostname(),
                               "pid": dead.pid, "state": "ready", "endpoint": "ipc:///nowhere"})  # fmt: skip
    thread, outcome = in_thread(request_embedding, run.root, "esm2", tmp_path / "a.faa", tmp_path / "a.pt",
                                timeout=60, stop_file=run.stop_file)  # fmt: skip
    # Once the client has looked at the registry (dropping the dead daemon's entry), it holds the stop
    # token it started with; a new one ends its wait.
    wait_for(lambda: not run.entry("esm2-dead").exists(), 10, "the client looked for a daemon")
    started = time.monotonic()
    run.write_stop_token()
    thread.join(10)
    assert time.monotonic() - started < 5
    assert isinstance(outcome[0], UserError) and "the run is ending" in str(outcome[0])

    for index in range(2):
        registry.write_entry(run, {"daemon_id": f"esm2-{index}", "model": "esm2", "host": "x", "pid": 1,
                                   "state": "failed", "reason": f"CUDA broke {index}", "endpoint": ""})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(UserError, match="every esm2 daemon .* failed.*CUDA broke 0.*CUDA broke 1"):
        request_embedding(run.root, "esm2", tmp_path / "a.faa", tmp_path / "a.pt", timeout=60)
    assert time.monotonic() - started < 5

    # In a workflow, the token to compare with is the one of the run's start (RUN/settings.json, for the
    # jobs of its session): a job that starts after the run began to end gives up at once.
    for index in range(2):
        registry.remove_entry(run, f"esm2-{index}")
    monkeypatch.setenv("VIRNUCPRO_SESSION", "session-1")
    run.write_settings({"session": "session-1", "stop_baselines": run.stop_baselines(("esm2",))})
    run.write_stop_token()
    started = time.monotonic()
    with pytest.raises(UserError, match="the run is ending"):
        request_embedding(run.root, "esm2", tmp_path / "a.faa", tmp_path / "a.pt", timeout=60)
    assert time.monotonic() - started < 5


# --- out of memory and the failure policy -----------------------------------------------------------
class FakeEmbedder:
    """Stands in for a model: fails the sequences named in ``too_big`` as if out of GPU memory, or raises
    CUDA out-of-memory for the first ``raise_times`` calls."""

    dim = 3

    def __init__(self, too_big: set[int] = frozenset(), raise_times: int = 0):
        self.too_big, self.raise_times, self.calls = too_big, raise_times, 0

    def embed(self, sequences: list[str]) -> Embedded:
        self.calls += 1
        if self.calls <= self.raise_times:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        vectors = torch.tensor([[len(s), i, 1.0] for i, s in enumerate(sequences)], dtype=torch.float32)
        failed = {i: f"out of GPU memory even alone (sequence {i})" for i in self.too_big}
        return Embedded(vectors=vectors, tokens=sum(map(len, sequences)), failed=failed, out_of_memory=2 * len(failed))


def run_worker(
    monkeypatch, run_dir: Path, embedder: FakeEmbedder, jobs: list[Job], cache_clear_every: int
) -> list[dict]:
    """Drive a daemon's model thread (worker.Worker, no sockets) whose model is ``embedder`` over ``jobs``
    in this thread; the events it posted."""
    monkeypatch.setattr("virnucpro.engines.embed.load_embedder", lambda *args, **kwargs: embedder)
    events: list[dict] = []
    confinement = Confinement([run_dir.parent], never_write=[run_dir])
    spec = DaemonSpec(daemon_id="esm2-fake", model="esm2", weights=run_dir / "w.pt",
                      cache_clear_every=cache_clear_every)  # fmt: skip
    worker = Worker(spec, RunDir(run_dir), confinement, post=events.append)
    for job in jobs:
        worker.submit(job)
    worker.close()
    worker.run()
    assert [event["event"] for event in events] == ["ready"] + ["started", "finished"] * len(jobs) + ["exit"]
    return [event for event in events if event["event"] == "finished"]


def test_a_sequence_that_never_fits_gets_a_manifest_line_and_the_rest_of_the_shard_is_written(tmp_path, monkeypatch):
    fasta = write_proteins(tmp_path / "shard_00003.faa", 5, seed=44)
    job = Job("rid", str(fasta), str(tmp_path / "out.pt"), "s1", "shard_00003", 1, math.inf)
    [finished] = run_worker(monkeypatch, tmp_path / "run", FakeEmbedder(too_big={1, 3}), [job], cache_clear_every=10)
    reply = finished["reply"]
    assert reply["reply"] == "done" and reply["sequences"] == 3 and reply["failed_sequences"] == 2
    assert finished["cache_clears"] == 4  # each out-of-memory error cleared the cache
    ids = fasta_ids(fasta)
    assert read_embeddings(tmp_path / "out.pt")[0] == [ids[0], ids[2], ids[4]]
    entries = read_failures(tmp_path / "run" / "failures.tsv")
    assert [(e["sequence_id"], e["shard"], e["sample"], e["error_class"]) for e in entries] == [
        (ids[1], "shard_00003", "s1", "OutOfMemoryError"),
        (ids[3], "shard_00003", "s1", "OutOfMemoryError"),
    ]


def test_a_shard_level_out_of_memory_is_retried_once_after_clearing_the_cache(tmp_path, monkeypatch):
    fasta = write_proteins(tmp_path / "shard_00004.faa", 4, seed=45)
    job = Job("rid", str(fasta), str(tmp_path / "out.pt"), "s1", "shard_00004", 1, math.inf)
    [finished] = run_worker(monkeypatch, tmp_path / "run", FakeEmbedder(raise_times=1), [job], cache_clear_every=1)
    reply = finished["reply"]
    assert reply["reply"] == "done" and reply["sequences"] == 4
    assert finished["cache_clears"] == 2  # after the error, and scheduled
    assert read_failures(tmp_path / "run" / "failures.tsv") == []
    job = Job("rid2", str(fasta), str(tmp_path / "out2.pt"), "s1", "shard_00004", 2, math.inf)
    [finished] = run_worker(monkeypatch, tmp_path / "run", FakeEmbedder(raise_times=2), [job], cache_clear_every=10)
    reply = finished["reply"]
    assert reply["reply"] == "failed" and reply["error_class"] == "OutOfMemoryError" and reply["attempts"] == 3
    [entry] = read_failures(tmp_path / "run" / "failures.tsv")
    assert entry["shard"] == "shard_00004" and entry["sequence_id"] == "" and entry["attempts"] == "3"
    assert not (tmp_path / "out2.pt").exists()


def test_in_process_embedding_records_a_failed_shard_and_follows_the_policy(tmp_path, models):
    broken = tmp_path / "shard_00001.faa"
    broken.write_text("no header here\n")
    manifest = tmp_path / "failures.tsv"
    with pytest.raises(UserError, match="before the first"):
        embed_shard(broken, "esm2", models["esm2"], tmp_path / "a.pt", manifest=manifest, sample="s", shard="x1")
    assert not (tmp_path / "a.pt").exists()
    assert embed_shard(broken, "esm2", models["esm2"], tmp_path / "b.pt", manifest=manifest, sample="s", shard="x2",
                       on_failure="record") is None  # fmt: skip
    ids, vectors = read_embeddings(tmp_path / "b.pt")
    assert ids == [] and vectors.shape[0] == 0
    assert [(e["shard"], e["stage"], e["error_class"]) for e in read_failures(manifest)] == [
        ("x1", "embed_esm2", "UserError"),
        ("x2", "embed_esm2", "UserError"),
    ]


def test_a_failed_shard_under_record_policy_gives_reads_marked_embedding_failed(shared, test_models, tmp_path, caplog):
    run_dir, data = shared["run_dir"], shared["data"]
    rng = random.Random(46)
    codons = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in ("TAA", "TAG", "TGA")]
    reads = data / "policy" / "reads.fa"
    reads.parent.mkdir(parents=True, exist_ok=True)
    with open(reads, "w") as handle:  # six reads with a stop-free first frame, one empty read
        handle.writelines(f">read{i}\n{''.join(rng.choices(codons, k=166))}AC\n" for i in range(6))
        handle.write(">empty\n\n")
    work = reads.parent
    assert main(["-q", "chunk", str(reads), "--length", "500", "--output", str(work / "chunks.fa"), "--reads-table",
                 str(work / "reads_index.tsv")]) == 0  # fmt: skip
    assert main(["-q", "translate", str(work / "chunks.fa"), "--nucleotide-output", str(work / "frames.fa"),
                 "--protein-output", str(work / "frames.faa")]) == 0  # fmt: skip
    assert main(["-q", "shard", str(work / "frames.fa"), str(work / "frames.faa"), "--shard-size", "1000",
                 "--output-dir", str(work / "shards")]) == 0  # fmt: skip
    shard = work / "shards" / "shard_00000"
    shard.with_suffix(".faa").write_text("garbage that the ESM-2 daemon cannot read\n")  # the shard will fail
    manifest = run_dir / "failures.tsv"
    before = len(read_failures(manifest))

    code = main(["embed", str(shard.with_suffix(".faa")), "--model", "esm2", "--output", str(work / "esm2.pt"),
                 "--run-dir", str(run_dir), "--sample", "policy", "--shard", "shard_00000", "--on-failure", "record",
                 "--timeout", "60"])  # fmt: skip
    assert code == 0
    assert "failure policy: record" in caplog.text
    ids, vectors = read_embeddings(work / "esm2.pt")
    assert ids == [] and vectors.shape[0] == 0
    entries = read_failures(manifest)[before:]
    assert [(e["sample"], e["stage"], e["shard"], e["sequence_id"]) for e in entries] == [
        ("policy", "embed_esm2", "shard_00000", "")
    ]

    assert main(["-q", "embed", str(shard.with_suffix(".fa")), "--model", "dnabert-s", "--weights",
                 str(test_models["dnabert_s"]), "--output", str(work / "dnabert_s.pt")]) == 0  # fmt: skip
    assert main(["-q", "classify", str(shard.with_suffix(".fa")), "--dnabert-s", str(work / "dnabert_s.pt"),
                 "--esm2", str(work / "esm2.pt"), "--classifier", str(test_models["classifier_500"]), "--output",
                 str(work / "predictions.tsv")]) == 0  # fmt: skip
    assert main(["-q", "aggregate", "--sample", "policy", "--reads-table", str(work / "reads_index.tsv"),
                 "--nucleotide", str(work / "frames.fa"), "--predictions", str(work / "predictions.tsv"),
                 "--failure-manifest", str(manifest), "--output-dir", str(work / "results")]) == 0  # fmt: skip
    lines = (work / "results" / "reads.tsv").read_text().splitlines()
    rows = {row.split("\t")[0]: row.split("\t") for row in lines[1:]}
    assert set(rows) == {f"read{i}" for i in range(6)} | {"empty"}  # every read accounted for
    framed = {read for read, row in rows.items() if int(row[3]) > 0}
    assert framed and all(rows[read][7:] == ["unclassified", "embedding failed"] for read in framed), rows
    assert rows["empty"][7:] == ["unclassified", "empty sequence"]
    failures = (work / "results" / "failures.tsv").read_text().splitlines()
    assert len(failures) == 2 and "\tshard_00000\t" in failures[1]


# --- processes killed, stopped and restarted --------------------------------------------------------
@pytest.mark.slow
def test_sigkill_of_one_of_two_daemons_during_ten_concurrent_shards_loses_nothing(start_daemon, models, gate, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemons = [start_daemon(run_dir, f"esm2-{i}", "esm2", models["esm2"], [data]) for i in range(2)]
    endpoints = [daemon.wait_ready()["endpoint"] for daemon in daemons]
    shards = [gate(data / f"shard_{i:05d}.faa", proteins(f"shard_{i:05d}", 40, seed=50 + i, length=(100, 160)))
              for i in range(10)]  # fmt: skip
    clients = [in_thread(request_embedding, run_dir, "esm2", shard.path, shard.path.with_suffix(".pt"), sample="s",
                         shard=shard.path.stem, timeout=180) for shard in shards]  # fmt: skip
    wait_for(lambda: accepted(endpoints) == 10, 60, "all ten shards accepted")
    # Let the daemons through their shards one at a time until one of them has finished a shard, is in the
    # middle of another (held at its gate) and has more queued: kill it there.
    victim = None
    while victim is None:
        statuses = [status(endpoint) for endpoint in endpoints]
        victim = next((i for i, s in enumerate(statuses) if s["running"] and s["queued"] and s["shards_done"]), None)
        if victim is None:
            done = sum(s["shards_done"] for s in statuses)
            opening = wait_for(lambda: next((s for s in shards if s.waiting()), None), 60, "a daemon opening a shard")
            opening.open()
            wait_for(lambda done=done: sum(status(e)["shards_done"] for e in endpoints) > done, 60, "a shard done")
    done_by_victim = statuses[victim]["shards_done"]
    daemons[victim].kill()
    for shard in shards:
        if not shard.is_open:
            shard.open()
    for thread, outcome in clients:
        thread.join(240)
        assert outcome == [None]
    expected = references(models["esm2"], "esm2", [shard.path for shard in shards], tmp_path / "reference")
    for shard in shards:
        assert_equal_to_reference(shard.path.with_suffix(".pt"), shard.path, expected[shard.path])
    survivor = daemons[1 - victim]
    stop_daemons(run_dir)  # the stop token reaches it whatever becomes of the acknowledgement
    assert survivor.wait_exit() == 0
    stats = survivor.final_stats()
    assert stats["taken_over"] >= 1 and stats["failures"] == 0  # the victim's shards, queued or cut short
    assert stats["shards"] + done_by_victim == 10  # the one cut short computed again, no other twice
    assert read_failures(run_dir / "failures.tsv") == []
    assert registry.list_entries(run_dir) == []


@pytest.mark.slow
def test_sixty_concurrent_clients_on_two_daemons_with_a_small_queue(start_daemon, models, gate, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="virnucpro.serving.client")
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemons = [start_daemon(run_dir, f"esm2-{i}", "esm2", models["esm2"], [data], "--max-queue", "2")
               for i in range(2)]  # fmt: skip
    endpoints = [daemon.wait_ready()["endpoint"] for daemon in daemons]
    # one shard held at its gate in each daemon, so that the queues fill up and clients are told "busy"
    blockers = [gate(data / f"blocker_{i}.faa", proteins(f"blocker_{i}", 5, seed=59 - i)) for i in range(2)]
    blocking = []
    for count, blocker in enumerate(blockers, start=1):
        blocking.append(in_thread(request_embedding, run_dir, "esm2", blocker.path, blocker.path.with_suffix(".pt"),
                                  timeout=240))  # fmt: skip
        wait_for(lambda count=count: accepted(endpoints) == count, 60, f"blocker {count} accepted")
    assert [status(endpoint)["running"] for endpoint in endpoints] == [1, 1]  # the least-loaded daemon took each
    shards = [write_proteins(data / f"shard_{i:05d}.faa", 12, seed=60 + i) for i in range(30)]
    clients = [in_thread(request_embedding, run_dir, "esm2", shard, shard.with_suffix(".pt"), shard=shard.stem,
                         timeout=240) for shard in shards * 2]  # fmt: skip  # each shard asked for twice at once
    wait_for(lambda: [s["queued"] + s["running"] for s in map(status, endpoints)] == [2, 2], 60, "both queues full")
    wait_for(lambda: any("is busy" in record.getMessage() for record in caplog.records), 60, "a client told busy")
    for blocker in blockers:
        blocker.open()
    for thread, outcome in blocking + clients:
        thread.join(300)
        assert outcome == [None]
    assert len(clients) == 60
    stop_daemons(run_dir)  # the stop token reaches them whatever becomes of the acknowledgements
    assert [daemon.wait_exit() for daemon in daemons] == [0, 0]
    stats = [daemon.final_stats() for daemon in daemons]
    # the 30 shards and the 2 blockers: none computed twice, at once or later
    assert sum(s["shards"] for s in stats) == 32
    assert all(s["peak_queued"] <= 2 for s in stats) and sum(s["busy_replies"] for s in stats) > 0, stats
    # each daemon computed its blocker and the shard queued behind it, at least
    assert all(s["shards"] >= 2 and s["model_loads"] == 1 and s["failures"] == 0 for s in stats), stats
    expected = references(models["esm2"], "esm2", shards, tmp_path / "reference")
    for shard in shards:
        assert_equal_to_reference(shard.with_suffix(".pt"), shard, expected[shard])


@pytest.mark.slow
def test_sigterm_hands_back_a_long_shard_after_the_grace_and_a_restart_under_the_same_id_finishes_it(
    start_daemon, models, gate, tmp_path
):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    first = start_daemon(run_dir, "esm2-0", "esm2", models["esm2"], [data], "--drain-grace", "1")
    endpoint = first.wait_ready()["endpoint"]
    # held at its gate: it cannot finish while the first daemon drains, however fast the machine
    big = gate(data / "big.faa", proteins("big", 60, seed=70, length=(140, 160)))
    thread, outcome = in_thread(request_embedding, run_dir, "esm2", big.path, data / "big.pt", sample="s",
                                shard="big", timeout=180)  # fmt: skip
    wait_running(endpoint)
    first.process.send_signal(signal.SIGTERM)
    wait_for(lambda: (first.entry() or {}).get("state") != "ready", 10, "the first daemon draining", interval=0.005)
    first.process.send_signal(signal.SIGSTOP)  # hold it in "stopping", mid-shard, while the restart comes up
    try:
        first_pid = first.process.pid
        second = start_daemon(run_dir, "esm2-0", "esm2", models["esm2"], [data])
        end = time.monotonic() + 60
        while "waiting for the previous daemon" not in second.log.read_text():
            assert time.monotonic() < end and second.process.poll() is None, second.log.read_text()
            time.sleep(0.05)
    finally:
        first.process.send_signal(signal.SIGCONT)  # its grace is over: it hands the shard back and exits
    assert first.wait_exit(30) == 0
    stats = first.final_stats()
    assert stats["exit_reason"] == "signal" and stats["handed_back"] == 1 and stats["shards"] == 0
    big.open()  # now read by the restarted daemon
    thread.join(180)
    assert outcome == [None]
    assert second.entry()["pid"] == second.process.pid != first_pid
    assert read_embeddings(data / "big.pt")[0] == fasta_ids(big.path)
    stop_daemons(run_dir)  # the stop token reaches it whatever becomes of the acknowledgement
    assert second.wait_exit() == 0
    assert second.final_stats()["shards"] == 1 and second.final_stats()["taken_over"] == 0
    assert read_failures(run_dir / "failures.tsv") == []


@pytest.mark.slow
def test_a_frozen_daemon_is_lost_after_its_silence_and_another_embeds_the_shard(start_daemon, models, gate, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    monkeypatch.setattr(timing, "LOST_AFTER", 3.0)
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemons = [start_daemon(run_dir, f"esm2-{i}", "esm2", models["esm2"], [data]) for i in range(2)]
    endpoints = [daemon.wait_ready()["endpoint"] for daemon in daemons]
    big = gate(data / "big.faa", proteins("big", 60, seed=80, length=(140, 160)))
    output = data / "big.pt"
    thread, outcome = in_thread(request_embedding, run_dir, "esm2", big.path, output, timeout=120)
    wait_for(lambda: running_daemon(endpoints) is not None, 30, "a daemon started the shard")
    frozen = running_daemon(endpoints)
    wait_for(big.waiting, 30, "the daemon opening the shard")  # in the middle of it, nothing written
    daemons[frozen].process.send_signal(signal.SIGSTOP)  # alive, holding the shard's lock, silent
    try:
        big.open()  # read by the other daemon, once the client has lost the frozen one
        thread.join(120)
        assert outcome == [None]
        assert read_embeddings(output)[0] == fasta_ids(big.path)
        assert status(endpoints[1 - frozen])["shards_done"] == 1
        embedded = output.read_bytes(), output.stat().st_mtime_ns
    finally:
        daemons[frozen].process.send_signal(signal.SIGCONT)
    # Thawed, the frozen daemon goes on with its shard, finds the output written meanwhile and keeps it.
    wait_for(lambda: status(endpoints[frozen])["shards_done"] == 1, 60, "the thawed daemon finished its shard")
    assert (output.read_bytes(), output.stat().st_mtime_ns) == embedded
    assert status(endpoints[frozen])["failures"] == 0 and read_failures(run_dir / "failures.tsv") == []
