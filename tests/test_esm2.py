"""ESM-2 engine: safe loading of the published checkpoint layout, and the published embedding semantics."""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
from pathlib import Path

import esm
import pytest
import torch
from esm.data import Alphabet, FastaBatchedDataset
from esm.model.esm2 import ESM2
from esm2_reference import fair_esm_model, reference_vector

from virnucpro.engines.esm2 import load_esm2
from virnucpro.errors import UserError
from virnucpro.testmodels import write_random_checkpoint

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("esm2") / "esm2_t2_64_test.pt", seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> ESM2:
    return fair_esm_model(checkpoint)


def random_proteins(count: int, longest: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lengths = [1, 2, longest] + [rng.randint(1, longest) for _ in range(count - 3)]
    return ["".join(rng.choice(AMINO_ACIDS) for _ in range(n)) for n in lengths]


def test_vectors_equal_an_independent_single_sequence_computation(checkpoint: Path, reference: ESM2) -> None:
    proteins = random_proteins(12, 400, seed=1)
    embedded = load_esm2(checkpoint).embed(proteins)
    assert embedded.vectors.dtype == torch.float32
    assert embedded.vectors.shape == (len(proteins), 64)
    for row, protein in zip(embedded.vectors, proteins):
        torch.testing.assert_close(row, reference_vector(reference, protein, layer=2), atol=1e-5, rtol=1e-5)


def test_batched_equals_one_at_a_time_across_several_batches(checkpoint: Path) -> None:
    proteins = random_proteins(30, 400, seed=2)
    budget = 700
    assert len(FastaBatchedDataset(proteins, proteins).get_batch_indices(budget, extra_toks_per_seq=1)) > 3
    embedder = load_esm2(checkpoint, toks_per_batch=budget)
    batched = embedder.embed(proteins).vectors
    alone = torch.stack([embedder.embed([protein]).vectors[0] for protein in proteins])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_tokens_count_cls_and_eos_of_every_sequence(checkpoint: Path) -> None:
    proteins = ["M", "MKV", "ACDEFGHIKL"]
    assert load_esm2(checkpoint).embed(proteins).tokens == (1 + 2) + (3 + 2) + (10 + 2)


def test_mean_covers_only_the_first_1024_residues_of_a_longer_protein(checkpoint: Path, reference: ESM2) -> None:
    protein = random_proteins(3, 1100, seed=4)[2]
    assert len(protein) == 1100
    vector = load_esm2(checkpoint).embed([protein]).vectors[0]
    torch.testing.assert_close(vector, reference_vector(reference, protein, layer=2), atol=1e-5, rtol=1e-5)


def test_default_layer_is_the_last_and_an_earlier_layer_gives_its_own_mean(checkpoint: Path, reference: ESM2) -> None:
    proteins = random_proteins(5, 200, seed=5)
    last = load_esm2(checkpoint)
    assert (last.layer, last.num_layers, last.dim) == (2, 2, 64)
    first = load_esm2(checkpoint, layer=1).embed(proteins).vectors
    assert not torch.allclose(first, last.embed(proteins).vectors, atol=1e-3)
    for row, protein in zip(first, proteins):
        torch.testing.assert_close(row, reference_vector(reference, protein, layer=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [-1, 3])
def test_a_layer_the_model_does_not_have_is_refused(checkpoint: Path, layer: int) -> None:
    with pytest.raises(UserError, match="layer"):
        load_esm2(checkpoint, layer=layer)


def test_fair_esm_own_loader_reads_the_written_checkpoint_and_agrees(checkpoint: Path) -> None:
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(checkpoint))
    model.eval()
    proteins = random_proteins(6, 300, seed=6)
    _, _, tokens = alphabet.get_batch_converter()([(str(i), p) for i, p in enumerate(proteins)])
    with torch.no_grad():
        representation = model(tokens, repr_layers=[2])["representations"][2]
    expected = torch.stack([representation[i, 1 : len(p) + 1].mean(0) for i, p in enumerate(proteins)])
    torch.testing.assert_close(load_esm2(checkpoint).embed(proteins).vectors, expected, atol=1e-5, rtol=1e-5)


def test_written_checkpoint_has_the_published_layout(checkpoint: Path) -> None:
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(checkpoint, weights_only=True)
    cfg = data["cfg"]["model"]
    assert isinstance(cfg, argparse.Namespace)
    assert (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads) == (2, 64, 4)
    assert cfg.encoder_ffn_embed_dim == 256 and cfg.token_dropout is True
    names = set(data["model"])
    assert "encoder.sentence_encoder.embed_tokens.weight" in names
    assert "encoder.sentence_encoder.layers.1.self_attn.q_proj.weight" in names
    assert "encoder.lm_head.dense.weight" in names
    assert all(n.startswith(("encoder.sentence_encoder.", "encoder.lm_head.")) for n in names)
    assert {t.dtype for t in data["model"].values()} == {torch.float16}


class _Payload:
    """Unpickling this runs ``function(argument)``: what a malicious checkpoint would carry."""

    def __init__(self, function, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def _malicious_checkpoints(directory: Path, marker: Path) -> list[Path]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(next(directory.glob("esm2_*.pt")), weights_only=True)
    paths = []
    for name, payload in [
        ("system", _Payload(os.system, f"touch {marker}")),
        ("exec", _Payload(exec, f"open({str(marker)!r}, 'w').close()")),
    ]:
        evil = directory / f"esm2_evil_{name}.pt"
        torch.save({**data, "extra": payload}, evil)
        companion = directory / "esm2_t2_64_test-contact-regression.pt"
        shutil.copy(companion, directory / f"esm2_evil_{name}-contact-regression.pt")
        paths.append(evil)
    return paths


def test_a_checkpoint_that_asks_to_run_code_is_refused_and_nothing_runs(checkpoint: Path, tmp_path: Path) -> None:
    shutil.copy(checkpoint, tmp_path / checkpoint.name)
    shutil.copy(checkpoint.with_name(checkpoint.stem + "-contact-regression.pt"), tmp_path)
    marker = tmp_path / "pwned"
    for evil in _malicious_checkpoints(tmp_path, marker):
        with pytest.raises(UserError, match=r"refusing to load .*esm2_evil.*(system|exec).*not an allowed type"):
            load_esm2(evil)
        assert not marker.exists()
    # the payload is live: an unrestricted unpickler does run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_a_missing_checkpoint_is_a_user_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "esm2_t36_3B_UR50D.pt"
    with pytest.raises(UserError, match=str(missing)):
        load_esm2(missing)


def test_a_missing_contact_regression_companion_only_warns(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alone = tmp_path / checkpoint.name
    shutil.copy(checkpoint, alone)
    with caplog.at_level(logging.WARNING, logger="virnucpro.engines.esm2"):
        embedder = load_esm2(alone)
    assert "contact-regression" in caplog.text
    torch.testing.assert_close(embedder.embed(["MKV"]).vectors, load_esm2(checkpoint).embed(["MKV"]).vectors)


def test_weights_that_do_not_fit_the_cfg_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(checkpoint, weights_only=True)
    data["cfg"]["model"].encoder_embed_dim = 32
    wrong = tmp_path / "esm2_wrong.pt"
    torch.save(data, wrong)
    with pytest.raises(UserError, match=r"esm2_wrong\.pt.*shape"):
        load_esm2(wrong)


def test_a_file_without_the_esm2_cfg_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "esm2_other.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, other)
    with pytest.raises(UserError, match="not an ESM-2 checkpoint"):
        load_esm2(other)


def test_a_protein_longer_than_1024_goes_through_whole_not_truncated_as_fair_esm_extract_would(
    checkpoint: Path,
) -> None:
    protein = random_proteins(3, 1300, seed=9)[2]
    embedder = load_esm2(checkpoint)
    whole = embedder.embed([protein]).vectors[0]
    truncated_input = embedder.embed([protein[:1022]]).vectors[0]  # fair-esm extract.py's truncation_seq_length
    first_1024 = embedder.embed([protein[:1024]]).vectors[0]
    # residues past 1024 are not averaged, but they are attended to: the vector is neither of the cut ones
    assert (whole - truncated_input).abs().max() > 1e-3
    assert (whole - first_1024).abs().max() > 1e-3


# --- out of GPU memory: clear the cache, split the batch, retry; give up on a protein only alone ---


class OomAbove:
    """The model, except that a batch of more than ``limit`` tokens raises CUDA's out-of-memory error."""

    def __init__(self, model, limit: int) -> None:
        self.model, self.limit, self.batches = model, limit, []

    def __call__(self, tokens, repr_layers):
        self.batches.append(tokens.shape[0])
        if tokens.numel() > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {tokens.numel()} tokens")
        return self.model(tokens, repr_layers=repr_layers)


def test_out_of_memory_splits_the_batch_and_gives_the_same_vectors(checkpoint: Path) -> None:
    proteins = random_proteins(16, 60, seed=10)
    expected = load_esm2(checkpoint).embed(proteins).vectors
    embedder = load_esm2(checkpoint)
    embedder.model = OomAbove(embedder.model, limit=200)
    embedded = embedder.embed(proteins)
    assert embedded.failed == {} and embedded.out_of_memory > 0
    assert embedder.model.batches[0] == len(proteins)  # one published batch first, then halves
    assert 1 < max(embedder.model.batches[1:]) < len(proteins)
    torch.testing.assert_close(embedded.vectors, expected, atol=1e-5, rtol=1e-5)
    assert embedded.tokens == sum(len(p) + 2 for p in proteins)


def test_a_protein_that_does_not_fit_alone_is_reported_and_the_others_are_embedded(checkpoint: Path) -> None:
    proteins = ["MKV" * 40, "ACDE", "W" * 200, "GHIK" * 5]
    expected = load_esm2(checkpoint).embed(proteins).vectors
    embedder = load_esm2(checkpoint)
    embedder.model = OomAbove(embedder.model, limit=150)
    embedded = embedder.embed(proteins)
    assert set(embedded.failed) == {2}
    assert re.search(r"out of GPU memory even alone \(200 residues\): CUDA out of memory", embedded.failed[2])
    assert torch.isnan(embedded.vectors[2]).all()
    keep = [0, 1, 3]
    torch.testing.assert_close(embedded.vectors[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert embedded.tokens == sum(len(proteins[i]) + 2 for i in keep)


def test_errors_other_than_out_of_memory_are_not_swallowed(checkpoint: Path) -> None:
    embedder = load_esm2(checkpoint)

    def broken(tokens, repr_layers):
        raise RuntimeError("something else")

    embedder.model = broken
    with pytest.raises(RuntimeError, match="something else"):
        embedder.embed(["MKV"])


# --- lean loading ---


def test_loading_never_builds_random_weights_and_places_them_in_the_target_dtype(checkpoint: Path, monkeypatch) -> None:
    def only_on_meta(tensor, *args, **kwargs):
        if tensor.device.type != "meta":
            raise AssertionError(f"random weights of shape {tuple(tensor.shape)} were allocated")
        return tensor

    for initializer in ("kaiming_uniform_", "normal_", "uniform_", "xavier_uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, initializer, only_on_meta)
    embedder = load_esm2(checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in embedder.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in embedder.model.parameters()} == {"cpu"}
    assert embedder.model.lm_head.weight is embedder.model.embed_tokens.weight


def test_missing_checkpoint_message_names_it_and_the_download_command(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"ESM-2 checkpoint not found: .*nothing\.pt; .*virnucpro models download --dest DIR"
    ):
        load_esm2(tmp_path / "nothing.pt")


def test_giving_back_mapped_pages_keeps_the_data_and_never_touches_other_memory(checkpoint: Path) -> None:
    from virnucpro.engines.safeload import MappedPages, load_allowlisted

    data = load_allowlisted(checkpoint, [argparse.Namespace], mmap=True)
    mapped = max(data["model"].values(), key=lambda t: t.numel())
    assert mapped.untyped_storage().nbytes() > 3 * 4096
    before = mapped.clone()
    anonymous = torch.randn(200_000)  # ordinary memory: dropping its pages would zero it
    kept = anonymous.clone()
    pages = MappedPages(checkpoint)
    pages.release(mapped)
    pages.release(anonymous)
    assert torch.equal(mapped, before)  # dropped pages of the file mapping are read again from the file
    assert torch.equal(anonymous, kept)


# --- the fused-attention forward (the default) against fair-esm's own ---


def fair_esm_tokens(proteins: list[str]) -> torch.Tensor:
    """What fair-esm's batch converter makes of the proteins: <cls> residues <eos>, padded."""
    return Alphabet.from_architecture("ESM-1b").get_batch_converter()([(str(i), p) for i, p in enumerate(proteins)])[2]


def test_fused_attention_forward_equals_fair_esm_forward_at_every_layer(checkpoint: Path, reference: ESM2) -> None:
    tokens = fair_esm_tokens(random_proteins(10, 250, seed=12))
    tokens[2, 7] = Alphabet.from_architecture("ESM-1b").mask_idx  # token dropout rescales this row
    real = tokens.ne(Alphabet.from_architecture("ESM-1b").padding_idx)
    assert (~real).any()  # padding really happens
    embedder = load_esm2(checkpoint)
    assert type(embedder.model).__name__ == "SdpaESM2" and isinstance(embedder.model, ESM2)
    with torch.no_grad():
        ours = embedder.model(tokens, repr_layers=[0, 1, 2])["representations"]
        theirs = reference(tokens, repr_layers=[0, 1, 2])["representations"]
    for layer in (0, 1, 2):
        torch.testing.assert_close(ours[layer][real], theirs[layer][real], atol=1e-5, rtol=1e-5)


def test_fair_esm_attention_option_runs_fair_esm_forward_and_gives_the_same_vectors(checkpoint: Path) -> None:
    proteins = random_proteins(20, 300, seed=13)
    fair = load_esm2(checkpoint, attention="fair-esm")
    assert type(fair.model) is ESM2
    torch.testing.assert_close(fair.embed(proteins).vectors, load_esm2(checkpoint).embed(proteins).vectors,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_an_unknown_attention_is_refused(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="attention"):
        load_esm2(checkpoint, attention="flash")


def test_half_precision_keeps_the_rotary_frequencies_in_fp32_and_exact(checkpoint: Path) -> None:
    with torch.serialization.safe_globals([argparse.Namespace]):
        stored = torch.load(checkpoint, weights_only=True)["model"]
    embedder = load_esm2(checkpoint, dtype=torch.bfloat16)
    for index, layer in enumerate(embedder.model.layers):
        inv_freq = layer.self_attn.rot_emb.inv_freq
        assert inv_freq.dtype == torch.float32
        assert torch.equal(
            inv_freq, stored[f"encoder.sentence_encoder.layers.{index}.self_attn.rot_emb.inv_freq"].float()
        )
    assert layer.fc1.weight.dtype == torch.bfloat16


def test_encoding_equals_fair_esm_alphabet_encode(checkpoint: Path) -> None:
    alphabet = Alphabet.from_architecture("ESM-1b")
    embedder = load_esm2(checkpoint)
    letters = "".join(token for token in alphabet.all_toks if len(token) == 1)
    assert len(letters) == 27 and "X" in letters and "-" in letters
    rng = random.Random(14)
    proteins = [letters] + ["".join(rng.choice(letters) for _ in range(rng.randint(1, 80))) for _ in range(50)]
    proteins += ["MK<mask>V", "<unk>AC", "M<cls>K<eos>", "MK V"]  # fair-esm reads special tokens, drops spaces
    for protein in proteins:
        assert embedder.encode(protein) == alphabet.encode(protein), protein
    for unknown in ("MKj", "MKé"):  # fair-esm fails on a letter it does not know, and so do we
        with pytest.raises(KeyError):
            alphabet.encode(unknown)
        with pytest.raises(KeyError):
            embedder.encode(unknown)


def test_the_cpu_batch_budget_is_the_published_2048_unless_given(checkpoint: Path) -> None:
    assert load_esm2(checkpoint).toks_per_batch == 2048
    assert load_esm2(checkpoint, toks_per_batch=500).toks_per_batch == 500


def test_layers_with_different_rotary_frequencies_each_use_their_own(checkpoint: Path, tmp_path: Path) -> None:
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(checkpoint, weights_only=True)
    data["model"]["encoder.sentence_encoder.layers.1.self_attn.rot_emb.inv_freq"] *= 1.5
    changed = tmp_path / "esm2_changed_rotary.pt"
    torch.save(data, changed)
    assert load_esm2(checkpoint).model.shared_rotary
    embedder = load_esm2(changed)
    assert not embedder.model.shared_rotary
    proteins = random_proteins(8, 200, seed=16)
    vectors = embedder.embed(proteins).vectors
    torch.testing.assert_close(vectors, load_esm2(changed, attention="fair-esm").embed(proteins).vectors,
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    assert (vectors - load_esm2(checkpoint).embed(proteins).vectors).abs().max() > 1e-3
