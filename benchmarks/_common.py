"""Shared pieces of the benchmarks: the command line, the machine, reads and frames, random models, FLOPs.

Every benchmark prints the command line that produced its figures (``command_line``) and the
machine it ran on (``machine``). Reads are generated so that they have stop-free frames as real
reads do (a random protein back-translated into frame 1 of each read); they are then chunked,
translated and sharded with the package itself. Models are random-weight files in the published
formats, written by the package (``virnucpro.testmodels``) or, for
ESM-2 3B, tensor by tensor in fp16 (``write_large_esm2``), so that the real loaders read them.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

from virnucpro.layout import RESULTS, RunFiles, SampleFiles

REPO = Path(__file__).resolve().parent.parent
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_CODONS: dict[str, list[str]] = {}


def command_line() -> str:
    """The command that runs this process again, as the user would type it from the repository root
    (``python -m benchmarks.NAME ...``)."""
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:
        return shlex.join([python, "-m", spec.name, *sys.argv[1:]])
    script = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return shlex.join([python, script, *sys.argv[1:]])


def machine() -> str:
    """One line: CPUs, memory, torch version and threads, GPU if any."""
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {memory:.1f} GB RAM, {gpu}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def matmul_rate(
    size: int = 2048, seconds: float = 3.0, device: str = "cpu", dtype: str = "fp32"
) -> tuple[float, float]:
    """This machine's rate of ``size``x``size`` matrix products in GFLOP/s: (best, median) of timed products.

    The best is what the machine can do; on a shared machine the median shows what others left us.
    """
    import torch

    from virnucpro.engines.embed import torch_dtype

    dtype_ = torch_dtype(dtype)
    a = torch.randn(size, size, device=device, dtype=dtype_)
    b = torch.randn(size, size, device=device, dtype=dtype_)
    for _ in range(3):
        a @ b
    synchronize(device)
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 5:
        started = time.perf_counter()
        a @ b
        synchronize(device)
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    rates.sort()
    return rates[-1], rates[len(rates) // 2]


def synchronize(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _codon_table() -> dict[str, list[str]]:
    if not _CODONS:
        from virnucpro.prep.translate import translate_codons

        for a in "ACGT":
            for b in "ACGT":
                for c in "ACGT":
                    _CODONS.setdefault(translate_codons(a + b + c), []).append(a + b + c)
    return _CODONS


def generate_reads(path: Path, count: int, length: int, seed: int = 0) -> Path:
    """``count`` reads of ``length`` nt whose frame 1 codes a random protein without stop codons."""
    codons = _codon_table()
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index in range(count):
            coding = "".join(rng.choice(codons[rng.choice(AMINO_ACIDS)]) for _ in range(length // 3 + 1))
            handle.write(f">read_{index:06d} generated\n{coding[:length]}\n")
    return path


def make_frames(reads: Path, expected_length: int, workdir: Path) -> tuple[Path, Path]:
    """Chunk and translate ``reads`` with the package; the kept frames' nucleotide and protein FASTA files."""
    from virnucpro.prep.chunk import chunk_fasta
    from virnucpro.prep.translate import translate_fasta

    chunked = workdir / "chunked.fa"
    chunk_fasta(reads, expected_length, chunked)
    nucleotide, protein = workdir / "frames.fa", workdir / "frames.faa"
    translate_fasta(chunked, nucleotide, protein)
    return nucleotide, protein


def read_sequences(path: Path, limit: int | None = None) -> list[str]:
    from virnucpro.fasta import read_fasta

    sequences = []
    for record in read_fasta(path):
        if limit is not None and len(sequences) >= limit:
            break
        sequences.append(record.sequence)
    return sequences


def frames_for(count: int, read_length: int, workdir: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """At least ``count`` frames (nucleotide slices, proteins) from generated reads, first ``count`` of each."""
    reads = generate_reads(workdir / f"reads_{read_length}_{count}.fa", count, read_length, seed)
    nucleotide, protein = make_frames(reads, 500 if read_length >= 500 else 300, workdir)
    return read_sequences(nucleotide, count), read_sequences(protein, count)


def esm2_checkpoint(directory: Path, layers: int, dim: int, heads: int, name: str | None = None) -> Path:
    """A random-weight ESM-2 checkpoint of these shapes in the published layout (written once, then reused)."""
    from virnucpro.testmodels import write_random_checkpoint

    path = directory / (name or f"esm2_t{layers}_{dim}_{heads}_bench.pt")
    if not path.is_file():
        started = time.perf_counter()
        write_random_checkpoint(path, num_layers=layers, embed_dim=dim, attention_heads=heads)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def write_large_esm2(path: Path, layers: int, dim: int, heads: int, device: str = "cpu", seed: int = 0) -> Path:
    """A random ESM-2 checkpoint made tensor by tensor in fp16 (never a whole fp32 model): for the 3B shapes.

    Scales as in ``write_random_checkpoint``: matrices ~ N(0, 1/fan_in), layer-norm weights 1 + N(0, 0.01),
    other vectors ~ N(0, 0.01), embeddings ~ N(0, 1) with a zero padding row; the rotary frequencies as published.
    The random numbers are drawn on ``device`` (a GPU draws 3 billion in a second).
    """
    import torch
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    from virnucpro.engines.esm2 import ALPHABET, ROTARY_FREQUENCIES
    from virnucpro.testmodels import save_published_checkpoint

    alphabet = Alphabet.from_architecture(ALPHABET)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in ESM2(layers, dim, heads, alphabet).state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":
            continue  # tied to embed_tokens.weight: one storage in the file
        if name.endswith(ROTARY_FREQUENCIES):
            width = 2 * shape[0]
            tensor = 1.0 / (10000 ** (torch.arange(0, width, 2, dtype=torch.float32) / width))
        else:
            tensor = torch.randn(shape, generator=generator, device=device)
            if name == "embed_tokens.weight":
                tensor[alphabet.padding_idx] = 0.0
            elif name.endswith(("layer_norm.weight", "layer_norm_after.weight")):
                tensor = 1.0 + 0.1 * tensor
            elif len(shape) == 2:
                tensor = tensor / shape[1] ** 0.5
            else:
                tensor = 0.1 * tensor
        state[name] = tensor.half().cpu()
    return save_published_checkpoint(path, state, num_layers=layers, embed_dim=dim, attention_heads=heads)


def dnabert_snapshot(directory: Path, layers: int, hidden: int, heads: int, intermediate: int) -> Path:
    """A random-weight DNABERT-S snapshot of these shapes in the published layout (written once, then reused)."""
    from virnucpro.testmodels import write_random_snapshot

    path = directory / f"DNABERT-S_{layers}_{hidden}_{heads}_{intermediate}"
    if not (path / "model.safetensors").is_file():
        write_random_snapshot(
            path, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=intermediate
        )
    return path


def esm2_flops(token_counts: list[int], layers: int, dim: int) -> float:
    """FLOPs of an ESM-2 forward pass over sequences of these token counts (<cls>, <eos> included), padding excluded.

    Per token and layer the matrix products take 2 x 12 dim^2 (q, k, v, out: 4 dim^2 weights; fc1, fc2:
    8 dim^2); per sequence of T tokens and layer the attention takes 2 x 2 x T^2 x dim (scores, weighted
    sum). Layer norms, activations and the unused language-model head are not counted.
    """
    per_token = 2 * 12 * dim * dim * layers
    return float(sum(per_token * t + 4 * t * t * dim * layers for t in token_counts))


def dnabert_flops(token_counts: list[int], layers: int, hidden: int, intermediate: int) -> float:
    """FLOPs of a DNABERT-S forward pass: 2 x (4 hidden^2 + 3 hidden x intermediate) per token and layer
    (Wqkv, output dense, gated layers, wo) plus 4 x T^2 x hidden per sequence and layer (attention)."""
    per_token = 2 * (4 * hidden * hidden + 3 * hidden * intermediate) * layers
    return float(sum(per_token * t + 4 * t * t * hidden * layers for t in token_counts))


def bench_env() -> dict[str, str]:
    """The environment with this checkout's virtualenv first on PATH (what the workflow's jobs need)."""
    bin_dir = Path(sys.executable).parent
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def figures_file(explicit: Path | None, name: str) -> Path | None:
    """Where a benchmark writes its figures as JSON: ``explicit`` (``--json``), else ``$OUT/name`` when
    ``$OUT`` is set (the device machine's output folder), else nowhere."""
    return explicit or (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None)


def workflow_config(sample: str, reads: Path, models: dict[str, Path], devices: list[str], shard_size: int,
                    precision: str = "fp32", mode: str = "daemon", esm2_engine: str = "default") -> dict:  # fmt: skip
    """A workflow config for one sample, both models' daemons on ``devices``."""
    return {
        "samples": {sample: str(reads)},
        "length": 500,
        "models": {name: str(path) for name, path in models.items()},
        "embedding_mode": mode,
        "daemons": {"esm2": list(devices), "dnabert_s": list(devices)},
        "shard_size": shard_size,
        "precision": precision,
        "esm2_engine": esm2_engine,
        "idle_timeout": 300,
    }


def sample_files(workdir: Path, sample: str) -> SampleFiles:
    """Where a workflow run in ``workdir`` puts the files of ``sample`` (``virnucpro.layout``)."""
    return SampleFiles(sample, str(workdir / RESULTS))


def run_stats(workdir: Path) -> dict:
    """The run statistics of the workflow run in ``workdir``."""
    return json.loads(Path(RunFiles(str(workdir / RESULTS)).run_stats).read_text())


def run_workflow(workdir: Path, config: dict, cores: int) -> dict:
    """One ``snakemake`` run (this Python's) of ``config`` in a fresh ``workdir``; its wall time and CPU seconds.

    GPU daemons get ``--resources gpu=N``, N the number of them. Exits with the log's path if the run fails.
    """
    import resource
    import shutil
    import subprocess

    import yaml

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    gpus = sum(device.startswith("cuda") for devices in config["daemons"].values() for device in devices)
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", str(cores),
        *(["--resources", f"gpu={gpus}"] if gpus else []),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(workdir / "snakemake.log", "w") as log:
        result = subprocess.run(command, cwd=workdir, env=bench_env(), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed with status {result.returncode}; see {workdir / 'snakemake.log'}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "workdir": workdir}


def start_daemon(model: str, weights: Path, run_dir: Path, daemon_id: str, root: Path, log: Path,
                 extra_env: dict[str, str] | None = None, device: str = "cpu", precision: str = "fp32",
                 esm2_engine: str = "default"):  # fmt: skip
    """Start ``virnucpro serve`` for ``model`` (a subprocess); its stderr goes to ``log``."""
    import subprocess

    command = [
        sys.executable, "-m", "virnucpro", "serve", "--model", model, "--weights", str(weights),
        "--device", device, "--precision", precision, "--run-dir", str(run_dir),
        "--stats-output", str(run_dir / f"{daemon_id}.stats.json"), "--daemon-id", daemon_id,
        "--idle-timeout", "600", "--allowed-root", str(root), "--esm2-engine", esm2_engine,
    ]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, stderr=open(log, "w"), env=dict(bench_env(), **(extra_env or {})))


def wait_ready(run_dir: Path, model: str, count: int, processes: list, timeout: float = 300) -> float:
    """Wait until ``count`` daemons of ``model`` are ready in the registry; returns the seconds waited."""
    from virnucpro.serving import registry

    started = time.perf_counter()
    while True:
        ready = [e for e in registry.list_entries(run_dir, model) if e.get("state") == "ready"]
        if len(ready) >= count:
            return time.perf_counter() - started
        if any(p.poll() is not None for p in processes) or time.perf_counter() - started > timeout:
            raise SystemExit(f"the {model} daemons did not become ready (see their logs in {run_dir})")
        time.sleep(0.1)


def stop_daemons(run_dir: Path, processes: list, daemon_ids: list[str]) -> list[dict]:
    """Stop the daemons, wait for them, and return their statistics files' contents."""
    from virnucpro.serving.client import stop_daemons as ask_to_stop

    ask_to_stop(run_dir)
    for process in processes:
        process.wait(timeout=120)
    return [json.loads((run_dir / f"{daemon_id}.stats.json").read_text()) for daemon_id in daemon_ids]


def write_fasta(path: Path, sequences: list[str], prefix: str = "s") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index, sequence in enumerate(sequences):
            handle.write(f">{prefix}{index}\n{sequence}\n")
    return path
