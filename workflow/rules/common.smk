# Configuration and sample checks (at parse time, one-line errors), the checks that the daemons can
# make progress and that the cluster can run the jobs (onstart), and the input and params functions
# of the rules.

import csv
import functools
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema

from snakemake.common import is_local_file, parse_uri
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from virnucpro.cluster.fit import cluster_misfit
from virnucpro.cluster.losses import JobLosses
from virnucpro.engines.embed import GPU_SLOT_CPU, MODELS
from virnucpro.engines.esm2_options import parse_engine
from virnucpro.errors import UserError
from virnucpro.fingerprint import model_fingerprint
from virnucpro.layout import SHARD_PATTERN, RunFiles, SampleFiles, ShardFiles
from virnucpro.resume import FILE, TABLE, Shard, check_intermediates
from virnucpro.serving.plan import SnakemakePlan, models_with_work
from virnucpro.serving.progress import workflow_settings
from virnucpro.serving.rundir import SESSION_VARIABLE, RunDir
from virnucpro.serving.runwatch import RunWatch, new_session
from virnucpro.serving.spec import DaemonSpec
from virnucpro.serving.stats import read_stats_session

SAMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Every file under results/ is named by virnucpro.layout: the rules' file patterns, and the run's own files.
SAMPLE = SampleFiles("{sample}")
RUN_FILES = RunFiles()
MODEL_HINTS = {  # what each model path must be: a file or a folder, and which
    "esm2": ("file", "the ESM-2 checkpoint esm2_t36_3B_UR50D.pt (with its -contact-regression.pt beside it)"),
    "dnabert_s": ("folder", "the DNABERT-S snapshot folder"),
    "classifier": ("file", "the classifier 300_model.pth or 500_model.pth"),
}


wildcard_constraints:
    sample=SAMPLE_NAME.pattern,
    shard=SHARD_PATTERN,
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
    try:
        parse_engine(config["esm2_engine"])
    except UserError as error:
        raise WorkflowError(f"config key 'esm2_engine': {error} (see config/README.md)") from None


def read_sample_sheet(path):
    """Sample name -> FASTA path from a TSV with the header 'sample<TAB>fasta' (UTF-8, a byte-order mark
    ignored; lines may end in LF, CRLF or a lone CR)."""
    sheet = Path(path)
    if not sheet.is_file():
        raise WorkflowError(f"config key 'sample_sheet': file not found: {sheet}")
    samples = {}
    with sheet.open(encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t")
        try:
            header = next(rows, None)
            if header is None or [field.strip() for field in header[:2]] != ["sample", "fasta"]:
                raise WorkflowError(f"sample sheet {sheet}: the first line must be the header 'sample<TAB>fasta'")
            for row in rows:
                if not any(field.strip() for field in row):
                    continue
                if len(row) < 2 or not row[0].strip() or not row[1].strip():
                    raise WorkflowError(f"sample sheet {sheet}, line {rows.line_num}: expected 'sample<TAB>fasta'")
                name, fasta = row[0].strip(), row[1].strip()
                if name in samples:
                    raise WorkflowError(f"sample sheet {sheet}, line {rows.line_num}: sample '{name}' is listed twice")
                samples[name] = str(sheet.parent / fasta) if not os.path.isabs(fasta) else fasta
        except (UnicodeDecodeError, csv.Error) as error:
            raise WorkflowError(
                f"sample sheet {sheet}: not tab-separated UTF-8 text ({error}); save it as plain text"
            ) from None
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
        # The workflow's own entries directly under results/: a sample of the same name would put its folder on
        # or in them. Compared without letter case (case-insensitive file systems).
        if name.casefold() in RUN_FILES.reserved_names:
            raise WorkflowError(
                f"sample name '{name}' is reserved ({SampleFiles(name).folder} is the workflow's own output); "
                "rename the sample"
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
    """Every model path exists and is what it must be (a file or a folder); warn when the classifier's file
    name names the other length."""
    for key, (kind, hint) in MODEL_HINTS.items():
        path = config["models"][key]
        if not os.path.exists(path):
            raise WorkflowError(
                f"config key 'models.{key}': not found: {path}. Put {hint} there (virnucpro models "
                "download), or for a trial run use small test models: virnucpro make-test-models DIR "
                "writes them and lists their paths in DIR/models.json"
            )
        found = "folder" if os.path.isdir(path) else "file"
        if found != kind:
            raise WorkflowError(f"config key 'models.{key}': {path} is a {found}, but it must be a {kind}: {hint}")
    named = re.findall(r"(?<![0-9])(300|500)(?![0-9])", os.path.basename(config["models"]["classifier"]))
    if named and int(named[0]) != config["length"]:
        logger.warning(
            f"config key 'models.classifier': the file name says {named[0]} but 'length' is "
            f"{config['length']}; the classifier must match the expected read length"
        )


def check_container(config):
    """With --sdm apptainer, a local image file (config key container) exists: else one line says how to make it."""
    image = config["container"]
    if is_local_file(image) and not os.path.isfile(parse_uri(image).uri_path):
        raise WorkflowError(
            f"config key 'container': no image file {image} (snakemake --sdm apptainer runs every job in it): build "
            "it from the Containerfile and convert it to .sif (docs/cluster.md, 'The container image'), or set "
            "'container' to its path or to an address apptainer can pull (docker://..., oras://...)"
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
if DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method:
    check_container(config)
DAEMON_MODE = config["embedding_mode"] == "daemon"
DAEMONS = daemon_table(config) if DAEMON_MODE else {}
# Absolute: the run's threads outlive snakemake's change into --directory (and back, at its end).
RUN = RunDir(os.path.abspath(config["run_dir"]))
RUN_DIR = str(RUN.root)
# With a cluster executor the embedding clients (and config key cluster_local_steps) run where snakemake
# runs (localrules, Snakefile).
LOCAL_CLIENTS = DAEMON_MODE and config["cluster_local_clients"]
MAIN_PROCESS = not (workflow.remote_exec or workflow.subprocess_exec)  # not a job's own snakemake
# `snakemake --report FILE` (not --report-after-run) renders what earlier runs made: the finished samples,
# and why the others are not (report.smk). Snakemake tells a workflow no more than its command line.
REPORT_ONLY = (
    MAIN_PROCESS
    and any(arg == "--report" or arg.startswith("--report=") for arg in sys.argv)
    and "--report-after-run" not in sys.argv
)


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


def get_sample_outputs(samples=None):
    """The tables of these samples (default: every sample)."""
    return [path for sample in (SAMPLES if samples is None else samples) for path in SampleFiles(sample).outputs]


def get_final_outputs():
    """Every sample's outputs and report plots, and the run statistics (and their plot) in daemon mode; and
    the missing intermediates of samples done before (get_missing_intermediates). For a report, only what
    exists: the finished samples (a failed one is listed in the report, report.smk) and the statistics."""
    samples = [sample for sample in SAMPLES if not REPORT_ONLY or sample_finished(sample)]
    outputs = get_sample_outputs(samples)
    outputs += [path for sample in samples for path in SampleFiles(sample).plots.pngs]
    if DAEMON_MODE and SAMPLES:
        stats = [RUN_FILES.run_stats, RUN_FILES.daemons_plot]
        outputs += [path for path in stats if not REPORT_ONLY or os.path.exists(path)]
    if MAIN_PROCESS and not REPORT_ONLY:
        outputs += get_missing_intermediates()
    return outputs


def sample_finished(sample):
    """Whether a sample's outputs and report files all exist."""
    files = SampleFiles(sample)
    return all(os.path.exists(path) for path in (*files.outputs, *files.plots.files))


def get_missing_intermediates():
    """The missing intermediates of every sample sharded before: targets of the run, so that each, and every
    step after it, is made again (snakemake would not: their later steps are done). A damaged one stops the
    run before any job, with one line naming it (virnucpro.resume)."""
    missing = []
    for sample in SAMPLES:
        files = SampleFiles(sample)
        if not os.path.isdir(files.shards):
            continue  # not sharded yet: snakemake makes what is missing
        intermediates = [(path, TABLE if path.endswith(".tsv") else FILE) for path in files.intermediates]
        shards = [
            Shard(
                inputs=(files.shard_nucleotide(shard), files.shard_protein(shard)),
                embeddings=tuple(files.embedding(shard, model) for model in MODELS),
                prediction=files.predictions(shard),
            )
            for shard in files.shard_files.names()
        ]
        found = check_intermediates(intermediates, shards)
        try:
            found.raise_if_damaged()
        except UserError as error:
            raise WorkflowError(f"sample '{sample}': {error}") from None
        missing += found.missing
    if missing:
        logger.info(f"{len(missing)} intermediate file(s) missing, made again with what follows: {', '.join(missing)}")
    return missing


def get_fasta(wildcards):
    return SAMPLES[wildcards.sample]


def get_shards(sample):
    """The shard names of a sample, in order (known once its checkpoint has run)."""
    return ShardFiles(checkpoints.shard_frames.get(sample=sample).output[0]).names()


def get_predictions(wildcards):
    files = SampleFiles(wildcards.sample)
    return [files.predictions(shard) for shard in get_shards(wildcards.sample)]


@functools.cache
def get_models_with_work():
    """The models that have an embedding to make in this run (serving.plan.models_with_work), all of them when
    the user forces embedding (or sharding) jobs to run. Evaluated when the plan is built."""
    settings = workflow.dag_settings
    if settings.forceall or set(settings.forcerun) & FORCING_RULES:
        return frozenset(MODELS)
    made_with = {model: {"fingerprint": get_model_fingerprint(model), "precision": config["precision"]}
                 for model in MODELS}  # fmt: skip
    return frozenset(models_with_work(SAMPLES, made_with, checksum_limit=settings.max_checksum_file_size))


def get_daemon_stats(wildcards=None):
    """The serve jobs' outputs that the run statistics collect: of every daemon whose model has work, and of
    those whose statistics an earlier attempt left (a model without work starts no daemon)."""
    return [
        RUN_FILES.daemon_stats(daemon)
        for daemon, spec in DAEMONS.items()
        if spec["model"] in get_models_with_work() or os.path.exists(RUN_FILES.daemon_stats(daemon))
    ]


def get_serve_attempt(wildcards):
    """A serve job's tracked param: this run's session when its model has work (a new value, so the job runs),
    else the session its existing statistics came from (unchanged, so it does not)."""
    if DAEMONS[wildcards.daemon]["model"] in get_models_with_work():
        return SESSION
    return read_stats_session(RUN_FILES.daemon_stats(wildcards.daemon)) or SESSION


def get_daemon_gpus(wildcards):
    return int(is_gpu(DAEMONS[wildcards.daemon]["device"]))


def get_daemon_specs():
    """Every daemon's spec (serving.spec.DaemonSpec), for the run's settings (read by its serve job and its
    daemon): the config's transport, else ipc for a local run and tcp (across nodes) with a cluster executor.
    Call it from onstart: while the Snakefile is parsed, snakemake has not chosen its executor yet."""
    transport = config["transport"] or ("ipc" if workflow.local_exec else "tcp")
    return {
        daemon: DaemonSpec(
            daemon_id=daemon, model=spec["model"], weights=config["models"][spec["model"]], device=spec["device"],
            precision=config["precision"], esm2_engine=config["esm2_engine"], transport=transport,
            bind_host=config["bind_host"],
            allowed_roots=(os.path.abspath(RUN_FILES.root),), cache_clear_every=config["cache_clear_every"],
            orphan_timeout=config["orphan_timeout"], freeze_timeout=config["freeze_timeout"],
        ).checked()
        for daemon, spec in DAEMONS.items()
    }  # fmt: skip


def get_progress_settings():
    """What the run's watch reports while the daemons embed (virnucpro.serving.progress): each model's shard and
    embedding paths, as its embedding rule names them, the samples, and the seconds between two reports."""
    paths = {model: (getattr(rules, f"embed_{model}").input.shard, getattr(rules, f"embed_{model}").output[0])
             for model in MODELS}  # fmt: skip
    return workflow_settings(paths, list(SAMPLES), config["progress_every"])


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
