"""The Snakemake workflow catalog's standardized usage: its settings file, its lint from the repository root (as
the catalog runs it: `snakemake --lint` on config/config.yaml), and the test configuration that
`snakemake --directory .test` runs (the convention of the catalog and snakemake's workflow template). The
catalog's formatting check (snakefmt) is in tests/test_style.py."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from runs import BIN, REPO, read_ids, snakemake_env

# What a copy of the repository needs to run the workflow the catalog's way (the package is installed).
WORKFLOW_PARTS = ("workflow", "config", "envs", ".test")


def repository_copy(tmp_path):
    """The workflow's files in a folder of their own, so that a run from its root writes nothing in the checkout."""
    for part in WORKFLOW_PARTS:
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("results", "logs", "models",
                                                                                   ".snakemake", ".virnucpro"))  # fmt: skip
    return tmp_path


def test_the_catalog_settings_give_the_usage_the_catalog_reads():
    usage = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert set(usage) == {"mandatory-flags", "software-stack-deployment", "report"}
    assert usage["report"] is True
    assert usage["software-stack-deployment"] == {"conda": True, "singularity": True, "singularity+conda": False}
    assert "--cores" in usage["mandatory-flags"]["desc"] and "config/README.md" in usage["mandatory-flags"]["desc"]
    assert (REPO / "workflow" / "Snakefile").is_file() and (REPO / "config" / "README.md").is_file()


def test_lint_from_the_repository_root_reports_nothing(tmp_path):
    root = repository_copy(tmp_path)
    result = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=root, env=snakemake_env(), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


@pytest.mark.slow
def test_the_test_configuration_runs_with_snakemake_directory_dot_test(tmp_path):
    root = repository_copy(tmp_path)
    env = snakemake_env()
    subprocess.run([str(BIN / "virnucpro"), "make-test-models", ".test/models"], cwd=root, env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    result = subprocess.run([str(BIN / "snakemake"), "--directory", ".test"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-8000:]
    results = root / ".test" / "results"
    for sample, data in (("sample_a", "sample_a.fa"), ("sample_b", "sample_b.fq")):
        rows = (results / sample / "reads.tsv").read_text().splitlines()[1:]
        reads = root / ".test" / "data" / data
        ids = read_ids(reads) if data.endswith(".fa") else reads.read_text().splitlines()[::4]
        assert sorted(row.split("\t")[0] for row in rows) == sorted(line.lstrip("@").split()[0] for line in ids)
        assert (results / sample / "prediction_results.txt").is_file()
    assert (results / "run_stats.json").is_file()
