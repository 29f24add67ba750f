"""Chunking with the published overlap rule (ORIGINAL_METHOD.md §1) and the input policy."""

import gzip
import math
from pathlib import Path

import pytest

from virnucpro.errors import UserError
from virnucpro.prep.chunk import ChunkSummary, chunk_bounds, chunk_fasta, skip_reason

# (c, L) -> [start, end), copied from ORIGINAL_METHOD.md §1.
PUBLISHED_EXAMPLES = [
    (500, 501, [(0, 500), (250, 501)]),
    (500, 750, [(0, 500), (374, 750)]),
    (500, 1001, [(0, 500), (333, 833), (666, 1001)]),
    (500, 1200, [(0, 500), (399, 899), (798, 1200)]),
    (500, 1500, [(0, 500), (500, 1000), (1000, 1500)]),
    (300, 301, [(0, 300), (150, 301)]),
    (300, 1001, [(0, 300), (250, 550), (500, 800), (750, 1001)]),
    (300, 2003, [(0, 300), (286, 586), (572, 872), (858, 1158), (1144, 1444), (1430, 1730), (1716, 2003)]),
]


def spec_bounds(L: int, c: int) -> list[tuple[int, int]]:
    """The rule as ORIGINAL_METHOD.md words it, step list and all."""
    n = math.ceil(L / c)
    if L <= c:
        return [(0, L)]
    rep = n * c - L
    lo = math.floor(rep / n)
    hi = lo + 1
    need = rep - lo * (n - 1)
    steps = [hi] * need + [lo] * (n - 1 - need) + [0]
    result = []
    for k in range(n):
        start = k * c - sum(steps[:k])
        result.append((start, min(start + c, L)))
    return result


@pytest.mark.parametrize("c, L, expected", PUBLISHED_EXAMPLES)
def test_published_examples(c, L, expected):
    assert chunk_bounds(L, c) == expected


@pytest.mark.parametrize("c, L, expected", PUBLISHED_EXAMPLES)
def test_the_literal_rule_in_the_test_reproduces_the_published_examples(c, L, expected):
    assert spec_bounds(L, c) == expected


def lengths_around_multiples(c: int) -> list[int]:
    lengths = [1, 2, 3, c // 2]
    for m in range(1, 8):
        lengths += [m * c - 1, m * c, m * c + 1, m * c + c // 3, m * c + c // 2, m * c + c - 2]
    return lengths


@pytest.mark.parametrize("c", [300, 500])
def test_lengths_around_and_between_multiples_follow_the_literal_rule(c):
    for L in lengths_around_multiples(c):
        assert chunk_bounds(L, c) == spec_bounds(L, c), L


@pytest.mark.parametrize("c", [300, 500])
def test_every_length_up_to_four_chunks_follows_the_literal_rule(c):
    for L in range(1, 4 * c + 1):
        assert chunk_bounds(L, c) == spec_bounds(L, c), L


@pytest.mark.parametrize("c, L", [(300, 300), (500, 499), (500, 1), (300, 7)])
def test_a_read_not_longer_than_c_is_one_whole_unpadded_chunk(c, L):
    assert chunk_bounds(L, c) == [(0, L)]


@pytest.mark.parametrize("c", [300, 500])
def test_chunks_cover_the_read_with_full_length_chunks_except_the_last(c):
    for L in range(c + 1, 6 * c, 37):
        bounds = chunk_bounds(L, c)
        assert len(bounds) == math.ceil(L / c)
        assert bounds[0][0] == 0 and bounds[-1][1] == L
        assert all(end - start == c for start, end in bounds[:-1])
        assert 0 < bounds[-1][1] - bounds[-1][0] <= c
        assert all(nxt[0] <= cur[1] and nxt[0] > cur[0] for cur, nxt in zip(bounds, bounds[1:]))


def test_the_last_chunk_is_shorter_than_c_in_the_published_quirk():
    start, end = chunk_bounds(1200, 500)[-1]
    assert end - start == 402


@pytest.mark.parametrize("L", [0, -5])
def test_a_non_positive_length_is_a_value_error(L):
    with pytest.raises(ValueError):
        chunk_bounds(L, 500)


@pytest.mark.parametrize(
    "sequence, reason",
    [
        ("", "empty sequence"),
        ("ACGTURYSWKMBDHVNacgturyswkmbdhvn", ""),
        ("ACGTX", "invalid sequence: character 'X' at position 5"),
        ("AC-GT", "invalid sequence: character '-' at position 3"),
        ("*ACGT", "invalid sequence: character '*' at position 1"),
        ("ACéGT", "invalid sequence: character 'é' at position 3"),
        ("AC\x01", "invalid sequence: character '\\x01' at position 3"),
        ("ACGE", "invalid sequence: character 'E' at position 4"),
    ],
)
def test_skip_reason(sequence, reason):
    assert skip_reason(sequence) == reason


def read_fasta_text(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    assert all(line.startswith(">") for line in lines[0::2])
    return [(h[1:], s) for h, s in zip(lines[0::2], lines[1::2])]


def read_table(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def make_read(length: int, seed: int) -> str:
    letters = "ACGTacgtN"
    return "".join(letters[(i * 7 + seed * 13 + i * i) % len(letters)] for i in range(length))


def test_chunk_fasta_writes_the_published_chunks_with_one_based_ids_and_the_reads_case(tmp_path):
    reads = {"long": make_read(1200, 1), "short": make_read(120, 2), "exact": make_read(500, 3)}
    source = tmp_path / "reads.fa"
    source.write_text("".join(f">{rid} some description\n{seq[:70]}\n{seq[70:]}\n" for rid, seq in reads.items()))
    summary = chunk_fasta(source, 500, tmp_path / "chunks.fa")
    expected = []
    for rid, seq in reads.items():
        for k, (start, end) in enumerate(spec_bounds(len(seq), 500), start=1):
            expected.append((f"{rid}_chunk_{k}", seq[start:end]))
    assert read_fasta_text(tmp_path / "chunks.fa") == expected
    assert summary == ChunkSummary(reads=3, chunks=5, skipped=0)
    assert expected[0][1] == reads["long"][:500] and any(c.islower() for c in expected[0][1])


def test_skipped_reads_get_a_reason_in_the_reads_table_and_the_run_goes_on(tmp_path):
    source = tmp_path / "reads.fa"
    source.write_text(">ok1\n" + "A" * 301 + "\n>empty\n>bad x\nACGTXACGT\n>rna\nACGUU\n>gap\nAC\nG-T\n>ok2\nnnnn\n")
    summary = chunk_fasta(source, 300, tmp_path / "chunks.fa", tmp_path / "reads.tsv")
    assert summary == ChunkSummary(reads=6, chunks=4, skipped=3)
    assert read_table(tmp_path / "reads.tsv") == [
        ["read_id", "length", "chunks", "skip_reason"],
        ["ok1", "301", "2", ""],
        ["empty", "0", "0", "empty sequence"],
        ["bad", "9", "0", "invalid sequence: character 'X' at position 5"],
        ["rna", "5", "1", ""],
        ["gap", "5", "0", "invalid sequence: character '-' at position 4"],
        ["ok2", "4", "1", ""],
        ["#end", "6"],  # a counted table: its end line gives its rows
    ]
    assert [rid for rid, _ in read_fasta_text(tmp_path / "chunks.fa")] == [
        "ok1_chunk_1",
        "ok1_chunk_2",
        "rna_chunk_1",
        "ok2_chunk_1",
    ]


def test_an_input_without_reads_gives_empty_outputs(tmp_path):
    source = tmp_path / "reads.fa"
    source.write_text("")
    assert chunk_fasta(source, 500, tmp_path / "c.fa", tmp_path / "r.tsv") == ChunkSummary(0, 0, 0)
    assert (tmp_path / "c.fa").read_text() == ""
    assert (tmp_path / "r.tsv").read_text() == "read_id\tlength\tchunks\tskip_reason\n#end\t0\n"


def test_gzip_input_gives_the_same_output_as_plain_input(tmp_path):
    text = "".join(f">r{i}\n{make_read(250 * i + 3, i)}\n" for i in range(1, 8)) + ">e\n"
    (tmp_path / "plain.fa").write_text(text)
    (tmp_path / "packed.fa.gz").write_bytes(gzip.compress(text.encode()))
    first = chunk_fasta(tmp_path / "plain.fa", 300, tmp_path / "a.fa", tmp_path / "a.tsv")
    second = chunk_fasta(tmp_path / "packed.fa.gz", 300, tmp_path / "b.fa", tmp_path / "b.tsv")
    assert first == second
    assert (tmp_path / "a.fa").read_bytes() == (tmp_path / "b.fa").read_bytes()
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()


@pytest.mark.parametrize("length", [0, 299, 301, 1000, -500])
def test_an_unsupported_expected_length_is_a_user_error(tmp_path, length):
    source = tmp_path / "reads.fa"
    source.write_text(">r\nACGT\n")
    with pytest.raises(UserError, match="300 or 500"):
        chunk_fasta(source, length, tmp_path / "chunks.fa")
    assert not (tmp_path / "chunks.fa").exists()


def many_reads(count: int) -> bytes:
    return "".join(f">read{i}\n{make_read(400, i)}\n" for i in range(count)).encode()


def truncated_gzip(data: bytes) -> bytes:
    packed = gzip.compress(data)
    return packed[: len(packed) // 2]


BAD_INPUTS = {
    "duplicate ID": (b">a\nACGT\n>b\nAC\n>a x\nGG\n", ["record 3 ('a')", "duplicate read ID", "record 1"]),
    "text before the first header": (b"ACGT\n>a\nAC\n", ["line 1", "before the first '>'"]),
    "empty ID": (b">a\nAC\n>\nGG\n", ["record 2", "no read ID"]),
    "NUL byte": (b">a\nAC\n>b\nA\x00C\n", ["record 2 ('b')", "binary data"]),
    "non UTF-8": (b">a\nAC\xc3\x28\n", ["record 1 ('a')", "binary data"]),
    "truncated gzip": (truncated_gzip(many_reads(300)), ["record ", "('read", "truncated"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_user_error_naming_file_and_record_and_leaves_no_output(tmp_path, case):
    data, fragments = BAD_INPUTS[case]
    source = tmp_path / "in" / "reads.fa"
    source.parent.mkdir()
    source.write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        chunk_fasta(source, 500, out / "chunks.fa", out / "reads.tsv")
    message = str(caught.value)
    assert message.startswith(f"{source}:")
    for fragment in fragments:
        assert fragment in message
    assert list(out.iterdir()) == []


def test_a_failed_run_keeps_the_previous_outputs_untouched(tmp_path):
    source = tmp_path / "reads.fa"
    source.write_bytes(b">a\nAC\n>a\nAC\n")
    (tmp_path / "chunks.fa").write_text("previous\n")
    with pytest.raises(UserError):
        chunk_fasta(source, 300, tmp_path / "chunks.fa")
    assert (tmp_path / "chunks.fa").read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks.fa", "reads.fa"]
