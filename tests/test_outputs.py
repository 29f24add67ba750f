"""The published output files and the per-read account, from hand-made per-shard predictions."""

from pathlib import Path

import numpy as np
import pytest
import torch

from virnucpro.classify.predictions import PREDICTION_HEADER, format_score, merge_features, prediction_rows
from virnucpro.layout import SampleFiles
from virnucpro.outputs.aggregate import aggregate_sample
from virnucpro.tables import format_end


def test_scores_print_as_the_shortest_text_of_their_float32():
    assert format_score(np.float32(0.12100612)) == "0.12100612"
    assert format_score(0.5) == "0.5"
    assert format_score(np.float32(1) / np.float32(3)) == "0.33333334"
    assert format_score(np.float32(3.5e-08)) == "3.5e-08"


def test_prediction_is_virus_only_when_score2_is_greater_and_a_tie_is_others():
    probabilities = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.875, 0.125]])
    assert prediction_rows(["a", "b", "c"], probabilities) == [
        "a\tvirus\t0.25\t0.75",
        "b\tothers\t0.5\t0.5",
        "c\tothers\t0.875\t0.125",
    ]


def test_features_are_joined_by_id_not_by_position():
    dnabert = (["x", "y"], torch.tensor([[1.0], [2.0]]))
    esm = (["y", "x"], torch.tensor([[20.0, 21.0], [10.0, 11.0]]))
    ids, merged, missing = merge_features(["y", "x"], dnabert, esm)
    assert ids == ["y", "x"] and missing == []
    assert merged.tolist() == [[2.0, 20.0, 21.0], [1.0, 10.0, 11.0]]


def test_a_frame_missing_from_one_embedding_is_left_out_and_named_never_shifted():
    dnabert = (["x", "y", "z"], torch.tensor([[1.0], [2.0], [3.0]]))
    esm = (["z", "x"], torch.tensor([[30.0], [10.0]]))
    ids, merged, missing = merge_features(["x", "y", "z"], dnabert, esm)
    assert ids == ["x", "z"] and missing == ["y"]
    assert merged.tolist() == [[1.0, 10.0], [3.0, 30.0]]


def _table(path: Path, rows: list[str]) -> Path:
    path.write_text(PREDICTION_HEADER + "\n" + "".join(row + "\n" for row in rows) + format_end(len(rows)))
    return path


@pytest.fixture
def sample(tmp_path):
    reads = tmp_path / "reads_index.tsv"
    rows = [
        "read_id\tlength\tchunks\tskip_reason",
        "r1\t600\t2\t",
        "r2\t100\t1\t",
        "r3\t0\t0\tempty sequence",
        "b\t5000\t10\t",
    ]
    reads.write_text("".join(row + "\n" for row in rows) + format_end(len(rows) - 1))
    frames = ["r1_chunk_1F1", "r1_chunk_1R2", "r1_chunk_2F3", "b_chunk_2F1", "b_chunk_10R1", "b_chunk_10R3"]
    nucleotide = tmp_path / "nuc.fa"
    nucleotide.write_text("".join(f">{name}\nACGT\n" for name in frames))
    shard0 = _table(
        tmp_path / "p0.tsv",
        ["r1_chunk_1F1\tothers\t0.6\t0.4", "r1_chunk_1R2\tvirus\t0.3\t0.7", "r1_chunk_2F3\tothers\t0.9\t0.1"],
    )
    shard1 = _table(
        tmp_path / "p1.tsv",
        ["b_chunk_2F1\tothers\t0.55\t0.45", "b_chunk_10R1\tothers\t0.8\t0.2", "b_chunk_10R3\tvirus\t0.2\t0.8"],
    )
    out = tmp_path / "out"
    aggregate_sample(
        sample="s1",
        reads_table=reads,
        nucleotide=nucleotide,
        predictions=[shard0, shard1],
        manifest=None,
        output_dir=out,
    )
    return SampleFiles.at(out), (shard0, shard1)


def test_the_outputs_are_written_into_the_folder_given_and_nothing_else(sample):
    out, _ = sample
    assert sorted(path.name for path in Path(out.folder).iterdir()) == sorted(Path(path).name for path in out.outputs)


def test_prediction_results_are_the_shard_rows_in_shard_order_under_one_header(sample):
    out, (shard0, shard1) = sample
    expected = (
        PREDICTION_HEADER + "\n" + "".join(p.read_text().split("\n", 1)[1].split("#end")[0] for p in (shard0, shard1))
    )
    assert Path(out.prediction_results).read_text() == expected


def test_highest_score_file_gives_a_verdict_per_chunk_sorted_as_strings(sample):
    out, _ = sample
    # r1_chunk_1: max(score2)=0.7 >= max(score1)=0.6; r1_chunk_2: 0.1 < 0.9; b_chunk_10: 0.8 >= 0.8 (a tie is True);
    # b_chunk_2: 0.45 < 0.55. "b_chunk_10" sorts before "b_chunk_2" as a string.
    expected = [
        "Modified_ID\tIs_Virus",
        "b_chunk_10\tTrue",
        "b_chunk_2\tFalse",
        "r1_chunk_1\tTrue",
        "r1_chunk_2\tFalse",
    ]
    assert Path(out.highest_scores).read_text() == "".join(row + "\n" for row in expected)


def test_every_read_has_one_row_with_a_verdict_or_a_reason(sample):
    out, _ = sample
    lines = Path(out.reads_table).read_text().splitlines()
    assert lines[0].split("\t") == [
        "read_id",
        "length",
        "chunks",
        "frames",
        "frames_scored",
        "virus_chunks",
        "best_virus_score",
        "verdict",
        "reason",
    ]
    assert lines[1:] == [
        "r1\t600\t2\t3\t3\t1\t0.7\tvirus\t",
        "r2\t100\t1\t0\t0\t0\t\tunclassified\tno stop-free frame",
        "r3\t0\t0\t0\t0\t0\t\tunclassified\tempty sequence",
        "b\t5000\t10\t3\t3\t1\t0.8\tvirus\t",
    ]


def test_failures_table_has_its_header_even_when_empty(sample):
    out, _ = sample
    header = Path(out.failures).read_text().splitlines()
    assert len(header) == 1 and header[0].startswith("time\tsample\tstage\tshard\tsequence_id")
