"""Where every file of a run's results lives: one object per folder names its files, nobody else builds
these paths (the rules, the steps and the one-process pipeline all ask here).

Paths are text, relative to the workflow's working directory unless another ``root`` is given. Built
with a wildcard instead of a name (``SampleFiles("{sample}")``, ``shard="{shard}"``) they are the rules'
file patterns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RESULTS = "results"
SHARD_PATTERN = r"shard_[0-9]+"
MODELS = ("esm2", "dnabert_s")


def shard_name(index: int) -> str:
    """The name of a sample's shard ``index`` (0-based): ``shard_00000``, ..."""
    return f"shard_{index:05d}"


def shard_index(name: str) -> int:
    return int(name.split("_", 1)[1])


@dataclass(frozen=True)
class SampleFiles:
    """The files of one sample: its outputs in ``results/{sample}/``, its intermediates in ``work/``."""

    sample: str
    root: str = RESULTS

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, self.sample, *parts)

    # --- the outputs (README, "Outputs") -----------------------------------------------------------
    @property
    def folder(self) -> str:
        return self._path()

    @property
    def prediction_results(self) -> str:
        return self._path("prediction_results.txt")

    @property
    def highest_scores(self) -> str:
        return self._path("prediction_results_highestscore.csv")

    @property
    def reads_table(self) -> str:
        return self._path("reads.tsv")

    @property
    def failures(self) -> str:
        return self._path("failures.tsv")

    @property
    def outputs(self) -> tuple[str, ...]:
        """The tables a sample's aggregation writes, in this order."""
        return (self.prediction_results, self.highest_scores, self.reads_table, self.failures)

    def plot(self, name: str) -> str:
        return self._path("plots", f"{name}.png")

    @property
    def summary_page(self) -> str:
        return self._path("plots", "summary.html")

    # --- the intermediates -------------------------------------------------------------------------
    @property
    def work(self) -> str:
        return self._path("work")

    @property
    def chunked(self) -> str:
        return self._path("work", "chunked.fa")

    @property
    def reads_index(self) -> str:
        return self._path("work", "reads_index.tsv")

    @property
    def nucleotide_frames(self) -> str:
        return self._path("work", "identified_nucleotide.fa")

    @property
    def protein_frames(self) -> str:
        return self._path("work", "identified_protein.faa")

    @property
    def shards(self) -> str:
        return self._path("work", "shards")

    def shard_nucleotide(self, shard: str) -> str:
        return os.path.join(self.shards, f"{shard}.fa")

    def shard_protein(self, shard: str) -> str:
        return os.path.join(self.shards, f"{shard}.faa")

    def shard_input(self, shard: str, model: str) -> str:
        """What a model embeds: DNABERT-S the nucleotide slices, ESM-2 the proteins."""
        return self.shard_protein(shard) if model == "esm2" else self.shard_nucleotide(shard)

    def embedding(self, shard: str, model: str) -> str:
        return self._path("work", "embeddings", f"{shard}.{model}.pt")

    def embedding_record(self, shard: str, model: str) -> str:
        """What made an embedding file: the model's fingerprint, the precision, its rows and size (JSON)."""
        return self._path("work", "embeddings", f"{shard}.{model}.json")

    def predictions(self, shard: str) -> str:
        return self._path("work", "predictions", f"{shard}.tsv")


@dataclass(frozen=True)
class RunFiles:
    """The run's own files directly under ``results/`` (not per sample)."""

    root: str = RESULTS

    @property
    def run_stats(self) -> str:
        return os.path.join(self.root, "run_stats.json")

    @property
    def daemons_plot(self) -> str:
        return os.path.join(self.root, "daemons.png")

    def daemon_stats(self, daemon_id: str) -> str:
        """A serve job's output: its daemon's statistics, from the last attempt that ran it."""
        return os.path.join(self.root, "daemons", f"{daemon_id}.stats.json")

    @property
    def reserved_names(self) -> frozenset[str]:
        """Names under ``results/`` that no sample may take (compared without letter case)."""
        return frozenset(os.path.basename(path).casefold() for path in (self.run_stats, self.daemons_plot)) | {
            "daemons"
        }
