"""Progress with the time left (virnucpro.serving.progress): a daemon's current rate, what a run stands at read
from real files (shards, embeddings, registry entries), the lines said, `virnucpro status`; and a real run of
the workflow with the test models on the CPU, its progress lines and its estimate of the tokens left checked
against the tokens its daemons reported for those shards."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from runs import BIN, DEMO_READS, kill_all_in, run_output, sample_files, start_run, wait_until, write_config

from virnucpro.cli import main
from virnucpro.serving import registry
from virnucpro.serving.progress import (
    RATE_SHARDS,
    RATE_WINDOW,
    DaemonMeter,
    ProgressReport,
    describe,
    read_progress,
    status_lines,
    time_left,
    workflow_settings,
)
from virnucpro.serving.rundir import RunDir


def test_a_daemons_rate_is_the_tokens_of_the_last_minutes_of_wall_time():
    meter = DaemonMeter()
    snapshot = meter.snapshot(shards=0, frames=0, tokens=0, queued=2, running=0, now=1000.0)  # loaded, waiting
    assert snapshot["rate"] == 0.0 and snapshot["queued"] == 2 and snapshot["running"] == 0
    meter.snapshot(shards=0, frames=0, tokens=0, queued=1, running=1, now=1005.0)  # the first shard runs
    steps = int(2 * RATE_WINDOW / 5)
    for step in range(1, steps + 1):  # then 1,000 tokens every 5 s
        snapshot = meter.snapshot(shards=step, frames=10 * step, tokens=1000 * step, queued=1, running=1,
                                  now=1005.0 + 5 * step)  # fmt: skip
    assert snapshot["rate"] == 200.0 and snapshot["tokens"] == 1000 * steps and snapshot["frames"] == 10 * steps
    for step in range(steps + 1, 2 * steps + 1):  # twice as fast: once the span has passed, the rate is the new one
        snapshot = meter.snapshot(shards=step, frames=10 * step, tokens=1000 * steps + 2000 * (step - steps),
                                  queued=1, running=1, now=1005.0 + 5 * step)  # fmt: skip
    assert snapshot["rate"] == 400.0


def test_a_daemon_whose_shards_take_longer_than_the_span_keeps_its_rate_between_shards():
    meter = DaemonMeter()
    meter.snapshot(shards=0, frames=0, tokens=0, queued=0, running=1, now=0.0)
    shard_seconds = RATE_WINDOW  # a shard of 100 tokens/s x shard_seconds at a time: 100 tokens/s
    rates = []
    for second in range(5, int(12 * shard_seconds), 5):
        shards = int(second // shard_seconds)
        rates.append(meter.snapshot(shards=shards, frames=shards, tokens=int(100 * shard_seconds) * shards, queued=0,
                                    running=1, now=float(second))["rate"])  # fmt: skip
    first = int(shard_seconds / 5) - 1  # the snapshot at the first shard's end
    assert all(rate > 0 for rate in rates[first:]), rates
    settled = int(RATE_SHARDS * shard_seconds / 5)  # from the span's shards on: near 100 between shards too
    assert all(80 <= rate <= 125 for rate in rates[settled:]), rates[settled:]


def test_a_daemon_counts_the_bytes_of_the_shards_it_embedded(tmp_path):
    meter = DaemonMeter()
    (tmp_path / "a.faa").write_text(">a\nMKV\n")
    meter.shard_done(tmp_path / "a.faa")
    meter.shard_done(tmp_path / "gone.faa")
    assert meter.snapshot(shards=2, frames=1, tokens=5, queued=0, running=0)["bytes"] == 7


@pytest.mark.parametrize(
    "seconds, said",
    [(None, "time left not known yet"), (0, "done"), (59, "under a minute left"), (1860, "about 31 min left"),
     (5340, "about 89 min left"), (7500, "about 2 h 05 min left")],
)  # fmt: skip
def test_the_time_left_is_said_in_minutes_or_hours(seconds, said):
    assert time_left(seconds) == said


def a_run(tmp_path, shards: dict[str, dict[str, int]], embedded: dict[str, set[str]]):
    """A run folder and its results as the workflow lays them out: shard files of given sizes per sample (of
    two samples), and embeddings of some shards ("sample/shard" per model)."""
    rules = sample_files(tmp_path, "{sample}")  # the embedding rules' patterns
    settings = workflow_settings(
        {model: (rules.shard_input("{shard}", model), rules.embedding("{shard}", model)) for model in ("esm2", "dnabert_s")},
        samples=["s1", "s2"], every=0.0,
    )  # fmt: skip
    for sample, sizes in shards.items():
        files = sample_files(tmp_path, sample)
        Path(files.shards).mkdir(parents=True)
        Path(files.embeddings).mkdir()
        for shard, size in sizes.items():
            for path in (files.shard_protein(shard), files.shard_nucleotide(shard)):
                Path(path).write_bytes(b"x" * size)
        (Path(files.shards) / ".snakemake_timestamp").touch()
    for model, names in embedded.items():
        for name in names:
            sample, shard = name.split("/")
            Path(sample_files(tmp_path, sample).embedding(shard, model)).touch()
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.write_settings({"session": "test", "progress": settings})
    return run, settings


def live_daemon(run: RunDir, daemon_id: str, model: str, progress: dict) -> None:
    """A registry entry of a ready daemon (this process stands for it) with its progress."""
    registry.write_entry(run, {"daemon_id": daemon_id, "model": model, "pid": os.getpid(), "host": socket.gethostname(),
                               "state": "ready", "heartbeat": time.time(), "progress": progress})  # fmt: skip


def test_the_progress_of_a_run_counts_shards_and_estimates_the_time_left_from_the_shards_left(tmp_path):
    run, settings = a_run(
        tmp_path,
        shards={"s1": {"shard_00000": 1000, "shard_00001": 1000, "shard_00002": 1000}, "s2": {"shard_00000": 500}},
        embedded={"esm2": {"s1/shard_00000", "s1/shard_00001"}, "dnabert_s": set()},
    )
    live_daemon(run, "esm2-0", "esm2", {"shards": 2, "frames": 40, "tokens": 1800, "bytes": 2000, "queued": 1,
                                        "running": 1, "rate": 90.0})  # fmt: skip
    live_daemon(run, "esm2-1", "esm2", {"shards": 0, "frames": 0, "tokens": 0, "bytes": 0, "queued": 0, "running": 0,
                                        "rate": 0.0})  # fmt: skip
    live_daemon(run, "dnabert_s-0", "dnabert_s", {"shards": 0, "frames": 0, "tokens": 0, "bytes": 0, "queued": 0,
                                                  "running": 1, "rate": 0.0})  # fmt: skip
    esm2, dnabert_s = read_progress(run, settings)
    assert (esm2.total, esm2.done, esm2.queued, esm2.daemons) == (4, 2, 2, 2)
    assert (esm2.frames, esm2.tokens, esm2.rate, esm2.remaining_bytes) == (40, 1800, 90.0, 1500)
    assert esm2.tokens_per_byte == 0.9
    assert esm2.seconds_left == pytest.approx(1500 * 0.9 / 90.0)  # 15 s
    assert describe(esm2) == ("esm2: 2/4 shards done, 2 queued, 2 daemons, 40 frames and 1,800 tokens embedded, "
                              "90 tokens/s, under a minute left")  # fmt: skip
    assert (dnabert_s.total, dnabert_s.done, dnabert_s.queued, dnabert_s.seconds_left) == (4, 0, 1, None)
    assert describe(dnabert_s).endswith("0 tokens/s, time left not known yet")


def test_samples_not_sharded_yet_are_said_and_a_dead_daemon_is_not_counted(tmp_path):
    run, settings = a_run(tmp_path, shards={"s1": {"shard_00000": 100}}, embedded={})
    dead = subprocess.Popen(["true"])
    dead.wait()
    registry.write_entry(run, {"daemon_id": "esm2-9", "model": "esm2", "pid": dead.pid, "host": socket.gethostname(),
                               "state": "ready", "heartbeat": time.time(),
                               "progress": {"tokens": 10, "rate": 5.0, "queued": 3}})  # fmt: skip
    [esm2, _] = read_progress(run, settings)
    assert (esm2.total, esm2.samples_pending, esm2.daemons, esm2.queued, esm2.tokens) == (1, 1, 0, 0, 0)
    assert describe(esm2).startswith("esm2: 0/1 (+ 1 sample(s) not sharded yet) shards done")
    assert (run.registry / "esm2-9.json").exists()  # reading the progress changes nothing


def test_the_report_says_a_line_per_model_while_it_embeds_and_once_when_it_is_done(tmp_path):
    run, settings = a_run(
        tmp_path,
        shards={"s1": {"shard_00000": 100}, "s2": {"shard_00000": 100}},
        embedded={"esm2": {"s1/shard_00000", "s2/shard_00000"}, "dnabert_s": {"s1/shard_00000"}},
    )
    live_daemon(run, "dnabert_s-0", "dnabert_s", {"tokens": 100, "bytes": 100, "rate": 10.0, "running": 1})
    said: list[str] = []
    report = ProgressReport(run, {**settings, "every": 0.001}, say=said.append)
    time.sleep(0.01)
    report.tick()
    assert said == ["progress esm2: all 2 shards embedded",
                    "progress dnabert_s: 1/2 shards done, 1 queued, 1 daemon, 0 frames and 100 tokens embedded, "
                    "10 tokens/s, under a minute left"]  # fmt: skip
    Path(sample_files(tmp_path, "s2").embedding("shard_00000", "dnabert_s")).touch()
    time.sleep(0.01)
    report.tick()
    assert said[2:] == ["progress dnabert_s: all 2 shards embedded"]
    time.sleep(0.01)
    report.tick()
    assert len(said) == 3


def test_status_prints_the_progress_of_a_run_folder(tmp_path, capsys):
    run, _ = a_run(tmp_path, shards={"s1": {"shard_00000": 100}}, embedded={})
    assert main(["status", str(run.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["esm2", "dnabert_s"]
    assert status_lines(tmp_path / "elsewhere") == [
        f"{tmp_path / 'elsewhere'}: no run's progress settings here (settings.json): is this a run folder of the "
        "workflow?"
    ]


# --- a real run -------------------------------------------------------------------------------------


def daemon_shard_tokens(workdir, model: str) -> dict[str, int]:
    """Shard -> tokens, as the model's daemons logged them ("shard shard_00003: 25 sequences, 3659 tokens")."""
    tokens = {}
    for log in (workdir / "logs" / "daemons").glob(f"{model}-*.log"):
        for shard, count in re.findall(r"shard (shard_\d+): \d+ sequences, (\d+) tokens", log.read_text()):
            tokens[shard] = int(count)
    return tokens


@pytest.mark.slow
def test_a_run_says_its_progress_and_estimates_the_tokens_left_from_the_shards_left(tmp_path, test_models):
    reads = tmp_path / "reads.fa"
    text = DEMO_READS.read_text()
    reads.write_text("".join(text.replace(">demo_read_", f">copy{copy}_read_") for copy in range(2)))  # 120 reads
    write_config(tmp_path, test_models, {"s": str(reads)}, shard_size=12, progress_every=1)
    run = start_run(tmp_path, cores=4)
    try:
        embeddings = tmp_path / "results" / "s" / "work" / "embeddings"
        wait_until(lambda: len(list(embeddings.glob("*.esm2.pt"))) >= 3, 600, "3 ESM-2 shards embedded", run)
        run_dir = RunDir(tmp_path / ".virnucpro")
        settings = json.loads(run_dir.settings.read_text())["progress"]
        while True:  # an estimate (once the daemon's entry shows its first shards), and the shards left as it saw them
            left = shards_left(tmp_path)
            [esm2] = [progress for progress in read_progress(run_dir, settings) if progress.model == "esm2"]
            if esm2.tokens_per_byte is not None and shards_left(tmp_path) == left:
                break
            assert run.poll() is None and left, "the run ended before an estimate of the tokens left"
            time.sleep(0.2)
        status = subprocess.run([str(BIN / "virnucpro"), "status", str(run_dir.root)], capture_output=True,
                                text=True, timeout=60, check=True).stdout  # fmt: skip
        assert run.wait(timeout=900) == 0, run_output(tmp_path)[-6000:]
    finally:
        if run.poll() is None:
            kill_all_in(tmp_path)
    output = run_output(tmp_path)
    shards = len(list((tmp_path / "results/s/work/shards").glob("*.faa")))
    assert shards >= 15
    for model in ("esm2", "dnabert_s"):
        assert f"progress {model}: all {shards} shards embedded" in output
        done = [int(m) for m in re.findall(rf"progress {model}: (\d+)/{shards} shards done", output)]
        assert done == sorted(done) and all(count < shards for count in done)
    assert re.search(r"progress esm2: \d+/\d+ shards done, \d+ queued, 1 daemon, [\d,]+ frames and [\d,]+ tokens "
                     r"embedded, [\d,]+ tokens/s, (about \d+ min|under a minute) left", output), output[-4000:]  # fmt: skip
    assert [line.split(":")[0] for line in status.splitlines()] == ["esm2", "dnabert_s"]
    # The estimate of the tokens left, against the tokens the daemon reported for those shards afterwards
    # (left out: shards that ended in the last seconds before the estimate, in its count of done shards).
    exact = daemon_shard_tokens(tmp_path, "esm2")
    assert len(exact) == shards
    estimate = esm2.remaining_bytes * esm2.tokens_per_byte
    assert estimate == pytest.approx(sum(exact[shard] for shard in left), rel=0.1)


def shards_left(workdir) -> set[str]:
    """The shards of sample s with no ESM-2 embedding yet."""
    work = workdir / "results" / "s" / "work"
    names = {path.name.split(".")[0] for path in (work / "shards").glob("*.faa")}
    return names - {path.name.split(".")[0] for path in (work / "embeddings").glob("*.esm2.pt")}
