"""The names of the files under results/ (virnucpro.layout): the ones README documents, spelled here once more
(the other tests find the files through the layout); where a step given a folder puts them; the shards found in
a folder."""

from __future__ import annotations

import re
from pathlib import Path

from virnucpro.layout import (
    SHARD_PATTERN,
    PlotFiles,
    RunFiles,
    SampleFiles,
    ShardFiles,
    shard_index,
    shard_name,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_outputs() -> list[str]:
    """The file names in README's table "Outputs (`results/{sample}/`)"."""
    section = README.read_text().split("## Outputs (`results/{sample}/`)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def test_a_samples_outputs_are_the_ones_readme_documents():
    files = SampleFiles("s1")
    documented = readme_outputs()
    assert files.folder == "results/s1"
    assert (
        [path.removeprefix("results/s1/") for path in files.outputs]
        == documented[:4]
        == [
            "prediction_results.txt",
            "prediction_results_highestscore.csv",
            "reads.tsv",
            "failures.tsv",
        ]
    )
    assert files.plots.pngs == ("results/s1/plots/scores.png", "results/s1/plots/verdicts.png",
                                "results/s1/plots/failures.png")  # fmt: skip
    assert "plots/*.png" in documented
    assert files.plots.summary_page == "results/s1/plots/summary.html" and "plots/summary.html" in documented
    assert files.plots.files == (*files.plots.pngs, files.plots.summary_page)
    assert "work/" in documented and files.work == "results/s1/work"


def test_the_runs_own_files_are_the_ones_readme_documents():
    files = RunFiles()
    readme = README.read_text()
    assert files.run_stats == "results/run_stats.json" and f"`{files.run_stats}`" in readme
    assert files.daemons_plot == "results/daemons.png" and f"`{files.daemons_plot}`" in readme
    assert files.daemon_stats("esm2-0") == "results/daemons/esm2-0.stats.json"
    assert files.reserved_names == {"run_stats.json", "daemons.png", "daemons"}


def test_the_intermediates_keep_their_names_so_that_earlier_results_folders_resume():
    files = SampleFiles("s1")
    assert files.intermediates == (
        "results/s1/work/chunked.fa",
        "results/s1/work/reads_index.tsv",
        "results/s1/work/identified_nucleotide.fa",
        "results/s1/work/identified_protein.faa",
    )
    assert files.shards == "results/s1/work/shards"
    assert files.shard_nucleotide("shard_00003") == "results/s1/work/shards/shard_00003.fa"
    assert files.shard_protein("shard_00003") == "results/s1/work/shards/shard_00003.faa"
    assert files.shard_input("shard_00003", "esm2") == files.shard_protein("shard_00003")
    assert files.shard_input("shard_00003", "dnabert_s") == files.shard_nucleotide("shard_00003")
    assert files.embedding("shard_00003", "esm2") == "results/s1/work/embeddings/shard_00003.esm2.pt"
    assert files.embedding_record("shard_00003", "dnabert_s") == "results/s1/work/embeddings/shard_00003.dnabert_s.json"
    assert files.predictions("shard_00003") == "results/s1/work/predictions/shard_00003.tsv"


def test_with_wildcards_the_names_are_the_rules_patterns():
    files = SampleFiles("{sample}")
    assert files.embedding("{shard}", "esm2") == "results/{sample}/work/embeddings/{shard}.esm2.pt"
    assert files.plots.png("scores") == "results/{sample}/plots/scores.png"


def test_a_step_given_a_folder_names_the_files_in_it():
    for folder, expected in (("out", "out/reads.tsv"), ("/abs/out", "/abs/out/reads.tsv"), ("out/", "out/reads.tsv")):
        assert SampleFiles.at(folder).reads_table == expected, folder
    assert SampleFiles.at(Path("/abs/out")).work == "/abs/out/work"
    assert SampleFiles("s1", "/run/results") == SampleFiles.at("/run/results/s1")
    assert PlotFiles("/x/plots").summary_page == "/x/plots/summary.html"
    assert RunFiles("/x").daemons_plot == "/x/daemons.png"


def test_shard_names_count_from_zero_in_five_digits_and_sort_by_their_number():
    assert [shard_name(index) for index in (0, 7, 99999, 100000)] == [
        "shard_00000", "shard_00007", "shard_99999", "shard_100000",
    ]  # fmt: skip
    assert all(re.fullmatch(SHARD_PATTERN, shard_name(index)) for index in (0, 123456))
    assert [shard_index(shard_name(index)) for index in (0, 42, 100000)] == [0, 42, 100000]


def test_the_shards_of_a_folder_are_those_with_a_nucleotide_file_in_shard_order(tmp_path):
    for name in ("shard_00002.fa", "shard_00002.faa", "shard_100000.fa", "shard_00010.fa", "shard_x.fa",
                 "notes.fa", ".shard_00003.fa.tmp", "shard_00004.faa"):  # fmt: skip
        (tmp_path / name).touch()
    assert ShardFiles(str(tmp_path)).names() == ["shard_00002", "shard_00010", "shard_100000"]
    assert ShardFiles(str(tmp_path / "absent")).names() == []
