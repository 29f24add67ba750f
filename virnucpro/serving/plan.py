"""What a run will embed: a model's daemons are started only when it has embedding work, and stopped once
the plan holds none (docs/daemons.md, "Lifecycle in a run", rules 1 and 2).

Two views, one before the plan exists and one of the plan itself:

- ``models_with_work`` reads the results folder, before snakemake builds its plan: a model has work when
  a sample's frames are not sharded yet (or older than the reads they come from), or a shard's embedding
  of that model is missing, older than its shard, or was made with another model file or precision
  (its record, ``SampleFiles.embedding_record``). It decides which serve jobs the plan includes.
- ``SnakemakePlan`` reads the running snakemake's own plan (its scheduler, under the scheduler's lock,
  so that a checkpoint's new jobs are never half seen): which models still have embedding jobs (or
  sharding jobs that will make some) that can run, and which daemons' serve jobs are planned. The run's
  watch checks the first view against it at start, and stops a model's daemons once it has no work left.
  It is duck-typed on snakemake 9's scheduler and DAG (the package never imports snakemake); if those
  change, ``snapshot`` returns None and the watch falls back on its idle timeout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from virnucpro.engines.provenance import file_digest, read_record
from virnucpro.layout import RESULTS, SampleFiles

log = logging.getLogger(__name__)

CHECKSUM_LIMIT = 1_000_000  # bytes: snakemake's default --max-checksum-file-size


def models_with_work(samples: dict[str, str], made_with: dict[str, dict], root: str = RESULTS, *,
                     checksum_limit: int = CHECKSUM_LIMIT) -> set[str]:  # fmt: skip
    """The models (keys of ``made_with``: model -> ``{"fingerprint", "precision"}`` of this run) that have an
    embedding to make for ``samples`` (name -> reads file), as far as the files tell. A shard rewritten
    after its embedding (a sample prepared again) needs it again as snakemake decides: for a shard file of at
    most ``checksum_limit`` bytes, only if its content changed (snakemake compares checksums of files that
    small: its ``--max-checksum-file-size``); for a bigger one, always."""
    left: set[str] = set()
    for sample, reads in samples.items():
        files = SampleFiles(sample, root)
        if not _prepared(reads, files):
            return set(made_with)
        shards = files.shard_files.names()
        for model, identity in made_with.items():
            if model not in left and any(_needs_embedding(files, shard, model, identity, checksum_limit)
                                         for shard in shards):  # fmt: skip
                left.add(model)
        if left == set(made_with):
            break
    return left


def _prepared(reads: str, files: SampleFiles) -> bool:
    """Whether the sample's shards exist, each step's output no older than its input."""
    chain = [reads, files.chunked, files.nucleotide_frames, files.shards]
    times = [_mtime(path) for path in chain]
    if None in times[1:]:
        return False
    return all(later >= earlier for earlier, later in zip(times, times[1:]) if earlier is not None)


def _needs_embedding(files: SampleFiles, shard: str, model: str, identity: dict, checksum_limit: int) -> bool:
    made = _mtime(files.embedding(shard, model))
    record = read_record(files.embedding_record(shard, model))
    if made is None or record is None or any(record.get(key) != value for key, value in identity.items()):
        return True
    source = files.shard_input(shard, model)
    if (_mtime(source) or 0.0) <= made:
        return False
    try:
        small = os.path.getsize(source) <= checksum_limit
        return not small or record.get("input") != file_digest(source)
    except OSError:
        return True


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


@dataclass(frozen=True)
class PlanSnapshot:
    """The running plan at one moment."""

    models_with_work: frozenset[str]  # models with embedding (or sharding) jobs left that can still run
    serve_jobs: frozenset[str]  # daemon IDs whose serve jobs are pending or running


class SnakemakePlan:
    """A view of the plan of the snakemake process this runs in (its ``workflow`` object)."""

    def __init__(self, workflow: object, *, embed_rules: dict[str, str], prep_rules: Iterable[str], serve_rule: str):
        self.workflow = workflow
        self.embed_rules = dict(embed_rules)  # rule name -> model
        self.prep_rules = frozenset(prep_rules)  # rules whose jobs make shards (and so embedding jobs)
        self.serve_rule = serve_rule
        self.warned = False

    def snapshot(self, lock_timeout: float = 1.0) -> PlanSnapshot | None:
        """The plan now, or None when it cannot be read (the scheduler busy past ``lock_timeout``, or not of
        the snakemake version this knows)."""
        try:
            scheduler = self.workflow.scheduler
            lock = scheduler._lock
            if not lock.acquire(timeout=lock_timeout):
                return None
            try:
                jobs = list(scheduler.remaining_jobs) + list(scheduler.running)
                failed = list(scheduler.failed)
                depending = self.workflow.dag.depending
                blocked = _downstream(failed, depending) if failed else set()
            finally:
                lock.release()
            models, daemons = set(), set()
            for job in jobs:
                if job in blocked:
                    continue
                name = job.rule.name
                if name in self.embed_rules:
                    models.add(self.embed_rules[name])
                elif name in self.prep_rules:
                    models.update(self.embed_rules.values())
                elif name == self.serve_rule:
                    daemons.add(job.wildcards["daemon"])
            return PlanSnapshot(frozenset(models), frozenset(daemons))
        except (AttributeError, KeyError, TypeError, RuntimeError) as error:
            if not self.warned:
                self.warned = True
                log.warning("virnucpro: cannot read snakemake's plan (%s: %s); daemons stop on idle_timeout",
                            type(error).__name__, error)  # fmt: skip
            return None


def _downstream(jobs: list, depending: dict) -> set:
    """Every job that depends, directly or not, on one of ``jobs`` (those can never run once they failed)."""
    seen: set = set()
    stack = list(jobs)
    while stack:
        for dependent in depending.get(stack.pop(), ()):
            if dependent not in seen:
                seen.add(dependent)
                stack.append(dependent)
    return seen
