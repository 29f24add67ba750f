"""Benchmark: what verifying the intermediates costs on a run of many reads (chunk to aggregate, test models).

The checks (issue 17): every embedding file carries a CRC-32 of its content, computed when it is written and
compared when it is read (``virnucpro.engines.embed``); the reads index and the per-shard prediction tables
end with a line that counts their rows (``virnucpro.tables``); when a workflow run starts, every sample's
intermediates are checked (``virnucpro.resume.check_intermediates``: file metadata, the zip structure of each
embedding, the last bytes of each table; an embedding is read whole only when its prediction is to be made
again).

The script runs the steps of one sample as the workflow's jobs do, in the workflow's folder layout: chunk,
translate, shard (10,000 frames a shard), then per shard the embedding files of both models, classify (the
test classifier), then aggregate. The embedding files hold random vectors of the test models' widths
instead of computed ones: the models' compute is not what is measured, and on a shared 2-core machine the
test models take hours for 200,000 reads; without it, the checks' share of the run is an upper bound. The
time spent computing checksums is measured inside the run (the checksum function timed wherever it is
called); the start-of-run check is timed on the finished folder (three times, after a first pass that warms
the page cache, as on a re-run). Then the same checksums on one shard of the real models' widths (ESM-2 3B:
2560, DNABERT-S: 768 floats per frame), scaled to this run's shards.

    .venv/bin/python -m benchmarks.intermediates [--reads 200000] [--dir /tmp/virnucpro-bench-intermediates]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks._common import command_line, generate_reads, load_average, machine, sample_files
from virnucpro.layout import SampleFiles, shard_name

REAL_WIDTHS = {"esm2": 2560, "dnabert_s": 768}  # floats per frame in the real models' embeddings
TEST_WIDTH = 64  # both test models' widths (virnucpro.testmodels)
SHARD_SIZE = 10_000  # the workflow's default


class Timer:
    """Seconds spent in one function of a module, wherever it is called from (the attribute wrapped)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.seconds, self.calls = module, name, 0.0, 0
        self.original = getattr(module, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        setattr(module, name, timed)

    def restore(self) -> None:
        setattr(self.module, self.name, self.original)


def random_embeddings(fasta: Path, output: Path, width: int, seed: int) -> None:
    """An embedding file for every record of ``fasta``: random vectors of ``width`` (as an engine's output)."""
    import torch

    from virnucpro.engines.embed import write_embeddings
    from virnucpro.fasta import read_fasta

    ids = [record.id for record in read_fasta(fasta)]
    vectors = torch.randn(len(ids), width, generator=torch.Generator().manual_seed(seed))
    write_embeddings(output, ids, vectors)


def run_sample(reads: Path, files: SampleFiles, classifier_path: Path) -> tuple[dict[str, float], int, list]:
    """The workflow's steps on one sample, its files where the workflow puts them (``files``): seconds per step,
    the number of frames, and the shards (``virnucpro.resume.Shard``)."""
    from virnucpro.classify.classifier import load_classifier
    from virnucpro.classify.predictions import classify_embedded
    from virnucpro.engines.embed import read_embeddings
    from virnucpro.outputs.aggregate import aggregate_sample
    from virnucpro.prep.chunk import chunk_fasta
    from virnucpro.prep.shard import shard_frames
    from virnucpro.prep.translate import translate_fasta
    from virnucpro.resume import Shard

    seconds: dict[str, float] = {}

    def step(name: str, function, *args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return result

    step("chunk", chunk_fasta, reads, 500, Path(files.chunked), reads_table=Path(files.reads_index))
    nucleotide, protein = Path(files.nucleotide_frames), Path(files.protein_frames)
    summary = step("translate", translate_fasta, Path(files.chunked), nucleotide, protein)
    count = step("shard", shard_frames, nucleotide, protein, SHARD_SIZE, Path(files.shards))
    classifier = load_classifier(classifier_path)
    shards, predictions = [], []
    for index in range(count):
        name = shard_name(index)
        inputs = {model: Path(files.shard_input(name, model)) for model in ("dnabert_s", "esm2")}
        embeddings = {model: Path(files.embedding(name, model)) for model in inputs}
        for seed, model in enumerate(inputs):
            step("write embeddings (random vectors)", random_embeddings, inputs[model], embeddings[model],
                 TEST_WIDTH, index * 2 + seed)  # fmt: skip
        prediction = Path(files.predictions(name))
        dnabert, esm = step("classify: read embeddings", lambda paths: [read_embeddings(p) for p in paths],
                            [embeddings["dnabert_s"], embeddings["esm2"]])  # fmt: skip
        step("classify: merge, score, write", classify_embedded, inputs["dnabert_s"], dnabert, esm, classifier,
             prediction)  # fmt: skip
        predictions.append(prediction)
        shards.append(Shard((str(inputs["dnabert_s"]), str(inputs["esm2"])),
                            tuple(str(embeddings[m]) for m in ("esm2", "dnabert_s")), str(prediction)))  # fmt: skip
    step("aggregate", aggregate_sample, sample="bench", reads_table=Path(files.reads_index), nucleotide=nucleotide,
         predictions=predictions, manifest=None, output_dir=Path(files.folder))  # fmt: skip
    return seconds, summary.frames, shards


def real_width_checksums(folder: Path) -> tuple[float, float, int]:
    """Seconds of the CRC-32 of one shard of SHARD_SIZE frames at the real models' widths when written and
    when read (both models), and the bytes of the two files."""
    import torch

    from virnucpro.engines import embed

    written = read = 0.0
    size = 0
    for model, width in REAL_WIDTHS.items():
        ids = [f"read_{index:07d}_chunk_1F1" for index in range(SHARD_SIZE)]
        vectors = torch.randn(SHARD_SIZE, width)
        path = folder / f"real.{model}.pt"
        timer = Timer(embed, "embeddings_checksum")
        try:
            embed.write_embeddings(path, ids, vectors)
            written += timer.seconds
            timer.seconds = 0.0
            embed.read_embeddings(path)
            read += timer.seconds
        finally:
            timer.restore()
        size += path.stat().st_size
        path.unlink()
    return written, read, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-bench-intermediates"))
    args = parser.parse_args()

    from virnucpro.engines import embed
    from virnucpro.resume import FILE, TABLE, check_intermediates
    from virnucpro.testmodels import make_test_models

    print(f"$ {command_line()}")
    print(machine())
    print(load_average())
    root = args.dir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    sample = sample_files(root, "bench")
    Path(sample.work).mkdir(parents=True)
    classifier = make_test_models(root / "models")["classifier_500"]
    started = time.perf_counter()
    reads = generate_reads(root / "reads.fa", args.reads, 500)
    print(f"{args.reads:,} generated reads of 500 nt in {time.perf_counter() - started:.1f} s")

    checksum = Timer(embed, "embeddings_checksum")
    try:
        started = time.perf_counter()
        seconds, frames, shards = run_sample(reads, sample, classifier)
        total = time.perf_counter() - started
    finally:
        checksum.restore()
    files = [(path, TABLE if path.endswith(".tsv") else FILE) for path in sample.intermediates]
    check_intermediates(files, shards)  # a first pass: the page cache as a re-run finds it
    passes = []
    for _ in range(3):
        begun = time.perf_counter()
        found = check_intermediates(files, shards)
        passes.append(time.perf_counter() - begun)
    assert not found.missing and not found.damaged, found
    embedded = sum(Path(path).stat().st_size for shard in shards for path in shard.embeddings)

    print(f"\n{frames:,} frames in {len(shards)} shards of up to {SHARD_SIZE:,}; embedding files "
          f"{embedded / 1e6:,.1f} MB ({TEST_WIDTH} floats per frame and model, as the test models')")  # fmt: skip
    print(f"chunk to aggregate without the models' compute: {total:,.1f} s")
    for name, value in seconds.items():
        print(f"  {name:36s} {value:8.2f} s")
    print("\nthe checks in that run:")
    print(f"  CRC-32 of the embeddings ({checksum.calls} computed: each file written, then read): "
          f"{checksum.seconds:.3f} s = {100 * checksum.seconds / total:.2f} % of the run")  # fmt: skip
    print(f"  end lines of the counted tables: {len(shards) + 1} lines of a few bytes (not measurable)")
    print(f"  the start-of-run check of the sample ({len(shards)} shards): "
          f"{', '.join(f'{value * 1000:.1f}' for value in passes)} ms (three passes)")  # fmt: skip

    written, read, size = real_width_checksums(root)
    per_shard = written + read
    print(f"\nat the real models' widths ({' + '.join(map(str, REAL_WIDTHS.values()))} floats per frame; one shard "
          f"of {SHARD_SIZE:,} frames, {size / 1e6:.0f} MB in its two files): CRC-32 {written:.3f} s when written, "
          f"{read:.3f} s when read; x {len(shards)} shards = {per_shard * len(shards):.2f} s for this run")  # fmt: skip
    print(load_average())


if __name__ == "__main__":
    main()
