"""Six-frame translation with the published semantics (ORIGINAL_METHOD.md §2)."""

import random
from pathlib import Path

import pytest

from virnucpro.errors import UserError
from virnucpro.prep.translate import Frame, TranslateSummary, six_frames, translate_codons, translate_fasta

# The standard genetic code, written as amino acid -> codons (independent of the code's table).
# fmt: off
CODONS_OF = {
    "F": "TTT TTC", "L": "TTA TTG CTT CTC CTA CTG", "I": "ATT ATC ATA", "M": "ATG",
    "V": "GTT GTC GTA GTG", "S": "TCT TCC TCA TCG AGT AGC", "P": "CCT CCC CCA CCG",
    "T": "ACT ACC ACA ACG", "A": "GCT GCC GCA GCG", "Y": "TAT TAC", "*": "TAA TAG TGA",
    "H": "CAT CAC", "Q": "CAA CAG", "N": "AAT AAC", "K": "AAA AAG", "D": "GAT GAC",
    "E": "GAA GAG", "C": "TGT TGC", "W": "TGG", "R": "CGT CGC CGA CGG AGA AGG",
    "G": "GGT GGC GGA GGG",
}
# fmt: on
AMINO_ACID_OF = {codon: aa for aa, codons in CODONS_OF.items() for codon in codons.split()}
IUPAC_AMBIGUOUS = "NRYSWKMBDHVU"


def reference_six_frames(chunk_id: str, sequence: str) -> list[tuple[str, str, str]]:
    """ORIGINAL_METHOD.md §2 followed step by step."""
    seq = sequence.upper()
    pairs = {"A": "T", "T": "A", "C": "G", "G": "C"}
    rc = "".join(pairs.get(letter, letter) for letter in reversed(seq))
    result = []
    for strand, strand_seq in (("F", seq), ("R", rc)):
        for i in (1, 2, 3):
            protein = ""
            position = i - 1
            while len(strand_seq) - position >= 3:
                codon = strand_seq[position : position + 3]
                if codon in AMINO_ACID_OF:
                    protein += AMINO_ACID_OF[codon]
                position += 3
            if protein and "*" not in protein:
                p = len(protein)
                result.append((f"{chunk_id}{strand}{i}", strand_seq[i - 1 : i + 3 * p], protein))
    return result


def as_tuples(frames: list[Frame]) -> list[tuple[str, str, str]]:
    return [(f.id, f.nucleotide, f.protein) for f in frames]


def test_the_hand_written_code_has_64_codons():
    assert len(AMINO_ACID_OF) == 64


def test_every_codon_translates_by_the_standard_code():
    for codon, amino_acid in AMINO_ACID_OF.items():
        assert translate_codons(codon) == amino_acid, codon
        assert translate_codons(codon.lower()) == amino_acid, codon


def test_codons_are_read_while_three_letters_remain():
    assert [translate_codons("ATGGCC"[:n]) for n in range(7)] == ["", "", "", "M", "M", "M", "MA"]
    assert translate_codons("ATGGCCTA") == "MA"


@pytest.mark.parametrize("code", IUPAC_AMBIGUOUS + IUPAC_AMBIGUOUS.lower() + "X-")
@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_codon_with_a_non_acgt_letter_is_dropped_silently(code, position):
    codon = list("TGG")
    codon[position] = code
    assert translate_codons("ATG" + "".join(codon) + "AAA") == "MK"


def test_dropped_codons_do_not_shift_the_reading_frame():
    assert translate_codons("NNNATGNAATAA") == "M*"


# Worked by hand. ATGGCTTGGAAA: reverse complement TTTCCAAGCCAT.
# fmt: off
HAND_WORKED = {
    "ATGGCTTGGAAA": [
        ("cF1", "ATGGCTTGGAAA", "MAWK"),   # ATG GCT TGG AAA, slice clipped at 12
        ("cF2", "TGGCTTGGAA", "WLG"),      # TGG CTT GGA, slice [1:11] = 3p+1 letters
        ("cF3", "GGCTTGGAAA", "GLE"),      # GGC TTG GAA, slice [2:12]
        ("cR1", "TTTCCAAGCCAT", "FPSH"),   # TTT CCA AGC CAT
        ("cR2", "TTCCAAGCCA", "FQA"),      # TTC CAA GCC
        ("cR3", "TCCAAGCCAT", "SKP"),      # TCC AAG CCA
    ],
    # Lower and mixed case, N codons dropped, a stop in F1. Reverse complement GGCTTANNNCAT.
    "aTGNNNTAAGCc": [
        ("cF2", "TGNN", "K"),              # TGN NNT AAG: p = 1, so the slice is [1:5]
        ("cF3", "GNNN", "S"),              # GNN NTA AGC
        ("cR1", "GGCTTANNNC", "GLH"),      # GGC TTA NNN CAT
        ("cR2", "GCTT", "A"),              # GCT TAN NNC
        ("cR3", "CTTA", "L"),              # CTT ANN NCA
    ],
}
# fmt: on


def test_hand_worked_frames():
    for sequence, expected in HAND_WORKED.items():
        assert as_tuples(six_frames("c", sequence)) == expected, sequence


def test_ambiguity_codes_are_not_complemented_and_their_codons_are_dropped():
    # ATG NVH DBK MWS RYC TT: F1 = M (p = 1, slice [0:4]).
    # TGN VHD BKM WSR YCT T: every codon has an ambiguity code, F2 is empty and dropped.
    # GNV HDB KMW SRY CTT: F3 = L (p = 1, slice [2:6]).
    # Reverse complement AAGYRSWMKBDHVNCAT (only A, C, G, T are complemented):
    # AAG YRS WMK BDH VNC AT -> R1 = K; AGY RSW MKB DHV NCA T -> R2 empty;
    # GYR SWM KBD HVN CAT -> R3 = H.
    frames = as_tuples(six_frames("c", "ATGNVHDBKMWSRYCTT"))
    assert frames == [
        ("cF1", "ATGN", "M"),
        ("cF3", "GNVH", "L"),
        ("cR1", "AAGY", "K"),
        ("cR3", "GYRS", "H"),
    ]


def test_a_500_nt_chunk_with_166_codon_frames_gives_499_or_498_nt_slices():
    sequence = "GCT" * 166 + "GC"  # reverse complement: GC + AGC * 166
    frames = six_frames("c", sequence)
    assert [(f.id, f.protein, len(f.nucleotide)) for f in frames] == [
        ("cF1", "A" * 166, 499),  # GCT...: 3p + 1
        ("cF2", "L" * 166, 499),  # CTG...: 3p + 1
        ("cF3", "C" * 166, 498),  # TGC...: clipped at the end
        ("cR1", "A" * 166, 499),  # GCA...
        ("cR2", "Q" * 166, 499),  # CAG...
        ("cR3", "S" * 166, 498),  # AGC...
    ]
    assert frames[0].nucleotide == sequence[:499]
    assert frames[2].nucleotide == sequence[2:]


def test_with_dropped_codons_the_slice_is_shorter_than_the_frame_read():
    frames = six_frames("c", "ATGNNNAAACCC")
    assert frames[0] == Frame("cF1", "ATGNNNAAAC", "MKP")
    frames = six_frames("c", "ATGAAANNNCCC")
    assert frames[0] == Frame("cF1", "ATGAAANNNC", "MKP")


@pytest.mark.parametrize("sequence", ["CTAGCTAGCTAG", "TAGNNNCTA", "NNNNNNNNN", "AC", ""])
def test_a_chunk_without_a_stop_free_non_empty_frame_gives_nothing(sequence):
    assert six_frames("c", sequence) == []


def test_a_stop_only_in_the_last_codon_still_drops_the_frame():
    # ATG CCC TAG -> MP*; TGC CCT -> CP; GCC CTA -> AL.
    assert [f.id for f in six_frames("c", "ATGCCCTAG") if f.id.startswith("cF")] == ["cF2", "cF3"]


def random_sequences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ACGT" * 8 + "acgt" * 2 + IUPAC_AMBIGUOUS + "n"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 45))) for _ in range(count)]


def test_random_sequences_match_the_step_by_step_reference():
    sequences = random_sequences(3000, seed=7)
    kept = 0
    for n, sequence in enumerate(sequences):
        expected = reference_six_frames(f"s{n}_chunk_1", sequence)
        assert as_tuples(six_frames(f"s{n}_chunk_1", sequence)) == expected, sequence
        kept += len(expected)
    assert kept > 3000  # the comparison covered many kept frames


def write_chunks(path: Path, chunks: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{cid}\n{seq}\n" for cid, seq in chunks))
    return path


def test_translate_fasta_writes_both_files_in_chunk_then_frame_order(tmp_path):
    chunks = [("r1_chunk_1", "ATGGCTTGGAAA"), ("r1_chunk_2", "CTAGCTAGCTAG"), ("r2_chunk_1", "aTGNNNTAAGCc")]
    chunks += [(f"s{n}_chunk_1", s) for n, s in enumerate(random_sequences(200, seed=3))]
    source = write_chunks(tmp_path / "chunks.fa", chunks)
    summary = translate_fasta(source, tmp_path / "out_nucleotide.fa", tmp_path / "out_protein.faa")
    expected = [frame for cid, seq in chunks for frame in reference_six_frames(cid, seq)]
    assert (tmp_path / "out_nucleotide.fa").read_text() == "".join(
        f">{fid}\n{nucleotide}\n" for fid, nucleotide, _ in expected
    )
    assert (tmp_path / "out_protein.faa").read_text() == "".join(f">{fid}\n{protein}\n" for fid, _, protein in expected)
    assert summary == TranslateSummary(chunks=len(chunks), frames=len(expected))
    assert "r1_chunk_2" not in (tmp_path / "out_protein.faa").read_text()


def test_translate_fasta_leaves_no_output_on_bad_input(tmp_path):
    source = tmp_path / "chunks.fa"
    source.write_bytes(b">a_chunk_1\nATGAAA\n>b_chunk_1\nAT\x00G\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="record 2 \\('b_chunk_1'\\)"):
        translate_fasta(source, out / "n.fa", out / "p.faa")
    assert list(out.iterdir()) == []
