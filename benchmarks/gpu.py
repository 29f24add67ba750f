"""Benchmark: the GPU path, all figures in one run (prepared for one short call on an H200).

Without a CUDA GPU it prints "no GPU" and exits 0, unless ``--tiny``: then the same code runs on the
CPU with small shapes (to check the script, not to measure anything).

1. ESM-2 with the esm2_t36_3B_UR50D shapes (36 layers, 2560 wide, 40 heads), random weights written
   tensor by tensor in fp16 in the published layout (esm2_t36_3B_UR50D.pt, 5.7 GB, to ``--dir``), loaded
   with ``virnucpro.engines.esm2.load_esm2``: tokens/s in bf16 and fp16 at several token budgets per batch,
   as TFLOP/s and as a fraction of the card's dense bf16/fp16 peak (``--peak-tflops``, default 989 for
   an H100/H200 SXM) and of the bf16 8192x8192 matrix-product rate measured here. FLOPs per protein of
   T tokens (<cls> and <eos> included): 36 x (24 x 2560^2 x T + 4 x T^2 x 2560), padding not counted.
   Against the published approach in fp32 (fair-esm's own forward, fair-esm's batching of 2048 tokens,
   the batch's representations copied to the host and averaged there, as fair-esm's extract.py does)
   and ours in fp32 (the same batching, then our GPU default). Drift of bf16 and fp16 against fp32.
2. DNABERT-S with the real 117M shapes (12 layers, 768 wide, 12 heads, 3072 intermediate), random
   weights: batched (ours, fp32 and bf16) against one sequence at a time (the published loop, with our
   encoder, fp32); tokens/s and the ratio; drift of bf16 against fp32.
3. The whole daemon on a realistic shard: 10,000 frames of generated 500-nt reads, chunked,
   translated and sharded with the package; one ESM-2 and one DNABERT-S daemon (``virnucpro serve``,
   bf16, on the GPU), the shard sent to both at once with the client; request-to-reply seconds, the
   daemons' own tokens/s and load seconds.

    .venv/bin/python -m benchmarks.gpu [--dir /tmp/virnucpro-gpu] [--json results.json]
    .venv/bin/python -m benchmarks.gpu --tiny          # the same code on the CPU, small shapes
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from functools import partial
from pathlib import Path

from benchmarks import _common
from virnucpro.atomic import write_json

REAL = {"esm": (36, 2560, 40), "dnabert": (12, 768, 12, 3072), "frames": 10000, "engine_frames": 2000,
        "fp32_frames": 500, "one_at_a_time": 500, "budgets": (2048, 8192, 16384, 32768)}  # fmt: skip
TINY = {"esm": (4, 64, 4), "dnabert": (2, 64, 4, 128), "frames": 200, "engine_frames": 100,
        "fp32_frames": 40, "one_at_a_time": 40, "budgets": (2048, 16384)}  # fmt: skip


def timed(function, device: str):
    _common.synchronize(device)
    started = time.perf_counter()
    result = function()
    _common.synchronize(device)
    return result, time.perf_counter() - started


def drift(vectors, reference) -> dict:
    import torch

    cosine = torch.nn.functional.cosine_similarity(vectors, reference)
    relative = (vectors - reference).norm(dim=1) / reference.norm(dim=1)
    return {"max_abs": (vectors - reference).abs().max().item(), "max_rel_l2": relative.max().item(),
            "cos_min": cosine.min().item(), "cos_mean": cosine.mean().item()}  # fmt: skip


def free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def esm_section(checkpoint: Path, proteins: list[str], shape, plan: dict, device: str, peak: float,
                rate: float, compile_model: bool) -> dict:  # fmt: skip

    from virnucpro.engines.embed import torch_dtype
    from virnucpro.engines.esm2 import GPU_TOKS_PER_BATCH, load_esm2

    layers, width, _ = shape
    out: dict = {"throughput": [], "drift": {}}

    def flops_of(sequences):
        return _common.esm2_flops([len(p) + 2 for p in sequences], layers, width)

    chosen = proteins[: plan["engine_frames"]]
    small = proteins[: plan["fp32_frames"]]
    vectors_small = {}
    for precision in ("bf16", "fp16"):
        dtype = torch_dtype(precision)
        embedder, load_s = timed(partial(load_esm2, checkpoint, device=device, dtype=dtype), device)
        embedder.embed(chosen[:64])  # warm-up
        for budget in plan["budgets"]:
            embedder.toks_per_batch = budget
            _, seconds = timed(partial(embedder.embed, chosen), device)
            tokens = sum(len(p) + 2 for p in chosen)
            tflops = flops_of(chosen) / seconds / 1e12
            out["throughput"].append({"model": "esm2", "method": "ours", "precision": precision, "budget": budget,
                                      "sequences": len(chosen), "tokens": tokens, "seconds": seconds,
                                      "tokens_per_s": tokens / seconds, "tflops": tflops, "of_peak": tflops / peak,
                                      "of_matmul": tflops * 1e3 / rate, "load_s": load_s})  # fmt: skip
            print(f"  esm2 ours {precision} budget {budget}: {tokens / seconds:,.0f} tokens/s, {tflops:.1f} TFLOP/s",
                  flush=True)  # fmt: skip
        vectors_small[precision] = embedder.embed(small).vectors
        if compile_model and precision == "bf16":
            compiled = load_esm2(checkpoint, device=device, dtype=dtype, compile_model=True)
            _, warm_s = timed(partial(compiled.embed, chosen[:64]), device)
            _, seconds = timed(partial(compiled.embed, chosen), device)
            tokens = sum(len(p) + 2 for p in chosen)
            out["throughput"].append({"model": "esm2", "method": "ours, torch.compile", "precision": precision,
                                      "budget": compiled.toks_per_batch, "sequences": len(chosen), "tokens": tokens,
                                      "seconds": seconds, "tokens_per_s": tokens / seconds,
                                      "tflops": flops_of(chosen) / seconds / 1e12, "compile_warm_up_s": warm_s})  # fmt: skip
            del compiled
        del embedder
        free(device)

    # fp32: the published approach (fair-esm's forward and batching, host-side means) against ours
    fair = load_esm2(checkpoint, device=device, attention="fair-esm", toks_per_batch=2048)
    published_loop(fair.model, fair.alphabet, small[:16], device)  # warm-up
    published_vectors, published_s = timed(partial(published_loop, fair.model, fair.alphabet, small, device), device)
    fair = None  # free it before loading ours
    free(device)
    ours = load_esm2(checkpoint, device=device, toks_per_batch=2048)
    ours.embed(small[:16])
    tokens = sum(len(p) + 2 for p in small)
    fp32 = {"published (fair-esm, 2048)": published_s}
    ours_vectors, fp32["ours (2048)"] = timed(lambda: ours.embed(small).vectors, device)
    ours.toks_per_batch = GPU_TOKS_PER_BATCH
    _, fp32[f"ours ({ours.toks_per_batch})"] = timed(lambda: ours.embed(small), device)
    for method, seconds in fp32.items():
        tflops = flops_of(small) / seconds / 1e12
        out["throughput"].append({"model": "esm2", "method": method, "precision": "fp32", "sequences": len(small),
                                  "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                                  "tflops": tflops, "x_published": published_s / seconds})  # fmt: skip
    out["drift"]["ours fp32 vs published fp32"] = drift(ours_vectors, published_vectors)
    for precision, vectors in vectors_small.items():
        out["drift"][f"{precision} vs fp32"] = drift(vectors, ours_vectors)
    ours = None
    free(device)
    return out


def published_loop(model, alphabet, sequences: list[str], device: str):
    """fair-esm's batching, batch converter and forward; each batch's representations to the host, means there."""
    import torch
    from esm.data import FastaBatchedDataset

    from virnucpro.engines.esm2 import MEAN_POSITIONS, TOKS_PER_BATCH

    converter = alphabet.get_batch_converter()
    dataset = FastaBatchedDataset([str(i) for i in range(len(sequences))], sequences)
    vectors = torch.empty(len(sequences), model.embed_dim)
    with torch.no_grad():
        for batch in dataset.get_batch_indices(TOKS_PER_BATCH, extra_toks_per_seq=1):
            labels, strs, toks = converter([dataset[i] for i in batch])
            layer = model.num_layers
            representations = model(toks.to(device), repr_layers=[layer])["representations"][layer].to("cpu")
            for row, (label, sequence) in enumerate(zip(labels, strs)):
                vectors[int(label)] = representations[row, 1 : min(MEAN_POSITIONS, len(sequence)) + 1].mean(0)
    return vectors


def dnabert_section(snapshot: Path, slices: list[str], shape, plan: dict, device: str) -> dict:
    import torch

    from virnucpro.engines.dnabert import load_dnabert_s

    layers, hidden, _, intermediate = shape
    out: dict = {"throughput": [], "drift": {}}
    chosen = slices[: plan["engine_frames"]]
    alone = chosen[: plan["one_at_a_time"]]
    reference = load_dnabert_s(snapshot, device=device)
    counts = {s: len(reference.tokenize(s)) for s in chosen}
    reference.embed(alone[:16])

    def one_at_a_time():
        rows = []
        with torch.no_grad():
            for sequence in alone:
                ids = torch.tensor([reference.tokenize(sequence)], device=device)
                hidden_states = reference.encoder(ids, torch.ones_like(ids, dtype=torch.bool))
                rows.append(hidden_states[0].mean(0).cpu())
        return torch.stack(rows)

    alone_vectors, alone_s = timed(one_at_a_time, device)
    alone_tokens = sum(counts[s] for s in alone)
    batched_fp32, batched_fp32_s = timed(lambda: reference.embed(alone).vectors, device)
    rows = [("published (one at a time), fp32", "fp32", alone, alone_s),
            ("ours batched, fp32, same sequences", "fp32", alone, batched_fp32_s)]  # fmt: skip
    _, seconds = timed(lambda: reference.embed(chosen), device)
    rows.append(("ours batched, fp32", "fp32", chosen, seconds))
    low = load_dnabert_s(snapshot, device=device, dtype=torch.bfloat16)
    low.embed(chosen[:16])
    low_vectors, seconds = timed(lambda: low.embed(chosen).vectors, device)
    rows.append(("ours batched, bf16", "bf16", chosen, seconds))
    fp32_vectors = reference.embed(chosen).vectors
    published_rate = alone_tokens / alone_s
    for method, precision, sequences, seconds in rows:
        tokens = sum(counts[s] for s in sequences)
        tflops = _common.dnabert_flops([counts[s] for s in sequences], layers, hidden, intermediate) / seconds / 1e12
        out["throughput"].append({"model": "dnabert_s", "method": method, "precision": precision,
                                  "sequences": len(sequences), "tokens": tokens, "seconds": seconds,
                                  "tokens_per_s": tokens / seconds, "tflops": tflops,
                                  "x_published": tokens / seconds / published_rate})  # fmt: skip
    out["drift"]["batched fp32 vs one at a time fp32"] = drift(batched_fp32, alone_vectors)
    out["drift"]["bf16 vs fp32"] = drift(low_vectors, fp32_vectors)
    reference = low = None
    free(device)
    return out


def daemon_section(workdir: Path, shard: tuple[Path, Path], models: dict[str, Path], device: str) -> dict:
    from virnucpro.serving.client import request_embedding

    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    ids = {"esm2": "gpu-esm2", "dnabert_s": "gpu-dnabert_s"}
    processes = [
        _common.start_daemon(model, models[model], run_dir, daemon_id, workdir, workdir / f"{daemon_id}.log",
                             device=device, precision="bf16")
        for model, daemon_id in ids.items()
    ]  # fmt: skip
    trips: dict[str, float] = {}
    (workdir / "embeddings").mkdir(exist_ok=True)  # daemons write into existing folders only
    try:
        ready = {model: _common.wait_ready(run_dir, model, 1, processes, timeout=600) for model in ids}

        def send(model: str, path: Path) -> None:
            started = time.perf_counter()
            request_embedding(run_dir, model, path, workdir / "embeddings" / f"shard.{model}.pt", timeout=1800)
            trips[model] = time.perf_counter() - started

        threads = [threading.Thread(target=send, args=("esm2", shard[1])),
                   threading.Thread(target=send, args=("dnabert_s", shard[0]))]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stats = _common.stop_daemons(run_dir, processes, list(ids.values()))
    by_model = {entry["model"]: entry for entry in stats}
    return {model: {"request_to_reply_s": trips.get(model), "ready_after_s": ready.get(model),
                    **{key: by_model[model].get(key) for key in ("load_seconds", "sequences", "tokens",
                                                                "compute_seconds", "tokens_per_second",
                                                                "peak_gpu_memory_bytes", "model_loads")}}
            for model in ids}  # fmt: skip


def print_report(results: dict) -> None:
    print(f"\ncommand: {results['command']}")
    print(f"machine: {results['machine']}")
    print(f"peak used: {results['peak_tflops']} TFLOP/s dense bf16/fp16 (stated); measured bf16 "
          f"{results['matmul_size']}x{results['matmul_size']} matmul: best {results['matmul_gflops'][0] / 1e3:.1f}, "
          f"median {results['matmul_gflops'][1] / 1e3:.1f} TFLOP/s")  # fmt: skip
    print(f"setup: checkpoint written in {results['checkpoint_write_s']:.0f} s; frames: {results['frames']} "
          f"(prepared in {results['data_s']:.0f} s)")  # fmt: skip
    header = (f"{'model':<9} {'method':<36} {'prec':<5} {'budget':>6} {'seqs':>6} {'tokens/s':>10} {'TFLOP/s':>8} "
              f"{'of peak':>7} {'x publ.':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in results["esm2"]["throughput"] + results["dnabert_s"]["throughput"]:
        print(f"{row['model']:<9} {row['method']:<36} {row['precision']:<5} {row.get('budget', ''):>6} "
              f"{row['sequences']:>6} {row['tokens_per_s']:>10,.0f} {row['tflops']:>8.2f} "
              f"{row['tflops'] / results['peak_tflops']:>7.1%} "
              f"{(format(row['x_published'], '.2f') if 'x_published' in row else ''):>7}")  # fmt: skip
    for model in ("esm2", "dnabert_s"):
        for name, d in results[model]["drift"].items():
            print(f"drift {model} {name}: max |diff| {d['max_abs']:.2e}, max relative L2 {d['max_rel_l2']:.2e}, "
                  f"cosine min {d['cos_min']:.6f} (mean {d['cos_mean']:.6f})")  # fmt: skip
    for model, d in results["daemons"].items():
        rate = d["tokens_per_second"] or 0.0
        memory = d["peak_gpu_memory_bytes"]
        print(f"daemon {model}: {d['sequences']} frames, {d['tokens']} tokens; request to reply "
              f"{d['request_to_reply_s']:.1f} s, compute {d['compute_seconds']:.1f} s ({rate:,.0f} tokens/s); "
              f"load {d['load_seconds']:.1f} s; model loads {d['model_loads']}; peak GPU memory "
              f"{memory / 1e9 if memory else 0:.1f} GB")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-gpu"), help="checkpoint, data, daemons")
    parser.add_argument("--tiny", action="store_true", help="run the same code on the CPU with small shapes")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100/H200 SXM: 989)"
    )
    parser.add_argument("--compile", action="store_true", help="also time ESM-2 bf16 under torch.compile")
    parser.add_argument("--json", type=Path, help="also write the figures here (default: $OUT/gpu.json if $OUT is set)")
    args = parser.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("no GPU: nothing to measure (use --tiny to run the same code on the CPU with small shapes)")
        return 0
    device = "cpu" if args.tiny else "cuda"
    plan = TINY if args.tiny else REAL
    started = time.perf_counter()
    results: dict = {"command": _common.command_line(), "machine": _common.machine(), "peak_tflops": args.peak_tflops,
                     "tiny": args.tiny}  # fmt: skip
    target = _common.figures_file(args.json, "gpu.json")

    def keep(section: str) -> None:
        """Write what is measured so far, so that a run cut short still leaves its figures."""
        print(f"{section} done after {time.perf_counter() - started:.0f} s", flush=True)
        if target:
            write_json(target, results)

    print(f"command: {results['command']}\nmachine: {results['machine']}", flush=True)
    size = 2048 if args.tiny else 8192
    results["matmul_size"] = size
    results["matmul_gflops"] = _common.matmul_rate(size, seconds=2.0, device=device, dtype="bf16")
    args.dir.mkdir(parents=True, exist_ok=True)

    layers, width, heads = plan["esm"]
    from virnucpro.engines.download import MODEL_PATHS

    name = MODEL_PATHS["esm2"] if plan["esm"] == (36, 2560, 40) else f"esm2_t{layers}_{width}_gpu.pt"
    checkpoint = args.dir / name
    _, results["checkpoint_write_s"] = timed(
        lambda: checkpoint.is_file() or _common.write_large_esm2(checkpoint, layers, width, heads, device=device),
        device,
    )
    print(f"checkpoint {checkpoint} ready after {results['checkpoint_write_s']:.0f} s", flush=True)
    snapshot = _common.dnabert_snapshot(args.dir, *plan["dnabert"])

    data_started = time.perf_counter()
    from virnucpro.prep.shard import shard_frames

    reads = _common.generate_reads(args.dir / "reads.fa", plan["frames"], 500, seed=3)
    nucleotide, protein = _common.make_frames(reads, 500, args.dir)
    shards = args.dir / "shards"
    shard_frames(nucleotide, protein, plan["frames"], shards)
    shard = (shards / "shard_00000.fa", shards / "shard_00000.faa")
    slices, proteins = _common.read_sequences(shard[0]), _common.read_sequences(shard[1])
    results["frames"], results["data_s"] = len(proteins), time.perf_counter() - data_started
    print(f"{len(proteins)} frames in the shard ({results['data_s']:.0f} s)", flush=True)

    rate = results["matmul_gflops"][0]
    print("ESM-2 ...", flush=True)
    results["esm2"] = esm_section(checkpoint, proteins, plan["esm"], plan, device, args.peak_tflops, rate, args.compile)
    keep("ESM-2")
    print("DNABERT-S ...", flush=True)
    results["dnabert_s"] = dnabert_section(snapshot, slices, plan["dnabert"], plan, device)
    keep("DNABERT-S")
    print("daemons ...", flush=True)
    results["daemons"] = daemon_section(args.dir, shard, {"esm2": checkpoint, "dnabert_s": snapshot}, device)
    results["total_s"] = time.perf_counter() - started
    print_report(results)
    print(f"total {results['total_s']:.0f} s")
    if target:
        write_json(target, results)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
