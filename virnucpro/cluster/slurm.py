"""SLURM's commands as the workflow's checks use them: run one, and read what it prints. The readers are
pure functions on the text (tested on output captured from the test cluster, tests/data/slurm/)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

QUERY_TIMEOUT = 10.0  # seconds a query of the controller may take (the run's watch waits for it)
_FIELD = re.compile(r"\s+(?=[A-Za-z][A-Za-z0-9_/:]*=)")  # where the next Key= of a one-line record starts


def run(*args: str) -> str | None:
    """The standard output of a SLURM command, or None when it is missing or fails (no cluster here)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=QUERY_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def records(text: str) -> list[dict[str, str]]:
    """The records of ``scontrol -o show node|partition|job``: one line each, ``Key=Value`` fields (a value
    may hold spaces, as ``OS=Linux 6.1 #1 SMP``)."""
    found = []
    for line in text.splitlines():
        if "=" not in line:
            continue
        fields = {}
        for part in _FIELD.split(line.strip()):
            key, _, value = part.partition("=")
            fields[key] = value.strip()
        found.append(fields)
    return found


def minutes(value: str) -> float | None:
    """A SLURM time limit in minutes: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``; None for
    UNLIMITED (or anything unreadable)."""
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", value):
        return None
    days, _, clock = value.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:
        hours, mins, seconds = (parts + [0, 0])[:3]
        return int(days) * 1440 + hours * 60 + mins + seconds / 60
    if len(parts) == 1:
        return float(parts[0])
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return parts[0] * 60 + parts[1] + parts[2] / 60


@dataclass(frozen=True)
class Node:
    """What one node offers a job (``scontrol -o show node``)."""

    name: str
    cpus: int
    memory_mb: int
    gpus: dict[str, int] = field(default_factory=dict)  # GPU type ("" untyped) -> count
    partitions: tuple[str, ...] = ()
    state: str = ""

    @property
    def gpu_count(self) -> int:
        return sum(self.gpus.values())


@dataclass(frozen=True)
class Partition:
    """A partition's limits (``scontrol -o show partition``); None where it sets none."""

    name: str
    default: bool
    max_minutes: float | None
    max_memory_mb: int | None
    max_cpus: int | None


def parse_gres(value: str) -> dict[str, int]:
    """The GPUs of a node's ``Gres`` (``gpu:2``, ``gpu:a100:4(S:0-1)``, ``gpu:a100:4,gpu:v100:2``), by
    type ("" for untyped)."""
    gpus: dict[str, int] = {}
    for item in re.sub(r"\([^)]*\)", "", value).split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu" or len(parts) < 2:
            continue
        count = re.match(r"\d+", parts[-1])
        kind = parts[1] if len(parts) == 3 else ""
        if count:
            gpus[kind] = gpus.get(kind, 0) + int(count.group())
    return gpus


def _number(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def parse_nodes(text: str) -> list[Node]:
    """The nodes in ``scontrol -o show node``: effective CPUs (``CPUEfctv``, else ``CPUTot``), memory for
    jobs (``RealMemory`` less ``MemSpecLimit``), GPUs, partitions and state."""
    nodes = []
    for fields in records(text):
        if "NodeName" not in fields:
            continue
        cpus = _number(fields.get("CPUEfctv")) or _number(fields.get("CPUTot")) or 0
        memory = (_number(fields.get("RealMemory")) or 0) - (_number(fields.get("MemSpecLimit")) or 0)
        partitions = tuple(p for p in fields.get("Partitions", "").split(",") if p and p != "(null)")
        nodes.append(Node(fields["NodeName"], cpus, memory, parse_gres(fields.get("Gres", "")), partitions,
                          fields.get("State", "")))  # fmt: skip
    return nodes


def parse_partitions(text: str) -> list[Partition]:
    """The partitions in ``scontrol -o show partition`` with their per-job limits."""
    found = []
    for fields in records(text):
        if "PartitionName" not in fields:
            continue
        found.append(Partition(fields["PartitionName"], fields.get("Default") == "YES",
                               minutes(fields.get("MaxTime", "UNLIMITED")), _number(fields.get("MaxMemPerNode")),
                               _number(fields.get("MaxCPUsPerNode"))))  # fmt: skip
    return found


def cluster_nodes() -> tuple[list[Node], list[Partition]] | None:
    """The cluster's nodes and partitions, or None when SLURM cannot be asked."""
    nodes, partitions = run("scontrol", "-o", "show", "node"), run("scontrol", "-o", "show", "partition")
    if nodes is None or partitions is None:
        return None
    return parse_nodes(nodes), parse_partitions(partitions)


def parse_job_state(text: str) -> tuple[str, str] | None:
    """(state, node list) from one line of ``STATE|NODELIST`` (``squeue -o %T|%N`` or ``sacct -P -o
    State,NodeList``); a state such as ``CANCELLED by 0`` is kept to its first word."""
    for line in text.splitlines():
        if "|" in line:
            state, _, nodes = line.strip().partition("|")
            if state:
                return state.split()[0].upper(), nodes.strip()
    return None


def job_state(job_id: str) -> tuple[str, str] | None:
    """The state and node list of a SLURM job that has ended: from accounting (``sacct``) where it is kept,
    else from ``squeue`` (which knows an ended job for ``MinJobAge`` seconds); None if neither knows it."""
    if not re.fullmatch(r"[0-9_.+]+", job_id):
        return None
    for args in (("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,NodeList"),
                 ("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%N")):  # fmt: skip
        text = run(*args)
        if text and (found := parse_job_state(text)):
            return found
    return None
