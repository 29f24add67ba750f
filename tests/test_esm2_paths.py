"""ESM-2 engine paths (``esm2_engine``): each gives today's vectors in fp32 on the CPU, within 1e-6 relative L2.

Today's vectors are the default engine's, themselves checked against fair-esm in tests/test_esm2.py;
the packed path is also checked against fair-esm's own forward directly. The proteins mix lengths:
1 aa, 1,022 aa (1,024 tokens), above 1,024 aa (the mean stops at 1,024), and others up to 400.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from esm.data import Alphabet
from esm2_reference import fair_esm_model, reference_vector

from virnucpro.engines.esm2 import load_esm2
from virnucpro.engines.esm2_options import EngineOptions, parse_engine
from virnucpro.engines.esm2_packed import (
    choose_attention,
    pack,
    packed_batches,
    packed_representation,
    padded_attention,
    varlen_entry,
)
from virnucpro.engines.pipeline import prefetched
from virnucpro.errors import UserError

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
TOLERANCE = 1e-6
BUDGET = 1500
"""A token budget below the longest protein: several batches, and proteins alone in theirs."""
SPECIAL = {"cls": 0, "eos": 2, "padding": 1, "mask": 32}
"""ESM-2's alphabet's special ids (fair-esm's ESM-1b alphabet)."""


def relative_l2(vectors: torch.Tensor, reference: torch.Tensor) -> float:
    return ((vectors - reference).norm(dim=1) / reference.norm(dim=1)).max().item()


@pytest.fixture(scope="module")
def checkpoint(test_models: dict[str, Path]) -> Path:
    return test_models["esm2"]


@pytest.fixture(scope="module")
def proteins() -> list[str]:
    rng = random.Random(21)
    lengths = [1, 1022, 1100, 1300, 2, 166, 166, 500] + [rng.randint(1, 400) for _ in range(30)]
    return ["".join(rng.choice(AMINO_ACIDS) for _ in range(n)) for n in lengths]


@pytest.fixture(scope="module")
def today(checkpoint: Path, proteins: list[str]) -> torch.Tensor:
    return load_esm2(checkpoint, toks_per_batch=BUDGET).embed(proteins).vectors


@pytest.mark.parametrize("setting", [
    "fused-qkv", "packed", "device-mean", "overlap", "packed,cuda-graphs",
    "fused-qkv,packed,device-mean,cuda-graphs,overlap",
])  # fmt: skip
def test_each_path_gives_todays_vectors(checkpoint: Path, proteins: list[str], today: torch.Tensor, setting: str):
    embedder = load_esm2(checkpoint, toks_per_batch=BUDGET, engine=setting)
    assert str(embedder.options) == setting
    embedded = embedder.embed(proteins)
    assert embedded.vectors.shape == today.shape and embedded.vectors.dtype == torch.float32
    assert relative_l2(embedded.vectors, today) <= TOLERANCE
    assert embedded.tokens == sum(len(p) + 2 for p in proteins)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["compile", "all"])
def test_the_compiled_layer_gives_todays_vectors(checkpoint: Path, proteins: list[str], today: torch.Tensor, setting):
    embedder = load_esm2(checkpoint, toks_per_batch=BUDGET, engine=setting)
    assert embedder.options.compile
    assert relative_l2(embedder.embed(proteins).vectors, today) <= TOLERANCE
    assert relative_l2(embedder.embed(proteins[::-1]).vectors, today.flip(0)) <= TOLERANCE  # shapes met again


def test_the_packed_path_equals_fair_esm_forward_one_protein_at_a_time(checkpoint: Path, proteins: list[str]):
    reference = fair_esm_model(checkpoint)
    expected = torch.stack([reference_vector(reference, protein, layer=2) for protein in proteins])
    packed = load_esm2(checkpoint, toks_per_batch=BUDGET, engine="packed,fused-qkv").embed(proteins).vectors
    assert relative_l2(packed, expected) <= TOLERANCE


def test_the_packed_forward_scales_token_dropout_per_protein_as_fair_esm(checkpoint: Path):
    alphabet = Alphabet.from_architecture("ESM-1b")
    rng = random.Random(22)
    encoded = [[alphabet.get_idx(rng.choice(AMINO_ACIDS)) for _ in range(n)] for n in (7, 30, 12)]
    encoded[1][4] = encoded[1][9] = alphabet.mask_idx  # this protein's embeddings are scaled by its own ratio
    embedder = load_esm2(checkpoint)
    batch = pack(encoded, [len(ids) for ids in encoded], SPECIAL)
    with torch.inference_mode():
        packed = packed_representation(embedder.model, batch, 2, padded_attention)
    tokens = embedder._tokens(encoded)
    with torch.no_grad():
        padded = fair_esm_model(checkpoint)(tokens, repr_layers=[2])["representations"][2]
    expected = padded[batch.segments, batch.positions]
    assert relative_l2(packed, expected) <= TOLERANCE


def test_fused_qkv_projection_is_the_storage_of_the_three_projections(checkpoint: Path):
    model = load_esm2(checkpoint, dtype=torch.bfloat16).model
    attention = model.layers[1].self_attn
    width = attention.q_proj.weight.shape[0]
    assert attention.qkv_weight.shape == (3 * width, width) and attention.qkv_weight.dtype == torch.bfloat16
    for index, projection in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        assert projection.weight.untyped_storage().data_ptr() == attention.qkv_weight.untyped_storage().data_ptr()
        assert torch.equal(projection.weight, attention.qkv_weight[index * width : (index + 1) * width])
        assert torch.equal(projection.bias, attention.qkv_bias[index * width : (index + 1) * width])
    assert not any("qkv" in name for name in model.state_dict())  # the state dict is the published one


def test_pack_lays_proteins_back_to_back_with_boundaries_positions_and_averaged_rows():
    batch = pack([[5, 6, 7], [8], [9] * 1100], [3, 1, 1024], SPECIAL)
    assert batch.tokens.tolist() == [0, 5, 6, 7, 2, 0, 8, 2, 0, *[9] * 1100, 2]
    assert batch.cu_seqlens.tolist() == [0, 5, 8, 1110] and batch.cu_seqlens.dtype == torch.int32
    assert batch.positions.tolist() == [*range(5), *range(3), *range(1102)]
    assert batch.segments.tolist() == [0] * 5 + [1] * 3 + [2] * 1102
    assert batch.kept.tolist() == [1, 2, 3, 6, *range(9, 9 + 1024)]  # residues 1..end, the mean stops at 1,024
    assert batch.ends.tolist() == [3, 1, 1024] and batch.lengths.tolist() == [5, 3, 1102]
    assert (batch.max_len, batch.count) == (1102, 3)


def test_bucketed_pack_fills_fixed_shapes_with_padding_segments_that_are_never_averaged():
    batch = pack([[5] * 40, [6] * 70], [40, 70], SPECIAL, bucket_budget=2048)
    tokens, slots = batch.tokens.shape[0], batch.lengths.shape[0]
    assert (tokens, batch.max_len, slots) == (256, 128, 8)  # 114 tokens -> 256; longest 72 -> 128
    sizes = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    assert sizes[:2] == [42, 72] and sum(sizes) == 256 and max(sizes) <= batch.max_len
    assert sizes[2:4] == [128, 14] and sizes[4:] == [0] * 4  # padding tokens, then empty segments
    assert (batch.tokens[114:] == SPECIAL["padding"]).all()
    assert batch.kept.shape[0] == tokens  # a fixed count; the fillers go to the dropped row
    assert (batch.kept_at[110:] == slots * batch.max_len).all() and (batch.kept_at[:110] < 2 * batch.max_len).all()
    assert pack([[5] * 1990], [1024], SPECIAL, bucket_budget=2048).tokens.shape[0] == 2048  # the budget bounds it
    assert pack([[5] * 3000], [1024], SPECIAL, bucket_budget=2048).tokens.shape[0] == 4096  # a protein over it


def test_padded_attention_is_attention_within_each_segment():
    batch = pack([[5] * 3, [6] * 60, [7]], [3, 60, 1], SPECIAL, bucket_budget=2048)
    generator = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(batch.tokens.shape[0], 4, 16, generator=generator) for _ in range(3))
    got = padded_attention(q, k, v, batch, 0.25)
    bounds = batch.cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            one = F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v)), scale=0.25)
            torch.testing.assert_close(got[start:end], one.transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_packed_batches_fill_the_budget_shortest_first_and_a_long_protein_goes_alone():
    lengths = [100, 3000, 5, 400, 100, 1500]
    batches = packed_batches(lengths, 2048)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [lengths[i] for batch in batches for i in batch] == sorted(lengths)
    assert batches == [[2, 0, 4, 3], [5], [1]]
    assert all(sum(lengths[i] + 2 for i in batch) <= 2048 for batch in batches if len(batch) > 1)


def test_out_of_memory_in_a_packed_batch_splits_it_and_gives_the_same_vectors(checkpoint: Path, proteins, today):
    embedder = load_esm2(checkpoint, toks_per_batch=BUDGET, engine="packed,overlap")
    forward, seen = embedder.packed_forward, []

    def at_most_600_tokens(batch):
        seen.append(batch.count)
        if batch.tokens.shape[0] > 600 and batch.count > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate a packed batch")
        if batch.tokens.shape[0] > 1200:  # the proteins above 1,200 aa do not fit even alone
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate a long protein")
        return forward(batch)

    embedder.packed_forward = at_most_600_tokens
    embedded = embedder.embed(proteins)
    long = {i for i, p in enumerate(proteins) if len(p) + 2 > 1200}
    assert set(embedded.failed) == long and embedded.out_of_memory > len(long)
    assert torch.isnan(embedded.vectors[sorted(long)]).all()
    kept = [i for i in range(len(proteins)) if i not in long]
    assert relative_l2(embedded.vectors[kept], today[kept]) <= TOLERANCE
    assert embedded.tokens == sum(len(proteins[i]) + 2 for i in kept)


def test_the_engine_setting_is_parsed_and_wrong_ones_are_refused_in_one_line():
    assert parse_engine("default") == parse_engine(None) == EngineOptions() and EngineOptions().is_default
    every = parse_engine("all")
    assert all(getattr(every, name) for name in EngineOptions.__dataclass_fields__)
    assert str(every) == "fused-qkv,packed,device-mean,compile,cuda-graphs,overlap"
    assert parse_engine(" Packed, fused-qkv ") == EngineOptions(packed=True, fused_qkv=True)
    assert parse_engine("packed,cuda-graphs").bucketed and not parse_engine("packed,compile").bucketed
    for wrong, message in (("turbo", "unknown ESM-2 engine setting 'turbo'"), (",", "unknown"),
                           ("cuda-graphs", "cuda-graphs needs packed")):  # fmt: skip
        with pytest.raises(UserError, match=message) as raised:
            parse_engine(wrong)
        assert "\n" not in str(raised.value)


def test_fair_esm_own_forward_has_only_the_default_engine(checkpoint: Path):
    with pytest.raises(ValueError, match="needs attention='sdpa'"):
        load_esm2(checkpoint, attention="fair-esm", engine="packed")


def test_on_the_cpu_the_packed_attention_is_the_padded_stand_in_and_says_so():
    attend, how = choose_attention(torch.device("cpu"), torch.float32, 4, 16)
    assert attend is padded_attention and "no variable-length kernel" in how
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 10):  # PyTorch's public variable-length attention
        assert varlen_entry()[1] == "torch.nn.attention.varlen.varlen_attn"


def test_prefetch_prepares_ahead_in_a_background_thread_keeps_order_and_raises_where_it_failed():
    threads = set()

    def prepare(item: int) -> int:
        threads.add(threading.current_thread().name)
        if item == 5:
            raise KeyError("bad letter")
        return item * 10

    got = []
    with pytest.raises(KeyError, match="bad letter"):
        for item, prepared in prefetched(range(8), prepare, background=True):
            got.append((item, prepared))
    assert got == [(i, i * 10) for i in range(5)]
    assert all(name.startswith("prefetch") for name in threads)
    assert list(prefetched(range(3), prepare, background=False)) == [(0, 0), (1, 10), (2, 20)]


# --- on a CUDA GPU only (the benchmark's machine): the kernel and the graphs against the CPU-tested paths ---

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_a_gpu_the_variable_length_kernel_agrees_with_padded_attention(dtype):
    attend, how = choose_attention(torch.device("cuda"), dtype, 40, 64)
    assert attend is not padded_attention, how
    batch = pack([[5] * n for n in (1, 166, 1022, 40)], [1, 166, 1022, 40], SPECIAL).map(lambda t: t.cuda())
    q, k, v = (torch.randn(batch.tokens.shape[0], 40, 64, device="cuda", dtype=dtype) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v, batch, 0.125).float(), padded_attention(q, k, v, batch, 0.125).float(),
                               atol=2e-2, rtol=2e-2)  # fmt: skip


@cuda
def test_on_a_gpu_every_path_gives_the_default_vectors(checkpoint: Path, proteins: list[str]):
    today_gpu = load_esm2(checkpoint, device="cuda", toks_per_batch=BUDGET).embed(proteins).vectors
    every_but_compile = "fused-qkv,packed,device-mean,cuda-graphs,overlap"  # compiling: the benchmark's drift rows
    for setting in ("packed", "packed,cuda-graphs", every_but_compile):
        embedder = load_esm2(checkpoint, device="cuda", toks_per_batch=BUDGET, engine=setting)
        assert relative_l2(embedder.embed(proteins).vectors, today_gpu) <= 1e-5, setting
        assert relative_l2(embedder.embed(proteins).vectors, today_gpu) <= 1e-5, setting  # graphs replayed
    low = load_esm2(checkpoint, device="cuda", dtype=torch.bfloat16, toks_per_batch=BUDGET, engine=every_but_compile)
    assert F.cosine_similarity(low.embed(proteins).vectors, today_gpu).min() > 0.99
