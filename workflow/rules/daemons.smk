# The model daemons (embedding_mode: daemon). Each configured daemon is one long-running serve job
# (`virnucpro serve-job`: the daemon runs as its child) that loads its model once and embeds the
# shards that the embedding jobs send it. Once every embedding of every sample exists, stop_daemons
# tells them to stop; each writes its statistics and exits, and collect_run_stats merges them.
#
# The lifecycle (docs/daemons.md, "Lifecycle in a run"): the run's watch (virnucpro.serving.supervise,
# started below) stops the daemons of an earlier run, then stops this run's daemons when nothing else
# runs for idle_timeout s (a few s after a failed job), or at once on SIGINT/SIGTERM/SIGHUP; a serve
# job stops its daemon when the run is gone (orphan_timeout), kills it when it freezes
# (freeze_timeout), and fails (to be restarted: retries) only when it held its model's last daemon.

if MAIN_PROCESS:
    # This run's session: its jobs inherit it (locally, and through sbatch --export=ALL) and read the
    # run's settings (RUN_DIR/settings.json) only when they belong to it. Statistics files left by an
    # earlier, failed run would keep this run from starting its daemons: they go.
    os.environ[SESSION_VARIABLE] = new_session()
    clear_stale_outputs(get_daemon_stats(), Path(".snakemake", "locks"))
    # A job lost with its node (NODE_FAIL, BOOT_FAIL, PREEMPTED) is submitted again and is not the run's
    # failure; one that failed on its own is not submitted again (docs/cluster.md, "A node dies").
    JOB_LOSSES = JobLosses(workflow, RUN, os.environ[SESSION_VARIABLE])
    RUN_WATCH = RunWatch(
        RUN,
        os.environ[SESSION_VARIABLE],
        idle_timeout=config["idle_timeout"],
        daemon_restarts=config["daemon_restarts"],
        keep_going=False,  # set in onstart, where snakemake's settings are known
        losses=JOB_LOSSES,
        settings={
            "client_timeout": config["client_timeout"],
            "on_failure": "record" if config["failure_policy"] == "continue" else "fail",
        },
    )


onstart:
    check_progress()
    check_cluster_fit()
    RUN_WATCH.keep_going = bool(getattr(workflow.execution_settings, "keep_going", False))
    RUN_WATCH.settings["daemons"] = get_daemon_settings()
    RUN_WATCH.start(logger)


# The run's last words when it stops after losing jobs with a node: which node, and what went with it.
onerror:
    JOB_LOSSES.report(logger)


# A serve job has no tracked params and no input: what its daemon is (model, device, precision, transport,
# timeouts) is in the run's settings (RUN_DIR/settings.json, written at start), so that changing any
# of it never makes snakemake redo finished work; the embeddings depend on the model (embed.smk).
rule serve_model:
    output:
        temp("results/daemons/{daemon}.stats.json"),
    params:
        run_dir=untracked(RUN_DIR),
    log:
        "logs/daemons/{daemon}.log",
    threads: 1
    priority: 100
    retries: config["daemon_restarts"]
    resources:
        gpu=get_daemon_gpus,
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro serve-job --run-dir {params.run_dir:q} --daemon-id {wildcards.daemon} --stats-output {output:q}"
        " --allowed-root results 2>> {log:q}"


rule stop_daemons:
    input:
        get_all_embeddings,
    output:
        temp(touch("results/daemons/stop.done")),
    params:
        run_dir=untracked(RUN_DIR),
    log:
        "logs/daemons/stop.log",
    priority: 100
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro stop-daemons --run-dir {params.run_dir:q} 2> {log:q}"


rule collect_run_stats:
    input:
        stop="results/daemons/stop.done",
        stats=get_daemon_stats(),
    output:
        report("results/run_stats.json", caption="../report/run_stats.rst", category="Run statistics"),
    params:
        run_dir=untracked(RUN_DIR),
    log:
        "logs/daemons/run_stats.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro run-stats {input.stats:q} --run-dir {params.run_dir:q} --output {output:q} 2> {log:q}"
