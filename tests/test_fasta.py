"""FASTA reading (streaming, plain or gzip) and writing."""

import gzip
from pathlib import Path

import pytest

from virnucpro.errors import UserError
from virnucpro.fasta import FastaRecord, read_fasta, write_fasta_record


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def records(path: Path) -> list[FastaRecord]:
    return list(read_fasta(path))


def test_multi_line_sequences_are_joined_and_records_numbered_from_one(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b">r1 first read\nACGT\nacgt\nNN\n>r2\nTTTT\n")
    assert records(path) == [
        FastaRecord(id="r1", description="r1 first read", sequence="ACGTacgtNN", number=1),
        FastaRecord(id="r2", description="r2", sequence="TTTT", number=2),
    ]


def test_id_is_the_header_up_to_the_first_whitespace(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b">read/1\tlane=3 x\nAC\n>read_2  \nGT\n")
    assert [r.id for r in records(path)] == ["read/1", "read_2"]


def test_crlf_line_endings_and_blank_lines_are_ignored(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b"\r\n>r1 d\r\nAC\r\n\r\nGT\r\n\n>r2\r\n  \r\nA\r\n")
    assert [(r.id, r.description, r.sequence) for r in records(path)] == [("r1", "r1 d", "ACGT"), ("r2", "r2", "A")]


def test_whitespace_inside_sequence_lines_is_removed(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b">r1\nAC GT\tAA \n")
    assert records(path)[0].sequence == "ACGTAA"


def test_a_header_without_sequence_gives_an_empty_record(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b">empty\n>r2\nAC\n>last\n")
    assert [(r.id, r.sequence) for r in records(path)] == [("empty", ""), ("r2", "AC"), ("last", "")]


def test_an_empty_file_has_no_records(tmp_path):
    assert records(write_bytes(tmp_path / "in.fa", b"")) == []


def test_a_leading_utf8_byte_order_mark_is_ignored(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b"\xef\xbb\xbf>r1\nAC\n")
    assert [r.id for r in records(path)] == ["r1"]


def test_reading_is_lazy_one_record_at_a_time(tmp_path):
    # The broken second record is only reached when the second record is asked for.
    path = write_bytes(tmp_path / "in.fa", b">r1\nAC\n>r2\nGT\n>\nAA\n")
    iterator = read_fasta(path)
    assert next(iterator).id == "r1"
    assert next(iterator).id == "r2"
    with pytest.raises(UserError):
        next(iterator)


def test_gzip_input_gives_the_same_records_as_plain_input(tmp_path):
    text = b">r1 a\nACGT\nAC\n>r2\nGGG\n"
    plain = write_bytes(tmp_path / "in.fa", text)
    packed = write_bytes(tmp_path / "in.fa.gz", gzip.compress(text))
    assert records(packed) == records(plain)


def test_gzip_is_detected_by_content_not_by_name(tmp_path):
    text = b">r1\nACGT\n"
    disguised = write_bytes(tmp_path / "looks_plain.fa", gzip.compress(text))
    misnamed = write_bytes(tmp_path / "looks_packed.fa.gz", text)
    assert records(disguised) == records(misnamed) == [FastaRecord("r1", "r1", "ACGT", 1)]


def test_concatenated_gzip_members_are_read_as_one_file(tmp_path):
    path = write_bytes(tmp_path / "in.fa.gz", gzip.compress(b">r1\nAC\n") + gzip.compress(b">r2\nGT\n"))
    assert [r.id for r in records(path)] == ["r1", "r2"]


def assert_user_error(path: Path, *fragments: str) -> str:
    with pytest.raises(UserError) as caught:
        records(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    return message


def test_text_before_the_first_header_is_an_error_naming_the_line(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b"\nACGT\n>r1\nAC\n")
    assert_user_error(path, "line 2", "text before the first '>' header")


def test_a_header_without_an_id_is_an_error_naming_the_record(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b">r1\nAC\n>   \nGT\n")
    assert_user_error(path, "record 2", "line 3", "no read ID")


def test_a_nul_byte_is_reported_as_binary_data_with_the_record(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b">r1\nAC\n>r2\nAC\x00GT\n")
    assert_user_error(path, "record 2 ('r2')", "line 4", "binary data")


def test_non_utf8_bytes_are_reported_as_binary_data(tmp_path):
    path = write_bytes(tmp_path / "in.fa", b">r1\nAC\xff\xfeGT\n")
    assert_user_error(path, "record 1 ('r1')", "binary data")


def test_a_binary_file_is_refused_before_any_record(tmp_path):
    path = write_bytes(tmp_path / "in.fa", bytes(range(256)) * 4)
    assert_user_error(path, "line 1", "binary data")


def test_a_truncated_gzip_file_is_an_error_naming_the_record_being_read(tmp_path):
    text = b"".join(b">read%d\n%s\n" % (i, b"ACGT" * 50) for i in range(200))
    packed = gzip.compress(text)
    path = write_bytes(tmp_path / "in.fa.gz", packed[: len(packed) // 2])
    message = assert_user_error(path, "truncated or corrupt")
    assert "record " in message and "('read" in message


def test_a_gzip_file_cut_after_its_header_is_an_error(tmp_path):
    path = write_bytes(tmp_path / "in.fa.gz", gzip.compress(b">r1\nACGT\n")[:12])
    assert_user_error(path, "truncated or corrupt")


def test_corrupt_gzip_data_is_an_error(tmp_path):
    packed = bytearray(gzip.compress(b">r1\n" + b"ACGT" * 1000 + b"\n"))
    for i in range(20, len(packed) - 8):
        packed[i] ^= 0x55
    path = write_bytes(tmp_path / "in.fa.gz", bytes(packed))
    assert_user_error(path, "truncated or corrupt")


def test_a_gzip_file_with_a_wrong_checksum_is_an_error(tmp_path):
    packed = bytearray(gzip.compress(b">r1\nACGT\n"))
    packed[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    path = write_bytes(tmp_path / "in.fa.gz", bytes(packed))
    assert_user_error(path, "record 1 ('r1')", "truncated or corrupt")


def test_a_missing_file_is_a_user_error(tmp_path):
    assert_user_error(tmp_path / "absent.fa", "cannot read")


def test_write_fasta_record_writes_the_header_and_one_sequence_line(tmp_path):
    path = tmp_path / "out.fa"
    with open(path, "w") as handle:
        write_fasta_record(handle, "r1_chunk_1", "ACGT" * 100)
        write_fasta_record(handle, "r2", "")
    assert path.read_text() == ">r1_chunk_1\n" + "ACGT" * 100 + "\n>r2\n\n"
