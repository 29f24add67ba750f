# The model daemons (embedding_mode: daemon). Each configured daemon is one long-running serve
# job that loads its model once and embeds the shards that the embedding jobs send it. Once every
# embedding of every sample exists, stop_daemons tells them to stop; each then writes its
# statistics and exits, and collect_run_stats merges them. The statistics files and the stop
# marker are temp(), so a later run that needs embeddings starts the daemons again.
#
# How the daemons give their devices back when the run does not end well (docs/cluster.md):
# - a job fails: its shell stops the daemons (the ERR trap of the shell prefix, common.smk), and so
#   does snakemake when it sees the failure (a job that SLURM ended has no chance to), unless the
#   run keeps going (--keep-going); a serve job that starts only after that (it waited in the cluster
#   queue) ends its daemon STOP_GRACE seconds after it started;
# - snakemake gets SIGINT, SIGTERM or SIGHUP: it writes a fresh stop token (the daemons stop
#   within seconds, and the embedding clients stop waiting for them) and ends its local clients;
# - snakemake is killed outright: the run's heartbeat stops, and each serve job stops its daemon
#   once the heartbeat is `orphan_timeout` seconds old (or belongs to a later run);
# - a later run of the same folder stops the daemons of an earlier one before it starts its own.

onstart:
    check_progress()
    if DAEMONS:
        os.environ.update(VIRNUCPRO_TRANSPORT=daemon_transport())  # for the serve jobs' own snakemake
        os.makedirs(RUN_DIR, exist_ok=True)
        # The heartbeat, with this run's token: serve jobs of an earlier run stop their daemons now.
        heartbeat = threading.Thread(target=beat_heartbeat, args=(os.environ.get("VIRNUCPRO_RUN_TOKEN"),))
        heartbeat.daemon = True
        heartbeat.start()
        # Daemons left over by a killed run of this folder hold their devices: stop them.
        shell("virnucpro -q stop-daemons --run-dir {RUN_DIR:q} --stop-file {STOP_FILE:q}")
        wait_for_leftover_daemons()
        # The stop token at the start of this run: serve jobs compare the stop file with it.
        os.environ.update(VIRNUCPRO_STOP_BASELINE=(read_file(STOP_FILE) or b"").decode().strip())
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, on_interrupt(signal.getsignal(number)))
        if os.environ.get("VIRNUCPRO_STOP_DAEMONS_ON_ERROR") == "1":
            logger.addHandler(StopDaemonsOnJobError())


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
        transport=daemon_transport,
        heartbeat=HEARTBEAT,
        idle_timeout=config["idle_timeout"],
        orphan_timeout=math.ceil(config["orphan_timeout"]),
        stop_grace=STOP_GRACE,
        cache_clear_every=config["cache_clear_every"],
    log:
        "logs/daemons/{daemon}.log",
    threads: 1
    priority: 100
    resources:
        gpu=daemon_gpus,
    conda:
        "../../envs/virnucpro.yaml"
    # The daemon runs in the background of this job's shell, which forwards SIGTERM/SIGINT to it and
    # watches the run: it stops the daemon (exit 1, no statistics) once the run's heartbeat is
    # orphan_timeout seconds old or is another run's (the snakemake process that started it was
    # killed), and ends it (SIGTERM) if the run's stop token has changed since the run started and
    # the daemon still runs STOP_GRACE seconds later: it started after the run was told to stop (a
    # serve job that waited in the cluster queue while a job failed), so it saw no change itself.
    shell:
        ": > {log:q}; virnucpro serve --model {params.model} --weights {input.weights:q} --device {params.device}"
        " --precision {params.precision} --run-dir {params.run_dir:q} --stats-output {output:q}"
        " --daemon-id {wildcards.daemon} --idle-timeout {params.idle_timeout}"
        " --cache-clear-every {params.cache_clear_every} --allowed-root \"$PWD/results\""
        " --stop-file {params.stop_file:q} --transport {params.transport} 2>> {log:q} & daemon=$!;"
        " trap 'kill -TERM $daemon 2> /dev/null || true' TERM INT HUP;"
        " token=${{VIRNUCPRO_RUN_TOKEN:-}}; baseline=${{VIRNUCPRO_STOP_BASELINE:-}}; last=; since=$SECONDS; stopping=;"
        " while kill -0 $daemon 2> /dev/null; do"
        "  if [ -n \"$baseline\" ] && [ \"$(cat {params.stop_file:q} 2> /dev/null || true)\" != \"$baseline\" ]; then"
        "   stopping=${{stopping:-$SECONDS}};"
        "   if [ $((SECONDS - stopping)) -ge {params.stop_grace} ]; then kill -TERM $daemon 2> /dev/null || true; fi;"
        "  fi;"
        "  beat=$(cat {params.heartbeat:q} 2> /dev/null || true);"
        "  if [ \"$beat\" != \"$last\" ]; then last=$beat; since=$SECONDS; fi;"
        "  if [ -n \"$token\" ] && [ \"${{beat%% *}}\" != \"$token\" ] && [ -n \"$beat\" ]"
        "   || [ $((SECONDS - since)) -ge {params.orphan_timeout} ]; then"
        "   echo \"$(date '+%H:%M:%S') serve job: the run that started this daemon is gone (heartbeat"
        " {params.heartbeat}: '$beat'); stopping it\" >> {log:q};"
        "   kill -TERM $daemon 2> /dev/null || true; wait $daemon || true; rm -f {output:q}; exit 1;"
        "  fi;"
        "  sleep 2;"
        " done;"
        " wait $daemon"


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
