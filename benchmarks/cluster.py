"""Benchmark: where the wall time of a workflow run on the two-node test SLURM cluster goes, against a
local run of the same reads (docs/cluster.md, "Where a cluster run's time goes").

Both runs: the same generated reads (``--reads`` reads of 500 nt, the shard size chosen so that they make
``--shards`` shards), the small random-weight test models (``virnucpro make-test-models``), and the same
daemons (``--daemons`` per model on ``gpu-slot:cpu``: a GPU slot each, computing on the CPU). The local
run is ``snakemake --cores CORES --resources gpu=N`` (CORES: by default the profile's ``local-cores`` plus
one per daemon, so that both runs have as many other jobs at once on this machine); the cluster run is ``snakemake --workflow-profile
workflow/profiles/slurm`` (the shipped profile, plus ``slurm-status-command: squeue`` for a cluster
without accounting, ``slurm-keep-successful-logs`` so that each job's own timing can be read, and the
serve jobs' ``cpus_per_gpu``/``mem_mb`` scaled to the test nodes) with SLURM's own placement. The runs
alternate (local, cluster, local, ...) so that both see the same load; ``--repeats`` pairs.

For each run: the wall time, and its phases from the files it wrote (modification times): start to the
shards written (reading, translating, sharding), to the first embedding, to the last embedding, to the
sample's outputs, to the end. For the cluster run, each SLURM job's time from ``squeue`` (submitted,
started, ended) and from its own log (the job's command started and ended, as its snakemake reports
them), and when the main snakemake noticed that it had ended (its output): the queue wait, the job start
(``sbatch``'s script, snakemake twice: the job step and the job), the command, the job end, the status
polling; and snakemake's own pauses (start to the first job, last job to the end). Times are to the
second (snakemake's and SLURM's clocks).

It needs the two-node test cluster running (as root):

    eval "$(scripts/slurm-cluster.sh start --nodes 2 | tail -n 1)"
    .venv/bin/python -m benchmarks.cluster [--dir /tmp/virnucpro-bench-cluster] [--reads 3000] [--shards 27]
        [--daemons 2] [--cores N] [--repeats 1] [--profile-set KEY=YAML ...] [--config-set KEY=YAML ...]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from benchmarks import _common

SAMPLE = "s1"
PROFILE = _common.REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
# The test cluster has no accounting (squeue gives the job states); keep every job's SLURM log (its
# timing); a serve job's request scaled to a test node that runs two of them beside the CPU jobs.
TEST_CLUSTER = {"slurm-status-command": "squeue", "slurm-keep-successful-logs": True}
TEST_SERVE_RESOURCES = {"cpus_per_gpu": 2, "mem_mb": 8000}
STAMP = re.compile(r"^\s*\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")
JOB_HEAD = re.compile(r"^\s*(local)?(?:rule|checkpoint) (\w+):\s*$")
JOB_ID = re.compile(r"^\s*jobid: (\d+)\s*$")
SUBMITTED = re.compile(r"^Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (.*)\)\.$")
FINISHED = re.compile(r"^\s*Finished jobid: (\d+) \(Rule: (\w+)\)")


def stamp(text: str) -> float:
    return datetime.strptime(re.sub(" +", " ", text), "%a %b %d %H:%M:%S %Y").timestamp()


def slurm_time(text: str) -> float | None:
    return None if text in ("N/A", "Unknown", "") else datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def snakemake_jobs(text: str) -> tuple[dict[str, dict], list[dict]]:
    """What snakemake's output says of its jobs: job ID -> its rule, whether local, when snakemake started it
    and noticed its end; and its SLURM jobs, each with its log and the job IDs it ran (a group job runs
    several)."""
    jobs: dict[str, dict] = {}
    slurm_jobs, members = [], []
    last_stamp, head, in_group = None, None, False
    for line in text.splitlines():
        if match := STAMP.match(line):
            last_stamp = stamp(match.group(1))
            if "Group job" in line:
                in_group, members = True, []
            elif not line.startswith(" "):  # a group's members are indented
                in_group = False
        elif match := JOB_HEAD.match(line):
            head = {"rule": match.group(2), "local": bool(match.group(1)), "started": last_stamp}
        elif (match := JOB_ID.match(line)) and head is not None:
            jobs[match.group(1)] = head
            if in_group:
                members.append(match.group(1))
            head = None
        elif match := SUBMITTED.match(line):
            ran = [match.group(1)] if match.group(1) in jobs else members
            slurm_jobs.append({"id": match.group(2), "log": Path(match.group(3)), "jobs": ran})
            members = []
        elif match := FINISHED.match(line):
            jobs.setdefault(match.group(1), {"rule": match.group(2)})["noticed"] = last_stamp
    return jobs, slurm_jobs


def job_log_times(path: Path) -> tuple[float | None, float | None]:
    """When the command of a SLURM job started and ended, as the job's own (inner) snakemake says."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, None
    stamps, started, ended = None, [], []
    for line in text.splitlines():
        if match := STAMP.match(line):
            stamps = stamp(match.group(1))
        elif JOB_HEAD.match(line) and line.strip().startswith(("localrule", "localcheckpoint")):
            started.append(stamps)
        elif FINISHED.match(line):
            ended.append(stamps)
    return (min(started) if started else None), (max(ended) if ended else None)


def squeue_times(ids: list[str], env: dict) -> dict[str, dict]:
    if not ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%V|%S|%e|%T|%N"], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    times = {}
    for line in out.splitlines():
        job, submitted, started, ended, state, node = line.split("|")
        times[job] = {"submitted": slurm_time(submitted), "started": slurm_time(started),
                      "ended": slurm_time(ended), "state": state, "node": node}  # fmt: skip
    return times


def phases(workdir: Path, started: float, ended: float) -> dict[str, float]:
    """Seconds from the start at which the run had written its shards, first and last embedding, outputs."""
    work = workdir / "results" / SAMPLE / "work"
    shards = [p.stat().st_mtime for p in (work / "shards").glob("shard_*")]
    embeddings = sorted(p.stat().st_mtime for p in (work / "embeddings").glob("*.pt"))
    outputs = (workdir / "results" / SAMPLE / "reads.tsv").stat().st_mtime
    return {"shards written": max(shards) - started, "first embedding": embeddings[0] - started,
            "last embedding": embeddings[-1] - started, "sample outputs": outputs - started,
            "end": ended - started}  # fmt: skip


def run(workdir: Path, command: list[str], env: dict) -> tuple[float, float, str]:
    started = time.time()
    result = subprocess.run(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    ended = time.time()
    (workdir / "snakemake.out").write_text(result.stdout)
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed with status {result.returncode}; see {workdir / 'snakemake.out'}")
    return started, ended, result.stdout


def fresh(workdir: Path, config: dict) -> Path:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake_base(workdir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(_common.REPO / "workflow" / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(config)]  # fmt: skip


def local_run(workdir: Path, config: dict, cores: int, daemons: int) -> dict:
    path = fresh(workdir, config)
    command = [*snakemake_base(workdir, path), "--cores", str(cores), "--resources", f"gpu={2 * daemons}"]
    started, ended, _ = run(workdir, command, _common.bench_env())
    return {"wall": ended - started, "phases": phases(workdir, started, ended)}


def cluster_profile(workdir: Path, overrides: dict) -> Path:
    settings = yaml.safe_load(PROFILE.read_text())
    settings.update(TEST_CLUSTER)
    serve = settings.setdefault("set-resources", {}).setdefault("serve_model", {})
    serve.update(TEST_SERVE_RESOURCES)
    settings.update(overrides)
    profile = workdir / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump(settings))
    return profile


def cluster_run(workdir: Path, config: dict, overrides: dict, env: dict) -> dict:
    path = fresh(workdir, config)
    profile = cluster_profile(workdir, overrides)
    started, ended, out = run(workdir, [*snakemake_base(workdir, path), "--workflow-profile", str(profile)], env)
    jobs, submitted = snakemake_jobs(out)
    times = squeue_times([job["id"] for job in submitted], env)
    split: dict[str, list[float]] = {"queue wait": [], "job start": [], "command": [], "job end": [],
                                     "status polling": []}  # fmt: skip
    per_rule: dict[str, int] = {}
    for job in submitted:
        slurm = times.get(job["id"])
        if not slurm or None in (slurm["submitted"], slurm["started"], slurm["ended"]):
            continue
        rules = sorted({jobs[member]["rule"] for member in job["jobs"]})
        name = "+".join(rules)
        per_rule[name] = per_rule.get(name, 0) + 1
        split["queue wait"].append(slurm["started"] - slurm["submitted"])
        command_started, command_ended = job_log_times(job["log"])
        if command_started and command_ended and rules != ["serve_model"]:
            split["job start"].append(command_started - slurm["started"])
            split["command"].append(command_ended - command_started)
            split["job end"].append(slurm["ended"] - command_ended)
        noticed = [jobs[member].get("noticed") for member in job["jobs"]]
        if noticed and None not in noticed:
            split["status polling"].append(max(noticed) - slurm["ended"])
    noticed = [job["noticed"] for job in jobs.values() if job.get("noticed")]
    first = min(job["started"] for job in jobs.values() if job.get("started"))
    return {"wall": ended - started, "phases": phases(workdir, started, ended), "split": split, "jobs": per_rule,
            "snakemake start": first - started, "after the last job": ended - max(noticed)}  # fmt: skip


def cluster_env() -> dict:
    env = _common.bench_env()
    env.setdefault("SLURM_CONF", "/tmp/virnucpro-slurm/slurm.conf")
    nodes = subprocess.run(["sinfo", "-h", "-o", "%D %t"], env=env, capture_output=True, text=True, check=False)
    if nodes.returncode != 0 or "idle" not in nodes.stdout and "mix" not in nodes.stdout:
        raise SystemExit('no test cluster answers: start it first (as root): eval "$(scripts/slurm-cluster.sh '
                         'start --nodes 2 | tail -n 1)"')  # fmt: skip
    return env


def key_values(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        values[key] = yaml.safe_load(value)
    return values


def describe_seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{sum(values):6.0f} s in all, {statistics.mean(values):5.1f} s mean, {max(values):5.0f} s max"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/virnucpro-bench-cluster"))
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=27)
    parser.add_argument("--daemons", type=int, default=2, help="daemons per model")
    parser.add_argument("--cores", type=int, default=None,
                        help="--cores of the local run (default: the profile's local-cores plus one per daemon, so "
                             "that as many other jobs run at once as on the login node of the cluster run)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--profile-set",
        action="append",
        default=[],
        metavar="KEY=YAML",
        help="a profile setting of the cluster run (e.g. slurm-init-seconds-before-status-checks=5)",
    )
    parser.add_argument("--config-set", action="append", default=[], metavar="KEY=YAML",
                        help="a config key of both runs")  # fmt: skip
    args = parser.parse_args()
    env = cluster_env()
    print(_common.command_line())
    print(_common.machine())
    from virnucpro.testmodels import make_test_models

    args.dir.mkdir(parents=True, exist_ok=True)
    models = make_test_models(args.dir / "models")
    reads = _common.generate_reads(args.dir / "reads.fa", args.reads, 500)
    nucleotide, _ = _common.make_frames(reads, 500, args.dir / "frames")
    frames = sum(1 for line in open(nucleotide) if line.startswith(">"))
    shard_size = math.ceil(frames / args.shards)
    config = {
        "samples": {SAMPLE: str(reads)}, "length": 500, "shard_size": shard_size, "idle_timeout": 300,
        "models": {"esm2": str(models["esm2"]), "dnabert_s": str(models["dnabert_s"]),
                   "classifier": str(models["classifier_500"])},
        "daemons": {"esm2": ["gpu-slot:cpu"] * args.daemons, "dnabert_s": ["gpu-slot:cpu"] * args.daemons},
        **key_values(args.config_set),
    }  # fmt: skip
    overrides = key_values(args.profile_set)
    local_cores = overrides.get("local-cores", yaml.safe_load(PROFILE.read_text())["local-cores"])
    args.cores = args.cores or local_cores + 2 * args.daemons
    print(
        f"{args.reads} reads, {frames} frames, shard size {shard_size}: {math.ceil(frames / shard_size)} shards; "
        f"{args.daemons} daemon(s) per model; local --cores {args.cores}; profile overrides {overrides or 'none'}"
    )
    results = []
    for repeat in range(args.repeats):
        print(f"\n{_common.load_average()}", flush=True)
        local = local_run(args.dir / f"local-{repeat}", config, args.cores, args.daemons)
        print(f"{_common.load_average()}", flush=True)
        cluster = cluster_run(args.dir / f"cluster-{repeat}", config, overrides, env)
        same = all((args.dir / f"local-{repeat}" / "results" / SAMPLE / name).read_bytes()
                   == (args.dir / f"cluster-{repeat}" / "results" / SAMPLE / name).read_bytes()
                   for name in ("prediction_results.txt", "prediction_results_highestscore.csv", "reads.tsv"))  # fmt: skip
        results.append({"local": local, "cluster": cluster, "same_outputs": same})
        print(
            f"\nrun pair {repeat + 1}: local {local['wall']:.0f} s, cluster {cluster['wall']:.0f} s, ratio "
            f"{cluster['wall'] / local['wall']:.2f}; outputs identical: {same}"
        )
        print(f"{'phase: seconds from the start':<32}{'local':>8}{'cluster':>9}{'cluster - local':>17}")
        for name, value in local["phases"].items():
            other = cluster["phases"][name]
            print(f"{name:<32}{value:8.0f}{other:9.0f}{other - value:+17.0f}")
        print(f"cluster jobs: {', '.join(f'{rule} {count}' for rule, count in sorted(cluster['jobs'].items()))}")
        print(f"snakemake start to its first job: {cluster['snakemake start']:.0f} s; its last job's end noticed "
              f"to its exit: {cluster['after the last job']:.0f} s")  # fmt: skip
        for name, values in cluster["split"].items():
            print(f"  {name:<16} {describe_seconds(values)}")
    walls = [(r["local"]["wall"], r["cluster"]["wall"]) for r in results]
    ratios = [cluster / local for local, cluster in walls]
    print(f"\nratio cluster/local: {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")
    figures = _common.figures_file(None, "cluster.json")
    if figures:
        figures.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
