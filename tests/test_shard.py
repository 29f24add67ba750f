"""Sharding: paired nucleotide/protein files cut into shards of a fixed number of frames."""

from pathlib import Path

import pytest

from virnucpro.errors import UserError
from virnucpro.prep.shard import shard_frames


def write(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records))
    return path


FRAMES = [(f"r{i}_chunk_1F1", "ACGT" * (i + 1)) for i in range(5)]
PROTEINS = [(name, "M" * (i + 1)) for i, (name, _) in enumerate(FRAMES)]


def test_five_frames_in_shards_of_two_make_three_pairs_in_order(tmp_path):
    count = shard_frames(write(tmp_path / "n.fa", FRAMES), write(tmp_path / "p.faa", PROTEINS), 2, tmp_path / "shards")
    assert count == 3
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == [f"shard_0000{i}.{ext}" for i in range(3) for ext in ("fa", "faa")]
    assert (tmp_path / "shards/shard_00000.fa").read_text() == ">r0_chunk_1F1\nACGT\n>r1_chunk_1F1\nACGTACGT\n"
    assert (tmp_path / "shards/shard_00002.faa").read_text() == ">r4_chunk_1F1\nMMMMM\n"


def test_no_frames_make_an_empty_shard_folder(tmp_path):
    count = shard_frames(write(tmp_path / "n.fa", []), write(tmp_path / "p.faa", []), 10, tmp_path / "shards")
    assert count == 0
    assert (tmp_path / "shards").is_dir() and not list((tmp_path / "shards").iterdir())


def test_files_whose_ids_disagree_are_refused_and_leave_no_folder(tmp_path):
    proteins = PROTEINS[:2] + [("other", "M")] + PROTEINS[3:]
    with pytest.raises(UserError, match="frame 3 should be 'r2_chunk_1F1'"):
        shard_frames(write(tmp_path / "n.fa", FRAMES), write(tmp_path / "p.faa", proteins), 2, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_a_protein_file_with_an_extra_frame_is_refused(tmp_path):
    with pytest.raises(UserError, match="no partner"):
        shard_frames(write(tmp_path / "n.fa", FRAMES[:2]), write(tmp_path / "p.faa", PROTEINS[:3]), 2, tmp_path / "s")
