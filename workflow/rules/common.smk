# Configuration and sample checks (at parse time, one-line errors), the run-time check that the
# daemons can make progress (onstart), and the input functions of the rules.

import csv
import glob
import json
import logging
import math
import os
import re
import secrets
import shlex
import signal
import socket
import threading
import time
from pathlib import Path

import jsonschema

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

MODELS = ("esm2", "dnabert_s")
SAMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RESERVED_SAMPLE_NAMES = {"daemons"}  # results/daemons/ holds the daemons' statistics
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
        if name in RESERVED_SAMPLE_NAMES:
            raise WorkflowError(f"sample name '{name}' is reserved (results/{name}/ is the workflow's); rename the sample")
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
RUN_DIR = config["run_dir"]
STOP_FILE = os.path.join(RUN_DIR, "stop")
HEARTBEAT = os.path.join(RUN_DIR, "heartbeat")
FAILURE_MANIFEST = os.path.join(RUN_DIR, "failures.tsv")
# With a cluster executor the embedding clients run where snakemake runs (localrules, Snakefile).
LOCAL_CLIENTS = DAEMON_MODE and config["cluster_local_clients"]
MAIN_PROCESS = not (workflow.remote_exec or workflow.subprocess_exec)  # not a job's own snakemake
if MAIN_PROCESS:
    # This run's identity. Jobs inherit the environment (locally, and through sbatch --export=ALL);
    # a serve job compares it with the heartbeat's, so a daemon of a killed run never serves a later one.
    os.environ.update(VIRNUCPRO_RUN_TOKEN=secrets.token_hex(8))
    # A failing job stops the daemons at once (shell prefix below), unless the run keeps going.
    stop_on_error = DAEMON_MODE and not getattr(workflow.execution_settings, "keep_going", False)
    os.environ.update(VIRNUCPRO_STOP_DAEMONS_ON_ERROR="1" if stop_on_error else "0")
if DAEMON_MODE and os.environ.get("VIRNUCPRO_STOP_DAEMONS_ON_ERROR") == "1":
    # Set here, not in onstart, so that the jobs' own snakemake processes on a cluster use it too:
    # when a job's command fails, it stops the daemons instead of the run waiting for their idle timeout.
    _stop = f"virnucpro -q stop-daemons --run-dir {shlex.quote(RUN_DIR)} --stop-file {shlex.quote(STOP_FILE)} || true"
    shell.prefix(f"set -euo pipefail; trap {shlex.quote(_stop)} ERR; ".replace("{", "{{").replace("}", "}}"))
# Lets envs/virnucpro.yaml install this checkout of the package (pip expands ${VIRNUCPRO_SOURCE}).
os.environ.setdefault("VIRNUCPRO_SOURCE", str(Path(workflow.basedir).parent))


def is_gpu(device):
    return device.startswith("cuda")


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


def daemon_param(key):
    return lambda wildcards: DAEMONS[wildcards.daemon][key]


def daemon_transport(wildcards=None):
    """The config's transport; else ipc for a local run, tcp (across nodes) with a cluster executor.
    The main process decides (a job's own snakemake runs locally) and passes it on (onstart)."""
    if not MAIN_PROCESS:
        return os.environ.get("VIRNUCPRO_TRANSPORT", "ipc")
    return config["transport"] or ("ipc" if workflow.local_exec else "tcp")


def get_daemon_weights(wildcards):
    return config["models"][DAEMONS[wildcards.daemon]["model"]]


def daemon_gpus(wildcards):
    return int(is_gpu(DAEMONS[wildcards.daemon]["device"]))


def embed_device(model):
    """In-process mode embeds on the first device listed for the model."""
    return config["daemons"][model][0]


def embed_weights(model):
    """The model as an input of in-process embedding jobs (daemon mode: the daemon holds it)."""
    return [] if DAEMON_MODE else [config["models"][model]]


def embed_gpus(model):
    return 0 if DAEMON_MODE else int(is_gpu(embed_device(model)))


def embed_args(model):
    """How an embedding job reaches its model: a daemon of the run, or loading it itself."""
    if DAEMON_MODE:
        return f"--run-dir {shlex.quote(RUN_DIR)} --timeout {config['client_timeout']}"
    return (
        f"--weights {shlex.quote(config['models'][model])} --device {embed_device(model)} "
        f"--precision {config['precision']}"
    )


# --- the daemons' lifecycle when the run does not end well (see daemons.smk) ---------------------

HEARTBEAT_EVERY = 5  # seconds between two heartbeats of the run
LEFTOVER_WAIT = 120  # seconds to wait at start for the daemons of an earlier run to exit
STOP_GRACE = 10  # seconds a daemon may take to notice a stop token itself before its serve job ends it
PROC = Path(os.sep, "proc")  # Linux: the processes (where it is missing, no local client is ended)


def write_stop_token(path):
    """Replace the stop file's content, atomically, by a fresh token: every daemon watching it stops,
    and every embedding client stops waiting for one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.{secrets.token_hex(4)}.tmp"
    with open(temporary, "w") as handle:
        handle.write(f"stop {time.time():.6f} {secrets.token_hex(16)}\n")
    os.replace(temporary, path)


def read_file(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def descendants(pid):
    """The IDs of the processes below `pid` (from /proc; none where there is no /proc)."""
    children = {}
    for stat in glob.glob(str(PROC / "[0-9]*" / "stat")):
        text = read_file(stat)
        if text:
            parent = int(text.rsplit(b")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(Path(stat).parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def end_local_clients():
    """SIGTERM the embedding clients (`virnucpro embed`) that this snakemake process started."""
    for pid in descendants(os.getpid()):
        args = (read_file(PROC / str(pid) / "cmdline") or b"").split(b"\0")
        if b"embed" in args and any(os.path.basename(arg) == b"virnucpro" for arg in args):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def keep_ending_local_clients(seconds):
    """A client watches the stop file from its own start: one that started just as the stop token was
    written would wait for a daemon until its timeout. So end the clients for a while."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        time.sleep(0.5)
        end_local_clients()


def stop_run_daemons():
    """Stop this run's daemons (a fresh stop token) and its local clients (now and for STOP_GRACE s)."""
    write_stop_token(STOP_FILE)
    end_local_clients()
    threading.Thread(target=keep_ending_local_clients, args=(STOP_GRACE,), daemon=True).start()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def beat_heartbeat(token):
    """Write the run's heartbeat, `<token> <count>`, every HEARTBEAT_EVERY seconds, for as long as this
    (main) snakemake process lives: the serve jobs stop their daemons when it stops changing."""
    beat = 0
    while True:
        temporary = f"{HEARTBEAT}.{token}.tmp"
        try:
            with open(temporary, "w") as handle:
                handle.write(f"{token} {beat}\n")
            os.replace(temporary, HEARTBEAT)
        except OSError as error:  # a file system hiccup: try again at the next beat
            logger.warning(f"could not write the run's heartbeat {HEARTBEAT}: {error}")
        beat += 1
        time.sleep(HEARTBEAT_EVERY)


class StopDaemonsOnJobError(logging.Handler):
    """Stops the daemons as soon as snakemake reports a failed job, whatever ended it (its command, or
    SLURM: time or memory limit, a lost node), instead of the run waiting for their idle timeout."""

    def emit(self, record):
        if str(getattr(record, "event", "")) == "job_error":
            stop_run_daemons()


def on_interrupt(previous):
    """A SIGINT/SIGTERM/SIGHUP handler: stop the daemons and the local clients, then do what snakemake
    (or Python) does with the signal."""

    def handler(number, frame):
        stop_run_daemons()
        if callable(previous):
            previous(number, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)

    return handler


def wait_for_leftover_daemons():
    """Wait (boundedly) until the daemons of an earlier run have exited, so that ours can take their IDs."""
    deadline = time.monotonic() + LEFTOVER_WAIT
    while True:
        live = []
        for path in glob.glob(os.path.join(RUN_DIR, "registry", "*.json")):
            try:
                entry = json.loads(read_file(path) or b"{}")
                pid, here = int(entry.get("pid", 0)), entry.get("host") == socket.gethostname()
            except (ValueError, TypeError):
                continue
            beat = entry.get("heartbeat")  # a daemon on another host refreshes it while it lives
            gone = here and not pid_alive(pid) or isinstance(beat, (int, float)) and (
                time.time() - beat > LEFTOVER_WAIT
            )
            if entry.get("state") != "failed" and not gone:
                live.append(f"{entry.get('daemon_id')} (pid {pid} on {entry.get('host')})")
        if not live:
            return
        if time.monotonic() > deadline:
            logger.warning(f"daemon(s) of an earlier run still registered after {LEFTOVER_WAIT} s: {', '.join(live)}")
            return
        time.sleep(1)
