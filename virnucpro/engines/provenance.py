"""What made an embedding file: its record (``SampleFiles.embedding_record``), written beside it by the job
that asked for it once the file is complete.

``{"model", "fingerprint", "precision", "input", "bytes"}``: the model's fingerprint, the precision and the
SHA-256 of the shard it was made from are what the workflow compares with the run's before it plans any
daemon (``serving.plan.models_with_work``); ``bytes`` is the size of the embedding file when it was made.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from virnucpro import atomic


def write_record(path: Path, embedding: Path, *, source: Path, model: str, fingerprint: str | None,
                 precision: str | None) -> None:  # fmt: skip
    """Record (atomically) that ``embedding`` was made from ``source`` with this model file and precision."""
    record = {"model": model, "fingerprint": fingerprint, "precision": precision, "input": file_digest(source),
              "bytes": os.stat(embedding).st_size}  # fmt: skip
    atomic.write_text(Path(path), json.dumps(record, sort_keys=True) + "\n")


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's content (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(path: Path) -> dict | None:
    """An embedding's record, or None if there is none (or an unreadable one)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
