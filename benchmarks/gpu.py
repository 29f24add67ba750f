"""Benchmark: the GPU path, all figures in one run (prepared for one short call on an H100/H200).

Without a CUDA GPU it prints "no GPU" and exits 0, unless ``--tiny``: then the same code runs on the
CPU with small shapes (to check the script, not to measure anything). Sections (``--sections``, all
by default) run in this order; each prints its seconds and the figures so far are written after each
(``--json``, or ``$OUT/gpu.json``), so a run cut short keeps them; a section that fails is recorded
under ``errors`` and the next one runs.

ESM-2 has the esm2_t36_3B_UR50D shapes (36 layers, 2560 wide, 40 heads; ``--esm-shape`` changes them),
random weights written tensor by tensor in fp16 in the published layout (esm2_t36_3B_UR50D.pt, 5.7 GB,
to ``--dir``), loaded with ``virnucpro.engines.esm2.load_esm2``, once per precision; the frames come from
10,000 generated 500-nt reads (166 aa). FLOPs per protein of T tokens (<cls> and <eos> included):
36 x (24 x 2560^2 x T + 4 x T^2 x 2560), padding not counted; TFLOP/s are given as a share of the card's
dense bf16/fp16 peak (``--peak-tflops``, 989 for an H100/H200 SXM) and of the bf16 8192x8192
matrix-product rate measured here.

In bf16, then fp16:
- ``budgets``: today's engine at token budgets 2,048 / 8,192 / 16,384 / 32,768 on 2,000 frames;
- ``ablation``: on 600 frames at the GPU default budget, today's engine, each engine path alone
  (fused-qkv, packed, device-mean, compile, overlap, packed + cuda-graphs) and all together
  (``benchmarks.esm2_paths``); each path's first pass is not timed;
- (the first precision, bf16) ``profile``: torch.profiler's split of one full batch (matrix products, attention,
  element-wise/normalisation, copies each way, device idle), today's engine and all paths;
  ``mixed``: 40-2,000-aa proteins against uniform 166-aa frames (same tokens), today / packed / all;
  ``sharing``: the fastest path's tokens/s alone and with a DNABERT-S process embedding beside it.
Then:
- ``fp32``: on 500 frames the published approach (fair-esm's forward and batching of 2,048 tokens,
  representations copied to the host and averaged there, as its extract.py) against ours at 2,048
  tokens and at the GPU default; then the fp32 ablation (today / packed / all, 200 frames);
- ``drift``: every ablation row's vectors on those 200 frames against today's fp32 ones (max relative
  L2, min cosine) and the labels that change on a random classifier of width 768 + 2560 fed
  [DNABERT-S fp32 | ESM-2]; the older drift of bf16/fp16 against fp32 (500 frames) too;
- ``dnabert``: DNABERT-S with the real 117M shapes (12 layers, 768 wide, 12 heads, 3072 intermediate),
  random weights: batched (ours, fp32 and bf16) against one sequence at a time (the published loop);
- ``daemons``: one 10,000-frame shard sent at once to an ESM-2 and a DNABERT-S daemon (``virnucpro
  serve``, bf16, ``--daemon-engine`` for ESM-2): request-to-reply seconds, tokens/s, load seconds.

    .venv/bin/python -m benchmarks.gpu [--dir /tmp/virnucpro-gpu] [--json results.json] [--sections ...]
    .venv/bin/python -m benchmarks.gpu --tiny          # the same code on the CPU, small shapes
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
import traceback
from functools import partial
from pathlib import Path

from benchmarks import _common, esm2_paths
from benchmarks.esm2_paths import timed
from virnucpro.atomic import write_json

REAL = {"esm": (36, 2560, 40), "dnabert": (12, 768, 12, 3072), "frames": 10000, "engine_frames": 2000,
        "ablation_frames": 600, "fp32_frames": 500, "fp32_ablation_frames": 200, "one_at_a_time": 500,
        "budgets": (2048, 8192, 16384, 32768)}  # fmt: skip
TINY = {"esm": (4, 64, 4), "dnabert": (2, 64, 4, 128), "frames": 200, "engine_frames": 60,
        "ablation_frames": 30, "fp32_frames": 24, "fp32_ablation_frames": 16, "one_at_a_time": 40,
        "budgets": (2048, 16384)}  # fmt: skip
SECTIONS = ("budgets", "ablation", "profile", "mixed", "sharing", "fp32", "drift", "dnabert", "daemons")
"""In the order they run: bf16 (budgets, ablation, profile, mixed, sharing), fp16 (budgets, ablation), fp32
(published against ours, the fp32 ablation), the drift of every path, DNABERT-S, the daemons."""


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


class Run:
    """One benchmark run: where it writes, what it measured so far, the sections asked for."""

    def __init__(self, results: dict, target: Path | None, sections: set[str], started: float,
                 time_limit: float) -> None:  # fmt: skip
        self.results, self.target, self.sections, self.started = results, target, sections, started
        self.time_limit = time_limit
        self.kept_vectors: dict = {}
        """(precision, path) -> the first fp32_ablation_frames vectors of that ablation row (for the drift)."""

    def section(self, name: str, function, precision: str = "") -> None:
        """Run section ``name`` (of ``precision``) if asked for; an error is recorded and the next section runs
        (the figures so far are written either way, so that a run cut short or failing somewhere keeps them)."""
        if name not in self.sections:
            return
        label = f"{precision} {name}".strip()
        if time.perf_counter() - self.started > self.time_limit:
            print(f"{label}: skipped (past --time-limit)", flush=True)
            self.results.setdefault("skipped", []).append(label)
            return
        started = time.perf_counter()
        print(f"{label} ...", flush=True)
        try:
            function()
        except Exception as error:  # a path that fails on this machine must not cost the other figures
            traceback.print_exc()
            self.results.setdefault("errors", {})[label] = f"{type(error).__name__}: {error}"
        self.results.setdefault("section_s", {})[label] = time.perf_counter() - started
        print(f"{label}: {time.perf_counter() - started:.0f} s (total {time.perf_counter() - self.started:.0f} s)",
              flush=True)  # fmt: skip
        if self.target:
            write_json(self.target, self.results)


def precision_block(run: Run, checkpoint: Path, proteins: list[str], data: dict, plan: dict, device: str,
                    peak: float, rate: float, precision: str, first: bool) -> None:  # fmt: skip
    """One precision on one loaded model: token budgets, the ablation, and (the ``first`` precision) profile,
    mixed lengths, sharing."""
    from virnucpro.engines.embed import torch_dtype
    from virnucpro.engines.esm2 import load_esm2

    results, shape = run.results, plan["esm"]
    layers, width, _ = shape
    chosen = proteins[: plan["engine_frames"]]
    embedder, load_s = timed(partial(load_esm2, checkpoint, device=device, dtype=torch_dtype(precision)), device)
    default_budget = embedder.toks_per_batch
    embedder.embed(chosen[:64])  # warm-up
    esm2 = results.setdefault("esm2", {"throughput": [], "drift": {}})

    def budgets() -> None:
        tokens = sum(len(p) + 2 for p in chosen)
        for budget in plan["budgets"]:
            embedder.toks_per_batch = budget
            _, seconds = timed(partial(embedder.embed, chosen), device)
            tflops = esm2_paths.esm2_tflops(chosen, seconds, layers, width)
            esm2["throughput"].append({"model": "esm2", "method": "ours", "precision": precision, "budget": budget,
                                       "sequences": len(chosen), "tokens": tokens, "seconds": seconds,
                                       "tokens_per_s": tokens / seconds, "tflops": tflops, "of_peak": tflops / peak,
                                       "of_matmul": tflops * 1e3 / rate, "load_s": load_s})  # fmt: skip
            print(f"  esm2 ours {precision} budget {budget}: {tokens / seconds:,.0f} tokens/s, {tflops:.1f} TFLOP/s",
                  flush=True)  # fmt: skip
        embedder.toks_per_batch = default_budget
        run.kept_vectors[(precision, "today, published batching")] = embedder.embed(
            proteins[: plan["fp32_frames"]]
        ).vectors

    def ablation() -> None:
        figures, kept = esm2_paths.ablation(embedder, proteins[: plan["ablation_frames"]], esm2_paths.ABLATION,
                                            precision, shape, device, peak, rate, plan["fp32_ablation_frames"],
                                            plan["repeats"])  # fmt: skip
        results.setdefault("ablation", []).extend(figures)
        run.kept_vectors.update(kept)

    def profile() -> None:
        batch = esm2_paths.one_batch(proteins, embedder.toks_per_batch)
        results["profile"] = {name: esm2_paths.profile_split(embedder, setting, batch, device)
                              for name, setting in (("before (today)", "default"), ("after (all)", "all"))}  # fmt: skip

    def mixed() -> None:
        uniform = proteins[: plan["ablation_frames"]]
        varied = esm2_paths.mixed_proteins(sum(len(p) + 2 for p in uniform))
        rows = results["mixed"] = []
        for lengths, sample in (("uniform 166 aa", uniform), ("40-2,000 aa", varied)):
            results.setdefault("padding", {})[lengths] = esm2_paths.batch_padding(sample, embedder.toks_per_batch)
            for label, setting in esm2_paths.MIXED:
                _, seconds, _, _ = esm2_paths.run_path(embedder, setting, sample, device, plan["repeats"])
                tokens = sum(len(p) + 2 for p in sample)
                rows.append({"lengths": lengths, "path": label, "setting": setting, "precision": precision,
                             "sequences": len(sample), "tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds,
                             "tflops": esm2_paths.esm2_tflops(sample, seconds, layers, width)})  # fmt: skip
        embedder.set_options("default")

    def share() -> None:
        best = max((row for row in results.get("ablation", []) if row["precision"] == precision),
                   key=lambda row: row["tokens_per_s"], default={"setting": "all"})  # fmt: skip
        results["sharing"] = esm2_paths.sharing(embedder, best["setting"], proteins[: plan["ablation_frames"]],
                                                data["snapshot"], data["slices"], device)  # fmt: skip

    run.section("budgets", budgets, precision)
    run.section("ablation", ablation, precision)
    if first:
        run.section("profile", profile, precision)
        run.section("mixed", mixed, precision)
        run.section("sharing", share, precision)


def fp32(run: Run, checkpoint: Path, proteins: list[str], plan: dict, device: str, peak: float, rate: float) -> None:
    """fp32 (our model loaded once): the published approach against ours (``fp32``), the fp32 ablation."""
    from virnucpro.engines.esm2 import load_esm2

    ours = load_esm2(checkpoint, device=device)
    run.section("fp32", lambda: published_against_ours(run, checkpoint, ours, proteins, plan, device))
    run.section("ablation", lambda: fp32_ablation(run, ours, proteins, plan, device, peak, rate), "fp32")


def published_against_ours(run: Run, checkpoint: Path, ours, proteins: list[str], plan: dict, device: str) -> None:
    """The published approach (fair-esm's forward, batching and host-side means) against ours, 2,048 tokens
    and the GPU default; and the drift of ours against it, and of bf16/fp16 against ours."""
    from virnucpro.engines.esm2 import GPU_TOKS_PER_BATCH, load_esm2

    layers, width, _ = plan["esm"]
    small = proteins[: plan["fp32_frames"]]
    esm2 = run.results.setdefault("esm2", {"throughput": [], "drift": {}})
    fair = load_esm2(checkpoint, device=device, attention="fair-esm", toks_per_batch=2048)
    published_loop(fair.model, fair.alphabet, small[:16], device)  # warm-up
    published_vectors, published_s = timed(partial(published_loop, fair.model, fair.alphabet, small, device), device)
    fair = None
    free(device)
    ours.toks_per_batch = 2048
    ours.embed(small[:16])
    tokens = sum(len(p) + 2 for p in small)
    seconds_by_method = {"published (fair-esm, 2048)": published_s}
    ours_vectors, seconds_by_method["ours (2048)"] = timed(lambda: ours.embed(small).vectors, device)
    ours.toks_per_batch = GPU_TOKS_PER_BATCH
    _, seconds_by_method[f"ours ({ours.toks_per_batch})"] = timed(lambda: ours.embed(small), device)
    for method, seconds in seconds_by_method.items():
        tflops = esm2_paths.esm2_tflops(small, seconds, layers, width)
        esm2["throughput"].append({"model": "esm2", "method": method, "precision": "fp32", "sequences": len(small),
                                   "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                                   "tflops": tflops, "x_published": published_s / seconds})  # fmt: skip
    esm2["drift"]["ours fp32 vs published fp32"] = drift(ours_vectors, published_vectors)
    for (precision, label), vectors in run.kept_vectors.items():
        if label == "today, published batching":
            esm2["drift"][f"{precision} vs fp32"] = drift(vectors, ours_vectors)


def fp32_ablation(run: Run, ours, proteins: list[str], plan: dict, device: str, peak: float, rate: float) -> None:
    from virnucpro.engines.esm2 import GPU_TOKS_PER_BATCH

    ours.toks_per_batch = GPU_TOKS_PER_BATCH
    figures, kept = esm2_paths.ablation(ours, proteins[: plan["fp32_ablation_frames"]], esm2_paths.FP32_ABLATION,
                                        "fp32", plan["esm"], device, peak, rate, plan["fp32_ablation_frames"],
                                        plan["repeats"])  # fmt: skip
    run.results.setdefault("ablation", []).extend(figures)
    run.kept_vectors.update(kept)


def path_drift(run: Run, data: dict, plan: dict, device: str) -> None:
    """Every kept ablation row against today's fp32 vectors; labels on a classifier of the matching width."""
    from virnucpro.classify.classifier import load_classifier
    from virnucpro.engines.dnabert import load_dnabert_s
    from virnucpro.testmodels import write_published_classifier

    reference = run.kept_vectors[("fp32", "today")]
    frames = reference.shape[0]
    dnabert = load_dnabert_s(data["snapshot"], device=device).embed(data["slices"][:frames]).vectors
    width = dnabert.shape[1] + reference.shape[1]
    path = data["dir"] / f"classifier_{width}.pth"
    if not path.is_file():
        write_published_classifier(path, input_dim=width, seed=1)
    rows = {key: vectors for key, vectors in run.kept_vectors.items() if key[1] != "today, published batching"}
    run.results["drift_paths"] = esm2_paths.drift_rows(rows, reference, dnabert, load_classifier(path))


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


def daemon_section(workdir: Path, shard: tuple[Path, Path], models: dict[str, Path], device: str,
                   esm2_engine: str) -> dict:  # fmt: skip
    from virnucpro.serving.client import request_embedding

    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    ids = {"esm2": "gpu-esm2", "dnabert_s": "gpu-dnabert_s"}
    processes = [
        _common.start_daemon(model, models[model], run_dir, daemon_id, workdir, workdir / f"{daemon_id}.log",
                             device=device, precision="bf16", esm2_engine=esm2_engine)
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
    rows = results.get("esm2", {}).get("throughput", []) + results.get("dnabert_s", {}).get("throughput", [])
    if rows:
        header = (f"{'model':<9} {'method':<36} {'prec':<5} {'budget':>6} {'seqs':>6} {'tokens/s':>10} "
                  f"{'TFLOP/s':>8} {'of peak':>7} {'x publ.':>7}")  # fmt: skip
        print(header)
        print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<9} {row['method']:<36} {row['precision']:<5} {row.get('budget', ''):>6} "
              f"{row['sequences']:>6} {row['tokens_per_s']:>10,.0f} {row['tflops']:>8.2f} "
              f"{row['tflops'] / results['peak_tflops']:>7.1%} "
              f"{(format(row['x_published'], '.2f') if 'x_published' in row else ''):>7}")  # fmt: skip
    for model in ("esm2", "dnabert_s"):
        for name, d in results.get(model, {}).get("drift", {}).items():
            print(f"drift {model} {name}: max |diff| {d['max_abs']:.2e}, max relative L2 {d['max_rel_l2']:.2e}, "
                  f"cosine min {d['cos_min']:.6f} (mean {d['cos_mean']:.6f})")  # fmt: skip
    esm2_paths.print_tables(results)
    for model, d in results.get("daemons", {}).items():
        rate = d["tokens_per_second"] or 0.0
        memory = d["peak_gpu_memory_bytes"]
        print(f"daemon {model}: {d['sequences']} frames, {d['tokens']} tokens; request to reply "
              f"{d['request_to_reply_s']:.1f} s, compute {d['compute_seconds']:.1f} s ({rate:,.0f} tokens/s); "
              f"load {d['load_seconds']:.1f} s; model loads {d['model_loads']}; peak GPU memory "
              f"{memory / 1e9 if memory else 0:.1f} GB")  # fmt: skip
    for name, error in results.get("errors", {}).items():
        print(f"section {name} FAILED: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-gpu"), help="checkpoint, data, daemons")
    parser.add_argument("--tiny", action="store_true", help="run the same code on the CPU with small shapes")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100/H200 SXM: 989)"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)")  # fmt: skip
    parser.add_argument("--time-limit", type=float, default=float("inf"),
                        help="seconds after which no further section starts (their figures are then missing)")  # fmt: skip
    parser.add_argument("--precisions", default="bf16,fp16",
                        help="the precisions of budgets and ablation; profile, mixed, sharing in the first (bf16,fp16)")  # fmt: skip
    parser.add_argument(
        "--ablation-frames", type=int, help="frames per ablation row, fp32 too (default: 600, fp32 200)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per ablation/mixed row, the best counts")
    parser.add_argument("--esm-shape", help="ESM-2 layers,width,heads instead of the plan's (e.g. 6,320,20)")
    parser.add_argument(
        "--daemon-engine", default="default", help="the ESM-2 daemon's --esm2-engine (default: default)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here (default: $OUT/gpu.json if $OUT is set)")
    args = parser.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("no GPU: nothing to measure (use --tiny to run the same code on the CPU with small shapes)")
        return 0
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    if not sections <= set(SECTIONS):
        parser.error(
            f"--sections: unknown {', '.join(sorted(sections - set(SECTIONS)))}; choose of {', '.join(SECTIONS)}"
        )
    device = "cpu" if args.tiny else "cuda"
    plan = dict(TINY if args.tiny else REAL)
    if args.esm_shape:
        plan["esm"] = tuple(int(part) for part in args.esm_shape.split(","))
    plan["repeats"] = args.repeats
    if args.ablation_frames:
        plan["ablation_frames"] = plan["fp32_ablation_frames"] = args.ablation_frames
    started = time.perf_counter()
    results: dict = {"command": _common.command_line(), "machine": _common.machine(), "peak_tflops": args.peak_tflops,
                     "tiny": args.tiny, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "sections": sorted(sections)}  # fmt: skip
    run = Run(results, _common.figures_file(args.json, "gpu.json"), sections, started, args.time_limit)
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
    from virnucpro.layout import ShardFiles, shard_name
    from virnucpro.prep.shard import shard_frames

    reads = _common.generate_reads(args.dir / "reads.fa", plan["frames"], 500, seed=3)
    nucleotide, protein = _common.make_frames(reads, 500, args.dir)
    shards = args.dir / "shards"
    shard_frames(nucleotide, protein, plan["frames"], shards)
    first = ShardFiles(str(shards))
    shard = (Path(first.nucleotide(shard_name(0))), Path(first.protein(shard_name(0))))
    slices, proteins = _common.read_sequences(shard[0]), _common.read_sequences(shard[1])
    results["frames"], results["data_s"] = len(proteins), time.perf_counter() - data_started
    print(f"{len(proteins)} frames in the shard ({results['data_s']:.0f} s)", flush=True)
    data = {"snapshot": snapshot, "slices": slices, "dir": args.dir}

    peak, rate = args.peak_tflops, results["matmul_gflops"][0]
    for index, precision in enumerate(args.precisions.split(",")):
        precision_block(run, checkpoint, proteins, data, plan, device, peak, rate, precision, index == 0)
        free(device)
    if sections & {"fp32", "ablation"}:
        fp32(run, checkpoint, proteins, plan, device, peak, rate)
        free(device)
    run.section("drift", lambda: path_drift(run, data, plan, device))

    def dnabert() -> None:
        results["dnabert_s"] = dnabert_section(snapshot, slices, plan["dnabert"], plan, device)

    def daemons() -> None:
        models = {"esm2": checkpoint, "dnabert_s": snapshot}
        results["daemons"] = daemon_section(args.dir, shard, models, device, args.daemon_engine)

    run.section("dnabert", dnabert)
    run.section("daemons", daemons)
    results["total_s"] = time.perf_counter() - started
    print_report(results)
    print(f"total {results['total_s']:.0f} s")
    if run.target:
        write_json(run.target, results)
        print(f"wrote {run.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
