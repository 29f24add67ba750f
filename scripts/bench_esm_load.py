#!/usr/bin/env python
"""Benchmark: loading an ESM-2 3B checkpoint with fair-esm's loader and with ours (peak RSS, seconds).

Writes a random-weight checkpoint with exactly the shapes, key names, cfg and fp16 storage of
``esm2_t36_3B_UR50D.pt`` (about 5.7 GB) into a folder (reused when present), reads it once so the
page cache is warm for every loader, then loads it in separate subprocesses:

  fair-esm   esm.pretrained.load_model_and_alphabet_local (argparse.Namespace allow-listed so it runs)
  fp32       virnucpro.engines.esm2.load_esm2, fp32 (the default on the CPU)
  fp16/bf16  virnucpro.engines.esm2.load_esm2 in half precision

Each child's peak resident memory comes from ``os.wait4`` (the kernel's accounting of that child;
this process stays small, since a child's peak starts from its parent's at fork), its load time
from the child itself (imports excluded). Results go to stdout as a table.

    python scripts/bench_esm_load.py [--dir /tmp/virnucpro-bench] [--delete]
    python scripts/bench_esm_load.py --layers 12 --dim 480 --heads 20   # a quick, small run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

MODES = ("fair-esm", "fp32", "fp16", "bf16")
GB = 1e9


def write_checkpoint(path: Path, layers: int, dim: int, heads: int) -> None:
    """A random fp16 checkpoint in the published layout, made tensor by tensor (never an fp32 copy)."""
    import torch
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    from virnucpro.engines.esm2 import ALPHABET, ROTARY_FREQUENCIES
    from virnucpro.testmodels import save_published_checkpoint

    with torch.device("meta"):
        model = ESM2(layers, dim, heads, Alphabet.from_architecture(ALPHABET))
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":
            continue  # tied to embed_tokens.weight, one storage in the file
        tensor = torch.empty(shape, dtype=torch.float16)
        if name.endswith(ROTARY_FREQUENCIES):
            tensor.copy_(1.0 / (10000 ** (torch.arange(0, shape[0] * 2, 2, dtype=torch.float32) / (shape[0] * 2))))
        else:
            tensor.uniform_(-0.05, 0.05, generator=generator)
        state[name] = tensor
    save_published_checkpoint(path, state, num_layers=layers, embed_dim=dim, attention_heads=heads)


def child(mode: str, checkpoint: str) -> None:
    """Load the checkpoint one way and print what it took, as one JSON line."""
    import resource

    import torch

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if mode == "fair-esm":
        import esm

        with torch.serialization.safe_globals([argparse.Namespace]):
            model, _ = esm.pretrained.load_model_and_alphabet_local(checkpoint)
        model.eval()
    else:
        from virnucpro.engines.embed import torch_dtype
        from virnucpro.engines.esm2 import load_esm2

        dtype = torch_dtype(mode)
        model = load_esm2(Path(checkpoint), dtype=dtype).model
    seconds = time.perf_counter() - started
    parameters = list(model.parameters())
    print(json.dumps({
        "load_s": seconds,
        "baseline_rss": baseline,
        "parameters": sum(p.numel() for p in parameters),
        "model_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "dtype": str(parameters[0].dtype).replace("torch.", ""),
    }))  # fmt: skip


def measure(mode: str, checkpoint: Path) -> dict:
    """Run one loader in a fresh process; its own report plus the kernel's peak RSS and wall time."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, str(checkpoint)], stdout=subprocess.PIPE, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{mode}: the loader exited with status {process.returncode}")
    report = json.loads(output.strip().splitlines()[-1])
    report.update(mode=mode, peak_rss=usage.ru_maxrss * 1024, process_s=time.perf_counter() - started)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-bench"), help="where the checkpoint goes")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--delete", action="store_true", help="delete the checkpoint afterwards")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CHECKPOINT"), help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, metavar="CHECKPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.write:
        write_checkpoint(args.write, args.layers, args.dim, args.heads)
        return
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")

    from virnucpro.engines.download import MODEL_PATHS

    published = (args.layers, args.dim, args.heads) == (36, 2560, 40)
    name = MODEL_PATHS["esm2"] if published else f"esm2_t{args.layers}_{args.dim}_bench.pt"
    checkpoint = args.dir / name
    args.dir.mkdir(parents=True, exist_ok=True)
    if checkpoint.is_file():
        print(f"reusing {checkpoint}")
    else:
        started = time.perf_counter()
        # in a child, so that this process stays small: a child's peak RSS starts from its parent's at fork
        shape = ["--layers", str(args.layers), "--dim", str(args.dim), "--heads", str(args.heads)]
        subprocess.run([sys.executable, __file__, "--write", str(checkpoint), *shape], check=True)
        print(f"wrote {checkpoint} in {time.perf_counter() - started:.0f} s")
    size = checkpoint.stat().st_size
    started = time.perf_counter()
    with checkpoint.open("rb") as handle:
        while handle.read(64 << 20):
            pass
    print(
        f"{checkpoint.name}: {size / GB:.2f} GB; read once to warm the page cache ({time.perf_counter() - started:.0f} s)"
    )

    results = []
    for mode in modes:
        print(f"loading with {mode} ...", flush=True)
        results.append(measure(mode, checkpoint))

    print()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB RAM")
    print(f"file: {checkpoint.name}, {size / GB:.2f} GB (fp16 storage)")
    header = f"{'loader':<10} {'dtype':<9} {'params':>8} {'load s':>7} {'process s':>9} {'peak RSS GB':>11} {'/ file':>7} {'/ weights':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['mode']:<10} {r['dtype']:<9} {r['parameters'] / 1e9:>7.2f}B {r['load_s']:>7.1f} {r['process_s']:>9.1f} "
            f"{r['peak_rss'] / GB:>11.2f} {r['peak_rss'] / size:>7.2f} {r['peak_rss'] / r['model_bytes']:>9.2f}"
        )
    print("('/ weights' = peak RSS divided by the loaded model's parameter bytes in its dtype;"
          f" baseline RSS after imports: {max(r['baseline_rss'] for r in results) / GB:.2f} GB)")  # fmt: skip
    by_mode = {r["mode"]: r for r in results}
    if "fair-esm" in by_mode:
        reference = by_mode["fair-esm"]
        for mode in modes:
            if mode != "fair-esm":
                r = by_mode[mode]
                print(
                    f"fair-esm / ours-{mode}: peak RSS x{reference['peak_rss'] / r['peak_rss']:.2f}, "
                    f"load time x{reference['load_s'] / r['load_s']:.2f}"
                )
    if args.delete:
        from virnucpro.engines.esm2 import contact_regression_path

        checkpoint.unlink()
        contact_regression_path(checkpoint).unlink(missing_ok=True)
        print(f"deleted {checkpoint}")


if __name__ == "__main__":
    main()
