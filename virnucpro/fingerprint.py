"""The identity of a model on disk: what decides whether results made with it are still valid.

A fingerprint covers a model file, or every file of a model folder (a DNABERT-S snapshot), by name,
size and modification time: replacing, editing or touching the model changes it, moving the run's
folder does not. Reading metadata only, it costs milliseconds even for the 5.7 GB ESM-2 checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from virnucpro.errors import UserError


def model_fingerprint(path: Path) -> str:
    """A short hex digest of the model at ``path`` (a file, or a folder and the files below it)."""
    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            parts = [[str(p.relative_to(path)), *_version(p)] for p in files]
        else:
            parts = [[path.name, *_version(path)]]
    except OSError as error:
        raise UserError(f"{path}: cannot read the model ({error.strerror or error})") from None
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _version(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns
