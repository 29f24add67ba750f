"""Classifier: the published whole-module pickle read safely, its scores, and its other file forms."""

from __future__ import annotations

import builtins
import json
import os
import pickletools
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import virnucpro.classify.classifier as classifier_module
from virnucpro.classify.classifier import classify, convert_classifier, load_classifier
from virnucpro.errors import UserError
from virnucpro.testmodels import write_published_classifier

INPUT_DIM = 48
HIDDEN_DIM = 32


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_published_classifier(tmp_path_factory.mktemp("clf") / "300_model.pth", INPUT_DIM, HIDDEN_DIM, seed=7)


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(200, INPUT_DIM, generator=torch.Generator().manual_seed(11)) * 2


class _StandIn(torch.nn.Module):
    """The test's own receiver for ``__main__.MLPClassifier``, to read the trusted file without the code under test."""


def published_weights(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    monkeypatch.setattr(sys.modules["__main__"], "MLPClassifier", _StandIn, raising=False)
    module = torch.load(path, weights_only=False)
    return {name: value.double().numpy() for name, value in module.state_dict().items()}


def numpy_probabilities(w: dict[str, np.ndarray], x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    h = x @ w["hidden_layer.weight"].T + w["hidden_layer.bias"]
    h = (h - w["bn1.running_mean"]) / np.sqrt(w["bn1.running_var"] + eps) * w["bn1.weight"] + w["bn1.bias"]
    h = np.maximum(h, 0.0)
    logits = h @ w["output_layer.weight"].T + w["output_layer.bias"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_written_classifier_is_a_whole_module_pickle_of_main_mlpclassifier(published: Path) -> None:
    with zipfile.ZipFile(published) as archive:
        pickle_bytes = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    globals_named = {arg for op, arg, _ in pickletools.genops(pickle_bytes) if op.name == "GLOBAL"}
    assert "__main__ MLPClassifier" in globals_named
    assert {"torch.nn.modules.linear Linear", "torch.nn.modules.batchnorm BatchNorm1d"} <= globals_named
    assert "torch.nn.modules.dropout Dropout" in globals_named
    assert not hasattr(sys.modules["__main__"], "MLPClassifier")


def test_probabilities_equal_an_independent_numpy_computation(
    published: Path, features: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = published_weights(published, monkeypatch)
    assert np.abs(weights["bn1.running_mean"]).max() > 0.05 and np.abs(weights["bn1.running_var"] - 1).max() > 0.05
    probabilities = classify(load_classifier(published), features)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (len(features), 2)
    expected = numpy_probabilities(weights, features.double().numpy())
    np.testing.assert_allclose(probabilities.numpy(), expected, atol=1e-6, rtol=0)
    assert (expected[:, 1] > expected[:, 0]).any() and (expected[:, 1] < expected[:, 0]).any()


def test_loaded_classifier_is_in_eval_mode_with_the_published_parts(published: Path) -> None:
    model = load_classifier(published)
    assert not model.training
    assert model.hidden_layer.in_features == INPUT_DIM and model.hidden_layer.out_features == HIDDEN_DIM
    assert isinstance(model.bn1, torch.nn.BatchNorm1d) and model.dropout.p == 0.5


def test_scores_do_not_depend_on_the_batch_size(
    published: Path, features: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_classifier(published)
    whole = classify(model, features)
    monkeypatch.setattr(classifier_module, "BATCH", 7)
    torch.testing.assert_close(classify(model, features), whole, atol=1e-6, rtol=0)


def test_state_dict_and_safetensors_forms_give_the_same_scores(
    published: Path, features: torch.Tensor, tmp_path: Path
) -> None:
    expected = classify(load_classifier(published), features)
    state_file = tmp_path / "300_state.pth"
    torch.save(load_classifier(published).state_dict(), state_file)
    safetensors_file = tmp_path / "300_model.safetensors"
    convert_classifier(published, safetensors_file)
    for path in (state_file, safetensors_file):
        torch.testing.assert_close(classify(load_classifier(path), features), expected, atol=0, rtol=0)


def test_convert_round_trips_and_records_the_dims(published: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    convert_classifier(published, first)
    convert_classifier(first, second)
    with safe_open(first, "pt") as a, safe_open(second, "pt") as b:
        assert json.loads(a.metadata()["dims"]) == {"input_dim": INPUT_DIM, "hidden_dim": HIDDEN_DIM, "num_class": 2}
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class _Payload:
    """Unpickling this runs ``function(argument)``: what a malicious model file would carry."""

    def __init__(self, function, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


@pytest.mark.parametrize("kind", ["system", "exec"])
def test_a_pickle_that_asks_to_run_code_is_refused_and_nothing_runs(published: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload = (
        _Payload(os.system, f"touch {marker}")
        if kind == "system"
        else _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    )
    state = dict(load_classifier(published).state_dict())
    evil = tmp_path / "500_model.pth"
    torch.save({**state, "extra": payload}, evil)
    with pytest.raises(UserError, match=r"refusing to load .*500_model\.pth.*(system|exec).*not an allowed type"):
        load_classifier(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live under an unrestricted unpickler
    assert marker.exists()


def test_a_whole_module_of_another_class_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Other(torch.nn.Module):
        pass

    Other.__module__, Other.__qualname__ = "__main__", "Other"
    monkeypatch.setattr(sys.modules["__main__"], "Other", Other, raising=False)
    path = tmp_path / "other.pth"
    torch.save(Other(), path)
    with pytest.raises(UserError, match=r"refusing to load .*__main__\.Other"):
        load_classifier(path)


def test_features_of_the_wrong_width_are_a_user_error(published: Path) -> None:
    with pytest.raises(UserError, match=f"expects {INPUT_DIM} features"):
        classify(load_classifier(published), torch.zeros(3, INPUT_DIM + 1))


def test_a_missing_classifier_is_a_user_error_naming_the_path_and_the_download(tmp_path: Path) -> None:
    missing = tmp_path / "500_model.pth"
    with pytest.raises(UserError, match=rf"not found: {missing}; 'virnucpro models download --dest DIR'"):
        load_classifier(missing)


def test_cli_converts_a_published_classifier_to_safetensors_that_scores_the_same(
    published: Path, features: torch.Tensor, tmp_path: Path
) -> None:
    from virnucpro.cli import main

    converted = tmp_path / "300_model.safetensors"
    assert main(["models", "convert-classifier", str(published), str(converted)]) == 0
    with safe_open(converted, "pt") as handle:
        assert set(handle.keys()) >= {"hidden_layer.weight", "bn1.running_var", "output_layer.bias"}
    torch.testing.assert_close(
        classify(load_classifier(converted), features), classify(load_classifier(published), features), atol=0, rtol=0
    )


def test_cli_conversion_of_a_malicious_file_is_refused_and_writes_nothing(tmp_path: Path, capsys) -> None:
    from virnucpro.cli import main

    marker = tmp_path / "pwned"
    evil = tmp_path / "300_model.pth"
    torch.save({"hidden_layer.weight": torch.zeros(2, 2), "x": _Payload(os.system, f"touch {marker}")}, evil)
    assert main(["models", "convert-classifier", str(evil), str(tmp_path / "out.safetensors")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_a_state_dict_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2, 3)}, path)
    with pytest.raises(UserError, match="not a VirNucPro classifier"):
        load_classifier(path)


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"PK\x03\x04 truncated"])
def test_a_damaged_file_is_a_user_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "300_model.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match="300_model.pth: not a readable torch checkpoint"):
        load_classifier(path)
