"""Whether the profile fits the cluster (virnucpro.cluster.fit), on SLURM's own output captured from the
test cluster (tests/data/slurm/: `scontrol -o show node` of nodes with 16 CPUs and 64,000 MB, the test
cluster's defaults, and of nodes with 8 CPUs and 8,000 MB; `scontrol -o show partition`), and what a
failed job's SLURM state says (virnucpro.cluster.losses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from runs import DEMO_READS, line_with, slurm_jobs, snakemake, snakemake_env, write_config, write_profile

from virnucpro.cluster.fit import Request, misfits
from virnucpro.cluster.losses import INFRASTRUCTURE_STATES, describe, reported_state
from virnucpro.cluster.slurm import (
    Node,
    Partition,
    minutes,
    parse_gres,
    parse_job_state,
    parse_nodes,
    parse_partitions,
    records,
)

DATA = Path(__file__).parent / "data" / "slurm"
# docs/cluster.md, "Small nodes": what to change in the profile for nodes of 8 CPUs and 8,000 MB.
SMALL_NODE_RESOURCES = {"serve_model": {"mem_mb": 3000, "cpus_per_gpu": 2}, "aggregate_sample": {"mem_mb": 2000},
                        "classify_shard": {"mem_mb": 2000}}  # fmt: skip
PROFILE = Path(__file__).resolve().parents[1] / "workflow" / "profiles" / "slurm" / "config.yaml"


def captured(name: str) -> str:
    return (DATA / name).read_text()


def profile_requests() -> list[Request]:
    """The shipped profile's largest request per SLURM rule, as the executor turns it into sbatch options (a
    cuda daemon: one GPU and cpus_per_gpu CPUs; the other rules: one thread)."""
    profile = yaml.safe_load(PROFILE.read_text())
    defaults = dict(item.split("=", 1) for item in profile["default-resources"])
    requests = []
    for rule in ("chunk_reads", "translate_chunks", "shard_frames", "classify_shard", "aggregate_sample"):
        values = {**{k: int(v) for k, v in defaults.items()}, **profile["set-resources"].get(rule, {})}
        requests.append(Request(rule, mem_mb=values["mem_mb"], cpus=1, runtime=values["runtime"]))
    serve = profile["set-resources"]["serve_model"]
    requests.append(Request("serve_model", mem_mb=serve["mem_mb"], cpus=serve["cpus_per_gpu"], gpus=1,
                            runtime=serve["runtime"], keys={"mem_mb": "set-resources: serve_model: mem_mb"}))  # fmt: skip
    return [request for request in requests if request.rule not in profile.get("localrules", ())]


def test_the_nodes_and_partitions_are_read_from_scontrol():
    nodes = parse_nodes(captured("nodes_16cpu_64000mb.txt"))
    assert [(n.name, n.cpus, n.memory_mb, n.gpus, n.partitions) for n in nodes] == [
        ("node1", 16, 64000, {"": 2}, ("debug",)),
        ("node2", 16, 64000, {"": 2}, ("debug",)),
    ]
    small = parse_nodes(captured("nodes_8cpu_8000mb.txt"))
    assert {(n.cpus, n.memory_mb, n.gpu_count) for n in small} == {(8, 8000, 2)}
    assert parse_partitions(captured("partitions.txt")) == [Partition("debug", True, None, None, None)]


def test_a_record_value_may_hold_spaces_and_equals_signs():
    fields = records(captured("nodes_16cpu_64000mb.txt"))[0]
    assert fields["OS"].startswith("Linux ") and " #1 SMP " in fields["OS"]
    assert fields["CfgTRES"] == "cpu=16,mem=62.50G,billing=16" and fields["RealMemory"] == "64000"


@pytest.mark.parametrize(("gres", "gpus"), [
    ("gpu:2", {"": 2}), ("(null)", {}), ("gpu:a100:4(S:0-1)", {"a100": 4}),
    ("gpu:a100:4(S:0),gpu:v100:2(S:1)", {"a100": 4, "v100": 2}), ("gpu:a100:4,mps:400", {"a100": 4}),
])  # fmt: skip
def test_gres_gives_the_gpus_by_type(gres, gpus):
    assert parse_gres(gres) == gpus


@pytest.mark.parametrize(("limit", "expected"), [
    ("UNLIMITED", None), ("30", 30), ("1:30", 1.5), ("01:00:00", 60), ("2-00:00:00", 2880), ("5-12", 7920),
    ("1-2:30", 1590),
])  # fmt: skip
def test_time_limits_in_every_slurm_form(limit, expected):
    assert minutes(limit) == expected


def test_the_shipped_profile_fits_the_test_clusters_default_nodes():
    nodes = parse_nodes(captured("nodes_16cpu_64000mb.txt"))
    assert misfits(profile_requests(), nodes, parse_partitions(captured("partitions.txt"))) == []


def test_on_small_nodes_the_serve_jobs_memory_is_named_with_the_largest_node_and_the_key():
    nodes = parse_nodes(captured("nodes_8cpu_8000mb.txt"))
    problems = misfits(profile_requests(), nodes, parse_partitions(captured("partitions.txt")))
    serve = [problem for problem in problems if "rule serve_model" in problem]
    assert len(serve) == 1 and "\n" not in serve[0]
    assert "32000 MB of memory" in serve[0] and "node1, has 8000 MB" in serve[0], serve
    assert "set-resources: serve_model: mem_mb" in serve[0] and "partition 'debug'" in serve[0], serve


def test_each_dimension_and_their_combination_is_checked():
    debug = Partition("debug", True, 60, None, 8)
    nodes = [Node("big", 32, 100000, {"a100": 2}, ("debug",)), Node("gpu", 8, 16000, {"v100": 4}, ("debug",))]
    fits = Request("ok", mem_mb=16000, cpus=8, gpus=2, runtime=60)
    assert misfits([fits], nodes, [debug]) == []
    too_long = Request("long", runtime=61, keys={"runtime": "default-resources: runtime"})
    assert "allows at most 60 min: lower default-resources: runtime" in misfits([too_long], nodes, [debug])[0]
    capped = Request("wide", cpus=16, keys={"cpus": "set-resources: wide: cpus_per_task"})  # partition caps 8
    assert "16 CPUs per job (set-resources: wide: cpus_per_task)" in misfits([capped], nodes, [debug])[0]
    a100 = Request("model", gpus=3, gpu_model="a100")
    assert "3 a100 GPUs" in misfits([a100], nodes, [debug])[0]
    # each alone fits some node, together none: 3 GPUs only on "gpu", 20,000 MB only on "big"
    both = Request("both", mem_mb=20000, gpus=3)
    assert "together, which no node" in misfits([both], nodes, [debug])[0]
    two = [Request("two", mem_mb=200000), Request("two", mem_mb=300000)]
    assert len(misfits(two, nodes, [debug])) == 1  # one line per rule
    elsewhere = Request("gpu_rule", partition="gpu")
    assert "partition 'gpu', which SLURM does not have (partitions: debug)" in misfits([elsewhere], nodes, [debug])[0]


def test_a_failed_jobs_state_comes_from_the_executors_message_or_from_slurm():
    message = "SLURM-job '57' failed due to a node failure, SLURM status is: 'NODE_FAIL'. Failed nodes ..."
    assert reported_state(message, "57", ask=lambda job: ("NODE_FAIL", "node1")) == ("NODE_FAIL", "node1")
    assert reported_state(None, "58", ask=lambda job: ("BOOT_FAIL", "node2")) == ("BOOT_FAIL", "node2")
    assert reported_state(message, "57", ask=lambda job: None) == ("NODE_FAIL", "")
    assert reported_state("exit status 1", "", ask=lambda job: ("FAILED", "x")) == (None, "")  # never a SLURM job
    own = "SLURM-job '59' failed, SLURM status is: 'FAILED'. Detailed failure reason unavailable"
    assert reported_state(own, "59", ask=lambda job: pytest.fail("SLURM asked")) == ("FAILED", "")
    assert parse_job_state("CANCELLED by 0|node1\n") == ("CANCELLED", "node1")
    assert parse_job_state(captured("squeue_node_fail.txt")) == ("NODE_FAIL", "node1")
    assert {"NODE_FAIL", "BOOT_FAIL", "PREEMPTED"} == INFRASTRUCTURE_STATES
    assert describe("classify_shard", {"sample": "s1", "shard": "shard_00003"}) == (
        "classify_shard (sample=s1, shard=shard_00003)"
    )


@pytest.mark.slow
def test_the_shipped_profile_on_small_nodes_stops_before_any_job_naming_the_rule_request_node_and_key(
    small_slurm_nodes, test_models, tmp_path
):
    write_config(tmp_path, test_models, {"demo": str(DEMO_READS)},
                 daemons={"esm2": ["gpu-slot:cpu"], "dnabert_s": ["gpu-slot:cpu"]})  # fmt: skip
    profile = write_profile(tmp_path)  # the shipped resources, unchanged
    result = snakemake(tmp_path, "--workflow-profile", str(profile), "--configfile", str(tmp_path / "config.yaml"),
                       env={**snakemake_env(), **small_slurm_nodes.env}, timeout=300)  # fmt: skip
    assert result.returncode != 0
    serve = line_with(result.stdout, "rule serve_model asks for")
    assert serve.startswith("the profile does not fit the cluster: rule serve_model asks for 32000 MB of memory "
                            "per job (set-resources: serve_model: mem_mb) but the largest node of partition "
                            "'debug', node1, has 8000 MB of memory: lower set-resources: serve_model: mem_mb"), serve  # fmt: skip
    aggregate = line_with(result.stdout, "rule aggregate_sample asks for")
    assert "16000 MB of memory per job (set-resources: aggregate_sample: mem_mb)" in aggregate, aggregate
    assert "has been submitted" not in result.stdout and slurm_jobs(small_slurm_nodes.env) == ""
    assert not (tmp_path / "results").exists()

    # With the values that docs/cluster.md gives for such nodes, the run goes through.
    profile = write_profile(tmp_path, **SMALL_NODE_RESOURCES)
    result = snakemake(tmp_path, "--workflow-profile", str(profile), "--configfile", str(tmp_path / "config.yaml"),
                       env={**snakemake_env(), **small_slurm_nodes.env}, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:]
    assert (tmp_path / "results" / "demo" / "reads.tsv").is_file()
