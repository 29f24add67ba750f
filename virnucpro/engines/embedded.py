"""What an embedding engine returns for a list of sequences, and its out-of-memory fallback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Embedded:
    """One float32 CPU vector per input sequence, in input order, and the tokens they took."""

    vectors: torch.Tensor
    """float32 on the CPU, shape [number of sequences, model width]; the rows of ``failed`` are NaN."""
    tokens: int
    """Total tokens run through the model, special tokens included, padding and failed sequences excluded."""
    failed: dict[int, str] = field(default_factory=dict)
    """Index (0-based, into the input) -> why that sequence has no vector (it did not fit in GPU memory alone)."""
    out_of_memory: int = 0
    """How many out-of-memory errors were met (and recovered from by clearing the cache and splitting)."""


@dataclass(frozen=True)
class OomOutcome:
    failed: dict[int, str]
    out_of_memory: int


def run_splitting_on_oom(
    batch: list[int],
    run: Callable[[list[int]], None],
    clear_cache: Callable[[], None],
    describe: Callable[[int], str],
) -> OomOutcome:
    """``run(batch)``; on CUDA out-of-memory clear the cache, split the batch in halves and run each.

    ``run`` must have no effect when it raises. A single index that still runs out of memory is
    given up: it is returned in ``failed`` with a reason (``describe(index)`` says what it was).
    Other errors propagate.
    """
    import torch

    failed: dict[int, str] = {}
    errors = 0
    pending = [batch]
    while pending:
        part = pending.pop()
        try:
            run(part)
            continue
        except torch.cuda.OutOfMemoryError as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        # outside the except block: the failed attempt's tensors are no longer referenced
        errors += 1
        clear_cache()
        if len(part) == 1:
            failed[part[0]] = f"out of GPU memory even alone ({describe(part[0])}): {message}"[:500]
        else:
            half = len(part) // 2
            pending += [part[half:], part[:half]]
    return OomOutcome(failed=failed, out_of_memory=errors)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU ``tensor`` on ``device``; to a GPU through pinned memory, without waiting for the copy."""
    import torch

    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
