# The model daemons (embedding_mode: daemon). Each configured daemon is one long-running serve
# job that loads its model once and embeds the shards that the embedding jobs send it. Once every
# embedding of every sample exists, stop_daemons tells them to stop; each then writes its
# statistics and exits, and collect_run_stats merges them. The statistics files and the stop
# marker are temp(), so a later run that needs embeddings starts the daemons again.


onstart:
    check_progress()
    if DAEMONS:
        # Daemons left over by a killed run of this folder hold their devices: stop them.
        shell("virnucpro -q stop-daemons --run-dir {RUN_DIR:q} --stop-file {STOP_FILE:q}")
    if DAEMONS and not workflow.execution_settings.keep_going:
        # A failing job ends the run: let it stop the daemons at once, instead of the run waiting
        # for their idle timeout while they hold their devices.
        stop = shlex.quote(f"virnucpro -q stop-daemons --run-dir {shlex.quote(RUN_DIR)} "
                           f"--stop-file {shlex.quote(STOP_FILE)} || true")
        shell.prefix(f"set -euo pipefail; trap {stop} ERR; ".replace("{", "{{").replace("}", "}}"))


rule serve_model:
    input:
        weights=get_daemon_weights,
    output:
        temp("results/daemons/{daemon}.stats.json"),
    params:
        model=daemon_param("model"),
        device=daemon_param("device"),
        precision=config["precision"],
        run_dir=RUN_DIR,
        stop_file=STOP_FILE,
        idle_timeout=config["idle_timeout"],
        cache_clear_every=config["cache_clear_every"],
    log:
        "logs/daemons/{daemon}.log",
    threads: 1
    priority: 100
    resources:
        gpu=daemon_gpus,
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro serve --model {params.model} --weights {input.weights:q} --device {params.device}"
        " --precision {params.precision} --run-dir {params.run_dir:q} --stats-output {output:q}"
        " --daemon-id {wildcards.daemon} --idle-timeout {params.idle_timeout}"
        " --cache-clear-every {params.cache_clear_every} --allowed-root \"$PWD/results\""
        " --stop-file {params.stop_file:q} 2> {log:q}"


rule stop_daemons:
    input:
        get_all_embeddings,
    output:
        temp(touch("results/daemons/stop.done")),
    params:
        run_dir=RUN_DIR,
        stop_file=STOP_FILE,
        stats=get_daemon_stats(),
        wait=math.ceil(config["idle_timeout"]),
    log:
        "logs/daemons/stop.log",
    priority: 100
    conda:
        "../../envs/virnucpro.yaml"
    # A daemon stops when the stop file changes after its own start, so one that starts after the
    # first token (a re-run that needs no embedding) is stopped by the next: repeat until every
    # daemon has written its statistics (or, at worst, for as long as a daemon waits when idle).
    shell:
        ": > {log:q}; until"
        " virnucpro stop-daemons --run-dir {params.run_dir:q} --stop-file {params.stop_file:q} 2>> {log:q}"
        " && ls {params.stats:q} > /dev/null 2>&1 || [ $SECONDS -ge {params.wait} ]; do sleep 2; done"


rule collect_run_stats:
    input:
        stop="results/daemons/stop.done",
        stats=get_daemon_stats(),
    output:
        report("results/run_stats.json", caption="../report/run_stats.rst", category="Run statistics"),
    log:
        "logs/daemons/run_stats.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro run-stats {input.stats:q} --output {output:q} 2> {log:q}"
