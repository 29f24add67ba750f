"""What an embedding engine returns for a list of sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Embedded:
    """One float32 CPU vector per input sequence, in input order, and the tokens they took."""

    vectors: torch.Tensor
    """float32 on the CPU, shape [number of sequences, model width]."""
    tokens: int
    """Total tokens run through the model, special tokens included, padding excluded."""
