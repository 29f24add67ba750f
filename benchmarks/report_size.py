"""Benchmark: the size of the Snakemake report (``snakemake --report``) of a large sample, and what it
costs to make the report's per-sample files.

No model runs: a synthetic sample of ``--reads`` reads is written straight into a workflow's working
folder as a finished run would leave it: the per-read outputs that grow with the reads
(``reads.tsv``, ``prediction_results.txt``, ``prediction_results_highestscore.csv``, ``failures.tsv``:
one chunk per read, 0 to 4 stop-free frames, random scores) at their real sizes, and every other
file of the run (FASTA, shards, embeddings, per-shard predictions) as a small placeholder, since the
report never reads them. Then:

1. ``virnucpro report-plots --sample`` (the report step of the workflow, rule ``plot_sample``) on the
   sample's tables: wall time and peak memory (kernel's count for the child);
2. ``snakemake --report report.html`` (in ``in_process`` mode: no daemons, so no run statistics);
3. the size of the report, and of every file it embeds (the outputs marked ``report()`` in the rules).

With ``--before REV`` the report is also made with the workflow of git revision REV (``git archive``)
on the same folder, for a before/after comparison (its report step needs only the plots, which exist).

    .venv/bin/python -m benchmarks.report_size --reads 1000000 [--dir /tmp/virnucpro-report-size] [--before REV]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

from benchmarks._common import REPO, command_line, sample_files
from virnucpro.layout import shard_name

SAMPLE = "big"
BIN = Path(sys.executable).parent
PREDICTION_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2\n"
READS_HEADER = "read_id\tlength\tchunks\tframes\tframes_scored\tvirus_chunks\tbest_virus_score\tverdict\treason\n"
FAILURES_HEADER = "time\tsample\tstage\tshard\tsequence_id\terror_class\tmessage\tattempts\tdaemon\n"
FRAMES = ("F1", "F2", "F3", "R1", "R2", "R3")


def write_config(workdir: Path) -> Path:
    """A config for the synthetic run: in-process mode, placeholder models (only their paths are checked)."""
    models = workdir / "models"
    (models / "DNABERT-S").mkdir(parents=True, exist_ok=True)
    for name in ("esm2_test.pt", "500_model.pth"):
        (models / name).write_bytes(b"placeholder\n")
    (workdir / "reads.fa").write_text(">placeholder\nACGT\n")
    config = {
        "samples": {SAMPLE: str(workdir / "reads.fa")},
        "length": 500,
        "models": {
            "esm2": str(models / "esm2_test.pt"),
            "dnabert_s": str(models / "DNABERT-S"),
            "classifier": str(models / "500_model.pth"),
        },
        "embedding_mode": "in_process",
        "shard_size": 10000,
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_sample(workdir: Path, reads: int, seed: int = 0) -> dict[str, int]:
    """The finished outputs of a sample of ``reads`` reads; returns counts (reads, frames, shards)."""
    rng = random.Random(seed)
    files = sample_files(workdir, SAMPLE)
    for folder in (files.shards, files.embeddings, files.predictions_folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
    frames_total = virus_reads = 0
    chunks_virus: list[tuple[str, bool]] = []
    with open(files.reads_table, "w") as reads_out, open(files.prediction_results, "w") as frames_out:
        reads_out.write(READS_HEADER)
        frames_out.write(PREDICTION_HEADER)
        for index in range(reads):
            read_id = f"read_{index:07d}"
            frames = rng.choice((0, 1, 2, 2, 3, 3, 4))
            best_others = best_virus = -1.0
            for frame in rng.sample(FRAMES, frames):
                virus = rng.random()
                others = 1.0 - virus
                best_others, best_virus = max(best_others, others), max(best_virus, virus)
                label = "virus" if virus > others else "others"
                frames_out.write(f"{read_id}_chunk_1{frame}\t{label}\t{others:.8g}\t{virus:.8g}\n")
            frames_total += frames
            if frames:
                is_virus = best_virus >= best_others
                virus_reads += is_virus
                chunks_virus.append((f"{read_id}_chunk_1", is_virus))
                verdict = "virus" if is_virus else "others"
                reads_out.write(
                    f"{read_id}\t500\t1\t{frames}\t{frames}\t{int(is_virus)}\t{best_virus:.8g}\t{verdict}\t\n"
                )
            else:
                reads_out.write(f"{read_id}\t500\t1\t0\t0\t0\t\tunclassified\tno stop-free frame\n")
    with open(files.highest_scores, "w") as out:
        out.write("Modified_ID\tIs_Virus\n")
        for chunk_id, is_virus in sorted(chunks_virus):
            out.write(f"{chunk_id}\t{is_virus}\n")
    with open(files.failures, "w") as out:
        out.write(FAILURES_HEADER)
        for shard in range(3):
            out.write(f"2026-01-01T00:00:00+00:00\t{SAMPLE}\tembed_esm2\t{shard_name(shard)}\t\tOutOfMemoryError\t"
                      "CUDA out of memory\t2\tesm2-0\n")  # fmt: skip
    shards = max(1, -(-frames_total // 10000))
    placeholders = list(files.intermediates)
    for name in map(shard_name, range(shards)):
        placeholders += [files.shard_nucleotide(name), files.shard_protein(name), files.embedding(name, "esm2"),
                         files.embedding(name, "dnabert_s"), files.predictions(name)]  # fmt: skip
    for path in placeholders:
        Path(path).write_text("placeholder\n")
    # Inputs older than outputs, as after a run.
    now = time.time()
    for path in placeholders:
        os.utime(path, (now - 60, now - 60))
    return {"reads": reads, "frames": frames_total, "virus_reads": virus_reads, "shards": shards}


def run(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``command``; (wall seconds, the peak RSS of the children so far in MB, its output). Exits on failure."""
    environment = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output, _ = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}\n{output[-5000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, peak, output


def report(workdir: Path, snakefile: Path, config: Path, name: str) -> tuple[float, int]:
    html = workdir / name
    command = [str(BIN / "snakemake"), "--snakefile", str(snakefile), "--directory", str(workdir),
               "--configfile", str(config), "--report", str(html)]  # fmt: skip
    seconds, _, _ = run(command, workdir)
    return seconds, html.stat().st_size


def embedded_files(workdir: Path) -> list[tuple[str, int]]:
    """The sample's files that the current rules mark for the report, with their sizes."""
    return [
        (os.path.relpath(path, workdir), os.stat(path).st_size) for path in sample_files(workdir, SAMPLE).plots.files
    ]


def export_workflow(revision: str, target: Path) -> Path:
    """The ``workflow/`` folder of git revision ``revision`` under ``target``; its Snakefile."""
    data = subprocess.run(["git", "archive", revision, "workflow"], cwd=REPO, check=True, capture_output=True).stdout
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(target, filter="data")
    # The old rules' conda: directives point to ../../envs: give them the same folder.
    (target / "envs").symlink_to(REPO / "envs")
    return target / "workflow" / "Snakefile"


def megabytes(size: int) -> str:
    return f"{size / 1e6:,.2f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-report-size"))
    parser.add_argument("--before", metavar="REV", help="also make the report with the workflow of this git revision")
    args = parser.parse_args()

    workdir = args.dir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    print(f"$ {command_line()}")
    config = write_config(workdir)
    started = time.perf_counter()
    counts = write_sample(workdir, args.reads)
    print(f"synthetic sample: {counts['reads']:,} reads, {counts['frames']:,} frames, {counts['virus_reads']:,} "
          f"virus reads, {counts['shards']} shards; written in {time.perf_counter() - started:.1f} s")  # fmt: skip
    files = sample_files(workdir, SAMPLE)
    for path in (files.reads_table, files.prediction_results, files.highest_scores, files.failures):
        print(f"  {os.path.basename(path)}: {megabytes(os.stat(path).st_size)}")

    plots = [str(BIN / "virnucpro"), "report-plots", "--sample", SAMPLE, "--reads-table", files.reads_table,
             "--predictions", files.prediction_results, "--failures", files.failures,
             "--output-dir", files.plots.folder]  # fmt: skip
    seconds, peak, _ = run(plots, workdir)
    print(f"virnucpro report-plots: {seconds:.1f} s, peak RSS {peak:,.0f} MB")
    for name, size in embedded_files(workdir):
        print(f"  embeds {name}: {size / 1e3:,.1f} kB")

    seconds, size = report(workdir, REPO / "workflow" / "Snakefile", config, "report.html")
    print(f"snakemake --report (this workflow): {megabytes(size)} in {seconds:.1f} s")
    if args.before:
        snakefile = export_workflow(args.before, workdir / "before")
        seconds, before = report(workdir, snakefile, config, f"report-{args.before}.html")
        print(f"snakemake --report (workflow of {args.before}): {megabytes(before)} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
