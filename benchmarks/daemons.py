"""Benchmark: the workflow with model daemons against the workflow in in-process mode, and the
per-shard overhead of a warm daemon.

1. Workflow runs: the same generated reads, the same models, real ``snakemake`` subprocesses (this
   virtualenv's bin first on PATH), once with ``embedding_mode: daemon`` and once with
   ``embedding_mode: in_process``, at each shard count of ``--shards`` (the shard size is chosen so that
   the frames make that many shards). Models: a random-weight ESM-2 with the esm2_t30_150M shapes
   (30 layers, 640 wide, 20 heads; fp16 in the published layout, as ``esm2_t30_150M_UR50D.pt``),
   the small DNABERT-S test snapshot, a random classifier of the matching width. For each run: wall
   time, the CPU seconds of all its processes, and the model loads: in daemon mode the sum of
   ``model_loads`` in ``results/run_stats.json``; in in-process mode the number of embedding jobs
   (each loads its model; counted from their logs, ``logs/embed/*/*.log``). The two modes' outputs are
   compared byte for byte.
2. Warm-daemon overhead: one daemon (ESM-2 as above, then the DNABERT-S test snapshot, whose compute
   is a few milliseconds) is started and, once ready, sent ``--overhead-shards`` one-sequence shards
   one after the other with the client (``virnucpro.serving.client.request_embedding``); overhead per shard
   = (sum of the round trips - the compute seconds the daemon reports in its statistics) / shards.
   Then a few whole client processes (``virnucpro embed --run-dir``, what each workflow job runs)
   against in-process ones (``virnucpro embed --weights``, which load the model) on the same shard.

    .venv/bin/python -m benchmarks.daemons [--dir /tmp/virnucpro-bench-daemons] [--shards 20,40] [--cores 4]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _common

SAMPLE = "bench"


def make_models(directory: Path) -> dict[str, Path]:
    from virnucpro.testmodels import write_published_classifier, write_random_snapshot

    esm2 = _common.esm2_checkpoint(directory, 30, 640, 20, "esm2_t30_150M_UR50D.pt")
    dnabert = directory / "DNABERT-S-test"
    if not (dnabert / "model.safetensors").is_file():
        write_random_snapshot(dnabert)  # the test snapshot's shapes: 2 layers, 64 wide
    classifier = directory / "classifier_704" / "500_model.pth"
    if not classifier.is_file():
        classifier.parent.mkdir(parents=True, exist_ok=True)
        write_published_classifier(classifier, input_dim=64 + 640, seed=1)
    return {"esm2": esm2, "dnabert_s": dnabert, "classifier": classifier}


def count_frames(reads: Path, workdir: Path) -> int:
    nucleotide, _ = _common.make_frames(reads, 500, workdir)
    return sum(1 for line in open(nucleotide) if line.startswith(">"))


def run_workflow(workdir: Path, mode: str, reads: Path, models: dict[str, Path], shard_size: int, cores: int) -> dict:
    """One snakemake run in a fresh ``workdir``; its wall time, CPU seconds, shards and model loads."""
    config = _common.workflow_config(SAMPLE, reads, models, devices=["cpu"], shard_size=shard_size, mode=mode)
    run = _common.run_workflow(workdir, config, cores)
    sample = _common.sample_files(workdir, SAMPLE)
    shards = sum(os.path.exists(sample.embedding(shard, "esm2")) for shard in sample.shard_files.names())
    embed_logs = sorted((workdir / "logs" / "embed").glob("*/*.log"))
    if mode == "daemon":
        stats = _common.run_stats(workdir)
        loads = stats["model_loads"]
        detail = ", ".join(f"{d['daemon_id']}: {d['model_loads']} load(s), {d['shards']} shards, load "
                           f"{d['load_seconds']:.1f} s" for d in stats["daemons"])  # fmt: skip
    else:
        loads = sum(1 for log in embed_logs if "embedded" in log.read_text())
        detail = f"{len(embed_logs)} embedding jobs, {loads} logged a load-and-embed"
    return {"mode": mode, "wall": run["wall"], "cpu": run["cpu"], "shards": shards, "loads": loads, "detail": detail,
            "jobs": len(embed_logs), "workdir": workdir}  # fmt: skip


def same_outputs(first: Path, second: Path) -> bool:
    tables = [_common.sample_files(workdir, SAMPLE) for workdir in (first, second)]
    return all(
        Path(getattr(tables[0], name)).read_bytes() == Path(getattr(tables[1], name)).read_bytes()
        for name in ("prediction_results", "highest_scores", "reads_table")
    )


def warm_overhead(directory: Path, model: str, weights: Path, shards: int, sequence: str) -> dict:
    """Round trips of one-sequence shards to a warm daemon, and whole client processes against in-process ones."""
    from virnucpro.serving.client import request_embedding

    run_dir = directory / "run"
    if directory.exists():
        shutil.rmtree(directory)
    inputs = [_common.write_fasta(directory / "in" / f"s{i}.fa", [sequence]) for i in range(shards)]
    (directory / "out").mkdir()  # daemons write into existing folders only
    daemon_id = f"bench-{model}"
    process = _common.start_daemon(model, weights, run_dir, daemon_id, directory, directory / "daemon.log")
    virnucpro = str(Path(sys.executable).parent / "virnucpro")
    try:
        ready = _common.wait_ready(run_dir, model, 1, [process])
        trips = []
        for index, path in enumerate(inputs):
            started = time.perf_counter()
            request_embedding(run_dir, model, path, directory / "out" / f"s{index}.pt", timeout=300)
            trips.append(time.perf_counter() - started)
        clients = []
        for index in range(3):
            started = time.perf_counter()
            subprocess.run([virnucpro, "-q", "embed", str(inputs[index]), "--model", model, "--run-dir", str(run_dir),
                            "--output", str(directory / "out" / f"client{index}.pt")], check=True,
                           env=_common.bench_env())  # fmt: skip
            clients.append(time.perf_counter() - started)
    finally:
        stats = _common.stop_daemons(run_dir, [process], [daemon_id])[0]
    in_process = []
    for index in range(3):
        started = time.perf_counter()
        subprocess.run([virnucpro, "-q", "embed", str(inputs[index]), "--model", model, "--weights", str(weights),
                        "--output", str(directory / "out" / f"inprocess{index}.pt")], check=True,
                       env=_common.bench_env())  # fmt: skip
        in_process.append(time.perf_counter() - started)
    compute = stats["compute_seconds"] * shards / stats["shards"]  # the 3 client processes' shards are in it too
    trips.sort()
    return {
        "model": model, "weights": weights.name, "shards": shards, "ready": ready, "load": stats["load_seconds"],
        "round_trip_total": sum(trips), "compute_total": compute,
        "overhead_ms": (sum(trips) - compute) / shards * 1000, "median_ms": trips[len(trips) // 2] * 1000,
        "p90_ms": trips[int(len(trips) * 0.9)] * 1000, "client_processes": clients, "in_process": in_process,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-bench-daemons"), help="work folder")
    parser.add_argument("--models", type=Path, default=Path("/tmp/virnucpro-bench"), help="models (made once)")
    parser.add_argument("--reads", type=int, default=40, help="generated 500-nt reads (each has a stop-free frame)")
    parser.add_argument(
        "--shards", default="20,40", help="shard counts to run at, comma-separated (empty: only the overhead)"
    )
    parser.add_argument("--cores", type=int, default=4, help="snakemake --cores, the same for both modes")
    parser.add_argument("--overhead-shards", type=int, default=50, help="one-sequence shards sent to each warm daemon")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    print(f"command: {_common.command_line()}")
    print(f"machine: {_common.machine()}")
    print(f"before: {_common.load_average()}", flush=True)
    models = make_models(args.models)
    reads = _common.generate_reads(args.dir / "reads.fa", args.reads, 500, seed=1)
    frames = count_frames(reads, args.dir / "frames")
    print(f"input: {args.reads} reads of 500 nt, {frames} stop-free frames; models: {models['esm2'].name} "
          f"(random, fp16 file), DNABERT-S test snapshot (2 layers, 64 wide), classifier 704 -> 2", flush=True)  # fmt: skip

    runs = []
    for count in (int(value) for value in args.shards.split(",") if value.strip()):
        shard_size = math.ceil(frames / count)
        pair = {}
        for mode in ("daemon", "in_process"):
            print(f"running the workflow: {mode}, shard_size {shard_size} ...", flush=True)
            pair[mode] = run_workflow(args.dir / f"{mode}_{count}", mode, reads, models, shard_size, args.cores)
        identical = same_outputs(pair["daemon"]["workdir"], pair["in_process"]["workdir"])
        runs.append((shard_size, pair, identical))

    print("measuring the overhead of a warm daemon ...", flush=True)
    overheads = [
        warm_overhead(args.dir / "overhead_esm2", "esm2", models["esm2"], args.overhead_shards, "MKVLAAGIVGLLLAQ"),
        warm_overhead(args.dir / "overhead_dnabert_s", "dnabert_s", models["dnabert_s"], args.overhead_shards,
                      "ACGTTGCAAGCTTGCA" * 4),
    ]  # fmt: skip

    print(f"\ncommand: {_common.command_line()}")
    print(f"machine: {_common.machine()}; {_common.load_average()} at the end")
    print(f"snakemake --cores {args.cores} for both modes; daemon mode: one ESM-2 and one DNABERT-S daemon on the CPU")
    header = (f"{'shards':>6} {'size':>4} {'mode':<11} {'wall s':>7} {'CPU s':>7} {'model loads':>11} "
              f"{'in-process / daemon':>19}  details")  # fmt: skip
    print(header)
    print("-" * len(header))
    for shard_size, pair, identical in runs:
        ratio = pair["in_process"]["wall"] / pair["daemon"]["wall"]
        for mode in ("daemon", "in_process"):
            r = pair[mode]
            shown = f"{ratio:.2f}x wall" if mode == "daemon" else ""
            print(f"{r['shards']:>6} {shard_size:>4} {mode:<11} {r['wall']:>7.1f} {r['cpu']:>7.1f} {r['loads']:>11} "
                  f"{shown:>19}  {r['detail']}")  # fmt: skip
        print(f"{'':>6} {'':>4} outputs of the two modes identical: {'yes' if identical else 'NO'}")
    for o in overheads:
        print(
            f"\nwarm {o['model']} daemon ({o['weights']}, CPU): load {o['load']:.1f} s (ready after {o['ready']:.1f} s)"
        )
        print(f"{o['shards']} one-sequence shards, one after the other: round trips {o['round_trip_total']:.2f} s in "
              f"all (median {o['median_ms']:.0f} ms, 90th percentile {o['p90_ms']:.0f} ms), daemon-reported compute "
              f"{o['compute_total']:.2f} s -> overhead {o['overhead_ms']:.1f} ms per shard")  # fmt: skip
        print(f"whole client process (virnucpro embed --run-dir): "
              f"{' / '.join(f'{s:.2f}' for s in o['client_processes'])} s; in-process job (virnucpro embed "
              f"--weights, loads the model): {' / '.join(f'{s:.2f}' for s in o['in_process'])} s")  # fmt: skip
    print(f"\nthis benchmark took {time.perf_counter() - begun:.0f} s")


if __name__ == "__main__":
    main()
