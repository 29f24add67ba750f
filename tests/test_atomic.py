"""virnucpro.atomic: a reader sees the whole file or nothing; replace=False never overwrites."""

import json
import os
from pathlib import Path

import pytest

from virnucpro.atomic import atomic_output, atomic_path, write_json, write_text


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_atomic_output_writes_the_file_on_success_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "out.fa"
    with atomic_output(path) as handle:
        handle.write("hello\n")
        assert not path.exists()
    assert path.read_text() == "hello\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.fa"]


def test_atomic_output_leaves_nothing_when_the_block_fails(tmp_path):
    path = tmp_path / "out.fa"
    with pytest.raises(RuntimeError):
        with atomic_output(path) as handle:
            handle.write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_keeps_an_existing_file_when_the_block_fails(tmp_path):
    path = write_bytes(tmp_path / "out.fa", b"old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(path) as handle:
            handle.write("new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.fa"]


def test_atomic_output_gives_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out.fa") as handle:
            handle.write("x\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.fa").stat().st_mode & 0o777 == 0o644


def test_atomic_output_writes_unix_line_endings_in_utf8(tmp_path):
    with atomic_output(tmp_path / "out.txt") as handle:
        handle.write("é\n")
    assert (tmp_path / "out.txt").read_bytes() == "é\n".encode()


def test_atomic_output_writes_binary_files(tmp_path):
    with atomic_output(tmp_path / "out.bin", "wb") as handle:
        handle.write(b"\0\1")
    assert (tmp_path / "out.bin").read_bytes() == b"\0\1"


def test_atomic_path_gives_a_temporary_path_beside_the_destination(tmp_path):
    path = tmp_path / "sub" / "out.pt"
    with atomic_path(path) as temporary:
        assert temporary.parent == path.parent and temporary != path
        temporary.write_bytes(b"data")
        assert not path.exists()
    assert path.read_bytes() == b"data"
    assert [p.name for p in path.parent.iterdir()] == ["out.pt"]


def test_atomic_path_without_replace_never_overwrites_an_existing_file(tmp_path):
    path = write_bytes(tmp_path / "out.pt", b"used\n")
    with pytest.raises(FileExistsError):
        with atomic_path(path, replace=False) as temporary:
            temporary.write_bytes(b"late")
    assert path.read_bytes() == b"used\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_atomic_path_without_replace_writes_a_new_file(tmp_path):
    with atomic_path(tmp_path / "out.pt", replace=False) as temporary:
        temporary.write_bytes(b"first")
    assert (tmp_path / "out.pt").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_write_text_and_write_json_replace_the_file(tmp_path):
    write_text(tmp_path / "a.txt", "old")
    write_text(tmp_path / "a.txt", "é")
    assert (tmp_path / "a.txt").read_bytes() == "é".encode()
    write_json(tmp_path / "a.json", {"b": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": [1, 2]}
    assert (tmp_path / "a.json").read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.txt"]
