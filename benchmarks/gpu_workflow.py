"""Benchmark: the whole workflow on a GPU, through snakemake (prepared for one short call on an H200).

1. Same answers on the GPU: the bundled demo reads (``tests/data/demo_reads.fa``) with the small test
   models in fp32, once with both daemons on the CPU and once with both on ``cuda``; the two runs'
   ``prediction_results.txt`` compared: identical bytes, or how many labels differ and the largest
   score difference.
2. A whole run at the real sizes: ``--reads`` generated 500-nt reads (one stop-free frame each),
   ESM-2 with the esm2_t36_3B_UR50D shapes and DNABERT-S with the 117M shapes (random weights in the
   published layouts), a random classifier of the matching width (768 + 2560); one daemon per model
   on ``cuda`` at ``--precision``; shard_size 10,000. The snakemake run's wall time and reads/s, and
   per daemon (``results/run_stats.json``): model loads, load seconds, shards, tokens/s, peak GPU memory.

Without a CUDA GPU it prints "no GPU" and exits 0, unless ``--tiny``: then the same code runs with
small shapes and the daemons on the CPU (to check the script, not to measure anything).

    python -m benchmarks.gpu_workflow [--dir /tmp/virnucpro-gpu-workflow] [--reads 40000] [--precision bf16]
    python -m benchmarks.gpu_workflow --tiny
"""

from __future__ import annotations

import argparse
import json
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


def same_answers(directory: Path, cores: int, gpu: str) -> dict:
    """The demo reads with the test models, fp32, daemons on the CPU and then on ``gpu``."""
    from virnucpro.testmodels import make_test_models

    models = make_test_models(directory / "test-models")
    runs = {}
    for name, device in (("cpu", "cpu"), ("gpu", gpu)):
        config = _common.workflow_config(SAMPLE, DEMO_READS, {
            "esm2": models["esm2"], "dnabert_s": models["dnabert_s"], "classifier": models["classifier_500"]},
            devices=[device], shard_size=25, precision="fp32")  # fmt: skip
        runs[name] = _common.run_workflow(directory / f"demo-{name}", config, cores)
        print(f"  demo reads, daemons on {device}: {runs[name]['wall']:.1f} s", flush=True)
    tables = [run["workdir"] / "results" / SAMPLE / "prediction_results.txt" for run in runs.values()]
    return {"wall_s": {name: run["wall"] for name, run in runs.items()}, **compare_predictions(*tables)}


def whole_run(directory: Path, plan: dict, reads: int, precision: str, cores: int, device: str) -> dict:
    """One run at ``plan``'s model sizes on ``reads`` generated reads, both daemons on ``device``."""
    from virnucpro.engines.download import MODEL_PATHS
    from virnucpro.testmodels import write_published_classifier

    layers, width, heads = plan["esm"]
    models_dir = directory / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    esm2 = models_dir / (MODEL_PATHS["esm2"] if plan is REAL else f"esm2_t{layers}_{width}_bench.pt")
    if not esm2.is_file():
        _common.write_large_esm2(esm2, layers, width, heads, device=device)
    dnabert = _common.dnabert_snapshot(models_dir, *plan["dnabert"])
    classifier = models_dir / f"classifier_{plan['dnabert'][1] + width}" / "500_model.pth"
    if not classifier.is_file():
        classifier.parent.mkdir(parents=True, exist_ok=True)
        write_published_classifier(classifier, input_dim=plan["dnabert"][1] + width, seed=1)
    generated = _common.generate_reads(directory / "reads.fa", reads, 500, seed=5)
    config = _common.workflow_config(SAMPLE, generated, {"esm2": esm2, "dnabert_s": dnabert, "classifier": classifier},
                                     devices=[device], shard_size=plan["shard_size"], precision=precision)  # fmt: skip
    run = _common.run_workflow(directory / "run", config, cores)
    stats = json.loads((run["workdir"] / "results" / "run_stats.json").read_text())
    daemons = [{key: entry.get(key) for key in ("daemon_id", "model", "device", "model_loads", "load_seconds", "shards",
                                                "sequences", "tokens", "compute_seconds", "tokens_per_second",
                                                "peak_gpu_memory_bytes")}
               for entry in stats["daemons"]]  # fmt: skip
    return {"reads": reads, "precision": precision, "wall_s": run["wall"], "reads_per_s": reads / run["wall"],
            "daemons": daemons}  # fmt: skip


def print_report(results: dict) -> None:
    print(f"\ncommand: {results['command']}\nmachine: {results['machine']}")
    same = results["same_answers"]
    verdict = (
        "identical bytes"
        if same["identical"]
        else (f"{same['labels_differ']} label(s) differ, largest score difference {same['max_score_diff']:.2e}")
    )
    print(f"same answers, demo reads ({same['frames']} frames), fp32, daemons on cpu vs {results['gpu']}: {verdict}")
    run = results["whole_run"]
    print(f"whole run: {run['reads']} reads, {run['precision']}, snakemake --cores {results['cores']}: "
          f"{run['wall_s']:.1f} s ({run['reads_per_s']:.0f} reads/s)")  # fmt: skip
    for d in run["daemons"]:
        memory = (d["peak_gpu_memory_bytes"] or 0) / 1e9
        print(f"  daemon {d['daemon_id']}: {d['model_loads']} model load(s) in {d['load_seconds']:.1f} s, "
              f"{d['shards']} shards, {d['sequences']} frames, {d['tokens_per_second'] or 0:,.0f} tokens/s over "
              f"{d['compute_seconds']:.1f} s of compute, peak GPU memory {memory:.1f} GB")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-gpu-workflow"), help="models, reads, runs")
    parser.add_argument("--reads", type=int, default=40000, help="generated 500-nt reads for the whole run")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"), help="of the whole run")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="snakemake --cores")
    parser.add_argument("--tiny", action="store_true", help="small shapes, daemons on the CPU")
    parser.add_argument("--json", type=Path, help="also write the figures here (default: $OUT/gpu_workflow.json)")
    args = parser.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("no GPU: nothing to measure (use --tiny to run the same code on the CPU with small shapes)")
        return 0
    gpu = "cpu" if args.tiny else "cuda"
    reads = min(args.reads, 400) if args.tiny else args.reads
    results: dict = {"command": _common.command_line(), "machine": _common.machine(), "gpu": gpu, "cores": args.cores}
    print(f"command: {results['command']}\nmachine: {results['machine']}", flush=True)
    target = _common.figures_file(args.json, "gpu_workflow.json")
    started = time.perf_counter()
    results["same_answers"] = same_answers(args.dir, args.cores, gpu)
    if target:
        write_json(target, results)
    print(f"same answers done after {time.perf_counter() - started:.0f} s; whole run ...", flush=True)
    results["whole_run"] = whole_run(args.dir, TINY if args.tiny else REAL, reads, args.precision, args.cores, gpu)
    results["total_s"] = time.perf_counter() - started
    print_report(results)
    print(f"total {results['total_s']:.0f} s")
    if target:
        write_json(target, results)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
