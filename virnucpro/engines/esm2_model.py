"""ESM-2 inference with PyTorch's fused attention (imported lazily: it imports torch and fair-esm).

``SdpaESM2`` is fair-esm's ``ESM2`` (same submodules and parameter names, so a checkpoint loads into
it unchanged) whose forward computes the requested representations with
``torch.nn.functional.scaled_dot_product_attention`` instead of fair-esm's explicit attention. It
follows fair-esm's forward step by step (token-dropout scaling, zeroed padding, pre-layer-norm
layers with rotary q/k, the final layer norm on the last layer), and it

- never builds the attention weights (fair-esm computes them in fp32 and averages them per layer),
- stops after the highest layer asked for and skips the language-model head (no logits),
- never waits for the device (fair-esm asks ``padding_mask.any()`` on the host every batch),
- computes the rotary tables once per batch, in fp32 whatever the model dtype (in bf16, fair-esm's own
  tables round the positions above 256 and the frequencies to 8 bits; its fp32 results are unchanged).

A layer is two regions around its attention, ``attention_inputs`` (layer norm, the q/k/v projection,
rotary q/k) and ``layer_output`` (output projection, residual, feed-forward); ``configure`` chooses
the three separate projections or one on the concatenated weights (``attach_fused_qkv``), and plain
or ``torch.compile``d regions (regional compilation: the layers share the regions' graphs). The packed
forward (``virnucpro.engines.esm2_packed``) runs the same regions on [N, E] tokens without padding.

In fp32 its representations equal fair-esm's to within float rounding (tests/test_esm2.py).
Asking for attention weights or contacts runs fair-esm's own forward; with ``load_esm2`` that works
in fp32 only (in bf16/fp16 the rotary frequencies stay in fp32, which fair-esm's attention cannot mix).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2

MASK_RATIO_TRAIN = 0.15 * 0.8
"""fair-esm's token-dropout constant: the embeddings are scaled by (1 - this) / (1 - observed mask ratio)."""


def attention_inputs(
    layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool, heads_first: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's q, k, v of ``x`` [..., T, E]: [..., T, H, D], or [B, H, T, D] when ``heads_first`` (with q and k
    rotated by ``cos``/``sin``, which broadcast against that shape). ``fused``: one projection on the
    concatenated weights (``attach_fused_qkv``) instead of three."""
    attention = layer.self_attn
    h = layer.self_attn_layer_norm(x)
    if fused:
        q, k, v = (
            F.linear(h, attention.qkv_weight, attention.qkv_bias).unflatten(-1, (3, attention.num_heads, -1)).unbind(-3)
        )
    else:
        q, k, v = (
            p(h).unflatten(-1, (attention.num_heads, -1))
            for p in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
    if heads_first:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def layer_output(layer: Any, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a layer after its attention: ``x`` plus the projected ``attended`` [..., E], then the feed-forward."""
    x = x + layer.self_attn.out_proj(attended)
    return x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))


@dataclass(frozen=True)
class Regions:
    """The two parts of a layer around its attention, plain or compiled."""

    inputs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = attention_inputs
    output: Callable[..., torch.Tensor] = layer_output


COMPILED_SHAPES = 64
"""How many graphs each compiled region may hold (torch's default is 8; dtypes, the projection choice and
sizes 0/1, which dynamic shapes specialise, each add one); past it a region runs uncompiled."""


class SdpaESM2(ESM2):
    """fair-esm's ESM2 with a representations-only forward on fused attention (see the module docstring)."""

    shared_rotary = False
    """True once ``share_rotary_buffers`` found every layer's rotary frequencies equal."""
    fused_qkv = False
    """Whether the forward projects q, k, v at once (``configure``)."""
    regions = Regions()

    def share_rotary_buffers(self) -> None:
        """Let the layers hold one rotary buffer when their frequencies are equal (as published), so that
        the forward computes the cos/sin tables once per batch instead of once per layer."""
        first = self.layers[0].self_attn.rot_emb
        if all(torch.equal(layer.self_attn.rot_emb.inv_freq, first.inv_freq) for layer in self.layers):
            for layer in self.layers:
                layer.self_attn.rot_emb.inv_freq = first.inv_freq
            self.shared_rotary = True

    def attach_fused_qkv(self, fused: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give each layer's attention its concatenated q/k/v weight [3E, E] and bias [3E]: the storage that its
        ``q_proj``, ``k_proj`` and ``v_proj`` parameters view (non-persistent buffers: the state dict is unchanged)."""
        for layer, (weight, bias) in zip(self.layers, fused, strict=True):
            layer.self_attn.register_buffer("qkv_weight", weight, persistent=False)
            layer.self_attn.register_buffer("qkv_bias", bias, persistent=False)

    def configure(self, *, fused_qkv: bool, compile_regions: bool) -> None:
        """Choose the q/k/v projection, and plain or compiled regions (compiled with dynamic shapes: one graph
        per region serves every batch shape, and every layer)."""
        if fused_qkv and not hasattr(self.layers[0].self_attn, "qkv_weight"):
            raise ValueError("fused_qkv needs the concatenated weights (attach_fused_qkv)")
        self.fused_qkv = fused_qkv
        if not compile_regions:
            self.regions = Regions()
            return
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILED_SHAPES)
        self.regions = Regions(torch.compile(attention_inputs, dynamic=True), torch.compile(layer_output, dynamic=True))

    def forward(
        self,
        tokens: torch.Tensor,
        repr_layers: Any = (),
        need_head_weights: bool = False,
        return_contacts: bool = False,
    ) -> dict[str, Any]:
        """``{"representations": {layer: [B, T, E]}}`` for each layer of ``repr_layers`` (no logits)."""
        if need_head_weights or return_contacts:
            return super().forward(tokens, repr_layers, need_head_weights, return_contacts)
        wanted = set(repr_layers)
        if not wanted <= set(range(self.num_layers + 1)):
            raise ValueError(f"repr_layers {sorted(wanted)} outside 0..{self.num_layers}")
        padding = tokens.eq(self.padding_idx)
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.token_dropout:
            masked = tokens.eq(self.mask_idx)
            x = x.masked_fill(masked.unsqueeze(-1), 0.0)
            observed = masked.sum(-1).to(x.dtype) / (~padding).sum(-1)
            x = x * (1 - MASK_RATIO_TRAIN) / (1 - observed)[:, None, None]
        x = x * (1 - padding.unsqueeze(-1).type_as(x))
        representations = {0: x} if 0 in wanted else {}
        keep = (~padding)[:, None, None, :]  # [B, 1, 1, T]: the keys that take part
        tables = None
        for index in range(max(wanted, default=0)):
            layer = self.layers[index]
            if tables is None or not self.shared_rotary:
                tables = rotary_tables(layer.self_attn.rot_emb.inv_freq, tokens.shape[1], x.dtype)
            x = self._layer(layer, x, keep, *tables)
            if index + 1 in wanted:
                representations[index + 1] = x
        if self.num_layers in wanted:
            representations[self.num_layers] = self.emb_layer_norm_after(x)
        return {"representations": representations}

    def _layer(
        self, layer: Any, x: torch.Tensor, keep: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """One fair-esm TransformerLayer on [B, T, E] (fair-esm works on [T, B, E]; the arithmetic is the same,
        except that q's scaling is applied inside the fused attention: exact when the head width is a power of 4)."""
        q, k, v = self.regions.inputs(layer, x, cos, sin, self.fused_qkv, True)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=layer.self_attn.scaling)
        return self.regions.output(layer, x, attended.transpose(1, 2).flatten(2))


def rotary_tables(inv_freq: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, D] of positions 0..T-1 times the rotary frequencies, computed in fp32, given in ``dtype``."""
    positions = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
    frequencies = torch.outer(positions, inv_freq.float())
    angles = torch.cat((frequencies, frequencies), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fair-esm's rotary embedding: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
