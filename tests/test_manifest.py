"""The failure manifest: one documented TSV schema, appended safely by many processes at once."""

from __future__ import annotations

import multiprocessing
from datetime import datetime
from pathlib import Path

import pytest

from virnucpro.errors import UserError
from virnucpro.manifest import MANIFEST_COLUMNS, append_failure, read_failures, record_embed_failures

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


# --- record_embed_failures: a shard's entries are its latest outcome ---------------------------------
def keyed(entries: list[dict[str, str]]) -> set[tuple[str, ...]]:
    return {(e["sample"], e["stage"], e["shard"], e["sequence_id"], e["error_class"], e["message"], e["attempts"],
             e["daemon"]) for e in entries}  # fmt: skip


def test_recording_a_shards_outcome_replaces_its_entries_and_leaves_the_others(tmp_path):
    path = tmp_path / "failures.tsv"
    record_embed_failures(path, sample="s1", stage="embed_esm2", shard="a")  # embedded: nothing to record
    assert not path.exists()
    record_embed_failures(path, sample="s1", stage="embed_esm2", shard="a", daemon="d0",
                          shard_error=("UserError", "bad FASTA", 1))  # fmt: skip
    record_embed_failures(path, sample="s1", stage="embed_dnabert_s", shard="a", daemon="d9",
                          shard_error=("DaemonLost", "lost twice", 2))  # fmt: skip  # the same shard, another model
    record_embed_failures(path, sample="s2", stage="embed_esm2", shard="a", daemon="d9",
                          sequence_failures={"r1": "too long", "r2": "too long"})  # fmt: skip  # another sample
    append_failure(path, sample="s1", stage="chunk_reads", shard="a", error_class="UserError", message="other stage")
    others = [e for e in read_failures(path) if (e["sample"], e["stage"]) != ("s1", "embed_esm2")]
    assert len(others) == 4
    [first] = [e for e in read_failures(path) if (e["sample"], e["stage"]) == ("s1", "embed_esm2")]
    assert (first["shard"], first["error_class"], first["attempts"], first["daemon"]) == ("a", "UserError", "1", "d0")

    # retried: this time two sequences did not fit; the shard-level entry is gone
    record_embed_failures(path, sample="s1", stage="embed_esm2", shard="a", daemon="d1",
                          sequence_failures={"x1": "out of GPU memory", "x2": "out of GPU memory"})  # fmt: skip
    now = read_failures(path)
    assert [e for e in now if (e["sample"], e["stage"]) != ("s1", "embed_esm2")] == others  # untouched, in order
    assert keyed(e for e in now if (e["sample"], e["stage"]) == ("s1", "embed_esm2")) == {
        ("s1", "embed_esm2", "a", "x1", "OutOfMemoryError", "out of GPU memory", "1", "d1"),
        ("s1", "embed_esm2", "a", "x2", "OutOfMemoryError", "out of GPU memory", "1", "d1"),
    }
    # embedded in full at last: no entry of it is left, and the others still are
    record_embed_failures(path, sample="s1", stage="embed_esm2", shard="a", daemon="d2")
    assert read_failures(path) == others
    assert path.read_text().startswith(HEADER)


def record_outcomes(path: str, writer: int, shards: int, barrier) -> None:
    """Each shard of this writer first fails, then ends with its final outcome (see ``final_outcome``);
    an unrelated entry is appended now and then."""
    barrier.wait()
    for number in range(shards):
        key = {"sample": f"s{writer}", "stage": "embed_esm2", "shard": f"shard_{number:05d}", "daemon": f"d{writer}"}
        record_embed_failures(Path(path), **key, shard_error=("DaemonLost", "first try", 1))
        record_embed_failures(Path(path), **key, **final_outcome(writer, number))
        if number % 5 == 0:
            append_failure(Path(path), sample=f"s{writer}", stage="aggregate", shard=f"shard_{number:05d}",
                           error_class="UserError", message=message_for(writer, number))  # fmt: skip


def final_outcome(writer: int, number: int) -> dict:
    if number % 3 == 0:
        return {"shard_error": ("UserError", message_for(writer, number), 2)}
    if number % 3 == 1:
        return {"sequence_failures": {f"r{writer}_{number}_{i}": "out of GPU memory" for i in range(2)}}
    return {}  # embedded


def test_concurrent_writers_in_several_processes_lose_no_outcome(tmp_path):
    path = tmp_path / "failures.tsv"
    writers, shards = 4, 40
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers)
    processes = [context.Process(target=record_outcomes, args=(str(path), w, shards, barrier)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    expected = set()
    for w in range(writers):
        for n in range(shards):
            key = (f"s{w}", "embed_esm2", f"shard_{n:05d}")
            outcome = final_outcome(w, n)
            if "shard_error" in outcome:
                expected.add((*key, "", "UserError", message_for(w, n), "2", f"d{w}"))
            for sequence in outcome.get("sequence_failures", {}):
                expected.add((*key, sequence, "OutOfMemoryError", "out of GPU memory", "1", f"d{w}"))
            if n % 5 == 0:
                expected.add((f"s{w}", "aggregate", f"shard_{n:05d}", "", "UserError", message_for(w, n), "", ""))
    entries = read_failures(path)
    assert len(entries) == len(expected) and keyed(entries) == expected
    assert path.read_text().count(HEADER) == 1
