"""Precision: fp32 is the default and the reference; bf16 and fp16 stay close to it; anything else is refused."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from virnucpro.engines.embed import load_embedder
from virnucpro.errors import UserError
from virnucpro.pipeline import predict
from virnucpro.testmodels import make_test_models

COSINE_FLOOR = 0.99
"""The documented bound for bf16/fp16 against fp32 on the small models (measured: see docs/models.md)."""


@pytest.fixture(scope="module")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_models(tmp_path_factory.mktemp("models"), seed=5)


def sequences(model: str) -> list[str]:
    rng = random.Random(8)
    letters = "ACDEFGHIKLMNPQRSTVWY" if model == "esm2" else "ACGT"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(20, 120))) for _ in range(8)]


def half_precision_works_on_this_cpu(dtype: torch.dtype) -> bool:
    try:
        torch.nn.functional.layer_norm(torch.ones(2, 4, dtype=dtype), (4,)) @ torch.ones(4, 2, dtype=dtype)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("model", ["esm2", "dnabert_s"])
def test_fp32_is_the_default_precision(test_models, model):
    default = load_embedder(model, test_models[model]).embed(sequences(model)).vectors
    explicit = load_embedder(model, test_models[model], precision="fp32").embed(sequences(model)).vectors
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["esm2", "dnabert_s"])
def test_half_precision_vectors_are_float32_and_close_to_fp32(test_models, model, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if not half_precision_works_on_this_cpu(dtype):
        pytest.skip(f"torch {torch.__version__} cannot run {precision} on this CPU")
    reference = load_embedder(model, test_models[model]).embed(sequences(model)).vectors
    low = load_embedder(model, test_models[model], precision=precision)
    assert {p.dtype for p in getattr(low, "model", getattr(low, "encoder", None)).parameters()} == {dtype}
    vectors = low.embed(sequences(model)).vectors
    assert vectors.dtype == torch.float32 and vectors.shape == reference.shape
    cosine = torch.nn.functional.cosine_similarity(vectors, reference)
    assert cosine.min() > COSINE_FLOOR
    assert not torch.equal(vectors, reference)  # the precision really changed


@pytest.mark.parametrize("precision", ["fp8", "FP32", "float32", ""])
def test_an_unknown_precision_is_a_clear_error(test_models, precision):
    with pytest.raises(UserError, match=rf"unknown precision '{precision}': choose one of fp32, bf16, fp16"):
        load_embedder("esm2", test_models["esm2"], precision=precision)


def test_predict_refuses_an_unknown_precision_before_writing_anything(test_models, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(UserError, match="unknown precision 'int8'"):
        predict(
            Path(__file__).parent / "data" / "demo_reads.fa",
            500,
            esm2=test_models["esm2"],
            dnabert_s=test_models["dnabert_s"],
            classifier=test_models["classifier_500"],
            output_dir=output,
            precision="int8",
        )
    assert not any(output.rglob("*.txt"))
