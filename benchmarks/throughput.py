"""Benchmark: embedding throughput of ours against the published extraction method, same model, same data.

ESM-2 (random weights, esm2_t30_150M shapes by default: 30 layers, 640 wide, 20 heads):
  published  straight fair-esm 2.0.0: ``esm.pretrained.load_model_and_alphabet_local``, batches from
             ``FastaBatchedDataset.get_batch_indices(2048, extra_toks_per_seq=1)``, the alphabet's batch
             converter, ``model(toks, repr_layers=[last])``, the mean of positions 1..min(1024, len) per protein;
  ours       ``virnucpro.engines.esm2.load_esm2(path).embed(proteins)``.
DNABERT-S (random weights, the real 117M shapes: 12 layers, 768 wide, 12 heads, 3072 intermediate):
  published  one sequence at a time (tokenize one, forward one, mean over all tokens), as VirNucPro runs
             it; implemented here by calling OUR encoder one sequence at a time (the published model code
             cannot run here: it needs trust_remote_code);
  published-code style  the same, one at a time, with the attention written out as the published model
             code does without triton (q k^T / sqrt(d) + ALiBi, softmax, times v) on our encoder's weights;
  ours       ``virnucpro.engines.dnabert.load_dnabert_s(path).embed(slices)`` (length-sorted token-budget batches).

The data are the kept frames of generated 500-nt reads (chunked and translated by the package). Times
exclude model loading and include tokenization; each method runs ``--repeats`` times, interleaved.
FLOPs (see benchmarks/_common.py): 2 x (matrix parameters) x tokens + the attention terms, padding not
counted; the machine's rate is the best of timed 2048x2048 fp32 matrix products, measured here before
and after each model (the median shows how much of the machine other processes left).

    .venv/bin/python -m benchmarks.throughput [--dir /tmp/virnucpro-bench] [--esm-frames 16] [--dnabert-frames 24] [--repeats 5]
"""

from __future__ import annotations

import argparse
import argparse as _argparse
import math
import time
from pathlib import Path

from benchmarks import _common


def esm_published(checkpoint: Path, proteins: list[str]):
    """fair-esm straight, as the published tool extracts: returns a function that embeds ``proteins``."""
    import esm
    import torch
    from esm.data import FastaBatchedDataset

    from virnucpro.engines.esm2 import MEAN_POSITIONS, TOKS_PER_BATCH

    with torch.serialization.safe_globals([_argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(checkpoint))
    model.eval()
    converter = alphabet.get_batch_converter()
    last = model.num_layers

    def run(sequences: list[str]) -> torch.Tensor:
        dataset = FastaBatchedDataset([str(i) for i in range(len(sequences))], sequences)
        batches = dataset.get_batch_indices(TOKS_PER_BATCH, extra_toks_per_seq=1)
        vectors = torch.empty(len(sequences), model.embed_dim)
        with torch.no_grad():
            for batch in batches:
                labels, strs, toks = converter([dataset[i] for i in batch])
                representations = model(toks, repr_layers=[last])["representations"][last]
                for row, (label, sequence) in enumerate(zip(labels, strs)):
                    end = min(MEAN_POSITIONS, len(sequence))
                    vectors[int(label)] = representations[row, 1 : end + 1].mean(0)
        return vectors

    return run


def esm_ours(checkpoint: Path):
    from virnucpro.engines.esm2 import load_esm2

    embedder = load_esm2(checkpoint)
    return lambda sequences: embedder.embed(sequences).vectors


def dnabert_ours(snapshot: Path):
    from virnucpro.engines.dnabert import load_dnabert_s

    model = load_dnabert_s(snapshot)
    return lambda sequences: model.embed(sequences).vectors


def dnabert_one_at_a_time(snapshot: Path):
    """The published loop with our encoder: tokenize one, forward one, mean over all its tokens."""
    import torch

    from virnucpro.engines.dnabert import load_dnabert_s

    model = load_dnabert_s(snapshot)

    def run(sequences: list[str]) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for sequence in sequences:
                ids = torch.tensor([model.tokenize(sequence)])
                hidden = model.encoder(ids, torch.ones_like(ids, dtype=torch.bool))
                rows.append(hidden[0].mean(0))
        return torch.stack(rows)

    return run


def dnabert_published_style(snapshot: Path):
    """One at a time, attention written out as the published model code runs it without triton."""
    import torch
    import torch.nn.functional as F

    from virnucpro.engines.dnabert import load_dnabert_s
    from virnucpro.engines.dnabert_config import alibi_slopes

    model = load_dnabert_s(snapshot)
    encoder = model.encoder
    heads = encoder.cfg.num_attention_heads
    width = encoder.cfg.hidden_size // heads
    size = 512  # the published code builds its ALiBi table for 512 positions and slices it (grows it if needed)
    slopes = torch.tensor(alibi_slopes(heads))

    def alibi(length: int) -> torch.Tensor:
        positions = torch.arange(length)
        return -slopes[:, None, None] * (positions[None, :] - positions[:, None]).abs()

    table = alibi(size)

    def run(sequences: list[str]) -> torch.Tensor:
        nonlocal table
        rows = []
        with torch.no_grad():
            for sequence in sequences:
                ids = torch.tensor(model.tokenize(sequence))
                n = len(ids)
                if n > table.shape[-1]:
                    table = alibi(n)
                bias = table[:, :n, :n]
                x = encoder.embed_norm(encoder.word(ids) + encoder.token_type.weight[0])
                for layer in encoder.layers:
                    q, k, v = layer.wqkv(x).view(n, 3, heads, width).permute(1, 2, 0, 3)
                    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(width) + bias
                    context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1).reshape(n, -1)
                    x = layer.attn_norm(layer.attn_out(context) + x)
                    gate, value = layer.gated(x).split(layer.intermediate, dim=-1)
                    x = layer.mlp_norm(layer.wo(F.gelu(gate) * value) + x)
                rows.append(x.mean(0))
        return torch.stack(rows)

    return run


def measure(methods: dict, sequences: list[str], repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Seconds per method (``repeats`` interleaved runs, after one warm-up on a few sequences) and each one's vectors."""
    for run in methods.values():
        run(sequences[:4])
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    vectors = {}
    for _ in range(repeats):
        for name, run in methods.items():
            started = time.perf_counter()
            vectors[name] = run(sequences)
            seconds[name].append(time.perf_counter() - started)
    return seconds, vectors


def report(title: str, seconds: dict[str, list[float]], vectors: dict, reference: str, sequences: int,
           tokens: int, flops: float, rate: float) -> None:  # fmt: skip
    print(f"\n{title}: {sequences} sequences, {tokens} tokens, {flops / 1e9:.1f} GFLOP per pass")
    header = (f"{'method':<26} {'best s':>6} {'seq/s':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'of matmul':>9} "
              f"{'x published':>11} {'max |diff|':>10}  seconds of each run")  # fmt: skip
    print(header)
    print("-" * len(header))
    best_reference = min(seconds[reference])
    for name, runs in seconds.items():
        best = min(runs)
        diff = (vectors[name] - vectors[reference]).abs().max().item()
        print(
            f"{name:<26} {best:>6.2f} {sequences / best:>7.2f} {tokens / best:>9.0f} {flops / best / 1e9:>8.1f} "
            f"{flops / best / 1e9 / rate:>9.1%} {best_reference / best:>11.2f} {diff:>10.1e}  "
            f"{' / '.join(f'{s:.2f}' for s in runs)}"
        )
    print("(rates from the best run of each method; 'x published' = the published method's time / this one's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-bench"), help="models and data go here")
    parser.add_argument("--esm-frames", type=int, default=16, help="proteins for ESM-2 (0: skip)")
    parser.add_argument("--dnabert-frames", type=int, default=24, help="nucleotide slices for DNABERT-S (0: skip)")
    parser.add_argument("--esm-shape", default="30,640,20", help="layers,width,heads (default: esm2_t30_150M)")
    parser.add_argument("--dnabert-shape", default="12,768,12,3072", help="layers,hidden,heads,intermediate")
    parser.add_argument("--repeats", type=int, default=5, help="runs per method, interleaved; the best counts")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"command: {_common.command_line()}")
    print(f"machine: {_common.machine()}")
    print(f"before: {_common.load_average()}", flush=True)
    rates = [_common.matmul_rate()]
    print(f"2048x2048 fp32 matmul: best {rates[0][0]:.0f}, median {rates[0][1]:.0f} GFLOP/s", flush=True)
    results = []
    slices, proteins = _common.frames_for(max(args.esm_frames, args.dnabert_frames), 500, args.dir)

    if args.esm_frames:
        layers, width, heads = (int(v) for v in args.esm_shape.split(","))
        name = "esm2_t30_150M_UR50D.pt" if (layers, width, heads) == (30, 640, 20) else None
        checkpoint = _common.esm2_checkpoint(args.dir, layers, width, heads, name)
        chosen = proteins[: args.esm_frames]
        methods = {"published (fair-esm)": esm_published(checkpoint, chosen), "ours": esm_ours(checkpoint)}
        seconds, vectors = measure(methods, chosen, args.repeats)
        counts = [len(p) + 2 for p in chosen]
        results.append((f"ESM-2 {checkpoint.name} ({layers} layers, {width} wide, {heads} heads), fp32, CPU",
                        seconds, vectors, "published (fair-esm)", len(chosen), sum(counts),
                        _common.esm2_flops(counts, layers, width)))  # fmt: skip
        rates.append(_common.matmul_rate())

    if args.dnabert_frames:
        from virnucpro.engines.dnabert import load_dnabert_s

        layers, hidden, heads, intermediate = (int(v) for v in args.dnabert_shape.split(","))
        snapshot = _common.dnabert_snapshot(args.dir, layers, hidden, heads, intermediate)
        chosen = slices[: args.dnabert_frames]
        counts = [len(load_dnabert_s(snapshot).tokenize(s)) for s in chosen]
        methods = {
            "published (one at a time)": dnabert_one_at_a_time(snapshot),
            "published-code style": dnabert_published_style(snapshot),
            "ours": dnabert_ours(snapshot),
        }
        seconds, vectors = measure(methods, chosen, args.repeats)
        results.append((f"DNABERT-S random ({layers} layers, {hidden} wide, {heads} heads, {intermediate} "
                        "intermediate), fp32, CPU", seconds, vectors, "published (one at a time)", len(chosen),
                        sum(counts), _common.dnabert_flops(counts, layers, hidden, intermediate)))  # fmt: skip
        rates.append(_common.matmul_rate())
    rate = max(best for best, _ in rates)
    print(f"\n2048x2048 fp32 matmul, measured before and after each model: best "
          f"{' / '.join(f'{best:.0f}' for best, _ in rates)}, median {' / '.join(f'{m:.0f}' for _, m in rates)} "
          f"GFLOP/s; the fractions below are of the best, {rate:.0f} GFLOP/s")  # fmt: skip
    for result in results:
        report(*result, rate)
    print(f"\nafter: {_common.load_average()}")


if __name__ == "__main__":
    main()
