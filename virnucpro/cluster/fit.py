"""Whether the profile's requests fit the cluster (docs/cluster.md, "The profile's knobs").

At start, with the SLURM executor, the requests of each rule that will be submitted (memory, CPUs, GPUs,
time) are compared with what the nodes of their partition offer; a request that no node can meet stops
the run before anything is submitted, in one line per rule that names the request, the largest node and the
profile key to change. (Otherwise ``sbatch`` refuses the job, "Memory specification can not be satisfied",
or SLURM keeps it pending for ever, and the run fails the same way on every re-run.)

``requests_of`` reads the requests from snakemake's workflow object the way the SLURM executor turns them
into ``sbatch`` options (``--mem``, ``--cpus-per-task``/``--cpus-per-gpu``, ``--gpus``, ``-t``, ``-p``);
``misfits`` is a pure function of the requests and the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virnucpro.cluster.slurm import Node, Partition, cluster_nodes


@dataclass(frozen=True)
class Request:
    """What a rule's job asks SLURM for, and where each value is set (the key to change)."""

    rule: str
    mem_mb: int = 0
    cpus: int = 1
    gpus: int = 0
    gpu_model: str = ""
    runtime: float | None = None  # minutes
    partition: str | None = None  # None: the cluster's default partition
    keys: dict[str, str] = field(default_factory=dict)  # "mem_mb", "cpus", "gpus", "runtime" -> where it is set


def misfits(requests: list[Request], nodes: list[Node], partitions: list[Partition]) -> list[str]:
    """One line for each request that no node of its partition can meet (empty: everything fits)."""
    problems, misfit_rules = [], set()
    default = next((p.name for p in partitions if p.default), None)
    by_name = {p.name: p for p in partitions}
    for request in requests:
        if request.rule in misfit_rules:  # one line per rule: its first request that does not fit
            continue
        name = request.partition or default
        partition = by_name.get(name) if name else None
        if partition is None:
            where = f"partition '{name}'" if name else "a partition (the cluster has no default partition)"
            problem = (f"rule {request.rule} asks for {where}, which SLURM does not have (partitions: "
                       f"{', '.join(sorted(by_name)) or 'none'}): set slurm_partition in the profile's "
                       "default-resources or set-resources")  # fmt: skip
        else:
            problem = _misfit(request, partition, [node for node in nodes if partition.name in node.partitions])
        if problem:
            problems.append(problem)
            misfit_rules.add(request.rule)
    return problems


def _limits(partition: Partition, node: Node) -> tuple[int, int]:
    """CPUs and memory a job can have on ``node`` in ``partition``."""
    cpus = min(node.cpus, partition.max_cpus) if partition.max_cpus else node.cpus
    memory = min(node.memory_mb, partition.max_memory_mb) if partition.max_memory_mb else node.memory_mb
    return cpus, memory


def _gpus(request: Request, node: Node) -> int:
    return node.gpus.get(request.gpu_model, 0) if request.gpu_model else node.gpu_count


def _misfit(request: Request, partition: Partition, nodes: list[Node]) -> str | None:
    where = f"partition '{partition.name}'"
    if request.runtime is not None and partition.max_minutes is not None and request.runtime > partition.max_minutes:
        return (f"rule {request.rule} asks for runtime={request.runtime:g} min but {where} allows at most "
                f"{partition.max_minutes:g} min: lower {request.keys.get('runtime', 'runtime')} in the profile, "
                "or choose another partition (slurm_partition)")  # fmt: skip
    if not nodes:
        return f"rule {request.rule}: {where} has no node"
    if any(_fits(request, partition, node) for node in nodes):
        return None
    wants = {
        "mem_mb": (request.mem_mb, lambda node: _limits(partition, node)[1], "MB of memory"),
        "cpus": (request.cpus, lambda node: _limits(partition, node)[0], "CPUs"),
        "gpus": (request.gpus, lambda node: _gpus(request, node), f"{request.gpu_model or ''} GPUs".strip()),
    }
    for dimension, (wanted, offered, unit) in wants.items():
        largest = max(nodes, key=offered)
        if wanted > offered(largest):
            key = request.keys.get(dimension, dimension)
            return (f"rule {request.rule} asks for {wanted} {unit} per job ({key}) but the largest node of "
                    f"{where}, {largest.name}, has {offered(largest)} {unit}: lower {key} in the profile, or choose a "
                    "partition with larger nodes (slurm_partition)")  # fmt: skip
    largest = max(nodes, key=lambda node: _limits(partition, node)[1])
    cpus, memory = _limits(partition, largest)
    return (f"rule {request.rule} asks for {request.cpus} CPUs, {request.mem_mb} MB and {request.gpus} GPUs per "
            f"job together, which no node of {where} has (largest: {largest.name}, {cpus} CPUs, {memory} MB, "
            f"{_gpus(request, largest)} GPUs): lower {request.keys.get('mem_mb', 'mem_mb')} or "
            f"{request.keys.get('cpus', 'cpus')} in the profile")  # fmt: skip


def _fits(request: Request, partition: Partition, node: Node) -> bool:
    cpus, memory = _limits(partition, node)
    return request.cpus <= cpus and request.mem_mb <= memory and request.gpus <= _gpus(request, node)


# --- snakemake's side (the workflow object, passed in; nothing here imports snakemake) ---------------------


def requests_of(workflow) -> list[Request]:
    """The distinct requests of each rule that this run may submit to the cluster: of the jobs in the plan
    that need to run, and of the rules with no job planned yet (after a checkpoint) at their rule level."""
    planned: dict[str, list] = {}
    for job in workflow.dag.jobs:
        planned.setdefault(job.rule.name, []).append(job)
    requests = []
    for rule in workflow.rules:
        if rule.norun or workflow.is_local(rule):
            continue
        if rule.name in planned:
            found = [_request(workflow, rule.name, job.resources, job.threads)
                     for job in planned[rule.name] if workflow.dag.needrun(job)]  # fmt: skip
        else:
            try:
                resources = rule.expand_resources(_Unknown(), [], 1)
            except Exception:  # resources that depend on wildcards: nothing to check before the jobs exist
                continue
            found = [_request(workflow, rule.name, resources, resources.get("_cores", 1))]
        for request in found:
            if request not in requests:
                requests.append(request)
    return requests


class _Unknown:
    """Wildcards of a rule with no job yet: any use of one fails (and the rule is not checked)."""

    def __getattr__(self, name):
        raise AttributeError(name)


def _request(workflow, rule: str, resources, threads: int) -> Request:
    """What the SLURM executor asks ``sbatch`` for (snakemake-executor-plugin-slurm's mapping)."""
    overwritten = dict(workflow.resource_settings.overwrite_resources.get(rule, {}))

    def key(name: str, fallback: str) -> str:
        if name in overwritten:
            return f"set-resources: {rule}: {name}"
        if name in (workflow.resource_settings.default_resources or {}):
            return f"default-resources: {name}"
        return fallback

    def integer(name: str) -> int:
        value = resources.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    gpus = next((integer(name) for name in ("gpus", "gpu", "nvidia_gpu") if integer(name)), 0)
    gres = str(resources.get("gres") or "")
    if not gpus and gres.startswith("gpu"):
        gpus = int(gres.rsplit(":", 1)[1]) if gres.count(":") and gres.rsplit(":", 1)[1].isdigit() else 1
    if integer("cpus_per_task") > 0:
        cpus, cpu_key = integer("cpus_per_task"), key("cpus_per_task", f"set-resources: {rule}: cpus_per_task")
    elif gpus and integer("cpus_per_gpu") > 0:
        cpus, cpu_key = integer("cpus_per_gpu") * gpus, key("cpus_per_gpu", f"set-resources: {rule}: cpus_per_gpu")
    else:
        cpus, cpu_key = max(1, int(threads)), f"set-threads: {rule}"
    memory = integer("mem_mb_per_cpu") * cpus if integer("mem_mb_per_cpu") else integer("mem_mb")
    memory_key = "mem_mb_per_cpu" if integer("mem_mb_per_cpu") else "mem_mb"
    runtime = resources.get("runtime")
    partition = resources.get("slurm_partition")
    return Request(
        rule, mem_mb=memory, cpus=cpus, gpus=gpus, gpu_model=str(resources.get("gpu_model") or ""),
        runtime=float(runtime) if isinstance(runtime, (int, float)) and runtime > 0 else None,
        partition=str(partition) if partition else None,
        keys={"mem_mb": key(memory_key, f"set-resources: {rule}: {memory_key}"), "cpus": cpu_key,
              "gpus": key("gpu", "config key daemons (cpu or cuda)") if gpus else "gpu",
              "runtime": key("runtime", f"set-resources: {rule}: runtime")},
    )  # fmt: skip


def cluster_misfit(workflow) -> str | None:
    """What does not fit, one line per rule whose largest request no node can meet, when the workflow runs
    with the SLURM executor and SLURM can be asked; None when everything fits (or nothing can be checked)."""
    plugin = getattr(workflow, "executor_plugin", None)
    if getattr(plugin, "name", None) != "slurm":
        return None
    cluster = cluster_nodes()
    if cluster is None:
        return None
    problems = misfits(requests_of(workflow), *cluster)
    return "\n".join(f"the profile does not fit the cluster: {problem}" for problem in problems) or None
