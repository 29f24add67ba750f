"""The workflow across the two-node test cluster (scripts/slurm-cluster.sh start --nodes 2) with the SLURM
profile: the model daemons are GPU jobs on both nodes (gpu-slot:cpu: SLURM binds a stand-in GPU, the
model computes on the CPU), the embedding clients run on this machine (the login node) and reach them
over CURVE TCP at the nodes' addresses. Then a node is lost while its daemons hold shards, and the last
daemon of a model is lost.

The serve jobs are submitted held (``--hold``) and released onto the node the test names (``Placer``),
so that each node runs one daemon of each model: SLURM alone would fill node1's two GPUs with the two
ESM-2 daemons. The shard files of ESM-2 are held too (``Gate``, a file lease), so that each ESM-2 daemon
is in the middle of a shard when the node dies."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from runs import (
    DEMO_READS,
    assert_same_outputs,
    embeddings,
    gate_esm2_shards,
    line_with,
    ran_locally,
    run_stats,
    serve_processes,
    slurm_jobs,
    snakemake,
    snakemake_command,
    snakemake_env,
    wait_until,
    write_config,
    write_profile,
)

pytestmark = pytest.mark.slow

SHARD_SIZE = 4  # the demo reads' 119 frames make 30 shards
SHARDS = 30
BOTH_NODES = {"esm2-0": "node1", "dnabert_s-0": "node1", "esm2-1": "node2", "dnabert_s-1": "node2"}
# A serve job: one stand-in GPU and 2 CPUs (the profile's 8 per GPU would leave a node with two
# daemons no CPU for the other jobs), submitted held for the Placer.
SPREAD_SERVE_RESOURCES = {"cpus_per_gpu": 2, "mem_mb": 8000}
SERVE_RESOURCES = {**SPREAD_SERVE_RESOURCES, "slurm_extra": "--hold"}


class Placer:
    """Releases the run's held serve jobs, each onto its daemon's node (or, while that node is down, onto
    another): a stand-in for the user's placement constraints, so that the test knows where each runs."""

    def __init__(self, cluster, placement: dict[str, str]):
        self.cluster, self.placement = cluster, placement
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Placer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        if self.error is not None and exc[0] is None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self.done.wait(0.5):
                self._place_held_jobs()
        except BaseException as error:  # raised in the test by __exit__
            self.error = error

    def _place_held_jobs(self) -> None:
        held = self.cluster.command("squeue", "-h", "-t", "PENDING", "-o", "%i|%k|%r").stdout.splitlines()
        for job, comment, reason in (line.split("|", 2) for line in held):
            if reason != "JobHeldUser" or "rule_serve_model_wildcards_" not in comment:
                continue
            daemon = comment.split("rule_serve_model_wildcards_", 1)[1].strip()
            node = self.placement[daemon]
            if self.cluster.node_state(node) == "down":
                node = next(n for n in self.cluster.nodes if self.cluster.node_state(n) != "down")
            self.cluster.command("scontrol", "update", f"JobId={job}", f"NodeList={node}")
            self.cluster.command("scontrol", "release", job)


def start_cluster_run(workdir: Path, cluster, **profile_resources) -> subprocess.Popen:
    profile = write_profile(workdir, **{"serve_model": SERVE_RESOURCES, **profile_resources})
    command = snakemake_command(
        workdir, "--workflow-profile", str(profile), "--configfile", str(workdir / "config.yaml")
    )
    with open(workdir / "snakemake.out", "a") as out:
        return subprocess.Popen(command, cwd=workdir, env={**snakemake_env(), **cluster.env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def finish(run: subprocess.Popen, timeout: float = 900) -> int:
    try:
        return run.wait(timeout=timeout)
    finally:
        interrupt(run)


def interrupt(run: subprocess.Popen | None) -> None:
    """Stop a run that is still going (a test that failed midway), as Ctrl-C would."""
    if run is not None and run.poll() is None:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=180)


def read_log(workdir: Path) -> str:
    return (workdir / "snakemake.out").read_text()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, test_models) -> Path:
    """The reference: the same reads, shards and models, run locally."""
    workdir = tmp_path_factory.mktemp("local")
    write_config(workdir, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE)
    result = snakemake(workdir, "--cores", "3", "--configfile", str(workdir / "config.yaml"))
    assert result.returncode == 0, result.stdout[-10000:]
    return workdir


@pytest.fixture(scope="module")
def spread_run(slurm_nodes, test_models, tmp_path_factory) -> Path:
    """Two daemons of each model, one of each on each node."""
    workdir = tmp_path_factory.mktemp("spread")
    write_config(workdir, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE,
                 daemons={"esm2": ["gpu-slot:cpu"] * 2, "dnabert_s": ["gpu-slot:cpu"] * 2})  # fmt: skip
    with Placer(slurm_nodes, BOTH_NODES):
        code = finish(start_cluster_run(workdir, slurm_nodes))
    assert code == 0, read_log(workdir)[-10000:]
    return workdir


def test_the_run_across_two_nodes_gives_the_local_outputs_byte_for_byte(spread_run, local_run):
    assert_same_outputs(spread_run, local_run)
    assert len(embeddings(spread_run)) == 2 * SHARDS


def test_each_daemon_ran_on_its_node_with_its_own_gpu_loaded_once_and_served_over_tcp_at_the_node_address(
    spread_run, slurm_nodes
):
    stats = run_stats(spread_run)
    daemons = {entry["daemon_id"]: entry for entry in stats["daemons"]}
    print("\ndaemon        host   address         GPU  shards")
    for daemon_id, entry in sorted(daemons.items()):
        print(f"{daemon_id:<13} {entry['host']:<6} {entry['address']:<15} {entry['gpus']:<4} {entry['shards']}")
    assert {daemon: entry["host"] for daemon, entry in daemons.items()} == BOTH_NODES
    for entry in daemons.values():
        assert entry["model_loads"] == 1 and entry["exit_reason"] == "stopped", entry
        assert entry["transport"] == "tcp", entry
        # The address that the clients used is the node's own, on the cluster's network (not loopback).
        assert socket.gethostbyname(entry["address"]) == slurm_nodes.nodes[entry["host"]], entry
    for node in slurm_nodes.nodes:
        gpus = sorted(entry["gpus"] for entry in daemons.values() if entry["host"] == node)
        assert gpus == ["0", "1"], (node, gpus)  # SLURM bound each daemon of the node to its own GPU
    for model in ("esm2", "dnabert_s"):
        assert sum(entry["shards"] for entry in daemons.values() if entry["model"] == model) == SHARDS, model
    assert stats["daemons_lost"] == []


def test_the_clients_and_short_steps_ran_on_the_login_node_the_daemons_and_aggregation_as_slurm_jobs(spread_run):
    output = read_log(spread_run)
    for rule in ("embed_esm2", "embed_dnabert_s", "chunk_reads", "translate_chunks", "shard_frames", "classify_shard"):
        assert ran_locally(output, rule), rule
    assert list((spread_run / "logs" / "slurm" / "rule_aggregate_sample").glob("*/*.log"))
    for daemon in BOTH_NODES:
        assert list((spread_run / "logs" / "slurm" / "rule_serve_model" / daemon).glob("*.log")), daemon


def test_no_job_daemon_or_socket_is_left_after_the_run(spread_run, slurm_nodes):
    assert slurm_jobs(slurm_nodes.env) == ""
    assert serve_processes(spread_run) == []
    for folder in ("registry", "sockets"):
        assert not list((spread_run / ".virnucpro" / folder).glob("*")), folder


def test_a_node_lost_while_its_daemons_hold_shards_the_others_finish_the_run_with_the_same_outputs(
    slurm_nodes, test_models, local_run, tmp_path, gate
):
    write_config(tmp_path, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE,
                 daemons={"esm2": ["gpu-slot:cpu"] * 2, "dnabert_s": ["gpu-slot:cpu"] * 2})  # fmt: skip
    started = time.time()
    run = None
    try:
        with Placer(slurm_nodes, BOTH_NODES):
            run = start_cluster_run(tmp_path, slurm_nodes)
            gates = gate_esm2_shards(tmp_path, gate, SHARDS)
            # Both ESM-2 daemons are in the middle of a shard (each model thread blocked opening one).
            wait_until(lambda: sum(held.waiting() for held in gates) == 2, 300, "both ESM-2 daemons on a shard", run)
            done_before = len(embeddings(tmp_path))
            slurm_nodes.script("kill-node", "node2")
            killed = time.time()
            for held in gates:
                held.open()
            code = finish(run)
        ended = time.time()
    finally:
        interrupt(run)
        slurm_nodes.script("revive-node", "node2", check=False)
    assert code == 0, read_log(tmp_path)[-10000:]
    assert_same_outputs(tmp_path, local_run)
    assert len(embeddings(tmp_path)) == 2 * SHARDS  # every shard embedded, once: one file each
    assert (tmp_path / "results" / "demo" / "failures.tsv").read_text().count("\n") == 1  # the header only

    stats = run_stats(tmp_path)
    lost = {event["daemon"]: event for event in stats["daemons_lost"]}
    assert sorted(lost) == ["dnabert_s-1", "esm2-1"], stats["daemons_lost"]
    for event in lost.values():  # where it ran, as the registry knew it, and when the run learned of it
        assert event["host"] == event["address"] == "node2" and event["gpus"] in ("0", "1"), event
        assert event["time"] >= killed, event
    # The shards that esm2-1 held (the one it was embedding, and any queued behind it) went to esm2-0.
    esm2_logs = [path.read_text() for path in (tmp_path / "logs" / "embed" / "demo").glob("*.esm2.log")]
    taken_over = [log for log in esm2_logs if "daemon esm2-1 was lost while embedding" in log]
    assert taken_over and all("embedded by daemon esm2-0" in log for log in taken_over), taken_over
    after_kill = [event for event in _embedded_events(tmp_path) if event[0] > killed]  # whole seconds after it
    assert after_kill and {daemon for _, daemon in after_kill} <= {"esm2-0", "dnabert_s-0"}, after_kill
    print(f"\nnode2 killed {killed - started:.1f} s into the run with {done_before} of {2 * SHARDS} "
          f"embeddings done; first shard embedded after the kill {after_kill[0][0] - killed:.1f} s later; losses "
          f"recorded {min(e['time'] for e in lost.values()) - killed:.1f} s after the kill; the run ended "
          f"{ended - started:.0f} s after its start")  # fmt: skip


def test_the_last_daemon_of_a_model_lost_stops_the_run_clearly_and_a_rerun_finishes_without_recomputing(
    slurm_nodes, test_models, local_run, tmp_path, gate
):
    write_config(tmp_path, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE, daemon_restarts=0,
                 daemons={"esm2": ["gpu-slot:cpu"], "dnabert_s": ["gpu-slot:cpu"]})  # fmt: skip
    placement = {"esm2-0": "node2", "dnabert_s-0": "node1"}
    run = rerun = None
    try:
        with Placer(slurm_nodes, placement):
            run = start_cluster_run(tmp_path, slurm_nodes)
            gates = gate_esm2_shards(tmp_path, gate, SHARDS)
            # esm2-0 in the middle of a shard, and something embedded already (by dnabert_s-0, on node1).
            wait_until(lambda: any(held.waiting() for held in gates) and embeddings(tmp_path), 300,
                       "esm2-0 on a shard after a first embedding", run)  # fmt: skip
            slurm_nodes.script("kill-node", "node2")
            for held in gates:
                held.open()
            code = finish(run)
            assert code != 0, read_log(tmp_path)[-10000:]
            output = read_log(tmp_path)
            said = line_with(output, "virnucpro: stopping the model daemons:")
            assert "serve job of daemon esm2-0 on node2 failed with no restart left" in said, said
            # the run's last words: the node it lost, and what went with it
            last = line_with(output, "virnucpro: lost to the cluster:")
            assert "node2 (NODE_FAIL) with 1 job(s): serve_model (daemon=esm2-0)" in last, last
            assert output.index(last) > output.index(said) and output.rindex("Error in rule") < output.index(last)
            slurm_nodes.script("revive-node", "node2")
            kept = {path.name: path.stat().st_mtime_ns for path in embeddings(tmp_path)}
            rerun = start_cluster_run(tmp_path, slurm_nodes)
            code = finish(rerun)
    finally:
        interrupt(run)
        interrupt(rerun)
        slurm_nodes.script("revive-node", "node2", check=False)
    assert code == 0, read_log(tmp_path)[-10000:]
    assert_same_outputs(tmp_path, local_run)
    assert {name: mtime for name, mtime in ((p.name, p.stat().st_mtime_ns) for p in embeddings(tmp_path))
            if name in kept} == kept  # fmt: skip
    served = {entry["daemon_id"]: entry["shards"] for entry in run_stats(tmp_path)["daemons"]}
    assert sum(served.values()) == 2 * SHARDS - len(kept), (served, len(kept))  # only what was missing


def serve_placement(cluster) -> dict[str, str]:
    """Daemon ID -> the node where SLURM runs its serve job, for the serve jobs running now."""
    running = cluster.command("squeue", "-h", "-t", "RUNNING", "-o", "%k|%N").stdout.splitlines()
    return {comment.split("rule_serve_model_wildcards_", 1)[1].strip(): node
            for comment, node in (line.split("|", 1) for line in running)
            if "rule_serve_model_wildcards_" in comment}  # fmt: skip


def running_jobs_of(cluster, rule: str) -> dict[str, int]:
    """Node -> how many jobs of `rule` run there now."""
    nodes: dict[str, int] = {}
    for line in cluster.command("squeue", "-h", "-t", "RUNNING", "-o", "%k|%N").stdout.splitlines():
        comment, node = line.split("|", 1)
        if comment.strip().startswith(f"rule_{rule}_wildcards_"):
            nodes[node] = nodes.get(node, 0) + 1
    return nodes


def start_with_one_of_each_model_per_node(workdir: Path, cluster, tries: int = 5) -> tuple[subprocess.Popen, dict]:
    """Start the run (two daemons of each model, placed by SLURM) until SLURM has put one daemon of each model
    on each node: the run must keep a daemon of each model when a node is lost, and SLURM places the serve
    jobs in the order snakemake submits them, which varies (in runs so far the placement was mixed)."""
    for _ in range(tries):
        run = start_cluster_run(workdir, cluster, serve_model=SPREAD_SERVE_RESOURCES)
        placement = wait_until(lambda: (placed := serve_placement(cluster)) and len(placed) == 4 and placed, 300,
                               "the four serve jobs running", run)  # fmt: skip
        models = {}
        for daemon, node in placement.items():
            models.setdefault(node, set()).add(daemon.rsplit("-", 1)[0])
        if all(found == {"esm2", "dnabert_s"} for found in models.values()):
            return run, placement
        interrupt(run)
        wait_until(lambda: slurm_jobs(cluster.env) == "", 120, "the interrupted run's jobs gone")
        for name in ("results", "logs", ".snakemake", ".virnucpro"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    raise AssertionError(f"SLURM placed both daemons of a model on one node in {tries} runs")


def test_the_node_running_classify_jobs_and_a_daemon_of_each_model_lost_the_run_ends_well_and_lists_the_loss(
    slurm_nodes, test_models, local_run, tmp_path
):
    # SLURM's own placement (no hold, no release); the CPU steps are SLURM jobs (cluster_local_steps: []).
    write_config(tmp_path, test_models, {"demo": str(DEMO_READS)}, shard_size=SHARD_SIZE, cluster_local_steps=[],
                 daemons={"esm2": ["gpu-slot:cpu"] * 2, "dnabert_s": ["gpu-slot:cpu"] * 2})  # fmt: skip
    run = victim = None
    try:
        run, placement = start_with_one_of_each_model_per_node(tmp_path, slurm_nodes)
        busy = wait_until(lambda: running_jobs_of(slurm_nodes, "classify_shard"), 600, "classify jobs running", run)
        victim = max(busy, key=busy.get)
        done_before = len(embeddings(tmp_path))
        slurm_nodes.script("kill-node", victim)
        killed = time.time()
        code = finish(run)
    finally:
        interrupt(run)
        if victim:
            slurm_nodes.script("revive-node", victim, check=False)
    output = read_log(tmp_path)
    assert code == 0, output[-10000:]
    assert done_before < 2 * SHARDS, "the node was killed after the last embedding"
    assert_same_outputs(tmp_path, local_run)
    assert len(embeddings(tmp_path)) == 2 * SHARDS

    stats = run_stats(tmp_path)
    lost = {event["daemon"]: event for event in stats["daemons_lost"]}
    assert sorted(lost) == sorted(daemon for daemon, node in placement.items() if node == victim), stats
    assert all(event["host"] == victim and event["time"] >= killed for event in lost.values()), lost
    jobs = [event for event in stats["jobs_lost"] if event["rule"] == "classify_shard"]
    assert jobs and all(job["node"] == victim and job["state"] == "NODE_FAIL" and job["retried"] for job in jobs), jobs
    assert "virnucpro: lost to the cluster:" not in output  # the run did not stop
    print(
        f"\nserve jobs: {placement}; killed {victim} with {busy[victim]} classify job(s) running and "
        f"{done_before} of {2 * SHARDS} embeddings done; lost: {sorted(lost)} and "
        f"{', '.join(job['job'] for job in jobs)}; the run ended {time.time() - killed:.0f} s after the kill"
    )


def _embedded_events(workdir: Path) -> list[tuple[float, str]]:
    """(time, daemon) of each shard the daemons' logs say they embedded, in order (times to the second)."""
    events = []
    day = time.strftime("%Y-%m-%d")
    for log in (workdir / "logs" / "daemons").glob("*-[0-9].log"):
        for line in log.read_text().splitlines():
            if ": shard " in line and " sequences, " in line:
                clock = time.mktime(time.strptime(f"{day} {line.split()[0]}", "%Y-%m-%d %H:%M:%S"))
                events.append((clock, line.split("daemon ", 1)[1].split(":", 1)[0]))
    return sorted(events)
