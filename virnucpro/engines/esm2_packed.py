"""ESM-2 on packed batches: the proteins of a batch back to back, without padding (imported lazily: torch).

A packed batch (``PackedBatch``, made on the host by ``pack``) is one stream of N tokens, ``<cls>``
residues ``<eos>`` per protein, with each token's segment (protein) and position in it, the segments'
boundaries ``cu_seqlens`` (what variable-length attention kernels take), and the rows to average per
protein (positions 1 .. its end, ends at most 1,024 as published). The forward
(``packed_representation``) runs fair-esm's arithmetic on [N, E] with the model's own layer regions
(``virnucpro.engines.esm2_model``): token dropout per protein, rotary tables indexed by each token's
position, attention within each segment only. The attention is PyTorch's variable-length kernel
where it has one for the device and dtype (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10;
``aten._flash_attention_forward`` before it; CUDA, bf16/fp16), else ``padded_attention``: the same
attention on a padded copy of q, k, v made for it alone (the CPU, fp32), so that everything else stays
packed. ``packed_means`` averages on the device: the kept rows are laid out [S, max_len, E] in the
model's dtype and reduced in fp32 as the padded path reduces them (a sequential sum, e.g. a product
with a 0/1 selection, is 3x less accurate over 1,024 rows); no fp32 copy of anything padded.

Bucketed batches (``bucket_budget``) have few distinct shapes, so that a CUDA graph recorded for one
shape serves many batches: the tokens are padded up to a power of two (or the budget) with padding segments of their own,
the segment count up to a power of two with empty segments, the longest segment up to a power of two.
``GraphedForward`` records one CUDA graph per such shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from virnucpro.engines.esm2_model import MASK_RATIO_TRAIN, rotary_tables

log = logging.getLogger(__name__)

MIN_TOKENS, MIN_SEGMENTS, MIN_LENGTH = 256, 8, 64
"""The smallest bucket of each size (tokens, segments, longest segment)."""
GRAPHS = 32
"""At most this many CUDA graphs (bucket shapes) are recorded; other shapes run without one."""
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "PackedBatch", float], torch.Tensor]
"""``attend(q, k, v, batch, scale)``: q, k, v [N, H, D] -> [N, H, D], attention within each segment."""


@dataclass(frozen=True)
class PackedBatch:
    """One packed batch (host or device tensors); see the module doc. S = segments (proteins first)."""

    tokens: torch.Tensor
    """[N] int64 token ids."""
    positions: torch.Tensor
    """[N] int64: each token's position in its segment."""
    segments: torch.Tensor
    """[N] int64: each token's segment."""
    cu_seqlens: torch.Tensor
    """[S + 1] int32: where each segment starts, then N."""
    lengths: torch.Tensor
    """[S] int64: tokens per segment (1 for an empty one): token dropout's denominator."""
    masked: torch.Tensor
    """[S] int64: ``<mask>`` tokens per segment."""
    kept: torch.Tensor
    """[K] int64: the rows averaged, protein after protein."""
    kept_at: torch.Tensor
    """[K] int64: where each kept row goes in the [S + 1, max_len] layout of the mean (row S: bucket filler)."""
    ends: torch.Tensor
    """[S] int64: rows averaged per segment (1 for padding segments)."""
    max_len: int
    """An upper bound of the segments' lengths (the longest, or its bucket)."""
    count: int
    """The proteins: the first ``count`` segments."""

    def map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> PackedBatch:
        """The same batch with ``move`` applied to every tensor."""
        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name not in _SCALARS})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SCALARS}

    @property
    def shape_key(self) -> tuple[int, ...]:
        """What a compiled graph or a CUDA graph of this batch depends on."""
        return (self.tokens.shape[0], self.lengths.shape[0], self.kept.shape[0], self.max_len)


_SCALARS = ("max_len", "count")


def packed_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length (shortest first, as fair-esm's batching), cut into batches of at most
    ``budget`` tokens (``length + 2`` per protein); a protein longer than the budget has a batch alone."""
    batches: list[list[int]] = []
    total = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        size = lengths[index] + 2
        if batches and total + size <= budget:
            batches[-1].append(index)
            total += size
        else:
            batches.append([index])
            total = size
    return batches


def power_of_two(count: int, floor: int) -> int:
    return max(floor, 1 << (count - 1).bit_length())


def token_bucket(count: int, budget: int) -> int:
    """The bucket of ``count`` tokens: the next power of two, or the budget when that lies between."""
    size = power_of_two(count, MIN_TOKENS)
    return budget if count <= budget < size else size


def pack(
    encoded: list[list[int]], ends: list[int], special: dict[str, int], bucket_budget: int | None = None
) -> PackedBatch:
    """The packed batch of proteins given as token ids without ``<cls>``/``<eos>`` (``encoded``), each averaging
    rows 1 .. ``ends[i]``; ``special`` holds the alphabet's ``cls``, ``eos``, ``padding`` and ``mask`` ids.
    With ``bucket_budget`` (the batch token budget) the shapes are bucketed (see the module doc)."""
    cls, eos, pad = special["cls"], special["eos"], special["padding"]
    sizes = [len(ids) + 2 for ids in encoded]
    stream = [token for ids in encoded for token in (cls, *ids, eos)]
    max_len = max(sizes)
    if bucket_budget is not None:
        max_len = power_of_two(max_len, MIN_LENGTH)
        spare = token_bucket(len(stream), bucket_budget) - len(stream)
        while spare > 0:  # padding tokens, in segments no longer than max_len
            part = min(spare, max_len)
            sizes.append(part)
            stream += [pad] * part
            spare -= part
    slots = power_of_two(len(sizes), MIN_SEGMENTS) if bucket_budget is not None else len(sizes)
    count, empty = len(encoded), slots - len(sizes)
    size = torch.tensor(sizes, dtype=torch.int64)
    starts = torch.cumsum(size, 0) - size
    segments = torch.repeat_interleave(torch.arange(len(sizes)), size)
    positions = torch.arange(len(stream)) - starts[segments]
    end = torch.tensor(ends + [0] * (len(sizes) - count), dtype=torch.int64)
    kept = torch.nonzero((positions >= 1) & (positions <= end[segments])).flatten()
    kept_at = segments[kept] * max_len + positions[kept] - 1
    if bucket_budget is not None:  # a fixed count of kept rows: the others go to a dropped row
        fill = len(stream) - kept.shape[0]
        kept = torch.cat((kept, torch.zeros(fill, dtype=torch.int64)))
        kept_at = torch.cat((kept_at, torch.full((fill,), slots * max_len, dtype=torch.int64)))
    cu_seqlens = torch.cat(
        (torch.zeros(1, dtype=torch.int64), torch.cumsum(size, 0), torch.full((empty,), len(stream)))
    )
    mask = special["mask"]
    return PackedBatch(
        tokens=torch.tensor(stream, dtype=torch.int64),
        positions=positions,
        segments=segments,
        cu_seqlens=cu_seqlens.to(torch.int32),
        lengths=torch.tensor(sizes + [1] * empty, dtype=torch.int64),
        masked=torch.tensor([ids.count(mask) for ids in encoded] + [0] * (slots - count), dtype=torch.int64),
        kept=kept,
        kept_at=kept_at,
        ends=torch.tensor(ends + [1] * (slots - count), dtype=torch.int64),
        max_len=max_len,
        count=count,
    )


def packed_representation(model: Any, batch: PackedBatch, layer: int, attend: Attention) -> torch.Tensor:
    """The representation [N, E] of ``layer`` for the packed tokens: ``SdpaESM2.forward``'s arithmetic per token."""
    tokens = batch.tokens
    x = model.embed_scale * model.embed_tokens(tokens)
    if model.token_dropout:
        x = x.masked_fill(tokens.eq(model.mask_idx).unsqueeze(-1), 0.0)
        observed = batch.masked.to(x.dtype) / batch.lengths
        x = x * (1 - MASK_RATIO_TRAIN) / (1 - observed)[batch.segments, None]
    tables = None
    for index in range(layer):
        block = model.layers[index]
        if tables is None or not model.shared_rotary:
            cos, sin = rotary_tables(block.self_attn.rot_emb.inv_freq, batch.max_len, x.dtype)
            tables = cos[batch.positions].unsqueeze(1), sin[batch.positions].unsqueeze(1)  # [N, 1, D]
        q, k, v = model.regions.inputs(block, x, *tables, model.fused_qkv, False)
        attended = attend(q, k, v, batch, block.self_attn.scaling)
        x = model.regions.output(block, x, attended.flatten(1))
    if layer == model.num_layers:
        x = model.emb_layer_norm_after(x)
    return x


def packed_means(representation: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[S, E] float32: each segment's mean of its kept rows, summed in fp32 from the model's dtype."""
    slots, width = batch.ends.shape[0], representation.shape[1]
    laid_out = representation.new_zeros(((slots + 1) * batch.max_len, width))
    laid_out[batch.kept_at] = representation.index_select(0, batch.kept)
    sums = laid_out.unflatten(0, (slots + 1, batch.max_len)).sum(dim=1, dtype=torch.float32)
    return sums[:slots] / batch.ends[:, None]


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, scale: float
) -> torch.Tensor:
    """Attention within each segment on a padded copy [S, H, max_len, D] of q, k, v (PyTorch's fused attention,
    padding keys masked out), given back packed: the stand-in where no variable-length kernel runs."""
    slots, length = batch.cu_seqlens.shape[0] - 1, batch.max_len
    where = batch.segments * length + batch.positions

    def spread(t: torch.Tensor) -> torch.Tensor:
        padded = t.new_zeros((slots * length, *t.shape[1:]))
        padded[where] = t
        return padded.unflatten(0, (slots, length)).transpose(1, 2)

    sizes = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    keep = (torch.arange(length, device=q.device)[None, :] < sizes[:, None])[:, None, None, :]
    attended = F.scaled_dot_product_attention(spread(q), spread(k), spread(v), attn_mask=keep, scale=scale)
    return attended.transpose(1, 2).flatten(0, 1)[where]


def varlen_entry() -> tuple[Callable[..., torch.Tensor], str] | None:
    """PyTorch's own variable-length attention, ``f(q, k, v, cu_seqlens, max_len)``, and its name; None if this
    torch has none (``varlen_attn`` came with torch 2.10; the aten flash entry point is older)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        flash = getattr(torch.ops.aten, "_flash_attention_forward", None)
        if flash is None:
            return None

        def aten_flash(q, k, v, cu_seqlens, max_len):
            return flash(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, False, False)[0]

        return aten_flash, "aten._flash_attention_forward"

    def public(q, k, v, cu_seqlens, max_len):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)

    return public, "torch.nn.attention.varlen.varlen_attn"


def choose_attention(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> tuple[Attention, str]:
    """The packed attention for this device and dtype, and one line saying which (and why not the kernel).

    The variable-length kernel is tried once on a small batch and compared with ``padded_attention``;
    it is used only if it runs and agrees (its scale is fixed at 1/sqrt(head_dim), ESM-2's own)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return padded_attention, f"attention on padded copies (no variable-length kernel for {dtype} on {device.type})"
    entry = varlen_entry()
    if entry is None:
        return padded_attention, f"attention on padded copies (torch {torch.__version__} has no variable-length kernel)"
    kernel, name = entry

    def attend(q, k, v, batch, scale):  # v of the fused projection is a strided view: made contiguous
        return kernel(q.contiguous(), k.contiguous(), v.contiguous(), batch.cu_seqlens, batch.max_len)

    try:
        trial = pack([[5] * 3, [6] * 7, [7] * 20], [3, 7, 20], {"cls": 0, "eos": 2, "padding": 1, "mask": 32})
        trial = trial.map(lambda t: t.to(device))
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(trial.tokens.shape[0], heads, head_dim, device=device, generator=generator, dtype=dtype)
                   for _ in range(3))  # fmt: skip
        got = attend(q, k, v, trial, head_dim**-0.5).float()
        expected = padded_attention(q, k, v, trial, head_dim**-0.5).float()
        if not torch.allclose(got, expected, atol=2e-2, rtol=2e-2):
            raise RuntimeError(f"differs from padded attention by {(got - expected).abs().max().item():.3g}")
    except RuntimeError as error:  # e.g. no kernel for this GPU or head width
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return padded_attention, f"attention on padded copies ({name} failed here: {first})"
    return attend, f"variable-length attention ({name})"


class GraphedForward:
    """``forward(batch)`` replayed from one CUDA graph per batch shape (``PackedBatch.shape_key``).

    A new shape is run twice on a side stream (warm-up: compilation, workspace allocation), then recorded
    with static copies of the batch's tensors; later batches of that shape are copied into those and the
    graph replayed. The result is a fresh tensor (the graph's own output is overwritten by the next replay).
    After ``GRAPHS`` shapes, other shapes run without a graph, as does a shape whose recording fails.
    """

    def __init__(self, forward: Callable[[PackedBatch], torch.Tensor]) -> None:
        self.forward = forward
        self.graphs: dict[tuple[int, ...], tuple[PackedBatch, Any, torch.Tensor] | None] = {}

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        key = batch.shape_key
        if key not in self.graphs:
            if len(self.graphs) >= GRAPHS:
                return self.forward(batch)
            try:
                self.graphs[key] = self._record(batch)
            except RuntimeError as error:  # e.g. a kernel that cannot be captured: this shape runs without a graph
                if isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                log.warning("ESM-2: no CUDA graph for packed batches of shape %s (%s); they run without one",
                            key, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)  # fmt: skip
                self.graphs[key] = None
        entry = self.graphs[key]
        if entry is None:
            return self.forward(batch)
        static, graph, output = entry
        for name, tensor in static.tensors().items():
            tensor.copy_(getattr(batch, name), non_blocking=True)
        graph.replay()
        return output.clone()

    def _record(self, batch: PackedBatch) -> tuple[PackedBatch, Any, torch.Tensor]:
        static = batch.map(torch.clone)
        side = torch.cuda.Stream(batch.tokens.device)
        side.wait_stream(torch.cuda.current_stream(batch.tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(static)
        torch.cuda.current_stream(batch.tokens.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.forward(static)
        log.info("ESM-2: CUDA graph recorded for packed batches of shape %s", batch.shape_key)
        return static, graph, output
