"""The run folder (virnucpro.serving.rundir.RunDir): the one place naming its paths, the stop token, the
workflow's settings for the jobs of its session, and the daemon events. No processes."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from virnucpro.serving.rundir import SESSION_VARIABLE, RunDir, private_dir, read_token


def test_every_path_of_the_run_folder_is_named_once(tmp_path):
    run = RunDir(tmp_path / "run")
    root = tmp_path / "run"
    assert run == RunDir(str(root)) and run.root == root
    assert run.registry == root / "registry" and run.entry("esm2-0") == root / "registry" / "esm2-0.json"
    assert run.sockets == root / "sockets"
    assert run.keys == root / "keys" and run.key("client") == root / "keys" / "client.key"
    assert run.requests == root / "requests" and run.request_record("ab12") == root / "requests" / "ab12.json"
    assert run.failures == root / "failures.tsv"
    assert run.stop_file == root / "stop"
    assert run.heartbeat == root / "heartbeat"
    assert run.settings == root / "settings.json"
    assert run.events == root / "events.jsonl"
    assert not root.exists()  # naming creates nothing


def test_each_stop_token_is_new_and_a_missing_or_unreadable_file_has_none(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.read_stop_token() is None
    tokens = []
    for _ in range(5):
        run.write_stop_token()
        tokens.append(run.read_stop_token())
    assert all(tokens) and len(set(tokens)) == 5  # every write is a change a daemon sees
    assert run.stop_file.read_bytes() == tokens[-1]
    elsewhere = tmp_path / "other" / "stop"  # a daemon started with --stop-file
    run.write_stop_token(elsewhere)
    assert run.read_stop_token(elsewhere) == read_token(elsewhere) not in (None, tokens[-1])
    assert run.read_stop_token() == tokens[-1]  # the run's own token untouched
    assert read_token(None) is None and read_token(tmp_path) is None  # no file; a folder


def test_settings_are_read_only_by_the_jobs_of_the_session_that_wrote_them(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    monkeypatch.delenv(SESSION_VARIABLE, raising=False)
    assert run.read_settings() == {}  # none written
    run.write_settings({"session": "run-1", "client_timeout": 60, "on_failure": "record"})
    assert run.read_settings() == {}  # a process outside any workflow run
    monkeypatch.setenv(SESSION_VARIABLE, "run-2")
    assert run.read_settings() == {}  # a job of another run: that run's settings do not apply
    monkeypatch.setenv(SESSION_VARIABLE, "run-1")
    assert run.read_settings() == {"session": "run-1", "client_timeout": 60, "on_failure": "record"}
    run.settings.write_text("{not json")
    assert run.read_settings() == {}
    run.settings.write_text('["session", "run-1"]')
    assert run.read_settings() == {}


def append_events(root: str, writer: int, count: int, barrier) -> None:
    barrier.wait()
    run = RunDir(root)
    for number in range(count):
        run.record_event(event="lost", daemon=f"d{writer}", number=number, note="x" * (number * 53 % 3000))


def test_events_from_concurrent_processes_are_whole_lines(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.read_events() == []
    writers, count = 4, 100
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers)
    processes = [context.Process(target=append_events, args=(str(run.root), w, count, barrier)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    events = run.read_events()
    assert sorted((e["daemon"], e["number"]) for e in events) == sorted(
        (f"d{w}", n) for w in range(writers) for n in range(count)
    )
    assert all(e["event"] == "lost" and isinstance(e["time"], float) for e in events)
    with open(run.events, "a") as handle:
        handle.write("half a line\n[1]\n")
    assert len(run.read_events()) == writers * count  # unreadable lines are skipped


def test_a_private_folder_is_only_its_owners(tmp_path):
    folder = private_dir(tmp_path / "a" / "b")
    assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
    os.chmod(folder, 0o755)
    assert private_dir(Path(folder)).stat().st_mode & 0o777 == 0o700  # made private again
