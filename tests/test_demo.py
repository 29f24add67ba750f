"""The demo (scripts/demo.sh) explains itself: its closing lines give the counts, computed here from its
outputs, and say what its verdicts are worth and what to do for real runs; and its results hold only what
the README's outputs section lists."""

from __future__ import annotations

import csv
import re
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import pytest
from runs import REPO

pytestmark = pytest.mark.slow


def closing_text(output: str) -> list[str]:
    """The demo's closing lines: from its first line that starts with 'demo:' to the end."""
    lines = output.splitlines()
    first = next(index for index, line in enumerate(lines) if line.startswith("demo: "))
    return lines[first:]


def readme_outputs() -> tuple[list[str], list[str]]:
    """What the README's outputs section names: per sample (patterns under results/{sample}/, from its table)
    and per run (names directly under results/, from its text)."""
    section = (REPO / "README.md").read_text().split("## Outputs (`results/{sample}/`)", 1)[1].split("\n## ", 1)[0]
    per_sample = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    per_run = re.findall(r"`results/([^`/{}]+/?)`", section)
    return per_sample, per_run


def test_the_demo_closes_with_its_counts_taken_from_its_outputs(demo_outside):
    folder, output = demo_outside
    results = folder / "results" / "demo"
    with open(results / "reads.tsv", newline="") as handle:
        verdicts = Counter(row["verdict"] for row in csv.DictReader(handle, delimiter="\t"))
    failures = len((results / "failures.tsv").read_text().splitlines()) - 1
    reads = sum(verdicts.values())
    assert reads == 60  # every read of tests/data/demo_reads.fa has a row
    expected = (
        f"demo: {reads} reads: {verdicts['virus']} virus, {verdicts['others']} others, "
        f"{verdicts['unclassified']} with no verdict; {failures} failures."
    )
    assert closing_text(output)[0] == expected


def test_the_demo_says_its_verdicts_mean_nothing_and_what_to_do_for_real_runs(demo_outside):
    text = " ".join(line.strip() for line in closing_text(demo_outside[1]))
    assert "These verdicts mean nothing biologically" in text
    assert "random weights" in text and "not from the trained VirNucPro models" in text
    assert "virnucpro models download --dest models" in text and "docs/models.md" in text
    assert "config/README.md" in text and "snakemake --cores 3 --configfile my-config.yaml" in text
    assert f"results in {demo_outside[0] / 'results' / 'demo'}/" in text


def test_the_demos_results_hold_only_what_the_readme_lists(demo_outside):
    per_sample, per_run = readme_outputs()
    assert {"prediction_results.txt", "reads.tsv", "failures.tsv", "plots/*.png", "work/"} <= set(per_sample)
    assert set(per_run) == {"run_stats.json", "daemons.png", "daemons/"}
    results = demo_outside[0] / "results"
    unlisted = []
    for path in sorted(results.rglob("*")):
        relative = path.relative_to(results)
        if path.is_dir() or len(relative.parts) == 1 and relative.name in per_run:
            continue
        if f"{relative.parts[0]}/" in per_run:  # a folder of the run's own (the serve jobs' statistics)
            continue
        inside = Path(*relative.parts[1:]).as_posix()  # under results/{sample}/
        if not any(fnmatch(inside, pattern) or pattern.endswith("/") and inside.startswith(pattern)
                   for pattern in per_sample):  # fmt: skip
            unlisted.append(relative.as_posix())
    assert unlisted == []  # e.g. demo/failures.tsv.lock, left by reading failures.tsv under the manifest's lock
    assert sorted(path.name for path in results.iterdir()) == ["daemons", "daemons.png", "demo", "run_stats.json"]
