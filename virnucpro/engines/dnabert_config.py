"""The DNABERT-S snapshot format without torch: its file names, the config.json values that shape the
computation, and the ALiBi slopes they imply.

Below both the loader (``virnucpro.engines.dnabert``) and the encoder (``virnucpro.engines.dnabert_model``):
it imports neither, so the encoder never imports the loader (as fair-esm's ``model/esm2.py`` imports
nothing from ``pretrained.py``). Its errors say what is wrong; the loader adds what to do about it.
See docs/dnabert-s-format.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virnucpro.errors import UserError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
WEIGHT_FORMATS = {"safetensors": SAFETENSORS_FILE, "bin": BIN_FILE}
"""The two weight files a snapshot may hold (model.safetensors is preferred when both are there)."""
SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
"""The published vocabulary starts with these, ids 0 to 4."""
BERT_PREFIX = "bert."
"""Tensor names may carry this prefix (DNABERT-2-117M publishes them so, DNABERT-S without it)."""


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi slope per head: 2^(-8h/n) for h = 1..n when n is a power of two; otherwise those of
    the largest power of two p below n, then every other slope for 2p, until there are n."""
    if n_heads < 1:
        raise ValueError(f"need at least one attention head, got {n_heads}")
    p = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    if p == n_heads:
        return slopes
    return slopes + alibi_slopes(2 * p)[0::2][: n_heads - p]


@dataclass(frozen=True)
class DnabertConfig:
    """The config.json values that shape the computation (the others do not change it)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    type_vocab_size: int
    layer_norm_eps: float


def read_config(path: Path) -> DnabertConfig:
    """Read a snapshot's config.json; ``auto_map`` and the rest are ignored, never run."""
    return config_from_dict(read_json(path), path)


def config_from_dict(data: dict[str, Any], path: Path) -> DnabertConfig:
    """The DnabertConfig of a config.json's contents; ``path`` names the file in errors."""
    values: dict[str, Any] = {}
    for name, kind in (
        ("vocab_size", int),
        ("hidden_size", int),
        ("num_hidden_layers", int),
        ("num_attention_heads", int),
        ("intermediate_size", int),
        ("type_vocab_size", int),
        ("layer_norm_eps", float),
    ):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"{path}: key '{name}' is missing or not a positive number")
        if kind is int and value != int(value):
            raise UserError(f"{path}: key '{name}' must be a whole number, found {value}")
        values[name] = kind(value)
    config = DnabertConfig(**values)
    if config.hidden_size % config.num_attention_heads:
        raise UserError(
            f"{path}: hidden_size {config.hidden_size} is not a multiple of "
            f"num_attention_heads {config.num_attention_heads}"
        )
    return config


def read_json(path: Path) -> dict[str, Any]:
    """A snapshot's JSON file as a dict, or a UserError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
