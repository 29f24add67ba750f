"""Fixtures shared by the test files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small random-weight models in the published formats, written once per test session:
    paths under the keys esm2, dnabert_s, classifier_300 and classifier_500."""
    from virnucpro.testmodels import make_test_models

    return make_test_models(tmp_path_factory.mktemp("test-models"))


@pytest.fixture(scope="session")
def demo_reference(tmp_path_factory: pytest.TempPathFactory, test_models: dict[str, Path]) -> Path:
    """An undisturbed daemon-mode run of the demo reads with the test models, 20 frames a shard (6 shards): what
    a disturbed run must give."""
    from runs import DEMO_READS, run_workflow, shard_count, write_config

    workdir = tmp_path_factory.mktemp("undisturbed")
    write_config(workdir, test_models, {"demo": str(DEMO_READS)}, shard_size=20)
    result = run_workflow(workdir)
    assert result.returncode == 0, result.stdout[-10000:]
    assert shard_count(workdir) == 6
    return workdir


@pytest.fixture(scope="session")
def demo_outside(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """scripts/demo.sh, run once per test session with this virtualenv: its run folder and its output."""
    from runs import run_demo

    folder = tmp_path_factory.mktemp("demo") / "run"
    result = run_demo(folder)
    assert result.returncode == 0, result.stdout[-8000:]
    return folder, result.stdout


# A test cluster of SLURM nodes in network namespaces (scripts/slurm-cluster.sh start --nodes N).

CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-cluster.sh"
CLUSTER_NODES = 2
# Declared, not enforced (no cgroups): the test cluster's defaults, enough that the SLURM profile's
# requests fit as they are (a serve job: one GPU with 8 CPUs and 32 GB; the tests that run two daemons
# per node ask less, to leave room for CPU jobs beside them).
NODE_CPUS = 16
NODE_MEMORY_MB = 64000


@dataclass
class SlurmNodes:
    """A running test cluster: this machine is the login node, node1..nodeN are network namespaces."""

    env: dict[str, str]  # the environment that reaches it: SLURM_CONF, PATH
    nodes: dict[str, str]  # node name -> its address
    login_address: str  # this machine's address on the cluster's network (slurmctld's)

    def command(
        self, *args: str, timeout: float = 60, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run a command with the cluster's environment (and these variables); fail on an error if `check`."""
        result = subprocess.run(
            args, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check:
            assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def script(
        self, *args: str, timeout: float = 300, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """scripts/slurm-cluster.sh with these arguments."""
        return self.command("bash", str(CLUSTER_SCRIPT), *args, timeout=timeout, check=check, **env)

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (sbatch options and --wrap or a script); its id."""
        return self.command("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, NODE_FAIL, ... (kept by squeue for MinJobAge after the end)."""
        return self.command("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip()

    def node_state(self, node: str) -> str:
        """idle, mixed, allocated, down, ... (sinfo's long state, without its * for "not responding")."""
        return self.command("sinfo", "-h", "-n", node, "-o", "%T").stdout.strip().rstrip("*")

    def wait_until(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        """Poll `condition` until it is true; fail with `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            time.sleep(0.2)

    def wait_for_job(self, job_id: str, timeout: float = 60) -> str:
        """Wait until the job has ended; its final state."""
        ended = ("COMPLETED", "FAILED", "NODE_FAIL", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
        self.wait_until(lambda: self.job_state(job_id) in ended, timeout, f"job {job_id} ended")
        return self.job_state(job_id)


@contextmanager
def started_slurm_nodes(cpus: int = NODE_CPUS, memory_mb: int = NODE_MEMORY_MB) -> Iterator[SlurmNodes]:
    """A SLURM cluster of CLUSTER_NODES nodes of `cpus` CPUs, `memory_mb` MB and 2 stand-in GPUs each, started
    (installing SLURM if needed) and stopped at the end, whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("the test cluster needs root (network namespaces, SLURM daemons running as root)")
    env = dict(os.environ, CPUS=str(cpus), REAL_MEMORY_MB=str(memory_mb), GPUS_PER_NODE="2")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", "--nodes", str(CLUSTER_NODES)], env=env,
                             capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    # A start that failed has stopped what it started (and one refused for a running cluster of the
    # other kind must leave that one alone): nothing to stop here.
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        export = started.stdout.strip().splitlines()[-1]
        assert export.startswith("export SLURM_CONF="), started.stdout
        env["SLURM_CONF"] = export.split("=", 1)[1]
        cluster = SlurmNodes(env=env, nodes={}, login_address="")
        for line in cluster.command("scontrol", "-o", "show", "node").stdout.splitlines():
            fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
            cluster.nodes[fields["NodeName"]] = fields["NodeAddr"]
        config = cluster.command("scontrol", "show", "config").stdout
        cluster.login_address = re.search(r"SlurmctldHost\[0\]\s*=\s*\S+\(([\d.]+)\)", config).group(1)
        yield cluster
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def slurm_nodes() -> Iterator[SlurmNodes]:
    """The test cluster (started_slurm_nodes) for a test module."""
    with started_slurm_nodes() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def small_slurm_nodes() -> Iterator[SlurmNodes]:
    """The test cluster with small nodes, 8 CPUs and 8,000 MB each, for a test module."""
    with started_slurm_nodes(cpus=8, memory_mb=8000) as cluster:
        yield cluster


# --- model daemons: tests/test_daemon.py, tests/test_daemon_faults.py, tests/test_worker.py --------
# (plain helpers in tests/daemon_helpers.py)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The daemon tests' small random models: an ESM-2 checkpoint and a DNABERT-S snapshot folder."""
    from virnucpro.testmodels import write_random_checkpoint, write_random_snapshot

    directory = tmp_path_factory.mktemp("models")
    return {
        "esm2": write_random_checkpoint(directory / "esm2_t2_64_test.pt", seed=5),
        "dnabert_s": write_random_snapshot(directory / "DNABERT-S", seed=5),
    }


@pytest.fixture
def start_daemon():
    """Start `virnucpro serve` processes (daemon_helpers.DaemonProcess); any still running at the end of
    the test is killed."""
    from daemon_helpers import DaemonProcess

    started: list[DaemonProcess] = []

    def start(*args, **kwargs) -> DaemonProcess:
        started.append(DaemonProcess(*args, **kwargs))
        return started[-1]

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]):
    """One ESM-2 daemon shared by a test module's request-level tests: its process, endpoint, allowed
    data folder, run folder and weights."""
    from daemon_helpers import DaemonProcess

    root = tmp_path_factory.mktemp("shared")
    run_dir = root / "run"
    daemon = DaemonProcess(run_dir, "esm2-shared", "esm2", models["esm2"], [root / "data"], "--idle-timeout", "600")
    try:
        entry = daemon.wait_ready()
        yield {"daemon": daemon, "endpoint": entry["endpoint"], "data": root / "data", "run_dir": run_dir,
               "weights": models["esm2"]}  # fmt: skip
    finally:
        daemon.kill()


@pytest.fixture
def gate():
    """Make shard files that no one can open until the test opens them (daemon_helpers.Gate); every gate
    is opened at the end of the test. SIGIO, the kernel's notice to a lease holder, is ignored meanwhile."""
    import signal

    from daemon_helpers import Gate

    made: list[Gate] = []
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)

    def make(path: Path, text: str | None = None) -> Gate:
        made.append(Gate(path, text))
        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            each.close()
        signal.signal(signal.SIGIO, previous)


LEASE_BREAK_TIME = Path("/proc/sys/fs/lease-break-time")


@pytest.fixture
def long_leases():
    """As root, the kernel's own limit on a gate held against a reader goes from 45 s to 10 min for the
    test (a loaded machine can take longer than 45 s between a gate's first reader and its opening); the
    kernel's 45 s stay where /proc/sys cannot be written (a container)."""
    break_time = None
    if os.geteuid() == 0 and LEASE_BREAK_TIME.exists():
        try:
            break_time = LEASE_BREAK_TIME.read_text()
            LEASE_BREAK_TIME.write_text("600\n")
        except OSError:
            break_time = None
    yield
    if break_time is not None:
        LEASE_BREAK_TIME.write_text(break_time)
