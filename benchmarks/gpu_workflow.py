"""Benchmark: the whole workflow on a GPU, through snakemake (prepared for one short call on an H200).

1. Same answers on the GPU: the bundled demo reads (``tests/data/demo_reads.fa``) with the small test
   models in fp32, once with both daemons on the CPU and once with both on ``cuda``; the two runs'
   ``prediction_results.txt`` compared: identical bytes, or how many labels differ and the largest
   score difference.
2. The bare engine: ESM-2 (3B shapes) loaded in this process at ``--precision`` with ``--esm2-engine``,
   tokens/s on 2,000 frames of the same generated reads (first pass untimed).
3. A whole run at the real sizes, for each ``--reads`` (e.g. ``--reads 40000 200000``): generated 500-nt
   reads (one stop-free frame each), ESM-2 with the esm2_t36_3B_UR50D shapes and DNABERT-S with the 117M
   shapes (random weights in the published layouts), a random classifier of the matching width
   (768 + 2560); one daemon per model on ``cuda`` at ``--precision``, ESM-2's with ``--esm2-engine``;
   shard_size 10,000. The snakemake run's wall time and reads/s; per daemon (``results/run_stats.json``)
   model loads, load seconds, shards, tokens/s, peak GPU memory; and the ESM-2 daemon's load + compute
   seconds, the wall time over them (1.0: the run waited only for ESM-2) and its tokens/s over the bare
   engine's.

Without a CUDA GPU it prints "no GPU" and exits 0, unless ``--tiny``: then the same code runs with
small shapes and the daemons on the CPU (to check the script, not to measure anything).

    python -m benchmarks.gpu_workflow [--dir /tmp/virnucpro-gpu-workflow] [--reads 40000 200000] [--precision bf16]
                                      [--esm2-engine all]
    python -m benchmarks.gpu_workflow --tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import _common
from virnucpro.atomic import write_json

SAMPLE = "bench"
DEMO_READS = _common.REPO / "tests" / "data" / "demo_reads.fa"
REAL = {"esm": (36, 2560, 40), "dnabert": (12, 768, 12, 3072), "shard_size": 10000}
TINY = {"esm": (2, 64, 4), "dnabert": (2, 64, 4, 128), "shard_size": 50}


def compare_predictions(first: Path, second: Path) -> dict:
    """How two prediction tables of the same frames differ: identical bytes, labels, largest score difference."""
    if first.read_bytes() == second.read_bytes():
        return {
            "identical": True,
            "frames": first.read_text().count("\n") - 1,
            "labels_differ": 0,
            "max_score_diff": 0.0,
        }
    rows = [dict((line.split("\t")[0], line.split("\t")[1:]) for line in path.read_text().splitlines()[1:])
            for path in (first, second)]  # fmt: skip
    if rows[0].keys() != rows[1].keys():
        raise SystemExit(f"{first} and {second} hold different frames")
    labels = sum(rows[0][key][0] != rows[1][key][0] for key in rows[0])
    score_diff = max(abs(float(a) - float(b)) for key in rows[0] for a, b in zip(rows[0][key][1:], rows[1][key][1:]))
    return {"identical": False, "frames": len(rows[0]), "labels_differ": labels, "max_score_diff": score_diff}


def same_answers(directory: Path, cores: int, gpu: str, esm2_engine: str) -> dict:
    """The demo reads with the test models, fp32, daemons on the CPU and then on ``gpu``."""
    from virnucpro.testmodels import make_test_models

    models = make_test_models(directory / "test-models")
    runs = {}
    for name, device in (("cpu", "cpu"), ("gpu", gpu)):
        config = _common.workflow_config(SAMPLE, DEMO_READS, {
            "esm2": models["esm2"], "dnabert_s": models["dnabert_s"], "classifier": models["classifier_500"]},
            devices=[device], shard_size=25, precision="fp32", esm2_engine=esm2_engine)  # fmt: skip
        runs[name] = _common.run_workflow(directory / f"demo-{name}", config, cores)
        print(f"  demo reads, daemons on {device}: {runs[name]['wall']:.1f} s", flush=True)
    tables = [Path(_common.sample_files(run["workdir"], SAMPLE).prediction_results) for run in runs.values()]
    return {"wall_s": {name: run["wall"] for name, run in runs.items()}, **compare_predictions(*tables)}


def esm2_checkpoint(directory: Path, plan: dict, device: str) -> Path:
    """The random ESM-2 of ``plan``'s shapes in the published layout (written once)."""
    from virnucpro.engines.download import MODEL_PATHS

    layers, width, heads = plan["esm"]
    models_dir = directory / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    esm2 = models_dir / (MODEL_PATHS["esm2"] if plan is REAL else f"esm2_t{layers}_{width}_bench.pt")
    if not esm2.is_file():
        _common.write_large_esm2(esm2, layers, width, heads, device=device)
    return esm2


def bare_engine(directory: Path, plan: dict, precision: str, esm2_engine: str, device: str) -> dict:
    """ESM-2 in this process on 2,000 (tiny: 100) frames of the run's generated reads: tokens/s."""
    from virnucpro.engines.embed import load_embedder

    _, proteins = _common.frames_for(100 if plan is TINY else 2000, 500, directory / "bare", seed=5)
    embedder = load_embedder("esm2", esm2_checkpoint(directory, plan, device), device, precision, esm2_engine)
    embedder.embed(proteins)  # first pass: compilation, graphs, allocator
    _common.synchronize(device)
    started = time.perf_counter()
    tokens = embedder.embed(proteins).tokens
    _common.synchronize(device)
    seconds = time.perf_counter() - started
    del embedder
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return {"frames": len(proteins), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def whole_run(directory: Path, plan: dict, reads: int, precision: str, cores: int, device: str,
              esm2_engine: str) -> dict:  # fmt: skip
    """One run at ``plan``'s model sizes on ``reads`` generated reads, both daemons on ``device``."""
    from virnucpro.testmodels import write_published_classifier

    width = plan["esm"][1]
    models_dir = directory / "models"
    esm2 = esm2_checkpoint(directory, plan, device)
    dnabert = _common.dnabert_snapshot(models_dir, *plan["dnabert"])
    classifier = models_dir / f"classifier_{plan['dnabert'][1] + width}" / "500_model.pth"
    if not classifier.is_file():
        classifier.parent.mkdir(parents=True, exist_ok=True)
        write_published_classifier(classifier, input_dim=plan["dnabert"][1] + width, seed=1)
    generated = _common.generate_reads(directory / f"reads_{reads}.fa", reads, 500, seed=5)
    config = _common.workflow_config(SAMPLE, generated, {"esm2": esm2, "dnabert_s": dnabert, "classifier": classifier},
                                     devices=[device], shard_size=plan["shard_size"], precision=precision,
                                     esm2_engine=esm2_engine)  # fmt: skip
    run = _common.run_workflow(directory / f"run_{reads}", config, cores)
    stats = _common.run_stats(run["workdir"])
    daemons = [{key: entry.get(key) for key in ("daemon_id", "model", "device", "model_loads", "load_seconds", "shards",
                                                "sequences", "tokens", "compute_seconds", "tokens_per_second",
                                                "peak_gpu_memory_bytes")}
               for entry in stats["daemons"]]  # fmt: skip
    esm = next(d for d in daemons if d["model"] == "esm2")
    busy = (esm["load_seconds"] or 0.0) + (esm["compute_seconds"] or 0.0)
    return {"reads": reads, "precision": precision, "esm2_engine": esm2_engine, "wall_s": run["wall"],
            "reads_per_s": reads / run["wall"], "esm2_load_plus_compute_s": busy,
            "wall_over_esm2": run["wall"] / busy if busy else None, "daemons": daemons}  # fmt: skip


def print_report(results: dict) -> None:
    print(f"\ncommand: {results['command']}\nmachine: {results['machine']}")
    same = results.get("same_answers")
    if same:
        verdict = (
            "identical bytes"
            if same["identical"]
            else (f"{same['labels_differ']} label(s) differ, largest score difference {same['max_score_diff']:.2e}")
        )
        print(
            f"same answers, demo reads ({same['frames']} frames), fp32, daemons on cpu vs {results['gpu']}: {verdict}"
        )
    bare = results.get("bare_engine")
    if bare:
        print(f"bare ESM-2 engine ({results['precision']}, {results['esm2_engine']}): {bare['tokens_per_s']:,.0f} "
              f"tokens/s on {bare['frames']} frames")  # fmt: skip
    for run in results["whole_runs"]:
        print(f"whole run: {run['reads']} reads, {run['precision']}, esm2_engine {run['esm2_engine']}, snakemake "
              f"--cores {results['cores']}: {run['wall_s']:.1f} s ({run['reads_per_s']:.0f} reads/s); ESM-2 load + "
              f"compute {run['esm2_load_plus_compute_s']:.1f} s; wall / (ESM-2 load + compute) "
              f"{run['wall_over_esm2'] or 0:.3f}")  # fmt: skip
        for d in run["daemons"]:
            memory = (d["peak_gpu_memory_bytes"] or 0) / 1e9
            versus = ""
            if bare and d["model"] == "esm2" and d["tokens_per_second"]:
                versus = f" ({d['tokens_per_second'] / bare['tokens_per_s']:.1%} of the bare engine's)"
            print(f"  daemon {d['daemon_id']}: {d['model_loads']} model load(s) in {d['load_seconds']:.1f} s, "
                  f"{d['shards']} shards, {d['sequences']} frames, {d['tokens_per_second'] or 0:,.0f} tokens/s"
                  f"{versus} over {d['compute_seconds']:.1f} s of compute, peak GPU memory {memory:.1f} GB")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-gpu-workflow"), help="models, reads, runs")
    parser.add_argument("--reads", type=int, nargs="+", default=[40000], help="generated 500-nt reads per whole run")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"), help="of the whole run")
    parser.add_argument("--esm2-engine", default="default", help="the ESM-2 daemon's engine paths (config esm2_engine)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="snakemake --cores")
    parser.add_argument("--tiny", action="store_true", help="small shapes, daemons on the CPU")
    parser.add_argument("--skip-same-answers", action="store_true", help="leave out 1. (the demo reads, CPU vs GPU)")
    parser.add_argument("--json", type=Path, help="also write the figures here (default: $OUT/gpu_workflow.json)")
    args = parser.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("no GPU: nothing to measure (use --tiny to run the same code on the CPU with small shapes)")
        return 0
    gpu = "cpu" if args.tiny else "cuda"
    plan = TINY if args.tiny else REAL
    results: dict = {"command": _common.command_line(), "machine": _common.machine(), "gpu": gpu, "cores": args.cores,
                     "precision": args.precision, "esm2_engine": args.esm2_engine, "whole_runs": []}  # fmt: skip
    print(f"command: {results['command']}\nmachine: {results['machine']}", flush=True)
    target = _common.figures_file(args.json, "gpu_workflow.json")
    started = time.perf_counter()

    def keep(what: str) -> None:
        print(f"{what} done after {time.perf_counter() - started:.0f} s", flush=True)
        if target:
            write_json(target, results)

    if not args.skip_same_answers:
        results["same_answers"] = same_answers(args.dir, args.cores, gpu, args.esm2_engine)
        keep("same answers")
    results["bare_engine"] = bare_engine(args.dir, plan, args.precision, args.esm2_engine, gpu)
    keep(f"bare engine ({results['bare_engine']['tokens_per_s']:,.0f} tokens/s)")
    for reads in args.reads:
        reads = min(reads, 400) if args.tiny else reads
        results["whole_runs"].append(whole_run(args.dir, plan, reads, args.precision, args.cores, gpu,
                                               args.esm2_engine))  # fmt: skip
        keep(f"whole run of {reads} reads")
    results["total_s"] = time.perf_counter() - started
    print_report(results)
    print(f"total {results['total_s']:.0f} s")
    if target:
        write_json(target, results)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
