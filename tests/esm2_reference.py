"""fair-esm's own ESM-2, built by hand from a checkpoint's tensors: the independent reference of the ESM-2 tests."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from esm.data import Alphabet
from esm.model.esm2 import ESM2


def fair_esm_model(checkpoint: Path) -> ESM2:
    """fair-esm's ESM2 in fp32 with the file's tensors (read here, not by the code under test)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = data["cfg"]["model"]
    state = {}
    for name, tensor in data["model"].items():
        for prefix in ("encoder.sentence_encoder.", "encoder."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        state[name] = tensor.float()
    regression = torch.load(checkpoint.with_name(checkpoint.stem + "-contact-regression.pt"), weights_only=True)
    state.update({name: tensor.float() for name, tensor in regression["model"].items()})
    model = ESM2(cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads, "ESM-1b", cfg.token_dropout)
    model.load_state_dict(state, strict=True)
    return model.eval()


def reference_vector(model: ESM2, sequence: str, layer: int) -> torch.Tensor:
    """One sequence alone: <cls> residues <eos>, representation of ``layer``, mean of residues 1..min(1024, len)."""
    alphabet = Alphabet.from_architecture("ESM-1b")
    tokens = torch.tensor([[alphabet.cls_idx, *(alphabet.get_idx(a) for a in sequence), alphabet.eos_idx]])
    with torch.no_grad():
        representation = model(tokens, repr_layers=[layer])["representations"][layer][0]
    last = min(1024, len(sequence))
    return representation[1 : last + 1].mean(0)
