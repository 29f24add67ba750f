"""Writing files so that a reader sees the whole file or nothing: the one place that does it.

Every writer makes a temporary file in the destination's folder (same file system), writes and
flushes it, then renames it over the destination (``replace=True``) or links it there only if the
destination does not exist yet (``replace=False``: an output that a later step may already have
used is never overwritten). On any error the temporary file is removed and the destination is left
as it was, so a failed write (a full disk, a killed process) never leaves a half-written file that a
re-run would take as done.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

Check = Callable[[], None]


@contextmanager
def atomic_path(
    path: Path, *, replace: bool = True, permissions: int = 0o644, before_commit: Check | None = None
) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (for writers that take a path, e.g. ``torch.save``);
    on a clean exit it becomes ``path``. With ``replace=False`` an existing ``path`` is kept and
    FileExistsError raised. ``before_commit`` (if given) runs before the temporary file is made and again
    just before it becomes ``path``; if it raises, nothing is left at ``path`` or beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if before_commit is not None:
        before_commit()
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, permissions)
        _sync(temporary)
        if before_commit is not None:
            before_commit()
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails (FileExistsError) if path exists: never overwrites
    except OSError as error:
        if error.filename is None or error.filename == str(temporary):
            error.filename = str(path)  # name the file being written, not its temporary
        raise
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_output(
    path: Path, mode: str = "w", *, replace: bool = True, permissions: int = 0o644, before_commit: Check | None = None
) -> Iterator[IO]:
    """An open file (text ``"w"`` in UTF-8, or binary ``"wb"``) that becomes ``path`` when the block ends
    without an error (``before_commit``: as for ``atomic_path``)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path, replace=replace, permissions=permissions, before_commit=before_commit) as temporary:
        encoding = "utf-8" if mode == "w" else None
        with open(temporary, mode, encoding=encoding, newline="" if mode == "w" else None) as handle:
            yield handle


def write_bytes(path: Path, data: bytes, *, permissions: int = 0o644) -> None:
    """Replace ``path`` by ``data``, atomically."""
    with atomic_output(path, "wb", permissions=permissions) as handle:
        handle.write(data)


def write_text(path: Path, text: str, *, permissions: int = 0o644) -> None:
    """Replace ``path`` by ``text`` (UTF-8), atomically."""
    write_bytes(path, text.encode("utf-8"), permissions=permissions)


def write_json(path: Path, data: Any, *, permissions: int = 0o644) -> None:
    """Replace ``path`` by ``data`` as indented JSON with a final newline, atomically."""
    write_text(path, json.dumps(data, indent=1) + "\n", permissions=permissions)


def _sync(path: Path) -> None:
    """Flush the file's data to disk, so that a rename never publishes a file whose blocks are missing;
    an error here (no space, I/O error) is raised like any write error."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
