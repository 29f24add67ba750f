"""What a re-run must know about a sample's intermediate files before it trusts them.

Snakemake makes a missing file again only when a later job must run: an intermediate deleted (by hand, to
retry a shard, or because the job that was making it again failed) after the later steps were done leaves
the run's outputs resting on a file that is gone, and the next run says "Nothing to be done". So, when a
run starts, the workflow asks ``check_intermediates`` which intermediates of its samples are missing (they
become targets of the run: they, and every step after them, are made again) and which are damaged (the
run stops with one line naming them: a run never deletes files it was not asked to make, a dry run least
of all). The checks read metadata and a few bytes per file; an embedding is read whole only when the
prediction made from it is to be made again anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from virnucpro.errors import UserError

FILE, TABLE, EMBEDDING = "file", "table", "embedding"
"""The kinds of intermediate: any file (it must exist), a counted table (``virnucpro.tables``), an embedding
file (``virnucpro.engines.embed``)."""
SHOWN = 3  # damaged files named in the message; the rest are counted


@dataclass(frozen=True)
class Shard:
    """One shard's files: its two FASTA inputs, its two embeddings and the prediction made from them."""

    inputs: tuple[str, ...]
    embeddings: tuple[str, ...]
    prediction: str


@dataclass
class Findings:
    """Missing intermediates (to be made again), and damaged ones with what is wrong with each."""

    missing: list[str] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)

    def raise_if_damaged(self) -> None:
        """A UserError naming the damaged files (the first few) and what to do, if there are any."""
        if not self.damaged:
            return
        named = "; ".join(f"{path} ({why})" for path, why in self.damaged[:SHOWN])
        more = f"; and {len(self.damaged) - SHOWN} more" if len(self.damaged) > SHOWN else ""
        files, them = ("this file", "it") if len(self.damaged) == 1 else ("these files", "them")
        raise UserError(f"intermediate files truncated or corrupt: {named}{more}. Delete {files} and run again: "
                        f"the run makes {them} again")  # fmt: skip


def damage(path: str, kind: str, *, whole: bool = False) -> str | None:
    """Why the intermediate at ``path`` cannot be used ("missing" or what is wrong), or None.

    A table must end with its end line; an embedding file must be a whole zip archive, and with ``whole``
    it is read and its checksum compared."""
    if not os.path.exists(path):
        return "missing"
    if kind == TABLE:
        from virnucpro.tables import table_damage

        return table_damage(Path(path))
    if kind == EMBEDDING:
        from virnucpro.engines.embed import embedding_file_damage

        return embedding_file_damage(Path(path), whole=whole)
    return None


def check_intermediates(files: list[tuple[str, str]], shards: list[Shard]) -> Findings:
    """Check a sample's intermediates: ``files`` as (path, kind), and its ``shards``. A shard's input that is
    missing is damage (the shard folder is made whole by one step only); a shard's embeddings are read whole
    when its prediction is missing, damaged or older than one of them (it is to be made again anyway)."""
    found = Findings()

    def note(path: str, why: str | None) -> None:
        if why == "missing":
            found.missing.append(path)
        elif why is not None:
            found.damaged.append((path, why))

    for path, kind in files:
        note(path, damage(path, kind))
    for shard in shards:
        for path in shard.inputs:
            if not os.path.exists(path):
                found.damaged.append((os.path.dirname(path), f"{os.path.basename(path)} is missing"))
        prediction = damage(shard.prediction, TABLE)
        note(shard.prediction, prediction)
        whole = prediction is not None or any(_newer(path, shard.prediction) for path in shard.embeddings)
        for path in shard.embeddings:
            note(path, damage(path, EMBEDDING, whole=whole))
    return found


def _newer(path: str, than: str) -> bool:
    try:
        return os.stat(path).st_mtime_ns > os.stat(than).st_mtime_ns
    except OSError:
        return False
