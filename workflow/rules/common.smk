# Configuration and sample checks (at parse time, one-line errors), the checks that the daemons can
# make progress and that the cluster can run the jobs (onstart), and the input and params functions
# of the rules.

import csv
import os
import re
import shlex
from pathlib import Path

import jsonschema

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from virnucpro.cluster.fit import cluster_misfit
from virnucpro.cluster.losses import JobLosses
from virnucpro.engines.embed import GPU_SLOT_CPU, MODELS
from virnucpro.fingerprint import model_fingerprint
from virnucpro.serving.rundir import SESSION_VARIABLE, RunDir
from virnucpro.serving.supervise import RunWatch, clear_stale_outputs, new_session

SAMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The workflow's own entries directly under results/ (not per sample): a sample of the same name would put
# results/{sample}/ on or in them. Compared without letter case (case-insensitive file systems).
RESERVED_SAMPLE_NAMES = {"daemons", "run_stats.json", "daemons.png"}
SAMPLE_OUTPUTS = (
    "prediction_results.txt",
    "prediction_results_highestscore.csv",
    "reads.tsv",
    "failures.tsv",
)
SAMPLE_PLOTS = ("scores", "verdicts", "failures")  # results/{sample}/plots/*.png, in the report
MODEL_HINTS = {
    "esm2": "the ESM-2 checkpoint esm2_t36_3B_UR50D.pt (with its -contact-regression.pt beside it)",
    "dnabert_s": "the DNABERT-S snapshot folder",
    "classifier": "the classifier 300_model.pth or 500_model.pth",
}


wildcard_constraints:
    sample=SAMPLE_NAME.pattern,
    shard=r"shard_[0-9]+",
    daemon=r"(esm2|dnabert_s)-[0-9]+",


def validate_config(config):
    """Validate `config` against the schema (filling in defaults); a one-line error otherwise."""
    try:
        validate(config, "../schemas/config.schema.yaml")
    except WorkflowError as error:
        cause = error.__context__  # the jsonschema ValidationError
        if not isinstance(cause, jsonschema.ValidationError):
            raise
        where = ".".join(str(part) for part in cause.absolute_path)
        key = f"config key '{where}'" if where else "config"
        raise WorkflowError(f"{key}: {cause.message} (see config/README.md)") from None


def read_sample_sheet(path):
    """Sample name -> FASTA path from a TSV with the header 'sample<TAB>fasta'."""
    sheet = Path(path)
    if not sheet.is_file():
        raise WorkflowError(f"config key 'sample_sheet': file not found: {sheet}")
    samples = {}
    with sheet.open(newline="") as handle:
        rows = csv.reader(handle, delimiter="\t")
        header = next(rows, None)
        if header is None or [field.strip() for field in header[:2]] != ["sample", "fasta"]:
            raise WorkflowError(f"sample sheet {sheet}: the first line must be the header 'sample<TAB>fasta'")
        for line, row in enumerate(rows, start=2):
            if not any(field.strip() for field in row):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise WorkflowError(f"sample sheet {sheet}, line {line}: expected 'sample<TAB>fasta'")
            name, fasta = row[0].strip(), row[1].strip()
            if name in samples:
                raise WorkflowError(f"sample sheet {sheet}, line {line}: sample '{name}' is listed twice")
            samples[name] = str(sheet.parent / fasta) if not os.path.isabs(fasta) else fasta
    return samples


def load_samples(config):
    """Sample name -> FASTA path, from `samples` and `sample_sheet`, checked (names, duplicates, files)."""
    samples = dict(config["samples"] or {})
    if config["sample_sheet"]:
        for name, fasta in read_sample_sheet(config["sample_sheet"]).items():
            if name in samples:
                raise WorkflowError(
                    f"sample '{name}' is defined both in config key 'samples' and in the sample sheet "
                    f"{config['sample_sheet']}; keep one of them"
                )
            samples[name] = fasta
    for name, fasta in samples.items():
        if name.casefold() in {reserved.casefold() for reserved in RESERVED_SAMPLE_NAMES}:
            raise WorkflowError(
                f"sample name '{name}' is reserved (results/{name} is the workflow's own output); rename the sample"
            )
        if not SAMPLE_NAME.fullmatch(name):
            raise WorkflowError(
                f"sample name '{name}' is not allowed: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        if not os.path.isfile(fasta):
            raise WorkflowError(f"sample '{name}': FASTA file not found: {fasta}")
    return samples


def check_models(config):
    """Every model path exists; warn when the classifier's file name names the other length."""
    for key, hint in MODEL_HINTS.items():
        path = config["models"][key]
        if not os.path.exists(path):
            raise WorkflowError(
                f"config key 'models.{key}': not found: {path}. Put {hint} there (virnucpro models "
                "download), or for a trial run use small test models: virnucpro make-test-models DIR "
                "writes them and lists their paths in DIR/models.json"
            )
    named = re.findall(r"(?<![0-9])(300|500)(?![0-9])", os.path.basename(config["models"]["classifier"]))
    if named and int(named[0]) != config["length"]:
        logger.warning(
            f"config key 'models.classifier': the file name says {named[0]} but 'length' is "
            f"{config['length']}; the classifier must match the expected read length"
        )


def daemon_table(config):
    """Daemon ID ('esm2-0', 'dnabert_s-1', ...) -> {'model', 'device'}, one per configured device."""
    return {
        f"{model}-{index}": {"model": model, "device": device}
        for model in MODELS
        for index, device in enumerate(config["daemons"][model])
    }


validate_config(config)
SAMPLES = load_samples(config)
if SAMPLES:
    check_models(config)
else:
    logger.warning("no samples configured: set 'samples' or 'sample_sheet' in the config (see config/README.md)")
DAEMON_MODE = config["embedding_mode"] == "daemon"
DAEMONS = daemon_table(config) if DAEMON_MODE else {}
RUN = RunDir(config["run_dir"])
RUN_DIR = str(RUN.root)
# With a cluster executor the embedding clients (and config key cluster_local_steps) run where snakemake
# runs (localrules, Snakefile).
LOCAL_CLIENTS = DAEMON_MODE and config["cluster_local_clients"]
MAIN_PROCESS = not (workflow.remote_exec or workflow.subprocess_exec)  # not a job's own snakemake


def is_gpu(device):
    """Whether a daemon on `device` takes a GPU (gpu-slot:cpu takes one but computes on the CPU: trials)."""
    return device.startswith("cuda") or device == GPU_SLOT_CPU


def check_progress():
    """Refuse (before any job starts) a daemon-mode run whose daemons would take every slot."""
    if not DAEMONS:
        return
    count = len(DAEMONS)
    slots, option = (workflow.cores, "--cores") if workflow.local_exec else (workflow.nodes, "--jobs")
    if slots is not None and slots <= count:
        raise WorkflowError(
            f"{count} daemon(s) would take all {slots} job slot(s) and no embedding job could run: "
            f"use {option} {count + 1} or more, or configure fewer daemons"
        )
    gpus = sum(is_gpu(spec["device"]) for spec in DAEMONS.values())
    limit = getattr(workflow.global_resources.get("gpu"), "value", None)
    if gpus and isinstance(limit, int) and limit < gpus:
        raise WorkflowError(
            f"{gpus} GPU daemon(s) but only gpu={limit} in --resources: the daemons would wait for "
            f"each other; use --resources gpu={gpus} or configure fewer GPU daemons"
        )


def check_cluster_fit():
    """Refuse (before any job is submitted) a run whose SLURM requests no node of its partition can meet."""
    misfit = cluster_misfit(workflow)
    if misfit:
        raise WorkflowError(misfit)


def get_final_outputs():
    """Every sample's outputs and report plots, and the run statistics (and their plot) in daemon mode."""
    outputs = expand("results/{sample}/{name}", sample=SAMPLES, name=SAMPLE_OUTPUTS)
    outputs += expand("results/{sample}/plots/{name}.png", sample=SAMPLES, name=SAMPLE_PLOTS)
    if DAEMON_MODE and SAMPLES:
        outputs += ["results/run_stats.json", "results/daemons.png"]
    return outputs


def get_fasta(wildcards):
    return SAMPLES[wildcards.sample]


def get_shards(sample):
    """The shard names of a sample, in order (known once its checkpoint has run)."""
    shard_dir = checkpoints.shard_frames.get(sample=sample).output[0]
    names = glob_wildcards(os.path.join(shard_dir, "{shard,shard_[0-9]+}.fa")).shard
    return sorted(names, key=lambda name: int(name.split("_")[1]))


def get_predictions(wildcards):
    return expand(
        "results/{sample}/work/predictions/{shard}.tsv",
        sample=wildcards.sample,
        shard=get_shards(wildcards.sample),
    )


def get_all_embeddings(wildcards):
    """Both embedding files of every shard of every sample: the daemons' whole workload."""
    return [
        f"results/{sample}/work/embeddings/{shard}.{model}.pt"
        for sample in SAMPLES
        for shard in get_shards(sample)
        for model in MODELS
    ]


def get_daemon_stats():
    return expand("results/daemons/{daemon}.stats.json", daemon=DAEMONS)


def get_daemon_gpus(wildcards):
    return int(is_gpu(DAEMONS[wildcards.daemon]["device"]))


def get_daemon_settings():
    """What each daemon is and how it serves, for the run's settings (read by its serve job): the config's
    transport, else ipc for a local run and tcp (across nodes) with a cluster executor."""
    transport = config["transport"] or ("ipc" if workflow.local_exec else "tcp")
    return {
        daemon: {
            "model": spec["model"], "weights": os.path.abspath(config["models"][spec["model"]]),
            "device": spec["device"], "precision": config["precision"], "transport": transport,
            "cache_clear_every": config["cache_clear_every"], "orphan_timeout": config["orphan_timeout"],
            "freeze_timeout": config["freeze_timeout"], "bind_host": config["bind_host"],
        }
        for daemon, spec in DAEMONS.items()
    }  # fmt: skip


def untracked(value):
    """A param that cannot change a result (the run folder, how a job reaches its model): snakemake does not
    track params computed from a job's output, so changing one never redoes finished work."""
    return lambda wildcards, output: value


def get_model_fingerprint(model):
    """The identity of a model's files (names, sizes, modification times): embeddings (and predictions) made
    with another are redone; a model moved or copied elsewhere with its timestamps is the same. (Models are
    not inputs, whose paths would decide instead; check_models checks that they exist.)"""
    path = config["models"][model]
    return model_fingerprint(path) if os.path.exists(path) else "absent"


def get_embed_gpus(model):
    """In-process mode embeds on the first device listed for the model."""
    return 0 if DAEMON_MODE else int(is_gpu(config["daemons"][model][0]))


def get_embed_access(model):
    """How an embedding job reaches its model, beyond --run-dir: a daemon (nothing more), or loading it
    itself (an untracked param: it cannot change a result)."""
    if DAEMON_MODE:
        return ""
    return f"--weights {shlex.quote(config['models'][model])} --device {config['daemons'][model][0]}"
