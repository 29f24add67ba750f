"""The Snakemake report stays small at scale (issue 10, case 9): it embeds each sample's plots and
summary page, never the per-read tables, so its size does not grow with the reads. The samples are
synthetic finished runs (benchmarks/report_size.py writes them: no model runs)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report_size  # noqa: E402


def make_report(workdir: Path, reads: int) -> tuple[int, str, Path]:
    workdir.mkdir()
    config = report_size.write_config(workdir)
    report_size.write_sample(workdir, reads)
    sample = workdir / "results" / report_size.SAMPLE
    report_size.run([str(report_size.BIN / "virnucpro"), "-q", "report-plots", "--sample", report_size.SAMPLE,
                     "--reads-table", str(sample / "reads.tsv"), "--predictions", str(sample / "prediction_results.txt"),
                     "--failures", str(sample / "failures.tsv"), "--output-dir", str(sample / "plots")], workdir)  # fmt: skip
    _, size = report_size.report(workdir, REPO / "workflow" / "Snakefile", config, "report.html")
    return size, (workdir / "report.html").read_text(), sample


@pytest.mark.slow
def test_the_report_embeds_summaries_not_the_per_read_tables_and_does_not_grow_with_the_reads(tmp_path):
    small, _, _ = make_report(tmp_path / "small", 2_000)
    large, html, sample = make_report(tmp_path / "large", 50_000)
    # 50,000 reads: reads.tsv 2.3 MB and prediction_results.txt 5.5 MB, 10 MB as base64 if embedded
    assert large - small < 200_000, (small, large)
    assert large < 8_000_000
    assert "summary.html" in html
    for name in ("reads.tsv", "prediction_results.txt", "prediction_results_highestscore.csv"):
        head = base64.b64encode((sample / name).read_bytes()[:3000]).decode()[:2000]
        assert head not in html, name
