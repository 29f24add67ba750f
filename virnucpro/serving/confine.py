"""What a daemon may read and write: files under its allowed roots, opened so that no interleaving
reads or writes elsewhere (docs/daemons.md, "Transport and access control").

A requested path is resolved once (symbolic links inside the roots are fine) and must then lie under
a root; it is opened by walking from the root's folder one component at a time without following any
symbolic link, so a folder swapped for a link after the check makes the open fail instead of leading
outside. The open file or folder is then used through its descriptor (``/proc/self/fd/N``), never
through its name again. A daemon never writes into the run folder, over its model files, or over the
file it reads.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from virnucpro.serving.protocol import ProtocolError, short

_WALK = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_LIMIT = 1000  # characters of a resolved path in a message (a file's name is worth more than 80)


class Confinement:
    """The allowed roots of a daemon, and the places it must never write to even under them."""

    def __init__(self, roots: list[Path | str], never_write: list[Path | str]):
        self.roots = [os.path.realpath(root) for root in roots]
        self.never_write = [os.path.realpath(path) for path in never_write]

    def check(self, path: str, what: str) -> str:
        """The resolved path of a request's file, if it may be used: absolute, under a root, and for an
        ``output``, outside the run folder and the model files. ProtocolError otherwise."""
        if not os.path.isabs(path):
            raise ProtocolError(f"{what} path '{short(path)}' must be absolute")
        real = os.path.realpath(path)
        if self._root_of(real) is None:
            raise ProtocolError(f"{what} path '{short(path)}' is outside the allowed roots ({', '.join(self.roots)})")
        if what == "output" and any(_under(real, place) for place in self.never_write):
            raise ProtocolError(f"output path '{short(path)}' is in the run folder or the model files: refused")
        return real

    @contextmanager
    def open_input(self, real: str) -> Iterator[Path]:
        """A path that reads the regular file ``real`` as it was found under its root (``/proc/self/fd``)."""
        descriptor = self._open_beneath(real, directory=False)
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise ProtocolError(f"input '{short(real, PATH_LIMIT)}' is not a regular file")
            yield Path(f"/proc/self/fd/{descriptor}")
        finally:
            os.close(descriptor)

    @contextmanager
    def output_folder(self, real: str) -> Iterator[Path]:
        """A path of the folder that will hold the output ``real``, as it was found under its root; its
        files are created and renamed through it."""
        descriptor = self._open_beneath(os.path.dirname(real), directory=True)
        try:
            yield Path(f"/proc/self/fd/{descriptor}")
        finally:
            os.close(descriptor)

    def _root_of(self, real: str) -> str | None:
        return next((root for root in self.roots if _under(real, root)), None)

    def _open_beneath(self, real: str, directory: bool) -> int:
        root = self._root_of(real)
        if root is None:
            raise ProtocolError(f"'{short(real, PATH_LIMIT)}' is outside the allowed roots")
        parts = [part for part in os.path.relpath(real, root).split(os.sep) if part not in ("", ".")]
        descriptor = os.open(root, _WALK | os.O_DIRECTORY)
        try:
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                flags = _WALK | (os.O_DIRECTORY if directory or not last else 0)
                try:
                    following = os.open(part, flags, dir_fd=descriptor)
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):  # a symbolic link, or not a folder, on the way
                        raise ProtocolError(f"'{short(real, PATH_LIMIT)}' changed while it was being opened (a symbolic "
                                            "link on the way): refused") from None  # fmt: skip
                    raise
                os.close(descriptor)
                descriptor = following
            return descriptor
        except BaseException:
            os.close(descriptor)
            raise


def _under(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder
