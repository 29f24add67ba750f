"""The DNABERT-2 / DNABERT-S encoder in plain PyTorch (imported lazily: it imports torch).

Our module names are our own; ``published_names`` maps each published tensor name (see
docs/dnabert-s-format.md) to the parameter that holds it, so the shapes expected from a snapshot
are exactly the shapes of this module's parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from virnucpro.engines.dnabert_config import DnabertConfig, alibi_slopes

PADDED_KEY_BIAS = -10000.0
"""Added to the attention scores of padded keys, as the published model code does."""


class _Layer(nn.Module):
    def __init__(self, cfg: DnabertConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.heads = cfg.num_attention_heads
        self.intermediate = i
        self.wqkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.gated = nn.Linear(h, 2 * i, bias=False)
        self.wo = nn.Linear(i, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.wqkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        x = self.attn_norm(self.attn_out(attended) + x)
        gate, value = self.gated(x).split(self.intermediate, dim=-1)
        return self.mlp_norm(self.wo(F.gelu(gate) * value) + x)


class DnabertEncoder(nn.Module):
    """Token ids [B, L] and a mask of real tokens [B, L] -> last hidden states [B, L, H]."""

    def __init__(self, cfg: DnabertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.slopes = alibi_slopes(cfg.num_attention_heads)  # plain floats: untouched by .to(dtype)
        self._slopes_on: dict[torch.device, torch.Tensor] = {}

    def attention_bias(self, real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, heads, L, L]: -slope * |i - j|, plus PADDED_KEY_BIAS on padded keys (padding at the right)."""
        positions = torch.arange(real.shape[1], device=real.device)
        distance = (positions[None, :] - positions[:, None]).abs().to(torch.float32)
        slopes = self._slopes_on.get(real.device)
        if slopes is None:  # made once per device: no copy to the device per batch
            slopes = self._slopes_on[real.device] = torch.tensor(self.slopes, dtype=torch.float32, device=real.device)
        alibi = -slopes[:, None, None] * distance
        padded = (~real).to(torch.float32)[:, None, None, :] * PADDED_KEY_BIAS
        return (alibi[None] + padded).to(dtype)

    def forward(self, input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids) + self.token_type.weight[0]
        x = self.embed_norm(x)
        bias = self.attention_bias(real, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def published_names(cfg: DnabertConfig) -> dict[str, str]:
    """Published tensor name (without any ``bert.`` prefix) -> our parameter name."""
    names = {
        "embeddings.word_embeddings.weight": "word.weight",
        "embeddings.token_type_embeddings.weight": "token_type.weight",
        "embeddings.LayerNorm.weight": "embed_norm.weight",
        "embeddings.LayerNorm.bias": "embed_norm.bias",
    }
    for n in range(cfg.num_hidden_layers):
        theirs, ours = f"encoder.layer.{n}.", f"layers.{n}."
        for published, own in (
            ("attention.self.Wqkv.weight", "wqkv.weight"),
            ("attention.self.Wqkv.bias", "wqkv.bias"),
            ("attention.output.dense.weight", "attn_out.weight"),
            ("attention.output.dense.bias", "attn_out.bias"),
            ("attention.output.LayerNorm.weight", "attn_norm.weight"),
            ("attention.output.LayerNorm.bias", "attn_norm.bias"),
            ("mlp.gated_layers.weight", "gated.weight"),
            ("mlp.wo.weight", "wo.weight"),
            ("mlp.wo.bias", "wo.bias"),
            ("mlp.layernorm.weight", "mlp_norm.weight"),
            ("mlp.layernorm.bias", "mlp_norm.bias"),
        ):
            names[theirs + published] = ours + own
    return names


def expected_shapes(cfg: DnabertConfig) -> dict[str, tuple[int, ...]]:
    """Published tensor name -> the shape that ``cfg`` requires."""
    with torch.device("meta"):
        params = dict(DnabertEncoder(cfg).named_parameters())
    return {theirs: tuple(params[ours].shape) for theirs, ours in published_names(cfg).items()}


def build_encoder(cfg: DnabertConfig, tensors: dict[str, torch.Tensor]) -> DnabertEncoder:
    """An encoder holding ``tensors`` (published names, shapes already checked), on the CPU."""
    with torch.device("meta"):
        encoder = DnabertEncoder(cfg)
    state = {ours: tensors[theirs] for theirs, ours in published_names(cfg).items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval()
