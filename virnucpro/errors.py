"""Errors that the command line reports as one line, without a traceback."""

from __future__ import annotations

import errno
import os

EXIT_USER_ERROR = 2
"""The exit status of a ``virnucpro`` command stopped by a UserError or an environmental error (one line)."""
EXIT_INTERRUPTED = 130
"""The exit status of a ``virnucpro`` command interrupted (SIGINT)."""


class UserError(Exception):
    """A problem with the user's input, files or configuration that the user can fix."""


class EnvironmentalError(UserError):
    """The machine failed, not the data: no space left, an I/O error, no permission, a read-only file
    system, no file descriptor left. Never recorded as a bad shard: the job fails naming the path and the cause, and a re-run
    after the fix does the work."""


ENVIRONMENTAL_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS, errno.EMFILE, errno.ENFILE,
})  # fmt: skip


def environmental(error: BaseException) -> EnvironmentalError | None:
    """``error`` as an EnvironmentalError ("PATH: cause") if the machine caused it, else None."""
    if isinstance(error, EnvironmentalError):
        return error
    if isinstance(error, OSError) and error.errno in ENVIRONMENTAL_ERRNOS:
        where = f"{error.filename}: " if error.filename else ""
        return EnvironmentalError(f"{where}{os.strerror(error.errno)}")
    return None
