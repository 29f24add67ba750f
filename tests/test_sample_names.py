"""Sample names that would collide with the workflow's own outputs under results/ (issue 10, case 6):
results/{sample}/ must never be, or be inside, results/daemons/, results/run_stats.json or
results/daemons.png. Such a name is refused at start with a one-line config error, not by a
multi-line Snakemake exception while the DAG is built (ChildIOException)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "workflow" / "Snakefile"
DEMO_READS = REPO / "tests" / "data" / "demo_reads.fa"
BIN = Path(sys.executable).parent
COLLIDING = ["run_stats.json", "daemons.png", "daemons"]


def dry_run(workdir: Path, models: dict[str, Path], samples: dict[str, str], **keys) -> subprocess.CompletedProcess:
    config = {
        "samples": samples,
        "length": 500,
        "models": {
            "esm2": str(models["esm2"]),
            "dnabert_s": str(models["dnabert_s"]),
            "classifier": str(models["classifier_500"]),
        },
        **keys,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [str(BIN / "snakemake"), "--snakefile", str(SNAKEFILE), "--directory", str(workdir), "-n",
               "--cores", "3", "--configfile", str(workdir / "config.yaml")]  # fmt: skip
    environment = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(command, cwd=workdir, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)  # fmt: skip


def assert_refused_in_one_line(result: subprocess.CompletedProcess, name: str) -> None:
    assert result.returncode != 0, result.stdout[-3000:]
    lines = [line for line in result.stdout.splitlines() if f"sample name '{name}'" in line]
    assert lines, result.stdout[-3000:]
    assert "reserved" in lines[0] and "rename the sample" in lines[0], lines[0]
    assert "ChildIOException" not in result.stdout and "Traceback" not in result.stdout


@pytest.mark.parametrize("name", COLLIDING)
def test_a_sample_named_like_a_workflow_output_is_refused_in_one_line(tmp_path, test_models, name):
    assert_refused_in_one_line(dry_run(tmp_path, test_models, {name: str(DEMO_READS)}), name)


def test_a_colliding_name_in_the_sample_sheet_is_refused_too(tmp_path, test_models):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(f"sample\tfasta\nrun_stats.json\t{DEMO_READS}\n")
    assert_refused_in_one_line(dry_run(tmp_path, test_models, {}, sample_sheet=str(sheet)), "run_stats.json")


def test_a_colliding_name_in_another_letter_case_is_refused(tmp_path, test_models):
    """On a case-insensitive file system (macOS, Windows shares) results/Daemons.PNG is results/daemons.png."""
    assert_refused_in_one_line(dry_run(tmp_path, test_models, {"Daemons.PNG": str(DEMO_READS)}), "Daemons.PNG")


def test_names_that_only_resemble_a_workflow_output_are_accepted(tmp_path, test_models):
    samples = {name: str(DEMO_READS) for name in ("run_stats", "daemons_2", "daemons.png.1", "run_stats.json.gz")}
    result = dry_run(tmp_path, test_models, samples)
    assert result.returncode == 0, result.stdout[-3000:]
