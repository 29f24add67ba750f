"""Reading ``torch.save`` files without unpickling anything but tensors and an allow-list of types.

Every model file that is a pickle (the ESM-2 checkpoint, DNABERT-S's ``pytorch_model.bin``, the
classifier ``.pth``) goes through ``load_allowlisted``: torch's weights-only unpickler, which builds
plain containers and tensors, plus the classes the caller names. A file that asks for anything else
(``os.system``, ``builtins.exec``, a class of its own) is refused before any of it is built or run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virnucpro.errors import UserError

if TYPE_CHECKING:
    import torch


def load_allowlisted(path: Path, allowed: Iterable[Any] = (), *, mmap: bool = False, hint: str = "") -> Any:
    """``torch.load`` on the CPU with the weights-only unpickler, allowing only ``allowed`` beyond tensors.

    Entries of ``allowed`` are classes or ``(class, "module.QualName")`` pairs. ``mmap`` maps the
    file instead of reading it (an old pre-zipfile file, which cannot be mapped, is read). Every
    problem is a UserError naming ``path``; ``hint`` (what to do) is appended to it.
    """
    import pickle

    import torch

    suffix = f"; {hint}" if hint else ""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found{suffix}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not mmap or "mmap" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = refused_global(str(error))
        if refused is None:
            raise UserError(f"{path}: not a readable torch checkpoint ({_gist(error)}){suffix}") from None
        raise UserError(
            f"refusing to load {path}: it asks to unpickle {refused}, which is not an allowed type; "
            "model files may hold only weights (if you trust this file, re-save its weights as a state dict)"
        ) from None
    except Exception as error:  # torch.load raises many types for a damaged or foreign file
        raise UserError(f"{path}: not a readable torch checkpoint ({_gist(error)}){suffix}") from None


def load_state_dict(path: Path, *, mmap: bool = True, hint: str = "") -> dict[str, torch.Tensor]:
    """A ``torch.save``d ``{name: tensor}`` dict, read with ``load_allowlisted`` (nothing else is allowed)."""
    import torch

    data = load_allowlisted(path, mmap=mmap, hint=hint)
    if not isinstance(data, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in data.items()
    ):
        suffix = f"; {hint}" if hint else ""
        raise UserError(f"{path}: expected a state dict (tensor name -> tensor), found a {type(data).__name__}{suffix}")
    return data


def refused_global(message: str) -> str | None:
    """The name of what torch's weights-only unpickler refused to build, as its message says."""
    for pattern in (r"GLOBAL (\S+?)[,\s]", r"unrecognized function (\S+)", r"but got (<[^>]+>)"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None


def _gist(error: Exception) -> str:
    """The error's type and the gist of its message, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    gist = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return f"{type(error).__name__}: {gist}"[:300]


class MappedPages:
    """Where ``path`` is memory-mapped into this process, to give the pages of copied tensors back (Linux).

    ``torch.load(..., mmap=True)`` maps the whole file once; every page a copy reads stays resident
    (and counts in the process's RSS) until the mapping goes. ``release`` tells the kernel that a
    tensor's pages are no longer needed (``madvise(MADV_DONTNEED)``: a private, unmodified file
    mapping just re-reads them from the file if touched again). It acts only on whole pages inside
    a mapping of ``path`` as listed in ``/proc/self/maps``, never on other memory; elsewhere it does
    nothing.
    """

    _MADV_DONTNEED = 4

    def __init__(self, path: Path) -> None:
        import mmap
        import os

        self._page = mmap.PAGESIZE
        self._ranges: list[tuple[int, int]] = []
        self._madvise = None
        target = os.path.realpath(path)
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].rstrip("\n") == target:
                        start, end = (int(value, 16) for value in fields[0].split("-"))
                        self._ranges.append((start, end))
        except OSError:
            return
        if self._ranges:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise

    def release(self, tensor: torch.Tensor) -> None:
        """Give back the whole pages that lie inside ``tensor``'s storage and inside a mapping of the file."""
        if self._madvise is None or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        first = storage.data_ptr()
        last = first + storage.nbytes()
        start = -(-first // self._page) * self._page
        end = last // self._page * self._page
        for low, high in self._ranges:
            lo, hi = max(start, low), min(end, high)
            if lo < hi:
                self._madvise(lo, hi - lo, self._MADV_DONTNEED)
