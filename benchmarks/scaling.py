"""Benchmark: embedding throughput with 1, 2 and 4 ESM-2 daemons on this machine's CPU.

For each daemon count N: start N ``virnucpro serve`` daemons of the same model (a random-weight ESM-2
with the esm2_t30_150M shapes, as in benchmarks/daemons.py), wait until all are loaded (not timed),
then send ``--shards`` shards of ``--frames-per-shard`` proteins (kept frames of generated 500-nt
reads) all at once, one client thread per shard (``virnucpro.serving.client.request_embedding``: each picks the
least-loaded daemon), and time from the first request to the last reply. Throughput = tokens / that
time. Each daemon runs torch with its default thread count unless ``--threads-per-daemon`` is given
(OMP_NUM_THREADS and MKL_NUM_THREADS for its process).

    .venv/bin/python -m benchmarks.scaling [--daemons 1,2,4] [--shards 8] [--frames-per-shard 4]
"""

from __future__ import annotations

import argparse
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import _common


def run(directory: Path, weights: Path, daemons: int, shards: list[Path], threads: int | None) -> dict:
    from virnucpro.serving.client import request_embedding

    if directory.exists():
        shutil.rmtree(directory)
    run_dir = directory / "run"
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
    ids = [f"esm2-{index}" for index in range(daemons)]
    processes = [_common.start_daemon("esm2", weights, run_dir, daemon_id, shards[0].parent.parent,
                                      directory / f"{daemon_id}.log", env) for daemon_id in ids]  # fmt: skip
    try:
        ready = _common.wait_ready(run_dir, "esm2", daemons, processes)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(shards)) as pool:
            outputs = [directory.parent / "out" / f"{directory.name}_{path.stem}.pt" for path in shards]
            outputs[0].parent.mkdir(parents=True, exist_ok=True)  # daemons write into existing folders only
            for future in [pool.submit(request_embedding, run_dir, "esm2", path, output, timeout=1800)
                           for path, output in zip(shards, outputs)]:  # fmt: skip
                future.result()
        wall = time.perf_counter() - started
    finally:
        stats = _common.stop_daemons(run_dir, processes, ids)
    return {"daemons": daemons, "ready": ready, "wall": wall, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-bench-scaling"), help="work folder")
    parser.add_argument("--models", type=Path, default=Path("/tmp/virnucpro-bench"), help="models (made once)")
    parser.add_argument("--daemons", default="1,2,4", help="daemon counts, comma-separated")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--frames-per-shard", type=int, default=4)
    parser.add_argument("--threads-per-daemon", type=int, default=None, help="default: torch's own choice")
    args = parser.parse_args()
    print(f"command: {_common.command_line()}")
    print(f"machine: {_common.machine()}")
    print(f"before: {_common.load_average()}", flush=True)
    weights = _common.esm2_checkpoint(args.models, 30, 640, 20, "esm2_t30_150M_UR50D.pt")
    count = args.shards * args.frames_per_shard
    _, proteins = _common.frames_for(count, 500, args.dir / "frames", seed=2)
    shards = [
        _common.write_fasta(args.dir / "shards" / f"shard_{i:03d}.faa", proteins[i::args.shards][: args.frames_per_shard])
        for i in range(args.shards)
    ]  # fmt: skip
    tokens = sum(len(p) + 2 for p in proteins[:count])
    results = []
    for daemons in (int(value) for value in args.daemons.split(",")):
        print(f"{daemons} daemon(s) ...", flush=True)
        results.append(run(args.dir / f"daemons_{daemons}", weights, daemons, shards, args.threads_per_daemon))

    print(f"\ncommand: {_common.command_line()}")
    print(f"machine: {_common.machine()}; {_common.load_average()} at the end")
    print(f"work: {args.shards} shards of {args.frames_per_shard} proteins ({tokens} tokens), all sent at once; "
          f"model {weights.name} (random weights, fp32 on the CPU); threads per daemon: "
          f"{args.threads_per_daemon or 'torch default'}")  # fmt: skip
    header = f"{'daemons':>7} {'wall s':>7} {'tokens/s':>9} {'x 1 daemon':>10} {'loads':>5}  shards per daemon"
    print(header)
    print("-" * len(header))
    base = None
    for r in results:
        rate = tokens / r["wall"]
        base = base or rate
        loads = sum(s["model_loads"] for s in r["stats"])
        spread = " ".join(str(s["shards"]) for s in r["stats"])
        print(f"{r['daemons']:>7} {r['wall']:>7.1f} {rate:>9.0f} {rate / base:>10.2f} {loads:>5}  {spread}")


if __name__ == "__main__":
    main()
