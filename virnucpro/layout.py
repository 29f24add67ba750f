"""Where every file of a run's results lives: one object per folder names its files, nobody else builds
these paths (the rules, the steps and the one-process pipeline all ask here).

- ``SampleFiles``: a sample's folder ``results/{sample}/``: its outputs (README, "Outputs"), its report's
  files (``plots``, a ``PlotFiles``) and its intermediates in ``work/`` (its shards: ``shard_files``, a
  ``ShardFiles``).
- ``RunFiles``: the run's own files directly under ``results/``.

Paths are text, relative to the workflow's working directory unless another ``root`` is given; a step that
writes into a folder it is given names that folder's files with ``SampleFiles.at(folder)``,
``PlotFiles(folder)``, ``ShardFiles(folder)`` or ``RunFiles(folder)``. Built with a wildcard instead of a
name (``SampleFiles("{sample}")``, ``shard="{shard}"``) they are the rules' file patterns. This module is a
leaf: it imports nothing from the package.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

RESULTS = "results"
SHARD_PATTERN = r"shard_[0-9]+"
"""What a shard's name matches (``shard_name``): the rules' wildcard constraint."""
SAMPLE_PLOTS = ("scores", "verdicts", "failures")
"""A sample's plots (``PlotFiles.png``), in the order the report draws them."""
DAEMON_STATS_SUFFIX = ".stats.json"
"""What ends a serve job's output after its daemon's ID (``RunFiles.daemon_stats``)."""
_NUCLEOTIDE, _PROTEIN = ".fa", ".faa"  # a shard's two files


def shard_name(index: int) -> str:
    """The name of a sample's shard ``index`` (0-based): ``shard_00000``, ..."""
    return f"shard_{index:05d}"


def shard_index(name: str) -> int:
    """The index of a shard from its name (``shard_name``'s inverse): the shards' order."""
    return int(name.split("_", 1)[1])


@dataclass(frozen=True)
class ShardFiles:
    """A shards folder (``work/shards/``): per shard, its nucleotide frames and their proteins, same IDs."""

    folder: str

    def nucleotide(self, shard: str) -> str:
        return os.path.join(self.folder, shard + _NUCLEOTIDE)

    def protein(self, shard: str) -> str:
        return os.path.join(self.folder, shard + _PROTEIN)

    def names(self) -> list[str]:
        """The shards in the folder (those with a nucleotide file), in shard order; [] without the folder."""
        try:
            entries = os.listdir(self.folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = [entry[: -len(_NUCLEOTIDE)] for entry in entries if entry.endswith(_NUCLEOTIDE)]
        return sorted((name for name in names if re.fullmatch(SHARD_PATTERN, name)), key=shard_index)

    def model_input(self, shard: str, model: str) -> str:
        """What a model embeds: DNABERT-S the nucleotide slices, ESM-2 the proteins."""
        return self.protein(shard) if model == "esm2" else self.nucleotide(shard)


@dataclass(frozen=True)
class PlotFiles:
    """A sample's report files (``results/{sample}/plots/``): its plots and its summary page."""

    folder: str

    def png(self, name: str) -> str:
        """The plot ``name`` (one of ``SAMPLE_PLOTS``)."""
        return os.path.join(self.folder, f"{name}.png")

    @property
    def pngs(self) -> tuple[str, ...]:
        """Every plot, in the order of ``SAMPLE_PLOTS``."""
        return tuple(self.png(name) for name in SAMPLE_PLOTS)

    @property
    def summary_page(self) -> str:
        return os.path.join(self.folder, "summary.html")

    @property
    def files(self) -> tuple[str, ...]:
        """What the report shows of a sample: the plots, then the summary page."""
        return (*self.pngs, self.summary_page)


@dataclass(frozen=True)
class SampleFiles:
    """The files of one sample: its outputs in ``results/{sample}/``, its intermediates in ``work/``."""

    sample: str
    root: str = RESULTS

    @classmethod
    def at(cls, folder: str | os.PathLike) -> SampleFiles:
        """The files of the sample whose folder is ``folder`` (any name, anywhere)."""
        folder = os.fspath(folder)
        return cls(os.path.basename(folder), os.path.dirname(folder))

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

    @property
    def plots(self) -> PlotFiles:
        return PlotFiles(self._path("plots"))

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
    def intermediates(self) -> tuple[str, ...]:
        """What the sample's shards were made from, and what its tables are made from."""
        return (self.chunked, self.reads_index, self.nucleotide_frames, self.protein_frames)

    @property
    def shards(self) -> str:
        return self._path("work", "shards")

    @property
    def shard_files(self) -> ShardFiles:
        return ShardFiles(self.shards)

    def shard_nucleotide(self, shard: str) -> str:
        return self.shard_files.nucleotide(shard)

    def shard_protein(self, shard: str) -> str:
        return self.shard_files.protein(shard)

    def shard_input(self, shard: str, model: str) -> str:
        """What a model embeds (``ShardFiles.model_input``)."""
        return self.shard_files.model_input(shard, model)

    @property
    def embeddings(self) -> str:
        return self._path("work", "embeddings")

    def embedding(self, shard: str, model: str) -> str:
        return os.path.join(self.embeddings, f"{shard}.{model}.pt")

    def embedding_record(self, shard: str, model: str) -> str:
        """What made an embedding file: the model's fingerprint, the precision, its rows and size (JSON)."""
        return os.path.join(self.embeddings, f"{shard}.{model}.json")

    @property
    def predictions_folder(self) -> str:
        return self._path("work", "predictions")

    def predictions(self, shard: str) -> str:
        return os.path.join(self.predictions_folder, f"{shard}.tsv")


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

    @property
    def daemons(self) -> str:
        """The serve jobs' outputs (``daemon_stats``)."""
        return os.path.join(self.root, "daemons")

    def daemon_stats(self, daemon_id: str) -> str:
        """A serve job's output: its daemon's statistics, from the last attempt that ran it."""
        return os.path.join(self.daemons, daemon_id + DAEMON_STATS_SUFFIX)

    @property
    def reserved_names(self) -> frozenset[str]:
        """Names under ``results/`` that no sample may take (compared without letter case)."""
        return frozenset(
            os.path.basename(path).casefold() for path in (self.run_stats, self.daemons_plot, self.daemons)
        )
