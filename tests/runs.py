"""Helpers of the tests that run the workflow: real snakemake processes on the demo reads, and what
a test needs to watch them (processes, embeddings, outputs). Plain functions; the fixtures are in
conftest.py."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from virnucpro.layout import RESULTS, RunFiles, SampleFiles

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "workflow" / "Snakefile"
DEMO_READS = REPO / "tests" / "data" / "demo_reads.fa"
DEMO_SCRIPT = REPO / "scripts" / "demo.sh"
BIN = Path(sys.executable).parent
ABSENT_MODELS = {"esm2": "absent/esm2.pt", "dnabert_s": "absent/DNABERT-S", "classifier_500": "absent/500_model.pth"}
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
IDLE_TIMEOUT = 300  # far above a run's length: a daemon that only stops by idling makes a test fail


def snakemake_env() -> dict[str, str]:
    """This environment, with this virtualenv's bin first on PATH (the rules call virnucpro)."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [str(BIN / "snakemake"), "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]


def snakemake(workdir: Path, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run snakemake on the workflow in `workdir` (environment: `snakemake_env()` unless given); its
    stdout and stderr together are in `.stdout`."""
    return subprocess.run(
        snakemake_command(workdir, *args), cwd=workdir, env=env or snakemake_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip


def run_workflow(workdir: Path, *args: str, cores: int = 3, timeout: float = 600) -> subprocess.CompletedProcess:
    """A run of the workflow with `workdir`'s config.yaml."""
    return snakemake(workdir, "--cores", str(cores), "--configfile", str(workdir / "config.yaml"), *args,
                     timeout=timeout)  # fmt: skip


def run_demo(folder: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """scripts/demo.sh with this virtualenv's virnucpro and snakemake (--no-setup), its run in `folder`; its
    stdout and stderr together are in `.stdout`."""
    env = dict(snakemake_env(), VIRNUCPRO_DEMO_DIR=str(folder))
    return subprocess.run(["bash", str(DEMO_SCRIPT), "--no-setup"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)  # fmt: skip


def write_config(workdir: Path, models: dict[str, Path], samples: dict[str, str], **keys) -> Path:
    config = {
        "samples": samples,
        "length": 500,
        "models": {
            "esm2": str(models["esm2"]),
            "dnabert_s": str(models["dnabert_s"]),
            "classifier": str(models["classifier_500"]),
        },
        "shard_size": 25,
        "idle_timeout": IDLE_TIMEOUT,
        **keys,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_run(workdir: Path, *args: str, cores: int = 3) -> subprocess.Popen:
    """Start snakemake with `workdir`'s config.yaml in its own session (so that a test can kill it and all
    it started); its output goes to `workdir`/snakemake.out."""
    log = open(workdir / "snakemake.out", "w")
    return subprocess.Popen(
        snakemake_command(workdir, "--cores", str(cores), "--configfile", str(workdir / "config.yaml"), *args),
        cwd=workdir, env=snakemake_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def run_output(workdir: Path) -> str:
    return (workdir / "snakemake.out").read_text()


def wait_until(condition: Callable[[], object], timeout: float, what: str, run: subprocess.Popen | None = None):
    """Poll `condition` until it is true (its value is returned); fail with `what` after `timeout` seconds,
    or as soon as `run` has exited."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if run is not None and run.poll() is not None:
            raise AssertionError(f"the run ended (status {run.returncode}) before: {what}\n{run_output_of(run)}")
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return value


def run_output_of(run: subprocess.Popen) -> str:
    path = Path(run.args[run.args.index("--directory") + 1]) / "snakemake.out"
    return path.read_text()[-8000:] if path.exists() else ""


def sample_files(workdir: Path, sample: str = "demo") -> SampleFiles:
    """The files of a sample of the run in `workdir` (``virnucpro.layout``; tests/test_layout.py pins the names)."""
    return SampleFiles(sample, str(workdir / RESULTS))


def run_files(workdir: Path) -> RunFiles:
    """The run's own files under `workdir`'s results/."""
    return RunFiles(str(workdir / RESULTS))


def embeddings(workdir: Path, sample: str = "demo") -> list[Path]:
    return sorted(Path(sample_files(workdir, sample).embeddings).glob("*.pt"))


def wait_for_embeddings(workdir: Path, run: subprocess.Popen, count: int, sample: str = "demo") -> None:
    """Wait until `count` embedding files exist (the run is in the middle of its embeddings)."""
    wait_until(lambda: len(embeddings(workdir, sample)) >= count, 300, f"{count} embedding files", run)


def shard_count(workdir: Path, sample: str = "demo") -> int:
    return len(sample_files(workdir, sample).shard_files.names())


def read_ids(fasta: Path) -> list[str]:
    with open(fasta) as handle:
        return [line[1:].split()[0] for line in handle if line.startswith(">")]


def line_with(text: str, needle: str) -> str:
    """The one line of `text` that contains `needle` (fails if there is none)."""
    lines = [line for line in text.splitlines() if needle in line]
    assert lines, f"no line contains {needle!r} in:\n{text}"
    return lines[0]


def run_stats(workdir: Path) -> dict:
    return json.loads(Path(run_files(workdir).run_stats).read_text())


def assert_same_outputs(workdir: Path, reference: Path, sample: str = "demo") -> None:
    """The sample's compared outputs (all but failures.tsv, whose entries hold times) are byte-identical to
    those of the reference run."""
    for made, expected in zip(
        compared_outputs(sample_files(workdir, sample)), compared_outputs(sample_files(reference, sample))
    ):
        assert Path(made).read_bytes() == Path(expected).read_bytes(), made


def compared_outputs(files: SampleFiles) -> tuple[str, ...]:
    return (files.prediction_results, files.highest_scores, files.reads_table)


# --- processes ---------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def processes_in(workdir: Path) -> dict[int, str]:
    """Live processes working in `workdir` (their current directory), with their command lines."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd") == str(workdir):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def daemons_in(workdir: Path) -> dict[int, str]:
    """The model daemons (`virnucpro serve`, the children of serve jobs) working in `workdir`."""
    return {pid: line for pid, line in processes_in(workdir).items() if "virnucpro serve " in line}


def serve_jobs_in(workdir: Path) -> dict[int, str]:
    """The serve jobs' supervisors (`virnucpro serve-job`) working in `workdir`."""
    return {pid: line for pid, line in processes_in(workdir).items() if "virnucpro serve-job " in line}


def daemon_pids(workdir: Path, daemon_id: str) -> list[int]:
    return [pid for pid, line in daemons_in(workdir).items() if f"--daemon-id {daemon_id} " in line]


def seconds_until_no_daemon(workdir: Path, since: float, limit: float) -> float:
    """Seconds from `since` (monotonic) until no daemon works in `workdir`; fails after `limit`."""
    while daemons_in(workdir):
        assert time.monotonic() - since < limit, f"daemons still alive after {limit} s: {daemons_in(workdir)}"
        time.sleep(0.1)
    return time.monotonic() - since


def kill_all_in(workdir: Path) -> None:
    """SIGKILL every process still working in `workdir` (a test's clean-up)."""
    for pid in processes_in(workdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def serve_processes(workdir: Path) -> list[str]:
    """Command lines of live `virnucpro serve` (and `serve-job`) processes naming `workdir` in their arguments
    (where they run from another working directory, e.g. as SLURM jobs)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(args).decode(errors="replace")
        if "virnucpro" in text and (b"serve" in args[1:] or b"serve-job" in args[1:]) and str(workdir) in text:
            found.append(text)
    return found


# --- the SLURM profile on the test clusters (tests/test_slurm.py, tests/test_multinode.py) -------------
# Only what a throw-away cluster needs differs from the profile: no accounting (so squeue gives the
# job states), quick status checks, and the SLURM logs of successful jobs kept.
TEST_SETTINGS = {
    "slurm-status-command": "squeue",
    "slurm-init-seconds-before-status-checks": 1,
    "slurm-keep-successful-logs": True,
}


def write_profile(workdir: Path, **resources: dict) -> Path:
    """The SLURM profile with the test cluster's settings (and these rules' resources changed)."""
    settings = yaml.safe_load(SLURM_PROFILE.read_text())
    for rule, values in resources.items():
        settings["set-resources"][rule] = {**settings["set-resources"].get(rule, {}), **values}
    profile = workdir / "profile"
    profile.mkdir(exist_ok=True)
    (profile / "config.yaml").write_text(yaml.safe_dump({**settings, **TEST_SETTINGS}))
    return profile


def ran_locally(output: str, rule: str) -> bool:
    """Whether snakemake's output shows jobs of `rule` and all of them local (with a cluster executor: local
    rules and checkpoints), none submitted to the cluster."""
    heads = re.findall(rf"^(localrule|localcheckpoint|rule|checkpoint) {rule}:$", output, re.MULTILINE)
    return bool(heads) and all(head.startswith("local") for head in heads)


def slurm_jobs(env: dict[str, str]) -> str:
    queue = subprocess.run(["squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING", "-o", "%i %j"], env=env,
                           capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return queue.stdout.strip()


def gate_esm2_shards(workdir: Path, gate, count: int | None = None, run: subprocess.Popen | None = None) -> list:
    """Hold (the ``gate`` fixture's file leases) every ESM-2 shard file of the demo sample as soon as
    shard_frames has written them (``count`` of them, if given), before a daemon opens them; the gates."""
    shards = workdir / "results" / "demo" / "work" / "shards"

    def written() -> bool:
        found = len(list(shards.glob("shard_*.faa")))
        return found == count if count is not None else found > 0

    wait_until(written, 300, "the ESM-2 shard files written", run)
    gates = []
    for path in sorted(shards.glob("shard_*.faa")):
        try:
            gates.append(gate(path))
        except OSError as error:  # taken already: the test was late for this one
            assert error.errno == errno.EAGAIN, error
    assert gates, "every shard file was opened before the test could hold one"
    return gates
