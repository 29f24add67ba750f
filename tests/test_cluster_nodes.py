"""The test cluster of two SLURM nodes on this one machine (scripts/slurm-cluster.sh start --nodes 2):
each node is a network namespace with its own address, host name, slurmd and two stand-in GPUs; this
machine is the login node. What the multi-node workflow tests rely on is checked here."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# A job that ends once two of its kind have written their CUDA_VISIBLE_DEVICES (so both ran at once)
# and the test has created `release`; it fails if that does not happen within a minute.
GPU_JOB = """
echo "${CUDA_VISIBLE_DEVICES:-none}" > "$SLURM_JOB_ID.gpu"
for _ in $(seq 600); do
    [ "$(ls *.gpu | wc -l)" -ge 2 ] && [ -e release ] && exit 0
    sleep 0.1
done
exit 1
"""

# A TCP server in a job: listens on all of the node's addresses, says where it runs and who called.
SERVER = """
import os, socket
server = socket.create_server(("0.0.0.0", 0))
server.settimeout(60)
with open("port.tmp", "w") as out:
    out.write(str(server.getsockname()[1]))
os.rename("port.tmp", "port")
connection, (peer, _) = server.accept()
connection.settimeout(10)
assert connection.recv(64) == b"hello"
connection.sendall(f"{socket.gethostname()} {peer}".encode())
connection.close()
"""

DAEMONS = ("slurmctld", "slurmd", "slurmstepd", "munged")


def live_processes(names: tuple[str, ...]) -> list[str]:
    """'pid name' of the running processes with these names (a zombie that init has not reaped yet is no process)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name in names and is_live(stat.parent.name):
            found.append(f"{stat.parent.name} {name}")
    return found


def is_live(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def assert_nothing_left() -> None:
    """No namespace, interface, /etc/hosts line or /etc/slurm/slurm.conf link of the cluster is left."""
    assert "vnp-" not in ip("netns", "list")
    links = ip("-o", "link", "show")
    assert "vnpbr0" not in links and "vnp-node" not in links
    assert "virnucpro-slurm-cluster" not in Path("/etc/hosts").read_text()
    assert not os.path.lexists("/etc/slurm/slurm.conf")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def namespace_pids(node: str) -> str:
    """The pids of the processes in the node's network namespace, one a line."""
    return ip("netns", "pids", f"vnp-{node}")


def test_each_node_has_its_own_address_on_a_private_network_that_overlaps_nothing_else(slurm_nodes):
    assert sorted(slurm_nodes.nodes) == ["node1", "node2"]
    assert all(slurm_nodes.node_state(node) == "idle" for node in slurm_nodes.nodes)
    network = ipaddress.ip_network(f"{slurm_nodes.login_address}/24", strict=False)
    addresses = {ipaddress.ip_address(address) for address in slurm_nodes.nodes.values()}
    assert len(addresses) == 2 and all(address in network for address in addresses)
    assert network.is_private
    # Only the cluster's bridge routes to that network; nothing else of this machine touches it.
    for route in ip("-4", "-o", "route", "show", "table", "all").splitlines():
        destination = next(word for word in route.split() if word[0].isdigit() or word == "default")
        if destination != "default" and ipaddress.ip_network(destination, strict=False).overlaps(network):
            assert " dev vnpbr0 " in route + " ", route
    # A node reaches that network and nothing beyond it: no default route, nothing forwarded.
    for node in slurm_nodes.nodes:
        node_routes = ip("-n", f"vnp-{node}", "-4", "route").splitlines()
        assert [route.split()[0] for route in node_routes] == [str(network)], node_routes
    # The nodes reach each other (node1 to node2's slurmd).
    slurmd_port = re.search(r"SlurmdPort\s*=\s*(\d+)", slurm_nodes.command("scontrol", "show", "config").stdout)[1]
    connect = f"import socket; socket.create_connection(('{slurm_nodes.nodes['node2']}', {slurmd_port}), timeout=10)"
    subprocess.run(["nsenter", "--net=/run/netns/vnp-node1", sys.executable, "-c", connect], check=True, timeout=60)
    # The node names resolve on the login node, as the daemons' tcp://<host name>:<port> needs.
    for node, address in slurm_nodes.nodes.items():
        assert socket.gethostbyname(node) == address


def test_jobs_land_on_both_nodes_each_with_its_node_host_name_and_address(slurm_nodes, tmp_path):
    # A job step (srun inside the batch job, as snakemake's SLURM executor runs its jobs) included.
    script = "hostname; hostname -I; srun hostname"
    jobs = {
        node: slurm_nodes.sbatch("-w", node, "--chdir", str(tmp_path), "-o", f"{node}.out", "--wrap", script)
        for node in slurm_nodes.nodes
    }
    seen = {}
    for node, job in jobs.items():
        assert slurm_nodes.wait_for_job(job) == "COMPLETED", (tmp_path / f"{node}.out").read_text()
        host, addresses, step_host = (tmp_path / f"{node}.out").read_text().split("\n")[:3]
        assert host == step_host == node
        assert addresses.split() == [slurm_nodes.nodes[node]]
        seen[host] = addresses
    assert len(set(seen)) == len(set(seen.values())) == 2
    assert socket.gethostname() not in seen


def test_two_gpu_jobs_on_one_node_get_distinct_devices_and_a_third_waits_while_cpu_jobs_go_ahead(slurm_nodes, tmp_path):
    script = tmp_path / "gpu-job.sh"
    script.write_text("#!/bin/bash\n" + GPU_JOB)
    submit = ("-w", "node1", "--gpus=1", "--chdir", str(tmp_path), "-o", "%j.out", str(script))
    first, second = slurm_nodes.sbatch(*submit), slurm_nodes.sbatch(*submit)
    slurm_nodes.wait_until(lambda: len(list(tmp_path.glob("*.gpu"))) == 2, 60, "two GPU jobs running on node1")
    third = slurm_nodes.sbatch(*submit)
    # The node has two GPUs: the third waits for one of them, and a CPU job behind it does not wait.
    cpu_job = slurm_nodes.sbatch("-w", "node1", "--chdir", str(tmp_path), "-o", "cpu.out", "--wrap", "true")
    assert slurm_nodes.wait_for_job(cpu_job) == "COMPLETED"
    assert slurm_nodes.job_state(third) == "PENDING"
    (tmp_path / "release").touch()
    for job in (first, second, third):
        assert slurm_nodes.wait_for_job(job) == "COMPLETED", (tmp_path / f"{job}.out").read_text()
    devices = {job: (tmp_path / f"{job}.gpu").read_text().strip() for job in (first, second, third)}
    assert {devices[first], devices[second]} == {"0", "1"}
    assert devices[third] in ("0", "1")


def test_a_tcp_server_in_a_job_is_reachable_from_the_login_node_at_the_node_address(slurm_nodes, tmp_path):
    (tmp_path / "server.py").write_text(SERVER)
    job = slurm_nodes.sbatch("-w", "node2", "--chdir", str(tmp_path), "-o", "server.out",
                             "--wrap", f"{sys.executable} server.py")  # fmt: skip
    port_file = tmp_path / "port"
    slurm_nodes.wait_until(lambda: port_file.exists() or slurm_nodes.job_state(job) not in ("PENDING", "RUNNING"),
                           60, "the server in the job listening")  # fmt: skip
    assert port_file.exists(), (tmp_path / "server.out").read_text()
    with socket.create_connection(("node2", int(port_file.read_text())), timeout=10) as connection:
        assert connection.getpeername()[0] == slurm_nodes.nodes["node2"]
        connection.sendall(b"hello")
        connection.settimeout(10)
        reply = connection.recv(256).decode()
    assert reply == f"node2 {slurm_nodes.login_address}"
    assert slurm_nodes.wait_for_job(job) == "COMPLETED", (tmp_path / "server.out").read_text()


def test_one_cluster_at_a_time_a_single_node_start_is_refused_while_the_nodes_run(slurm_nodes):
    refused = slurm_nodes.script("start", check=False)
    assert refused.returncode != 0 and "stop it first" in refused.stderr, refused.stdout + refused.stderr
    again = slurm_nodes.script("start", "--nodes", "2")
    assert "already running" in again.stdout
    assert all(slurm_nodes.node_state(node) == "idle" for node in slurm_nodes.nodes)


def test_a_killed_node_goes_down_and_its_running_job_fails_while_the_other_node_works_on(slurm_nodes, tmp_path):
    doomed = slurm_nodes.sbatch("-w", "node2", "--chdir", str(tmp_path), "-o", "doomed.out",
                                "--wrap", "touch started; sleep 600")  # fmt: skip
    slurm_nodes.wait_until(lambda: (tmp_path / "started").exists(), 60, "the job on node2 started")
    slurm_nodes.script("kill-node", "node2")
    assert namespace_pids("node2") == ""  # slurmd and the job are gone at once
    slurm_nodes.wait_until(lambda: slurm_nodes.node_state("node2") == "down", 120, "SLURM marked node2 down")
    assert slurm_nodes.wait_for_job(doomed, timeout=60) == "NODE_FAIL"
    # The other node takes the work, also a job that names no node.
    anywhere = slurm_nodes.sbatch("--chdir", str(tmp_path), "-o", "anywhere.out", "--wrap", "hostname")
    assert slurm_nodes.wait_for_job(anywhere) == "COMPLETED"
    assert (tmp_path / "anywhere.out").read_text().strip() == "node1"
    assert slurm_nodes.node_state("node1") == "idle"


def test_a_killed_node_returns_to_service_with_revive_node(slurm_nodes, tmp_path):
    if slurm_nodes.node_state("node2") != "down":
        slurm_nodes.script("kill-node", "node2")
        slurm_nodes.wait_until(lambda: slurm_nodes.node_state("node2") == "down", 120, "SLURM marked node2 down")
    slurm_nodes.script("revive-node", "node2")
    assert slurm_nodes.node_state("node2") == "idle"
    job = slurm_nodes.sbatch("-w", "node2", "--chdir", str(tmp_path), "-o", "back.out", "--wrap", "hostname")
    assert slurm_nodes.wait_for_job(job) == "COMPLETED"
    assert (tmp_path / "back.out").read_text().strip() == "node2"


def test_stop_leaves_no_process_namespace_interface_or_system_file_behind_and_can_be_repeated(slurm_nodes, tmp_path):
    # A job running on each node when the cluster stops.
    for node in slurm_nodes.nodes:
        slurm_nodes.sbatch("-w", node, "--gpus=1", "--chdir", str(tmp_path), "-o", f"{node}.out",
                           "--wrap", f"touch {node}.started; sleep 600")  # fmt: skip
    slurm_nodes.wait_until(lambda: len(list(tmp_path.glob("*.started"))) == 2, 60, "a job running on each node")
    on_nodes = {pid for node in slurm_nodes.nodes for pid in namespace_pids(node).split()}
    assert len(on_nodes) >= 2 * 4  # slurmd, slurmstepd, the job's shell and its sleep on each
    for _ in range(2):
        slurm_nodes.script("stop")
        assert live_processes(DAEMONS) == []
        assert {pid for pid in on_nodes if is_live(pid)} == set()
        assert_nothing_left()


def test_a_start_that_fails_midway_stops_what_it_started(slurm_nodes):
    # The controller's port taken (bound, not listening): the network, munged and slurmctld were
    # started when start fails.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = str(taken.getsockname()[1])
        failed = slurm_nodes.script("start", "--nodes", "2", check=False, VIRNUCPRO_SLURM_PORT=port)
    assert failed.returncode != 0 and "slurmctld exited" in failed.stderr, failed.stdout + failed.stderr
    assert "start failed, stopping what it started" in failed.stderr
    assert live_processes(DAEMONS) == []
    assert_nothing_left()


def test_a_network_that_overlaps_one_of_this_machine_is_refused(slurm_nodes):
    failed = slurm_nodes.script("start", "--nodes", "2", check=False, VIRNUCPRO_SLURM_SUBNET="127.0.0.0/24")
    assert failed.returncode != 0 and "overlaps" in failed.stderr, failed.stdout + failed.stderr
    assert live_processes(DAEMONS) == []
    assert_nothing_left()
