"""Model daemons: real `virnucpro serve` processes, real ZeroMQ sockets, the small test models.

Shards that must still be in progress when a test acts (signals, kills, concurrent clients) are gates
(daemon_helpers.Gate): the daemon blocks reading them until the test opens them, whatever the machine's
speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_helpers import (
    ask,
    ask_json,
    assert_same_as_in_process,
    fasta_ids,
    in_thread,
    nucleotides,
    proteins,
    replies,
    status,
    wait_for,
    wait_running,
    write_proteins,
)

from virnucpro.engines.embed import read_embeddings
from virnucpro.errors import UserError
from virnucpro.manifest import read_failures
from virnucpro.serving import registry
from virnucpro.serving.client import request_embedding, stop_daemons
from virnucpro.serving.rundir import RunDir
from virnucpro.serving.timing import STOP_CHECK_EVERY as STOP_FILE_CHECK_SECONDS
from virnucpro.serving.transport import SOCKET_PATH_LIMIT, socket_path


def running_daemon(endpoints: list[str]) -> int | None:
    """The index of the daemon that is computing a shard, if any."""
    return next((i for i, endpoint in enumerate(endpoints) if status(endpoint)["running"]), None)


# --- one daemon shared by the request-level tests (fixture `shared`, conftest.py) ------------------
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

    status_ = status(shared["endpoint"])
    assert status_["state"] == "ready" and status_["failures"] >= 2
    good = write_proteins(data / "good_after_failure.faa", 5, seed=3)
    request_embedding(run_dir, "esm2", good, data / "good_after_failure.pt", timeout=60)
    assert read_embeddings(data / "good_after_failure.pt")[0] == fasta_ids(good)

    # Fixed and embedded again, the shard has no failure any more: the manifest shows each shard's current
    # state (its old entry is replaced), and the other shard's entry stays.
    write_proteins(broken, 4, seed=5)
    request_embedding(run_dir, "esm2", broken, data / "broken.pt", sample="s1", shard="shard_00007", timeout=60)
    assert read_embeddings(data / "broken.pt")[0] == fasta_ids(broken)
    shards = [entry["shard"] for entry in read_failures(run_dir / "failures.tsv")]
    assert "shard_00007" not in shards and shards.count("shard_00008") == 1


def test_a_repeated_request_is_answered_without_computing_the_shard_twice(shared):
    endpoint, data = shared["endpoint"], shared["data"]
    fasta = write_proteins(data / "repeated.faa", 300, seed=4)
    request = {"op": "embed", "input": str(fasta), "output": str(data / "repeated.pt"), "shard": "repeated"}
    before = status(endpoint)["shards_done"]
    outcomes: list[list[dict]] = [[], []]
    threads = [threading.Thread(target=lambda i=i: outcomes[i].extend(replies(endpoint, request, {"done"})))
               for i in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [replies_[-1]["reply"] for replies_ in outcomes] == ["done", "done"]
    assert status(endpoint)["shards_done"] == before + 1
    again = ask_json(endpoint, request)
    assert again["reply"] == "done" and again["cached"] is True and again["sequences"] == 300
    assert status(endpoint)["shards_done"] == before + 1
    assert_same_as_in_process(data / "repeated.pt", fasta, "esm2", shared["weights"])


def test_an_output_that_exists_when_the_shard_is_asked_for_is_computed_again(shared):
    data = shared["data"]
    fasta = write_proteins(data / "redo.faa", 6, seed=6)
    output = data / "redo.pt"
    output.write_bytes(b"an embedding file of another model")  # no done record of this request: redo it
    assert request_embedding(shared["run_dir"], "esm2", fasta, output, timeout=60) is True
    assert_same_as_in_process(output, fasta, "esm2", shared["weights"])


def test_a_second_daemon_with_a_registered_id_refuses_to_start(shared, start_daemon, models):
    daemon = start_daemon(shared["run_dir"], "esm2-shared", "esm2", models["esm2"], [shared["data"]])
    assert daemon.wait_exit() == 2
    assert "already registered" in daemon.log.read_text()
    assert ask_json(shared["endpoint"], {"op": "ping"})["reply"] == "pong"


@pytest.mark.slow
def test_a_daemon_on_other_esm2_engine_paths_gives_the_in_process_vectors(start_daemon, models, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemon = start_daemon(run_dir, "esm2-paths", "esm2", models["esm2"], [data], "--esm2-engine",
                          "packed,fused-qkv,overlap,cuda-graphs")  # fmt: skip
    daemon.wait_ready()
    fasta = write_proteins(data / "shard_00000.faa", 40, seed=31, length=(1, 1100))
    request_embedding(run_dir, "esm2", fasta, data / "shard_00000.pt", timeout=120)
    assert_same_as_in_process(data / "shard_00000.pt", fasta, "esm2", models["esm2"])  # the default engine
    assert "ESM-2 engine fused-qkv,packed,cuda-graphs,overlap" in daemon.log.read_text()
    stop_daemons(run_dir)
    assert daemon.wait_exit() == 0


def test_a_daemon_with_an_unknown_esm2_engine_setting_refuses_to_start_in_one_line(start_daemon, models, tmp_path):
    daemon = start_daemon(tmp_path / "run", "esm2-wrong", "esm2", models["esm2"], [tmp_path], "--esm2-engine", "fast")
    assert daemon.wait_exit() == 2
    lines = daemon.log.read_text().strip().splitlines()
    assert len(lines) == 1 and "unknown ESM-2 engine setting 'fast'" in lines[0], lines


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
    assert RunDir(run_dir).read_stop_token()  # stop-daemons also left the run's stop token


@pytest.mark.slow
def test_two_daemons_of_one_model_share_the_shards_of_concurrent_clients(start_daemon, models, gate, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemons = [start_daemon(run_dir, f"dna-{i}", "dnabert-s", models["dnabert_s"], [data]) for i in range(2)]
    endpoints = [daemon.wait_ready()["endpoint"] for daemon in daemons]
    shards = [gate(data / f"shard_{i:05d}.fa", nucleotides(f"shard_{i:05d}", 100, seed=20 + i)) for i in range(8)]

    def accepted() -> int:
        return sum(s["queued"] + s["running"] for s in map(status, endpoints))

    clients = []
    for count, shard in enumerate(shards, start=1):
        # all eight in flight together, held at their gates; each accepted before the next client asks,
        # so that every client sees the load of the ones before it
        clients.append(in_thread(request_embedding, run_dir, "dnabert_s", shard.path, shard.path.with_suffix(".pt"),
                                 timeout=120))  # fmt: skip
        wait_for(lambda count=count: accepted() == count, 60, f"{count} shard(s) accepted")
    for shard in shards:
        shard.open()
    for thread, outcome in clients:
        thread.join(180)
        assert outcome == [None]
    stop_daemons(run_dir, "dnabert_s")  # the model's stop token reaches them whatever becomes of the acknowledgements
    for daemon in daemons:
        assert daemon.wait_exit() == 0
    done = [daemon.final_stats()["shards"] for daemon in daemons]
    assert done == [4, 4], done  # the least-loaded daemon took each shard
    assert [daemon.final_stats()["model_loads"] for daemon in daemons] == [1, 1]
    for shard in shards:
        assert_same_as_in_process(shard.path.with_suffix(".pt"), shard.path, "dnabert_s", models["dnabert_s"])


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
    """By default a daemon watches the run's stop token (RUN/stop); with --stop-file, that file instead."""
    run = RunDir(tmp_path / "run")
    other = tmp_path / "elsewhere" / "stop"
    run.write_stop_token()  # the content a daemon starts with does not stop it
    started = time.time()
    default = start_daemon(run.root, "esm2-default", "esm2", models["esm2"], [tmp_path])
    given = start_daemon(run.root, "esm2-given", "esm2", models["esm2"], [tmp_path], "--stop-file", str(other))
    for daemon in (default, given):
        daemon.wait_ready()
        # a registry refresh over a second later: the daemon has read its stop file since it started
        daemon.wait_heartbeat_after(started + STOP_FILE_CHECK_SECONDS + 0.01)
    assert default.process.poll() is None and given.process.poll() is None

    written = time.time()
    run.write_stop_token()
    assert default.wait_exit() == 0
    assert default.final_stats()["exit_reason"] == "stopped"
    given.wait_heartbeat_after(written + STOP_FILE_CHECK_SECONDS + 0.01)  # it has read its own stop file since
    assert given.process.poll() is None

    run.write_stop_token(other)
    assert given.wait_exit() == 0
    assert given.final_stats()["exit_reason"] == "stopped"


def test_a_daemon_that_cannot_load_its_model_says_why_in_the_registry(start_daemon, tmp_path):
    run_dir = tmp_path / "run"
    broken = tmp_path / "esm2_broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    daemon = start_daemon(run_dir, "esm2-broken", "esm2", broken, [tmp_path])
    assert daemon.wait_exit() == 2
    entry = daemon.entry()
    assert entry["state"] == "failed" and "esm2_broken.pt" in entry["reason"]
    assert not daemon.stats.exists()
    with pytest.raises(UserError, match="esm2-broken failed: .*esm2_broken.pt"):
        request_embedding(run_dir, "esm2", tmp_path / "x.faa", tmp_path / "x.pt", timeout=0.5)

    # a model file that does not exist is refused before the daemon registers
    missing = start_daemon(run_dir, "esm2-missing", "esm2", tmp_path / "esm2_missing.pt", [tmp_path])
    assert missing.wait_exit() == 2
    assert missing.entry() is None and "esm2_missing.pt: model not found" in missing.log.read_text()


@pytest.mark.slow
def test_sigterm_during_a_shard_lets_the_shard_finish_then_the_daemon_exits(start_daemon, models, gate, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemon = start_daemon(run_dir, "esm2-term", "esm2", models["esm2"], [data], "--drain-grace", "300")
    endpoint = daemon.wait_ready()["endpoint"]
    big = gate(data / "big.faa", proteins("big", 60, seed=30, length=(140, 160)))
    thread, outcome = in_thread(request_embedding, run_dir, "esm2", big.path, data / "big.pt", timeout=120)
    wait_running(endpoint)  # held at the gate until the daemon is draining
    daemon.process.send_signal(signal.SIGTERM)
    wait_for(lambda: status(endpoint)["state"] == "stopping", 10, "the daemon started draining")
    late = ask_json(endpoint, {"op": "embed", "input": str(big.path), "output": str(data / "late.pt")})
    assert late["reply"] == "stopping"
    big.open()
    thread.join(120)
    assert outcome == [None]
    assert daemon.wait_exit() == 0
    stats = daemon.final_stats()
    assert stats["exit_reason"] == "signal" and stats["shards"] == 1 and stats["sequences"] == 60
    assert read_embeddings(data / "big.pt")[0] == fasta_ids(big.path)
    assert not (data / "late.pt").exists() and daemon.entry() is None


@pytest.mark.slow
def test_the_client_fails_over_when_its_daemon_is_killed_mid_shard(start_daemon, models, gate, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemons = [start_daemon(run_dir, f"esm2-{i}", "esm2", models["esm2"], [data]) for i in range(2)]
    endpoints = [daemon.wait_ready()["endpoint"] for daemon in daemons]
    big = gate(data / "big.faa", proteins("big", 60, seed=31, length=(140, 160)))
    output = data / "big.pt"
    thread, outcome = in_thread(request_embedding, run_dir, "esm2", big.path, output, sample="s", shard="big",
                                timeout=120)  # fmt: skip
    wait_for(lambda: running_daemon(endpoints) is not None, 30, "a daemon started the shard")
    busy = running_daemon(endpoints)
    daemons[busy].kill()
    assert not output.exists()  # it was killed mid-shard
    big.open()  # now read by the other daemon, which takes the shard over
    thread.join(120)
    assert outcome == [None]
    assert_same_as_in_process(output, big.path, "esm2", models["esm2"])
    assert status(endpoints[1 - busy])["shards_done"] == 1
    assert [entry["daemon_id"] for entry in registry.list_entries(run_dir)] == [f"esm2-{1 - busy}"]
    assert read_failures(run_dir / "failures.tsv") == []


@pytest.mark.slow
def test_when_the_only_daemon_dies_the_client_records_daemon_lost(start_daemon, models, gate, tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    daemon = start_daemon(run_dir, "esm2-alone", "esm2", models["esm2"], [data])
    endpoint = daemon.wait_ready()["endpoint"]
    big = gate(data / "big.faa", proteins("big", 60, seed=32, length=(140, 160)))  # never opened
    thread, outcome = in_thread(request_embedding, run_dir, "esm2", big.path, data / "big.pt", sample="s9",
                                shard="big", timeout=120, restart_wait=1.0)  # fmt: skip
    wait_running(endpoint)
    daemon.kill()
    thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], UserError)
    assert "died while embedding" in str(outcome[0]) and "no other esm2 daemon was ready within 1 s" in str(outcome[0])
    [entry] = read_failures(run_dir / "failures.tsv")
    assert entry["error_class"] == "DaemonLost" and entry["sample"] == "s9" and entry["shard"] == "big"
    assert entry["daemon"] == "esm2-alone"
    assert not (data / "big.pt").exists()


def test_a_client_without_a_daemon_gives_up_after_its_timeout_with_a_clear_message(tmp_path):
    started = time.monotonic()
    with pytest.raises(UserError, match=r"no ready esm2 daemon answered within 1 s .*serve jobs running"):
        request_embedding(tmp_path / "run", "esm2", tmp_path / "a.faa", tmp_path / "a.pt", timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 15.0


def test_stop_daemons_with_no_daemon_returns_zero_at_once_and_leaves_a_fresh_stop_token(tmp_path):
    run = RunDir(tmp_path / "run")
    started = time.monotonic()
    assert stop_daemons(run.root) == 0
    assert time.monotonic() - started < 5.0
    first = run.read_stop_token()
    assert first  # every daemon watching the run's stop token stops, registered or not yet
    assert stop_daemons(run.root, "esm2") == 0
    assert run.read_stop_token() == first  # one model named: the other models' daemons serve on
    other = tmp_path / "elsewhere" / "stop"
    assert stop_daemons(run.root, "esm2", stop_file=other) == 0
    assert run.read_stop_token(other) and run.read_stop_token() == first
    assert stop_daemons(run.root) == 0
    assert run.read_stop_token() not in (None, first)


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
    assert registry.list_entries(RunDir(tmp_path)) == registry.list_entries(tmp_path)  # a RunDir or a path
    assert (tmp_path / "registry").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "registry" / "here.json").stat().st_mode & 0o777 == 0o600


def test_a_run_folder_too_deep_for_a_socket_path_gets_a_private_temporary_folder(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path, temporary = socket_path(RunDir(deep), "esm2-gpu0")
    try:
        assert temporary and len(os.fsencode(path)) <= SOCKET_PATH_LIMIT
        assert path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        path.parent.rmdir()
    path, temporary = socket_path(RunDir(tmp_path), "esm2-gpu0")
    assert not temporary and path == tmp_path.resolve() / "sockets" / "esm2-gpu0.sock"
