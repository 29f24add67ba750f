"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small random-weight models in the published formats, written once per test session:
    paths under the keys esm2, dnabert_s, classifier_300 and classifier_500."""
    from virnucpro.testmodels import make_test_models

    return make_test_models(tmp_path_factory.mktemp("test-models"))
