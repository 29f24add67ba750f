"""DNABERT-S: the native encoder reproduces the published computation and reads the published layout."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from virnucpro.engines.dnabert import load_dnabert_s, token_batches
from virnucpro.engines.dnabert_config import alibi_slopes
from virnucpro.errors import UserError
from virnucpro.testmodels import write_random_snapshot

# The key set of the published zhihan1996/DNABERT-S config.json.
PUBLISHED_CONFIG_KEYS = {
    "_name_or_path", "alibi_starting_size", "architectures", "attention_probs_dropout_prob", "auto_map",
    "classifier_dropout", "gradient_checkpointing", "hidden_act", "hidden_dropout_prob", "hidden_size",
    "initializer_range", "intermediate_size", "layer_norm_eps", "max_position_embeddings", "model_type",
    "num_attention_heads", "num_hidden_layers", "pad_token_id", "position_embedding_type", "torch_dtype",
    "transformers_version", "type_vocab_size", "use_cache", "vocab_size",
}  # fmt: skip


def published_encoder_names(layers: int) -> set[str]:
    names = {
        "embeddings.word_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    }
    for i in range(layers):
        for suffix in (
            "attention.self.Wqkv.weight", "attention.self.Wqkv.bias",
            "attention.output.dense.weight", "attention.output.dense.bias",
            "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
            "mlp.gated_layers.weight", "mlp.wo.weight", "mlp.wo.bias",
            "mlp.layernorm.weight", "mlp.layernorm.bias",
        ):  # fmt: skip
            names.add(f"encoder.layer.{i}.{suffix}")
    return names


def random_dna(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("ACGT") for _ in range(length))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_snapshot(tmp_path_factory.mktemp("dnabert") / "snapshot", seed=3)


@pytest.fixture(scope="module")
def model(snapshot: Path):
    return load_dnabert_s(snapshot)


# --- an independent reference: the published computation, one sequence, written out plainly ---


def reference_slopes(n_heads: int) -> list[float]:
    """Press et al.'s ALiBi slopes: geometric 2^(-8/n) for a power of two n, else interleaved."""
    if math.log2(n_heads).is_integer():
        return [2 ** (-8 * (h + 1) / n_heads) for h in range(n_heads)]
    below = 2 ** int(math.log2(n_heads))
    return reference_slopes(below) + reference_slopes(2 * below)[::2][: n_heads - below]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_embedding(snapshot: Path, sequence: str) -> torch.Tensor:
    """float64 mean over all tokens of the last hidden state, computed from the raw files."""
    config = json.loads((snapshot / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
    raw = load_file(snapshot / "model.safetensors")
    w = {k.removeprefix("bert."): v.double() for k, v in raw.items()}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    inter, eps = config["intermediate_size"], config["layer_norm_eps"]
    d = hidden // heads
    ids = tokenizer.encode(sequence).ids
    n = len(ids)
    x = torch.stack([w["embeddings.word_embeddings.weight"][t] for t in ids])
    x = x + w["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    slopes = reference_slopes(heads)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        qkv = x @ w[p + "attention.self.Wqkv.weight"].T + w[p + "attention.self.Wqkv.bias"]
        q, k, v = qkv[:, :hidden], qkv[:, hidden : 2 * hidden], qkv[:, 2 * hidden :]
        context = torch.zeros(n, hidden, dtype=torch.float64)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(d)
            for a in range(n):
                for b in range(n):
                    scores[a, b] -= slopes[h] * abs(a - b)
            probs = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            probs = probs / probs.sum(dim=1, keepdim=True)
            context[:, cols] = probs @ v[:, cols]
        attn = context @ w[p + "attention.output.dense.weight"].T + w[p + "attention.output.dense.bias"]
        x = layer_norm(
            attn + x, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps
        )
        g = x @ w[p + "mlp.gated_layers.weight"].T
        gate, value = g[:, :inter], g[:, inter:]
        gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
        out = (gelu * value) @ w[p + "mlp.wo.weight"].T + w[p + "mlp.wo.bias"]
        x = layer_norm(out + x, w[p + "mlp.layernorm.weight"], w[p + "mlp.layernorm.bias"], eps)
    return x.sum(dim=0) / n


# --- (a) the computation ---


def test_embeddings_equal_an_independent_reference_of_the_published_computation(snapshot, model):
    rng = random.Random(11)
    sequences = ["ACGTAGCATCGGATCTATCTATCGACACTTGGTTATCGATCTACGAGCATCTCGTTAGC", "A", "", random_dna(rng, 120)]
    vectors = model.embed(sequences).vectors
    assert vectors.dtype == torch.float32 and vectors.shape == (4, 64)
    for row, sequence in enumerate(sequences):
        expected = reference_embedding(snapshot, sequence)
        assert torch.allclose(vectors[row].double(), expected, atol=1e-5, rtol=0), sequence
    # not degenerate: different sequences give clearly different vectors
    assert (vectors[0] - vectors[3]).abs().max() > 0.05


# --- (b) batching with padding ---


def test_batched_with_padding_equals_one_at_a_time(model):
    rng = random.Random(5)
    lengths = [1, 2, 3, 7, 50, 99, 150, 151, 300, 333, 499, 500, 501, 598, 599, 600]
    lengths += [rng.randint(1, 600) for _ in range(16)]
    sequences = [random_dna(rng, n) for n in lengths]
    token_counts = [len(model.tokenize(s)) for s in sequences]
    assert len(set(token_counts)) > 10  # padding really happens inside batches
    batched = model.embed(sequences, max_tokens_per_batch=1024)
    assert len(token_batches(token_counts, 1024)) < len(sequences) / 2
    for row, sequence in enumerate(sequences):
        alone = model.embed([sequence]).vectors[0]
        assert torch.allclose(batched.vectors[row], alone, atol=1e-5, rtol=0), len(sequence)
    assert batched.tokens == sum(token_counts)


class _OomAbove:
    """The encoder, except that a batch of more than ``limit`` token slots raises CUDA's out-of-memory error."""

    def __init__(self, encoder, limit: int) -> None:
        self.encoder, self.limit = encoder, limit

    def __call__(self, input_ids, real):
        if input_ids.numel() > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.encoder(input_ids, real)


def test_out_of_memory_splits_batches_and_reports_only_a_sequence_too_big_alone(snapshot, model):
    rng = random.Random(6)
    sequences = [random_dna(rng, n) for n in (40, 90, 700, 60, 120, 30)]
    expected = model.embed(sequences).vectors
    squeezed = load_dnabert_s(snapshot)
    squeezed.encoder = _OomAbove(squeezed.encoder, limit=len(squeezed.tokenize(sequences[4])) * 2)
    embedded = squeezed.embed(sequences, max_tokens_per_batch=100000)
    assert set(embedded.failed) == {2} and "out of GPU memory even alone" in embedded.failed[2]
    assert embedded.out_of_memory >= 2 and torch.isnan(embedded.vectors[2]).all()
    keep = [0, 1, 3, 4, 5]
    assert torch.allclose(embedded.vectors[keep], expected[keep], atol=1e-5, rtol=0)
    assert embedded.tokens == sum(len(model.tokenize(sequences[i])) for i in keep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_still_returns_float32_vectors_close_to_fp32(snapshot, model, dtype):
    sequences = ["ACGT" * 40, "GATTACA", "CCCGGGTTTAAA" * 9]
    low = load_dnabert_s(snapshot, dtype=dtype).embed(sequences).vectors
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, model.embed(sequences).vectors).min() > 0.999


def test_embedding_nothing_gives_an_empty_matrix_of_the_model_width(model):
    result = model.embed([])
    assert result.vectors.shape == (0, model.dim) and result.tokens == 0


def test_token_batches_respect_the_budget_of_size_times_longest_and_cover_every_index():
    lengths = [5, 40, 12, 40, 3, 100, 7, 250]
    batches = token_batches(lengths, 100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 100 or len(batch) == 1
    assert [7] in batches  # over the budget: alone


# --- (c) layouts and formats ---


def embeddings_of(directory: Path, sequences: list[str]) -> torch.Tensor:
    return load_dnabert_s(directory).embed(sequences).vectors


def test_bert_prefixed_layout_with_mlm_head_and_bare_layout_with_pooler_give_identical_vectors(tmp_path):
    bare = write_random_snapshot(tmp_path / "bare", seed=9)
    prefixed = write_random_snapshot(tmp_path / "prefixed", seed=9, bert_prefix=True)
    bare_names = set(load_file(bare / "model.safetensors"))
    prefixed_names = set(load_file(prefixed / "model.safetensors"))
    assert bare_names == published_encoder_names(2) | {"pooler.dense.weight", "pooler.dense.bias"}
    assert {n.removeprefix("bert.") for n in prefixed_names if n.startswith("bert.")} == published_encoder_names(2)
    assert any(n.startswith("cls.predictions.") for n in prefixed_names)
    sequences = ["ACGTTGCA" * 20, "GATTACA", "T"]
    assert torch.equal(embeddings_of(bare, sequences), embeddings_of(prefixed, sequences))


def test_pytorch_model_bin_and_model_safetensors_give_identical_vectors(tmp_path):
    from_bin = write_random_snapshot(tmp_path / "bin", seed=4, formats=("bin",))
    from_safetensors = write_random_snapshot(tmp_path / "st", seed=4, formats=("safetensors",))
    assert (from_bin / "pytorch_model.bin").is_file() and not (from_bin / "model.safetensors").exists()
    assert isinstance(torch.load(from_bin / "pytorch_model.bin", weights_only=True), dict)
    sequences = ["CCGGAATT" * 30, "ACGTN"]
    assert torch.equal(embeddings_of(from_bin, sequences), embeddings_of(from_safetensors, sequences))


def test_random_snapshot_has_the_published_files_and_config_keys_and_is_reproducible(tmp_path, snapshot):
    again = write_random_snapshot(tmp_path / "again", seed=3)
    names = {p.name for p in again.iterdir()}
    assert names == {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "model.safetensors"}  # fmt: skip
    config = json.loads((again / "config.json").read_text())
    assert set(config) == PUBLISHED_CONFIG_KEYS
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    for name in names:
        assert (again / name).read_bytes() == (snapshot / name).read_bytes(), name


def test_tokenizer_file_is_a_bpe_with_the_published_special_tokens_and_template():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        directory = write_random_snapshot(Path(tmp) / "s")
        data = json.loads((directory / "tokenizer.json").read_text())
    assert data["model"]["type"] == "BPE" and data["model"]["unk_token"] == "[UNK]"
    vocab = data["model"]["vocab"]
    assert [vocab[t] for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert all(letter in vocab for letter in "ACGTN")
    assert len(data["model"]["merges"]) > 300 and all(isinstance(m, str) for m in data["model"]["merges"])
    assert data["pre_tokenizer"]["type"] == "Whitespace"
    single = data["post_processor"]["single"]
    assert data["post_processor"]["type"] == "TemplateProcessing"
    assert [next(iter(part.values()))["id"] for part in single] == ["[CLS]", "A", "[SEP]"]


# --- (d) errors the user can act on ---


def copy_snapshot(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_mis_shaped_tensor_is_refused_naming_the_file_and_tensor(tmp_path, snapshot):
    broken = copy_snapshot(snapshot, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    tensors["encoder.layer.1.mlp.wo.weight"] = torch.zeros(64, 100)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors.*'encoder\.layer\.1\.mlp\.wo\.weight'.*\[64, 100\]"):
        load_dnabert_s(broken)


def test_missing_tensor_is_refused_naming_the_file_and_tensor(tmp_path, snapshot):
    broken = copy_snapshot(snapshot, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    del tensors["encoder.layer.0.attention.self.Wqkv.bias"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(
        UserError, match=r"model\.safetensors.*'encoder\.layer\.0\.attention\.self\.Wqkv\.bias'.*missing"
    ):
        load_dnabert_s(broken)


def test_missing_snapshot_folder_is_refused_naming_it(tmp_path):
    with pytest.raises(
        UserError, match=r"snapshot folder not found: .*nowhere; .*virnucpro models download --dest DIR"
    ):
        load_dnabert_s(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_missing_snapshot_file_is_refused_naming_it_and_where_it_looked(tmp_path, snapshot, name):
    broken = copy_snapshot(snapshot, tmp_path / "broken")
    (broken / name).unlink()
    with pytest.raises(UserError, match=rf"{name} is missing \(looked for .*broken/{name}\)"):
        load_dnabert_s(broken)


def test_missing_weights_are_refused_naming_both_accepted_files(tmp_path, snapshot):
    broken = copy_snapshot(snapshot, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"neither model\.safetensors nor pytorch_model\.bin"):
        load_dnabert_s(broken)


class _Payload:
    """Unpickling this runs ``os.system(command)``: what a malicious weights file would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickled_code_in_pytorch_model_bin_is_refused_without_running_it(tmp_path, snapshot):
    broken = copy_snapshot(snapshot, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    weights = load_file(snapshot / "model.safetensors")
    torch.save({**weights, "x": _Payload(f"touch {marker}")}, broken / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"refusing to load .*pytorch_model\.bin: it asks to unpickle .*system"):
        load_dnabert_s(broken)
    assert not marker.exists()
    torch.load(broken / "pytorch_model.bin", weights_only=False)  # the payload is live when unrestricted
    assert marker.exists()


def test_pytorch_model_bin_that_is_not_a_state_dict_is_refused(tmp_path, snapshot):
    broken = copy_snapshot(snapshot, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    torch.save([torch.zeros(3)], broken / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin: expected a state dict .*found a list.*models download"):
        load_dnabert_s(broken)


def test_tokenizer_without_cls_sep_template_is_refused(tmp_path, snapshot):
    broken = copy_snapshot(snapshot, tmp_path / "broken")
    data = json.loads((broken / "tokenizer.json").read_text())
    data["post_processor"] = None
    (broken / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"tokenizer\.json: .*\[CLS\] \.\.\. \[SEP\]"):
        load_dnabert_s(broken)


# --- (e) tokenizer ---


def test_tokenizer_wraps_the_bpe_tokens_in_cls_and_sep(model, snapshot):
    sequence = "ACGTAGCATCGGATCTATCTATCGACACTTGG"
    bare = Tokenizer.from_file(str(snapshot / "tokenizer.json")).encode(sequence, add_special_tokens=False)
    assert model.tokenize(sequence) == [1, *bare.ids, 2]
    assert len(bare.ids) < len(sequence)  # merges are used
    assert model.tokenize("") == [1, 2]


# --- (f) ALiBi slopes ---


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8, 12, 16, 20])
def test_alibi_slopes_follow_the_standard_formula(heads):
    assert alibi_slopes(heads) == pytest.approx(reference_slopes(heads), rel=1e-12)


def test_alibi_slopes_for_twelve_heads_are_the_eight_head_ones_then_odd_sixteenths():
    expected = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert alibi_slopes(12) == pytest.approx(expected, rel=1e-12)


def test_importing_the_module_does_not_import_torch():
    code = "import sys, virnucpro.engines.dnabert, virnucpro.engines.embedded; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_a_compiled_encoder_gives_the_same_vectors(snapshot, model):
    sequences = ["ACGTTGCA" * 20, "GATTACA", "T"]
    compiled = load_dnabert_s(snapshot, compile_model=True).embed(sequences).vectors
    assert torch.allclose(compiled, model.embed(sequences).vectors, atol=1e-5, rtol=0)
