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
        self.never_write: list[str] = []
        self._open_folders: dict[str, tuple[str, int]] = {}  # descriptor path -> (real path, descriptor)
        for path in never_write:
            self.protect(path)
        for descriptor in (1, 2):  # the daemon's log, when its output goes to a file
            try:
                if stat.S_ISREG(os.fstat(descriptor).st_mode):
                    self.protect(os.readlink(f"/proc/self/fd/{descriptor}"))
            except OSError:
                continue

    def protect(self, path: Path | str) -> None:
        """Never write ``path``: a file, or a folder and every file below it, also where such a file is a
        link to elsewhere (as in a Hugging Face snapshot)."""
        places = {os.path.realpath(path)}
        if os.path.isdir(path):
            for folder, folders, files in os.walk(path):  # links are not followed, only resolved
                links = [os.path.join(folder, name) for name in folders + files]
                places.update(os.path.realpath(link) for link in links if os.path.islink(link))
        self.never_write += sorted(places - set(self.never_write))

    def check(self, path: str, what: str) -> str:
        """The resolved path of a request's file, if it may be used: absolute, under a root, and for an
        ``output``, outside the run folder and the model files. ProtocolError otherwise."""
        if not os.path.isabs(path):
            raise ProtocolError(f"{what} path '{short(path)}' must be absolute")
        real = os.path.realpath(path)
        if self._root_of(real) is None:
            raise ProtocolError(f"{what} path '{short(path)}' is outside the allowed roots ({', '.join(self.roots)})")
        if what == "output" and any(_under(real, place) for place in self.never_write):
            raise ProtocolError(f"output path '{short(path)}' is in the run folder, the model files or the daemon's "
                                "log or statistics: refused")  # fmt: skip
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
        folder = os.path.dirname(real)
        descriptor = self._open_beneath(folder, directory=True)
        path = Path(f"/proc/self/fd/{descriptor}")
        self._open_folders[str(path)] = (folder, descriptor)
        try:
            yield path
        finally:
            del self._open_folders[str(path)]
            os.close(descriptor)

    def check_in_place(self, folder: Path) -> None:
        """ProtocolError unless the open output ``folder`` (from ``output_folder``) is still the folder of its
        checked path: not moved, renamed or replaced since it was opened (and so still under its root)."""
        real, descriptor = self._open_folders[str(folder)]
        opened = os.fstat(descriptor)
        try:
            now = os.stat(real, follow_symlinks=False)
            where = os.readlink(folder)
        except OSError:
            now, where = None, "elsewhere"
        if now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino) or where != real:
            raise ProtocolError(f"output folder '{short(real, PATH_LIMIT)}' was moved or replaced while the shard "
                                f"was computed: refused, nothing written there")  # fmt: skip

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
