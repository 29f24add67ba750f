"""The failure manifest: one documented TSV schema, appended safely by many processes at once."""

from __future__ import annotations

import multiprocessing
from datetime import datetime
from pathlib import Path

import pytest

from virnucpro.errors import UserError
from virnucpro.manifest import MANIFEST_COLUMNS, append_failure, read_failures

HEADER = "time\tsample\tstage\tshard\tsequence_id\terror_class\tmessage\tattempts\tdaemon\n"


def message_for(writer: int, number: int) -> str:
    """A long message with tabs, newlines and backslashes, different for every line."""
    return f"writer {writer} line {number}\tcol\nnext line \\ end " + "x" * (number * 37 % 6000)


def append_many(path: str, writer: int, count: int, barrier) -> None:
    barrier.wait()  # all writers race for the first line, header included
    for number in range(count):
        append_failure(
            Path(path), time="t", sample=f"s{writer}", stage="embed_esm2", shard=f"shard_{number:05d}",
            error_class="UserError", message=message_for(writer, number), attempts=number % 3 + 1,
            daemon=f"d{writer}",
        )  # fmt: skip


def test_the_header_is_the_documented_schema():
    assert "\t".join(MANIFEST_COLUMNS) + "\n" == HEADER


def test_concurrent_appends_from_several_processes_give_complete_lines_and_one_header(tmp_path):
    path = tmp_path / "failures.tsv"
    writers, count = 4, 150
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers)
    processes = [context.Process(target=append_many, args=(str(path), w, count, barrier)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    lines = path.read_text().split("\n")
    assert lines[0] + "\n" == HEADER and lines.count(HEADER.rstrip("\n")) == 1
    assert lines[-1] == "" and len(lines) == 1 + writers * count + 1
    assert all(line.count("\t") == len(MANIFEST_COLUMNS) - 1 for line in lines[1:-1])
    got = {(entry["sample"], entry["shard"], entry["message"], entry["attempts"]) for entry in read_failures(path)}
    expected = {
        (f"s{w}", f"shard_{n:05d}", message_for(w, n), str(n % 3 + 1)) for w in range(writers) for n in range(count)
    }
    assert got == expected


def test_fields_round_trip_through_escaping(tmp_path):
    path = tmp_path / "failures.tsv"
    awkward = "tab\there\nnewline\r\\n literal backslash-n \\ and \u2028 line separator, ünïcode"
    append_failure(path, sample="s\t1", message=awkward, sequence_id="read_1_chunk_1F1", attempts=2)
    [entry] = read_failures(path)
    assert entry["sample"] == "s\t1" and entry["message"] == awkward
    assert entry["sequence_id"] == "read_1_chunk_1F1" and entry["attempts"] == "2"
    assert entry["stage"] == entry["shard"] == entry["daemon"] == ""
    assert datetime.fromisoformat(entry["time"]).tzinfo is not None
    assert path.read_text().count("\n") == 2


def test_an_unknown_field_is_refused(tmp_path):
    with pytest.raises(ValueError, match="colour"):
        append_failure(tmp_path / "failures.tsv", colour="red")
    assert not (tmp_path / "failures.tsv").exists()


def test_reading_a_missing_or_empty_manifest_gives_no_entries(tmp_path):
    assert read_failures(tmp_path / "missing.tsv") == []
    (tmp_path / "empty.tsv").write_text("")
    assert read_failures(tmp_path / "empty.tsv") == []


def test_a_file_that_is_not_a_manifest_is_refused(tmp_path):
    (tmp_path / "other.tsv").write_text("id\tscore\nread1\t0.5\n")
    with pytest.raises(UserError, match="not a failure manifest"):
        read_failures(tmp_path / "other.tsv")
    (tmp_path / "short.tsv").write_text(HEADER + "only\ttwo\n")
    with pytest.raises(UserError, match="line 2: 2 fields"):
        read_failures(tmp_path / "short.tsv")
