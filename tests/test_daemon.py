"""Model daemons: real `virnucpro serve` processes, real ZeroMQ sockets, the small test models."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from virnucpro.serving import registry
from virnucpro.serving.client import request_embedding, stop_daemons, write_stop_token
from virnucpro.serving.daemon import SOCKET_PATH_LIMIT, socket_path
from virnucpro.engines.embed import embed_fasta, read_embeddings
from virnucpro.errors import UserError
from virnucpro.manifest import read_failures

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
READY_TIMEOUT = 90.0


def write_proteins(path: Path, count: int, seed: int, length: tuple[int, int] = (20, 160)) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(f">{path.stem}_p{i}\n{''.join(rng.choices(AMINO_ACIDS, k=rng.randint(*length)))}\n")
    return path


def write_nucleotides(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(f">{path.stem}_n{i}F1\n{''.join(rng.choices('ACGT', k=rng.randint(100, 499)))}\n")
    return path


def fasta_ids(path: Path) -> list[str]:
    return [line[1:].split()[0] for line in path.read_text().splitlines() if line.startswith(">")]


def assert_same_as_in_process(output: Path, fasta: Path, model: str, weights: Path) -> None:
    """The daemon's file equals what the in-process mode computes for the same input."""
    reference = output.with_name(output.stem + ".reference.pt")
    embed_fasta(fasta, model, weights, reference)
    ids, vectors = read_embeddings(output)
    expected_ids, expected = read_embeddings(reference)
    assert ids == expected_ids == fasta_ids(fasta)
    assert vectors.shape == expected.shape
    assert (vectors - expected).abs().max().item() <= 1e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from virnucpro.testmodels import write_random_checkpoint, write_random_snapshot

    directory = tmp_path_factory.mktemp("models")
    return {
        "esm2": write_random_checkpoint(directory / "esm2_t2_64_test.pt", seed=5),
        "dnabert_s": write_random_snapshot(directory / "DNABERT-S", seed=5),
    }


class Daemon:
    """One `virnucpro serve` process started by a test."""

    def __init__(self, run_dir: Path, daemon_id: str, model: str, weights: Path, roots: list[Path], *extra: str):
        self.run_dir, self.daemon_id = run_dir, daemon_id
        self.stats = run_dir / "stats" / f"{daemon_id}.json"
        self.log = run_dir / "logs" / f"{daemon_id}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "virnucpro.cli", "serve", "--model", model, "--weights", str(weights),
            "--run-dir", str(run_dir), "--stats-output", str(self.stats), "--daemon-id", daemon_id, *extra,
        ]  # fmt: skip
        for root in roots:
            command += ["--allowed-root", str(root)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def entry(self) -> dict | None:
        return registry.read_entry(self.run_dir, self.daemon_id)

    def wait_ready(self) -> dict:
        end = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < end:
            entry = self.entry()
            if entry and entry["state"] == "ready":
                return entry
            assert self.process.poll() is None, f"daemon exited early:\n{self.log.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {READY_TIMEOUT} s:\n{self.log.read_text()}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout} s:\n{self.log.read_text()}") from None

    def final_stats(self) -> dict:
        return json.loads(self.stats.read_text())


@pytest.fixture
def start_daemon():
    """Start daemons; every one still running at the end of the test is killed."""
    started: list[Daemon] = []

    def start(*args, **kwargs) -> Daemon:
        started.append(Daemon(*args, **kwargs))
        return started[-1]

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
        daemon.process.wait()


def ask(endpoint: str, *frames: bytes, timeout: float = 10.0) -> dict:
    """Send raw frames from a DEALER socket and return the first reply."""
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(list(frames))
        assert sock.poll(int(timeout * 1000)), f"no reply within {timeout} s"
        return json.loads(sock.recv())


def ask_json(endpoint: str, message: dict, timeout: float = 10.0) -> dict:
    return ask(endpoint, json.dumps(message).encode(), timeout=timeout)


def replies(endpoint: str, message: dict, until: set[str], timeout: float = 30.0) -> list[dict]:
    """Send one message and collect the replies until one of the kinds in ``until``."""
    collected: list[dict] = []
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_json(message)
        while not collected or collected[-1]["reply"] not in until:
            assert sock.poll(int(timeout * 1000)), f"no final reply within {timeout} s: {collected}"
            collected.append(sock.recv_json())
    return collected


def wait_running(endpoint: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while ask_json(endpoint, {"op": "status"})["running"] == 0:
        assert time.monotonic() < end, "the daemon never started the shard"
        time.sleep(0.02)


def in_thread(function, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run ``function`` in a thread; the list receives its exception (or None once it returned)."""
    outcome: list = []

    def target() -> None:
        try:
            function(*args, **kwargs)
            outcome.append(None)
        except BaseException as error:  # reported by the test
            outcome.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


# --- one daemon shared by the request-level tests ------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]):
    root = tmp_path_factory.mktemp("shared")
    run_dir = root / "run"
    daemon = Daemon(run_dir, "esm2-shared", "esm2", models["esm2"], [root / "data"], "--idle-timeout", "600")
    try:
        entry = daemon.wait_ready()
        yield {"daemon": daemon, "endpoint": entry["endpoint"], "data": root / "data", "run_dir": run_dir,
               "weights": models["esm2"]}  # fmt: skip
    finally:
        daemon.process.kill()
        daemon.process.wait()


def test_malformed_messages_get_an_error_reply_and_the_daemon_serves_on(shared):
    endpoint, data = shared["endpoint"], shared["data"]
    bad = [
        (b"\xff\xfe\x00garbage",),
        (b"",),
        (b"not json at all",),
        (b"[1, 2, 3]",),
        (b"[" * 50000,),
        (b'{"no_op": 1}',),
        (b'{"op": "explode"}',),
        (b'{"op": ["ping"]}',),
        (b'{"op": "embed", "input": 5, "output": "/x.pt"}',),
        (b'{"op": "embed", "output": "/x.pt"}',),
        (b'{"op": "embed", "input": "/a.faa", "output": "/x.pt", "sample": {"nested": true}}',),
        (b'{"op": "ping"}', b'{"op": "ping"}'),
        (json.dumps({"op": "ping", "pad": "x" * 70000}).encode(),),
    ]
    for frames in bad:
        reply = ask(endpoint, *frames)
        assert reply["reply"] == "error", (frames[0][:40], reply)
        assert reply["message"]
    assert ask_json(endpoint, {"op": "ping"})["reply"] == "pong"
    fasta = write_proteins(data / "after_garbage.faa", 12, seed=1)
    request_embedding(shared["run_dir"], "esm2", fasta, data / "after_garbage.pt", timeout=60)
    assert_same_as_in_process(data / "after_garbage.pt", fasta, "esm2", shared["weights"])
    assert shared["daemon"].process.poll() is None


def test_paths_outside_the_allowed_roots_are_refused(shared, tmp_path):
    endpoint, data = shared["endpoint"], shared["data"]
    inside = write_proteins(data / "inside.faa", 3, seed=2)
    outside = write_proteins(tmp_path / "outside.faa", 3, seed=2)
    sibling = write_proteins(data.parent / "sibling.faa", 3, seed=2)
    (data / "escape").symlink_to(tmp_path, target_is_directory=True)
    (data / "escape.faa").symlink_to(outside)
    attempts = [
        (str(outside), str(data / "a.pt")),  # absolute, elsewhere
        (f"{data}/../{sibling.name}", str(data / "b.pt")),  # .. out of the root
        (str(data / "escape.faa"), str(data / "c.pt")),  # symlinked file pointing out
        (str(inside), str(data / "escape" / "d.pt")),  # output through a symlinked folder
        (str(inside), f"{data}/../e.pt"),  # output with ..
        ("inside.faa", str(data / "f.pt")),  # relative
    ]
    for input_path, output_path in attempts:
        reply = ask_json(endpoint, {"op": "embed", "input": input_path, "output": output_path})
        assert reply["reply"] == "error", (input_path, output_path, reply)
    with pytest.raises(UserError, match="outside the allowed roots"):
        request_embedding(shared["run_dir"], "esm2", outside, data / "g.pt", timeout=30)
    assert not list(tmp_path.glob("*.pt")) and not list(data.parent.glob("*.pt"))
    assert not (data / "a.pt").exists()


def test_an_unreadable_shard_fails_with_a_manifest_entry_and_the_daemon_stays_up(shared):
    data, run_dir = shared["data"], shared["run_dir"]
    broken = data / "broken.faa"
    broken.write_text("this is not a FASTA file\nat all\n")
    with pytest.raises(UserError, match="could not embed"):
        request_embedding(run_dir, "esm2", broken, data / "broken.pt", sample="s1", shard="shard_00007", timeout=60)
    entries = [entry for entry in read_failures(run_dir / "failures.tsv") if entry["shard"] == "shard_00007"]
    assert len(entries) == 1
    assert entries[0]["sample"] == "s1" and entries[0]["stage"] == "embed_esm2"
    assert entries[0]["error_class"] == "UserError" and "before the first" in entries[0]["message"]
    assert entries[0]["daemon"] == "esm2-shared" and entries[0]["attempts"] == "1"
    assert not (data / "broken.pt").exists()

    # the command-line client says it in one line and exits 2
    result = subprocess.run(
        [sys.executable, "-m", "virnucpro.cli", "embed", str(broken), "--model", "esm2", "--output",
         str(data / "broken.pt"), "--run-dir", str(run_dir), "--shard", "shard_00008", "--timeout", "60"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "could not embed" in result.stderr and "Traceback" not in result.stderr

    status = ask_json(shared["endpoint"], {"op": "status"})
    assert status["state"] == "ready" and status["failures"] >= 2
    good = write_proteins(data / "good_after_failure.faa", 5, seed=3)
    request_embedding(run_dir, "esm2", good, data / "good_after_failure.pt", timeout=60)
    assert read_embeddings(data / "good_after_failure.pt")[0] == fasta_ids(good)


def test_a_repeated_request_is_answered_without_computing_the_shard_twice(shared):
    endpoint, data = shared["endpoint"], shared["data"]
    fasta = write_proteins(data / "repeated.faa", 300, seed=4)
    request = {"op": "embed", "input": str(fasta), "output": str(data / "repeated.pt"), "shard": "repeated"}
    before = ask_json(endpoint, {"op": "status"})["shards_done"]
    outcomes: list[list[dict]] = [[], []]
    threads = [threading.Thread(target=lambda i=i: outcomes[i].extend(replies(endpoint, request, {"done"})))
               for i in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [replies_[-1]["reply"] for replies_ in outcomes] == ["done", "done"]
    assert ask_json(endpoint, {"op": "status"})["shards_done"] == before + 1
    again = ask_json(endpoint, request)
    assert again["reply"] == "done" and again["cached"] is True and again["sequences"] == 300
    assert ask_json(endpoint, {"op": "status"})["shards_done"] == before + 1
    assert_same_as_in_process(data / "repeated.pt", fasta, "esm2", shared["weights"])


def test_a_second_daemon_with_a_registered_id_refuses_to_start(shared, models):
    daemon = Daemon(shared["run_dir"], "esm2-shared", "esm2", models["esm2"], [shared["data"]])
    assert daemon.wait_exit() == 2
    assert "already registered" in daemon.log.read_text()
    assert ask_json(shared["endpoint"], {"op": "ping"})["reply"] == "pong"


# --- lifecycle ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_daemon_loads_its_model_once_for_six_shards_and_stop_daemons_ends_it(start_daemon, models, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemon = start_daemon(run_dir, "esm2-one", "esm2", models["esm2"], [data], "--cache-clear-every", "4")
    entry = daemon.wait_ready()
    assert entry["model"] == "esm2" and entry["pid"] == daemon.process.pid and entry["endpoint"].startswith("ipc://")
    assert (run_dir / "registry").stat().st_mode & 0o777 == 0o700
    socket_file = Path(entry["endpoint"].removeprefix("ipc://"))
    assert socket_file.parent.stat().st_mode & 0o777 == 0o700

    shards = [write_proteins(data / f"shard_{i:05d}.faa", 15 + 5 * i, seed=10 + i) for i in range(6)]
    for shard in shards:
        request_embedding(run_dir, "esm2", shard, shard.with_suffix(".pt"), sample="s", shard=shard.stem, timeout=60)
    for shard in shards:
        assert_same_as_in_process(shard.with_suffix(".pt"), shard, "esm2", models["esm2"])

    result = subprocess.run([sys.executable, "-m", "virnucpro.cli", "stop-daemons", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert daemon.wait_exit() == 0
    stats = daemon.final_stats()
    assert stats["model_loads"] == 1 and stats["shards"] == 6 and stats["failures"] == 0
    assert stats["sequences"] == sum(len(fasta_ids(shard)) for shard in shards)
    assert stats["cache_clears"] == 1 and stats["exit_reason"] == "stopped"
    assert stats["tokens"] > stats["sequences"] and stats["tokens_per_second"] > 0
    assert stats["peak_host_memory_bytes"] > 10_000_000 and stats["peak_gpu_memory_bytes"] is None
    assert daemon.entry() is None and not socket_file.exists()
    assert "esm2-one" in daemon.log.read_text() and "tokens/s" in daemon.log.read_text()


@pytest.mark.slow
def test_two_daemons_of_one_model_share_the_shards_of_concurrent_clients(start_daemon, models, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemons = [start_daemon(run_dir, f"dna-{i}", "dnabert-s", models["dnabert_s"], [data]) for i in range(2)]
    for daemon in daemons:
        daemon.wait_ready()
    shards = [write_nucleotides(data / f"shard_{i:05d}.fa", 500, seed=20 + i) for i in range(8)]
    clients = []
    for shard in shards:  # all eight in flight together, started a little apart so the load shows
        clients.append(in_thread(request_embedding, run_dir, "dnabert_s", shard, shard.with_suffix(".pt"), timeout=120))
        time.sleep(0.05)
    for thread, outcome in clients:
        thread.join(180)
        assert outcome == [None]
    assert stop_daemons(run_dir, "dnabert_s") == 2
    for daemon in daemons:
        assert daemon.wait_exit() == 0
    done = [daemon.final_stats()["shards"] for daemon in daemons]
    assert sum(done) == 8 and min(done) >= 1, done
    assert [daemon.final_stats()["model_loads"] for daemon in daemons] == [1, 1]
    for shard in shards:
        assert_same_as_in_process(shard.with_suffix(".pt"), shard, "dnabert_s", models["dnabert_s"])


@pytest.mark.slow
def test_an_idle_daemon_exits_by_itself_and_cleans_up_its_temporary_socket_folder(start_daemon, models, tmp_path):
    run_dir = tmp_path / ("deep" * 20) / "run"  # too long for a socket path under run/sockets/
    daemon = start_daemon(run_dir, "esm2-idle", "esm2", models["esm2"], [tmp_path], "--idle-timeout", "1")
    socket_file = Path(daemon.wait_ready()["endpoint"].removeprefix("ipc://"))
    assert not socket_file.is_relative_to(run_dir) and socket_file.parent.stat().st_mode & 0o777 == 0o700
    assert daemon.wait_exit() == 0
    stats = daemon.final_stats()
    assert stats["exit_reason"] == "idle" and stats["shards"] == 0 and stats["model_loads"] == 1
    assert daemon.entry() is None and not socket_file.parent.exists()


@pytest.mark.slow
def test_a_changed_stop_file_stops_the_daemon(start_daemon, models, tmp_path):
    stop_file = tmp_path / "run" / "stop"
    write_stop_token(stop_file)
    daemon = start_daemon(
        tmp_path / "run", "esm2-file", "esm2", models["esm2"], [tmp_path], "--stop-file", str(stop_file)
    )
    daemon.wait_ready()
    time.sleep(1.5)
    assert daemon.process.poll() is None  # the content it started with does not stop it
    write_stop_token(stop_file)
    assert daemon.wait_exit() == 0
    assert daemon.final_stats()["exit_reason"] == "stopped"


def test_a_daemon_that_cannot_load_its_model_says_why_in_the_registry(start_daemon, tmp_path):
    run_dir = tmp_path / "run"
    daemon = start_daemon(run_dir, "esm2-broken", "esm2", tmp_path / "esm2_missing.pt", [tmp_path])
    assert daemon.wait_exit() == 2
    entry = daemon.entry()
    assert entry["state"] == "failed" and "esm2_missing.pt" in entry["reason"]
    assert not daemon.stats.exists()
    with pytest.raises(UserError, match="esm2-broken failed: .*esm2_missing.pt"):
        request_embedding(run_dir, "esm2", tmp_path / "x.faa", tmp_path / "x.pt", timeout=0.5)


@pytest.mark.slow
def test_sigterm_during_a_shard_lets_the_shard_finish_then_the_daemon_exits(start_daemon, models, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    # a drain grace far above the shard's time, even on a loaded machine: the shard must finish
    daemon = start_daemon(run_dir, "esm2-term", "esm2", models["esm2"], [data], "--drain-grace", "300")
    endpoint = daemon.wait_ready()["endpoint"]
    big = write_proteins(data / "big.faa", 800, seed=30, length=(140, 160))
    thread, outcome = in_thread(request_embedding, run_dir, "esm2", big, data / "big.pt", timeout=120)
    wait_running(endpoint)
    daemon.process.send_signal(signal.SIGTERM)
    end = time.monotonic() + 10
    while ask_json(endpoint, {"op": "status"})["state"] != "stopping":
        assert time.monotonic() < end, "the daemon did not start draining"
        time.sleep(0.02)
    late = ask_json(endpoint, {"op": "embed", "input": str(big), "output": str(data / "late.pt")})
    assert late["reply"] == "stopping"
    thread.join(120)
    assert outcome == [None]
    assert daemon.wait_exit() == 0
    stats = daemon.final_stats()
    assert stats["exit_reason"] == "signal" and stats["shards"] == 1 and stats["sequences"] == 800
    assert read_embeddings(data / "big.pt")[0] == fasta_ids(big)
    assert not (data / "late.pt").exists() and daemon.entry() is None


@pytest.mark.slow
def test_the_client_fails_over_when_its_daemon_is_killed_mid_shard(start_daemon, models, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemons = [start_daemon(run_dir, f"esm2-{i}", "esm2", models["esm2"], [data]) for i in range(2)]
    endpoints = [daemon.wait_ready()["endpoint"] for daemon in daemons]
    big = write_proteins(data / "big.faa", 800, seed=31, length=(140, 160))
    output = data / "big.pt"
    thread, outcome = in_thread(request_embedding, run_dir, "esm2", big, output, sample="s", shard="big", timeout=120)
    end = time.monotonic() + 30
    busy = None
    while busy is None:
        assert time.monotonic() < end, "no daemon started the shard"
        busy = next((i for i, e in enumerate(endpoints) if ask_json(e, {"op": "status"})["running"]), None)
    daemons[busy].process.kill()
    daemons[busy].process.wait()
    assert not output.exists()  # it was killed mid-shard
    thread.join(120)
    assert outcome == [None]
    assert_same_as_in_process(output, big, "esm2", models["esm2"])
    assert ask_json(endpoints[1 - busy], {"op": "status"})["shards_done"] == 1
    assert [entry["daemon_id"] for entry in registry.list_entries(run_dir)] == [f"esm2-{1 - busy}"]
    assert read_failures(run_dir / "failures.tsv") == []


@pytest.mark.slow
def test_when_the_only_daemon_dies_the_client_records_daemon_lost(start_daemon, models, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemon = start_daemon(run_dir, "esm2-alone", "esm2", models["esm2"], [data])
    endpoint = daemon.wait_ready()["endpoint"]
    big = write_proteins(data / "big.faa", 800, seed=32, length=(140, 160))
    thread, outcome = in_thread(request_embedding, run_dir, "esm2", big, data / "big.pt", sample="s9", shard="big",
                                timeout=120, restart_wait=1.0)  # fmt: skip
    wait_running(endpoint)
    daemon.process.kill()
    daemon.process.wait()
    thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], UserError)
    assert "died while embedding" in str(outcome[0]) and "no other esm2 daemon was ready within 1 s" in str(outcome[0])
    [entry] = read_failures(run_dir / "failures.tsv")
    assert entry["error_class"] == "DaemonLost" and entry["sample"] == "s9" and entry["shard"] == "big"
    assert entry["daemon"] == "esm2-alone"


def test_a_client_without_a_daemon_gives_up_after_its_timeout_with_a_clear_message(tmp_path):
    started = time.monotonic()
    with pytest.raises(UserError, match=r"no ready esm2 daemon answered within 1 s .*serve jobs running"):
        request_embedding(tmp_path / "run", "esm2", tmp_path / "a.faa", tmp_path / "a.pt", timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 15.0


def test_stop_daemons_with_no_daemon_returns_zero_at_once(tmp_path):
    started = time.monotonic()
    assert stop_daemons(tmp_path / "run") == 0
    assert time.monotonic() - started < 5.0


# --- registry and socket path, no processes -------------------------------------------------------
def test_the_registry_drops_dead_local_daemons_and_skips_remote_ones_without_a_recent_heartbeat(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    base = {"endpoint": "ipc:///nowhere", "host": os.uname().nodename, "model": "esm2", "state": "ready"}
    remote = {**base, "pid": dead.pid, "host": "another-node"}
    registry.write_entry(tmp_path, {**base, "daemon_id": "gone", "pid": dead.pid})
    registry.write_entry(tmp_path, {**base, "daemon_id": "here", "pid": os.getpid()})
    registry.write_entry(tmp_path, {**remote, "daemon_id": "remote", "heartbeat": time.time() - 10})
    registry.write_entry(tmp_path, {**remote, "daemon_id": "remote-gone", "heartbeat": time.time() - 600})
    registry.write_entry(tmp_path, {**remote, "daemon_id": "remote-unknown"})
    registry.write_entry(tmp_path, {**base, "daemon_id": "why", "pid": dead.pid, "state": "failed"})
    (tmp_path / "registry" / "junk.json").write_text("{not json")
    assert [entry["daemon_id"] for entry in registry.list_entries(tmp_path)] == ["here", "remote", "why"]
    assert not (tmp_path / "registry" / "gone.json").exists()
    assert (tmp_path / "registry" / "remote-gone.json").exists()  # skipped, not deleted: its host may be back
    assert registry.list_entries(tmp_path, model="dnabert_s") == []
    assert (tmp_path / "registry").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "registry" / "here.json").stat().st_mode & 0o777 == 0o600


def test_a_run_folder_too_deep_for_a_socket_path_gets_a_private_temporary_folder(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path, temporary = socket_path(deep, "esm2-gpu0")
    try:
        assert temporary and len(os.fsencode(path)) <= SOCKET_PATH_LIMIT
        assert path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        path.parent.rmdir()
    path, temporary = socket_path(tmp_path, "esm2-gpu0")
    assert not temporary and path == tmp_path.resolve() / "sockets" / "esm2-gpu0.sock"
