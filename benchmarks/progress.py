"""Benchmark: the progress lines' time left against a run's actual end, and what a status request costs.

1. A real workflow run (generated reads, the small random-weight test models on the CPU, or a larger ESM-2
   with ``--esm2-layers``, one daemon per model, ``progress_every`` seconds between progress lines): its progress lines as snakemake printed them
   (an excerpt), and, every ``--poll`` seconds meanwhile, the estimate of the time left
   (``virnucpro.serving.progress.read_progress``, what the lines and ``virnucpro status`` print, unrounded).
   After the run, each model's actual end is the modification time of its last embedding file; the error of
   an estimate = (the time of the estimate + its time left) - the actual end, in seconds and in % of the
   time that was actually left.
2. The cost of a status request about the run folder of section 1: ``virnucpro status RUN_DIR`` as a process
   (wall and CPU seconds), the same in-process (``status_lines``), and a daemon's snapshot of its progress
   (``DaemonMeter.snapshot``, done every 5 s). Then one ESM-2 daemon (the esm2_t6_8M shapes, random weights) embeds ``--shards`` shards
   sent one after another, in rounds: with no status request, with one ``virnucpro status`` every second,
   and with status requests back to back (a process asking again as soon as it has its answer); the
   daemon's own compute tokens/s and the wall time per shard of each kind of round.

    .venv/bin/python -m benchmarks.progress [--dir /tmp/virnucpro-bench-progress] [--reads 240]
        [--shard-size 10] [--progress-every 5] [--esm2-layers 0] [--shards 6] [--frames 10] [--rounds 2]
        [--only eta|cost]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from benchmarks import _common

VIRNUCPRO = str(Path(sys.executable).parent / "virnucpro")


def eta_run(directory: Path, reads: int, shard_size: int, every: float, poll: float, esm2_layers: int) -> dict:
    """The workflow on generated reads with progress lines; the estimates polled meanwhile, the actual ends.
    ``esm2_layers`` > 0: an ESM-2 of that many layers, 320 wide (the esm2_t6_8M shapes for 6), instead of the
    test model's 2 x 64, so that its daemon, not the jobs around it, sets the pace."""
    from virnucpro.serving.progress import read_progress
    from virnucpro.serving.rundir import RunDir
    from virnucpro.testmodels import make_test_models

    if directory.exists():
        shutil.rmtree(directory)
    models = make_test_models(directory / "models")
    if esm2_layers:
        from virnucpro.testmodels import DNABERT_HIDDEN, write_published_classifier

        models["esm2"] = _common.esm2_checkpoint(directory / "models", esm2_layers, 320, 20)
        models["classifier_500"] = directory / "models" / "classifier_wide" / "500_model.pth"
        models["classifier_500"].parent.mkdir()
        write_published_classifier(models["classifier_500"], input_dim=DNABERT_HIDDEN + 320, seed=1)
    sample = _common.generate_reads(directory / "reads.fa", reads, 500)
    config = {
        "samples": {"bench": str(sample)}, "length": 500, "shard_size": shard_size, "idle_timeout": 300,
        "models": {"esm2": str(models["esm2"]), "dnabert_s": str(models["dnabert_s"]),
                   "classifier": str(models["classifier_500"])}, "progress_every": every,
    }  # fmt: skip
    workdir = directory / "run"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(_common.REPO / "workflow" / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "4"]  # fmt: skip
    lines: list[tuple[float, str]] = []
    process = subprocess.Popen(command, cwd=workdir, env=_common.bench_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line.rstrip()) for line in process.stdout))
    reader.start()
    run = RunDir(workdir / ".virnucpro")
    estimates: list[dict] = []
    started = time.time()
    while process.poll() is None:
        time.sleep(poll)
        try:
            settings = json.loads(run.settings.read_text())["progress"]
        except (OSError, ValueError, KeyError):
            continue
        now = time.time()
        for progress in read_progress(run, settings):
            if progress.daemons and progress.total > progress.done and progress.seconds_left is not None:
                estimates.append({"model": progress.model, "time": now, "at": now - started, "done": progress.done,
                                  "total": progress.total, "rate": progress.rate, "left": progress.seconds_left})  # fmt: skip
    reader.join()
    if process.returncode != 0:
        raise SystemExit(f"snakemake failed ({process.returncode}):\n" + "\n".join(line for _, line in lines[-40:]))
    ends = {}
    sample = _common.sample_files(workdir, "bench")
    shards = sample.shard_files.names()
    for model in ("esm2", "dnabert_s"):
        ends[model] = max(os.stat(sample.embedding(shard, model)).st_mtime for shard in shards)
    for estimate in estimates:
        actual = ends[estimate["model"]] - estimate["time"]
        estimate["actual_left"] = actual
        estimate["error"] = estimate["left"] - actual
    said = [(moment - started, line) for moment, line in lines if line.startswith("progress ")]
    return {"workdir": workdir, "estimates": estimates, "esm2": Path(models["esm2"]).name, "said": said, "ends": {m: e - started for m, e in ends.items()},
            "shards": len(shards)}  # fmt: skip


def status_cost(run_dir: Path, repeats: int = 10) -> dict:
    """Seconds of one ``virnucpro status`` process (wall, CPU), of one in-process ``status_lines``, and of one
    ``DaemonMeter.snapshot``."""
    from virnucpro.serving.progress import DaemonMeter, status_lines

    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([VIRNUCPRO, "status", str(run_dir)], check=True, capture_output=True, env=_common.bench_env())
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    started = time.perf_counter()
    for _ in range(repeats * 10):
        status_lines(run_dir)
    in_process = (time.perf_counter() - started) / (repeats * 10)
    meter = DaemonMeter()
    started = time.perf_counter()
    for step in range(10000):
        meter.snapshot(shards=step, frames=step, tokens=1000 * step, queued=1, running=1, now=5.0 * step)
    snapshot = (time.perf_counter() - started) / 10000
    return {"process_wall": statistics.median(walls), "process_cpu": statistics.median(cpus),
            "in_process": in_process, "snapshot": snapshot}  # fmt: skip


def asking(run_dir: Path, pause: float | None, stop: threading.Event, count: list[int]) -> None:
    """Status requests until ``stop``: one every ``pause`` seconds, or back to back (``None``)."""
    while not stop.is_set():
        subprocess.run([VIRNUCPRO, "status", str(run_dir)], capture_output=True, env=_common.bench_env())
        count[0] += 1
        if pause:
            stop.wait(pause)


def daemon_under_status(directory: Path, shards: int, frames: int, rounds: int, asked: Path) -> dict:
    """One ESM-2 daemon embedding ``shards`` shards of ``frames`` frames per round, with no, slow and back-to-back
    status requests about the run folder ``asked``."""
    from virnucpro.serving.client import request_embedding

    if directory.exists():
        shutil.rmtree(directory)
    weights = _common.esm2_checkpoint(directory, 6, 320, 20)
    _, proteins = _common.frames_for(frames * shards, 500, directory / "frames")
    inputs = [_common.write_fasta(directory / "in" / f"shard_{i:05d}.faa", proteins[frames * i : frames * (i + 1)])
              for i in range(shards)]  # fmt: skip
    (directory / "out").mkdir()
    run_dir = directory / "run"
    process = _common.start_daemon("esm2", weights, run_dir, "esm2-0", directory, directory / "daemon.log")
    kinds = {"none": None, "every 1 s": 1.0, "back to back": 0.0}
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    requests: dict[str, int] = {kind: 0 for kind in kinds}
    log = directory / "daemon.log"
    try:
        _common.wait_ready(run_dir, "esm2", 1, [process])
        for round_ in range(rounds):
            for kind, pause in kinds.items():
                stop, count = threading.Event(), [0]
                thread = None
                if pause is not None:
                    thread = threading.Thread(target=asking, args=(asked, pause, stop, count))
                    thread.start()
                seen = len(re.findall(r"tokens in", log.read_text()))
                started = time.perf_counter()
                for index, path in enumerate(inputs):
                    request_embedding(run_dir, "esm2", path, directory / "out" / f"{kind[:4]}{round_}_{index}.pt",
                                      timeout=600)  # fmt: skip
                wall = time.perf_counter() - started
                stop.set()
                if thread is not None:
                    thread.join()
                logged = re.findall(r"(\d+) tokens in ([\d.]+) s", log.read_text())[seen:]
                tokens, seconds = sum(int(t) for t, _ in logged), sum(float(s) for _, s in logged)
                results[kind].append(tokens / seconds)
                results.setdefault(f"{kind} wall per shard", []).append(wall / shards)
                requests[kind] += count[0]
    finally:
        _common.stop_daemons(run_dir, [process], ["esm2-0"])
    return {"rates": results, "requests": requests, "shards": shards, "frames": frames, "rounds": rounds}


def print_eta(eta: dict) -> None:
    print(f"\n== progress of a real run: {eta['shards']} shards per model, on the CPU, ESM-2 {eta['esm2']} ==")
    print("progress lines as printed (seconds since the start, line):")
    for moment, line in eta["said"][:6] + eta["said"][-4:]:
        print(f"  {moment:6.1f} s  {line}")
    for model, end in eta["ends"].items():
        print(f"{model}: last embedding at {end:.1f} s after the start")
    print("estimates of the time left (unrounded), against the actual end:")
    print("  model      at (s)  shards      rate tok/s   est. left (s)  actual left (s)  error (s)  error (%)")
    for estimate in eta["estimates"]:
        print(f"  {estimate['model']:<10} {estimate['at']:6.1f}  {estimate['done']:>4}/{estimate['total']:<4}  "
              f"{estimate['rate']:>12,.0f}  {estimate['left']:>13.1f}  {estimate['actual_left']:>15.1f}  "
              f"{estimate['error']:>9.1f}  {100 * estimate['error'] / max(estimate['actual_left'], 1e-9):>8.0f}")  # fmt: skip
    for model in ("esm2", "dnabert_s"):
        errors = [abs(e["error"]) / e["actual_left"] for e in eta["estimates"] if e["model"] == model
                  and e["actual_left"] > 10]  # fmt: skip
        if errors:
            print(f"{model}: median |error| {100 * statistics.median(errors):.0f} % of the time left "
                  f"({len(errors)} estimates with over 10 s left)")  # fmt: skip


def print_cost(cost: dict, load: dict) -> None:
    print("\n== cost of a status request ==")
    print(f"virnucpro status (a process): {cost['process_wall'] * 1000:.0f} ms wall, {cost['process_cpu'] * 1000:.0f} ms "
          f"CPU (median); in-process status_lines: {cost['in_process'] * 1000:.2f} ms; a daemon's progress snapshot "
          f"(every 5 s): {cost['snapshot'] * 1e6:.1f} µs")  # fmt: skip
    print(
        f"one ESM-2 daemon (6 layers x 320), {load['shards']} shards of {load['frames']} frames per round, {load['rounds']} rounds:"
    )
    for kind in ("none", "every 1 s", "back to back"):
        rates, walls = load["rates"][kind], load["rates"][f"{kind} wall per shard"]
        print(f"  status {kind:<13}: compute {statistics.median(rates):>8,.0f} tokens/s (rounds: "
              f"{', '.join(f'{rate:,.0f}' for rate in rates)}), wall {statistics.median(walls):.3f} s per shard, "
              f"{load['requests'][kind]} status requests")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-bench-progress"))
    parser.add_argument("--reads", type=int, default=240)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--progress-every", type=float, default=5.0)
    parser.add_argument("--poll", type=float, default=5.0)
    parser.add_argument("--esm2-layers", type=int, default=0, help="ESM-2 of N layers x 320 (0: the test model)")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--frames", type=int, default=10, help="frames per shard of the status-cost rounds")
    parser.add_argument("--only", choices=("eta", "cost"), help="run one section only")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    print(_common.command_line())
    print(_common.machine())
    print(_common.load_average())
    if args.only != "cost":
        eta = eta_run(args.dir / "eta", args.reads, args.shard_size, args.progress_every, args.poll, args.esm2_layers)
        print_eta(eta)
    if args.only != "eta":
        asked = args.dir / "eta" / "run" / ".virnucpro"  # a real run's folder: its shards, embeddings, registry
        if not (asked / "settings.json").is_file():
            raise SystemExit(f"no run folder at {asked}: run the eta section first")
        load = daemon_under_status(args.dir / "load", args.shards, args.frames, args.rounds, asked)
        cost = status_cost(asked)
        print_cost(cost, load)
    print(_common.load_average())


if __name__ == "__main__":
    main()
