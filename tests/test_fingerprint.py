"""The identity of a model on disk (virnucpro.fingerprint): what decides whether results made with it
still hold. Metadata only: names, sizes and modification times."""

from __future__ import annotations

import os
import shutil

import pytest

from virnucpro.errors import UserError
from virnucpro.fingerprint import model_fingerprint

T0 = 1_700_000_000_000_000_000  # an mtime in nanoseconds


def test_a_model_file_keeps_its_fingerprint_until_it_is_replaced_or_touched(tmp_path):
    model = tmp_path / "esm2_t6_8M.pt"
    model.write_bytes(b"weights " * 100)
    os.utime(model, ns=(T0, T0))
    first = model_fingerprint(model)
    assert len(first) == 16 and int(first, 16) >= 0
    assert model_fingerprint(model) == first and model_fingerprint(str(model)) == first

    os.utime(model, ns=(T0, T0 + 1))  # touched
    assert model_fingerprint(model) != first
    os.utime(model, ns=(T0, T0))
    assert model_fingerprint(model) == first

    replacement = tmp_path / "new.pt"
    replacement.write_bytes(b"other weights " * 100)
    os.replace(replacement, model)  # replaced by another file
    assert model_fingerprint(model) != first
    model.write_bytes(b"weights " * 99 + b"WEIGHTS ")  # edited in place, size kept, mtime restored
    os.utime(model, ns=(T0, T0))
    assert model_fingerprint(model) == first  # metadata only: the content is not read


def test_a_copy_elsewhere_with_the_same_name_and_mtime_has_the_same_fingerprint(tmp_path):
    model = tmp_path / "a" / "esm2_t6_8M.pt"
    model.parent.mkdir()
    model.write_bytes(b"weights " * 100)
    os.utime(model, ns=(T0, T0))
    moved = tmp_path / "elsewhere" / "deeper" / "esm2_t6_8M.pt"
    moved.parent.mkdir(parents=True)
    shutil.copy2(model, moved)  # keeps the mtime
    assert model_fingerprint(moved) == model_fingerprint(model)
    os.rename(model, tmp_path / "a" / "renamed.pt")
    assert model_fingerprint(tmp_path / "a" / "renamed.pt") != model_fingerprint(moved)  # the name is part of it


def test_a_model_folder_covers_every_file_below_it(tmp_path):
    snapshot = tmp_path / "DNABERT-S"
    (snapshot / "sub").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "sub/tokenizer.json"):
        (snapshot / name).write_text(name)
        os.utime(snapshot / name, ns=(T0, T0))
    first = model_fingerprint(snapshot)
    copy = tmp_path / "moved" / "DNABERT-S"
    shutil.copytree(snapshot, copy)  # copy2: mtimes kept
    assert model_fingerprint(copy) == first
    os.utime(snapshot / "sub" / "tokenizer.json", ns=(T0, T0 + 5))  # one file touched
    assert model_fingerprint(snapshot) != first
    os.utime(snapshot / "sub" / "tokenizer.json", ns=(T0, T0))
    assert model_fingerprint(snapshot) == first
    (snapshot / "extra.bin").write_text("x")  # one file more
    assert model_fingerprint(snapshot) != first


def test_a_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read the model"):
        model_fingerprint(tmp_path / "nowhere.pt")
