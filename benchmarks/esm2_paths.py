"""The ESM-2 engine paths measured on one loaded model (used by ``benchmarks.gpu``, see its doc).

- ``ablation``: tokens/s, TFLOP/s, share of the card's peak and of the measured matrix-product rate for
  today's engine, each technique alone, and all together (``virnucpro.engines.esm2_options``);
- ``profile_split``: ``torch.profiler`` on one full batch: device time in matrix products, attention,
  element-wise/normalisation, host-to-device and device-to-host copies, and the device idle (the call's
  wall time less the busy time); on the CPU the same split of the operators' own CPU time, "idle"
  being the time in no operator (Python, the framework);
- ``mixed_proteins``: frames of 40-2,000 aa, many short and few long (log-uniform lengths), the
  tokens of the uniform set;
- ``drift_rows``: each path's vectors against today's fp32 ones (max relative L2, min cosine), and how
  many labels a classifier of the matching width gives differently on [DNABERT-S fp32 | these vectors];
- ``sharing``: ESM-2's tokens/s alone and while a DNABERT-S process embeds on the same device.

A path is switched on the same loaded model (``Esm2Embedder.set_options``); its first pass over the
proteins (compilation, CUDA graph recording, kernel selection) is not timed.
"""

from __future__ import annotations

import math
import random
import time
from functools import partial
from pathlib import Path

from benchmarks import _common

ABLATION = (("today", "default"), ("fused-qkv", "fused-qkv"), ("packed", "packed"), ("device-mean", "device-mean"),
            ("compile", "compile"), ("overlap", "overlap"), ("packed + cuda-graphs", "packed,cuda-graphs"),
            ("all", "all"))  # fmt: skip
"""(label, esm2_engine setting): today's engine, each technique alone (CUDA graphs need packed), all."""
FP32_ABLATION = (("today", "default"), ("packed", "packed"), ("all", "all"))
MIXED = (("today", "default"), ("packed", "packed"), ("all", "all"))
CATEGORIES = ("matrix products", "attention", "element-wise/normalisation", "host-to-device copies",
              "device-to-host copies", "idle")  # fmt: skip
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def timed(function, device: str):
    _common.synchronize(device)
    started = time.perf_counter()
    result = function()
    _common.synchronize(device)
    return result, time.perf_counter() - started


def esm2_tflops(proteins: list[str], seconds: float, layers: int, width: int) -> float:
    return _common.esm2_flops([len(p) + 2 for p in proteins], layers, width) / seconds / 1e12


def run_path(embedder, setting: str, proteins: list[str], device: str, repeats: int = 1) -> tuple:
    """Switch ``embedder`` to ``setting``, run it once untimed (warm-up), then ``repeats`` times timed:
    (vectors, best seconds, warm-up seconds, every timed seconds)."""
    embedder.set_options(setting)
    _, warm_s = timed(partial(embedder.embed, proteins), device)
    runs = [timed(partial(embedder.embed, proteins), device) for _ in range(repeats)]
    every = [seconds for _, seconds in runs]
    return runs[0][0].vectors, min(every), warm_s, every


def ablation(embedder, proteins: list[str], rows, precision: str, shape, device: str, peak: float, rate: float,
             keep: int, repeats: int = 1) -> tuple[list[dict], dict]:  # fmt: skip
    """``repeats`` timed passes per row (the best counts); the figures and each row's first ``keep`` vectors."""
    layers, width, _ = shape
    tokens = sum(len(p) + 2 for p in proteins)
    figures, vectors = [], {}
    for label, setting in rows:
        kept, seconds, warm_s, every = run_path(embedder, setting, proteins, device, repeats)
        tflops = esm2_tflops(proteins, seconds, layers, width)
        figures.append({"path": label, "setting": setting, "precision": precision, "budget": embedder.toks_per_batch,
                        "sequences": len(proteins), "tokens": tokens, "seconds": seconds, "warm_up_s": warm_s,
                        "every_s": every,
                        "tokens_per_s": tokens / seconds, "tflops": tflops, "of_peak": tflops / peak,
                        "of_matmul": tflops * 1e3 / rate})  # fmt: skip
        vectors[(precision, label)] = kept[:keep]
        print(f"  {precision} {label:<20} {tokens / seconds:>10,.0f} tokens/s {tflops:7.1f} TFLOP/s "
              f"{tflops / peak:6.1%} of peak (first pass {warm_s:.1f} s)", flush=True)  # fmt: skip
    embedder.set_options("default")
    return figures, vectors


def category(name: str) -> str:
    """The profile category of a kernel or operator name."""
    lowered = name.lower()
    if "memcpy htod" in lowered:
        return "host-to-device copies"
    if "memcpy dtoh" in lowered:
        return "device-to-host copies"
    if any(word in lowered for word in ("flash", "fmha", "attention", "sdpa", "varlen")):
        return "attention"
    if any(word in lowered for word in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm",
                                        "aten::bmm", "aten::_mm")):  # fmt: skip
        return "matrix products"
    return "element-wise/normalisation"


def profile_split(embedder, setting: str, proteins: list[str], device: str) -> dict:
    """``torch.profiler`` on one ``embed`` call of ``proteins`` (one full batch) with ``setting``: ms per category.

    On a GPU: each kernel and copy (user annotations, such as compiled regions' ranges, left out), by
    name; idle is the call's wall time less the union of their intervals (copies on side streams
    overlap the compute). On the CPU: each operator's own time; idle is the time in no operator."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    embedder.set_options(setting)
    embedder.embed(proteins)  # warm-up: compilation, graphs, allocator
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        _, wall = timed(partial(embedder.embed, proteins), device)
    embedder.set_options("default")
    kind = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind and not getattr(e, "is_user_annotation", False)]
    split = dict.fromkeys(CATEGORIES, 0.0)
    intervals = []
    for event in events:
        if kind == DeviceType.CUDA:
            split[category(event.name)] += (event.time_range.end - event.time_range.start) / 1e3
            intervals.append((event.time_range.start, event.time_range.end))
        else:
            split[category(event.name)] += event.self_cpu_time_total / 1e3
    busy = union_length(intervals) / 1e3 if intervals else sum(split.values())
    split["idle"] = max(0.0, wall * 1e3 - busy)
    return {"setting": setting, "sequences": len(proteins), "tokens": sum(len(p) + 2 for p in proteins),
            "wall_ms": wall * 1e3, "busy_ms": busy, "ms": split,
            "share": {k: v / (wall * 1e3) for k, v in split.items()}}  # fmt: skip


def union_length(intervals: list[tuple[float, float]]) -> float:
    """The length covered by the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def one_batch(proteins: list[str], budget: int) -> list[str]:
    """The first proteins that fill one batch of ``budget`` tokens (padded and packed alike: equal lengths)."""
    return proteins[: max(1, budget // (len(proteins[0]) + 2))]


def mixed_proteins(tokens: int, seed: int = 11, shortest: int = 40, longest: int = 2000) -> list[str]:
    """Random proteins of log-uniform lengths between ``shortest`` and ``longest`` aa, about ``tokens`` tokens."""
    rng = random.Random(seed)
    proteins, total = [], 0
    while total < tokens:
        length = round(math.exp(rng.uniform(math.log(shortest), math.log(longest))))
        proteins.append("".join(rng.choice(AMINO_ACIDS) for _ in range(length)))
        total += length + 2
    return proteins


def batch_padding(proteins: list[str], budget: int) -> dict:
    """Tokens the batches hold against the real ones: today's padded batches (fair-esm's batching) and the
    packed ones bucketed as for CUDA graphs (unbucketed packed batches hold exactly the real tokens)."""
    from esm.data import FastaBatchedDataset

    from virnucpro.engines.esm2_packed import packed_batches, token_bucket

    real = sum(len(p) + 2 for p in proteins)
    dataset = FastaBatchedDataset([str(i) for i in range(len(proteins))], proteins)
    padded = sum(len(batch) * (max(len(proteins[i]) for i in batch) + 2)
                 for batch in dataset.get_batch_indices(budget, extra_toks_per_seq=1))  # fmt: skip
    bucketed = sum(token_bucket(sum(len(proteins[i]) + 2 for i in batch), budget)
                   for batch in packed_batches([len(p) for p in proteins], budget))  # fmt: skip
    return {
        "budget": budget,
        "real_tokens": real,
        "padded_extra": padded / real - 1,
        "bucketed_extra": bucketed / real - 1,
    }


def drift_rows(vectors: dict, reference, dnabert, classifier) -> list[dict]:
    """Each kept row's drift against ``reference`` (today's fp32 vectors of the same proteins), and the labels
    that change: the classifier on [DNABERT-S fp32 | vectors] against [DNABERT-S fp32 | reference]."""
    import torch

    from virnucpro.classify.classifier import classify

    def scores(esm):
        return classify(classifier, torch.cat((dnabert, esm), dim=1))

    expected = scores(reference)
    rows = []
    for (precision, label), kept in vectors.items():
        kept = kept[: reference.shape[0]]
        got = scores(kept)
        relative = (kept - reference).norm(dim=1) / reference.norm(dim=1)
        rows.append({"precision": precision, "path": label, "frames": kept.shape[0],
                     "max_rel_l2": relative.max().item(),
                     "cos_min": torch.nn.functional.cosine_similarity(kept, reference).min().item(),
                     "labels_changed": int((got.argmax(1) != expected.argmax(1)).sum().item()),
                     "max_score_diff": (got - expected).abs().max().item()})  # fmt: skip
    return rows


def _dnabert_in_a_loop(snapshot: Path, slices: list[str], device: str, ready, stop, results) -> None:
    """A second process: DNABERT-S embedding ``slices`` over and over on ``device`` until ``stop``."""
    import torch

    from virnucpro.engines.dnabert import load_dnabert_s

    model = load_dnabert_s(snapshot, device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    model.embed(slices[:16])
    ready.set()
    tokens, started = 0, time.perf_counter()
    while not stop.is_set():
        tokens += model.embed(slices).tokens
        _common.synchronize(device)
    results.put({"tokens": tokens, "seconds": time.perf_counter() - started})


def sharing(embedder, setting: str, proteins: list[str], snapshot: Path, slices: list[str], device: str) -> dict:
    """ESM-2's tokens/s with ``setting`` alone, then while a DNABERT-S process embeds on the same device."""
    import multiprocessing

    tokens = sum(len(p) + 2 for p in proteins)
    _, alone, _, _ = run_path(embedder, setting, proteins, device)
    context = multiprocessing.get_context("spawn")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    worker = context.Process(target=_dnabert_in_a_loop, args=(snapshot, slices, device, ready, stop, results))
    worker.start()
    try:
        if not ready.wait(timeout=600):
            raise RuntimeError("the DNABERT-S process did not start")
        _, shared = timed(partial(embedder.embed, proteins), device)
    finally:
        stop.set()
    dnabert = results.get(timeout=600)
    worker.join(timeout=60)
    embedder.set_options("default")
    return {"setting": setting, "tokens": tokens, "alone_tokens_per_s": tokens / alone,
            "shared_tokens_per_s": tokens / shared, "change": alone / shared - 1,
            "dnabert_tokens_per_s_while_sharing": dnabert["tokens"] / dnabert["seconds"]}  # fmt: skip


def print_tables(results: dict) -> None:
    """The ablation, profile, mixed-length, drift and sharing figures, as far as they were measured."""
    if results.get("ablation"):
        print(f"\n{'ablation':<22} {'prec':<5} {'budget':>6} {'tokens/s':>10} {'TFLOP/s':>8} {'of peak':>7} "
              f"{'of matmul':>9}")  # fmt: skip
        for row in results["ablation"]:
            print(f"{row['path']:<22} {row['precision']:<5} {row['budget']:>6} {row['tokens_per_s']:>10,.0f} "
                  f"{row['tflops']:>8.1f} {row['of_peak']:>7.1%} {row['of_matmul']:>9.1%}")  # fmt: skip
    for name, split in results.get("profile", {}).items():
        shares = ", ".join(f"{key} {split['share'][key]:.1%}" for key in CATEGORIES)
        print(f"profile {name} ({split['setting']}, {split['tokens']} tokens, {split['wall_ms']:.1f} ms): {shares}")
    for lengths, padding in results.get("padding", {}).items():
        print(f"batches of {lengths} at {padding['budget']} tokens: today's padded batches hold "
              f"{padding['padded_extra']:+.1%} tokens over the real ones, bucketed packed ones "
              f"{padding['bucketed_extra']:+.1%}, packed ones +0%")  # fmt: skip
    for row in results.get("mixed", []):
        print(f"mixed {row['lengths']:<14} {row['path']:<8} {row['sequences']:>5} proteins {row['tokens_per_s']:>10,.0f} "
              f"tokens/s {row['tflops']:7.1f} TFLOP/s")  # fmt: skip
    for row in results.get("drift_paths", []):
        print(f"drift {row['precision']} {row['path']:<20} max relative L2 {row['max_rel_l2']:.2e}, cosine min "
              f"{row['cos_min']:.6f}, labels changed {row['labels_changed']}/{row['frames']} (max score diff "
              f"{row['max_score_diff']:.2e})")  # fmt: skip
    if results.get("sharing"):
        s = results["sharing"]
        print(f"sharing ({s['setting']}): ESM-2 alone {s['alone_tokens_per_s']:,.0f} tokens/s, with DNABERT-S "
              f"embedding beside it {s['shared_tokens_per_s']:,.0f} ({s['change']:+.1%}); DNABERT-S meanwhile "
              f"{s['dnabert_tokens_per_s_while_sharing']:,.0f} tokens/s")  # fmt: skip
