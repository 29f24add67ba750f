# The model daemons (embedding_mode: daemon). Each daemon of a model that has embeddings to make is one
# long-running serve job (`virnucpro serve-job`: the daemon runs as its child) that loads its model once
# and embeds the shards that the embedding jobs send it; a model with nothing to embed gets no serve job.
# The run's watch (virnucpro.serving.runwatch, started below) stops a model's daemons once the plan holds
# no embedding of it; each writes its statistics and exits, and collect_run_stats merges the statistics
# of every attempt of the run (once the samples are done, so that an attempt that only finished them is
# in the story too).
#
# The lifecycle (docs/daemons.md, "Lifecycle in a run"): the watch refuses a run folder another live
# run uses, stops the daemons of an earlier run, then stops this run's daemons when their model's work
# is done, a few s after a failed job, when nothing else runs for idle_timeout s, or at once on
# SIGINT/SIGTERM/SIGHUP; a serve job stops its daemon when the run is gone (orphan_timeout), kills it
# when it freezes (freeze_timeout), and fails (to be restarted: retries) only when it held its model's
# last daemon.

if MAIN_PROCESS:
    # This run's session: its jobs inherit it (locally, and through sbatch --export=ALL), read the run's
    # settings (RUN_DIR/settings.json) only when they belong to it, and write their daemons' statistics
    # into its own folder (nothing an earlier attempt left can pass for this one's).
    os.environ[SESSION_VARIABLE] = new_session()
SESSION = os.environ.get(SESSION_VARIABLE, "none")
EMBED_RULES = {"embed_esm2": "esm2", "embed_dnabert_s": "dnabert_s"}
PREP_RULES = ("chunk_reads", "translate_chunks", "shard_frames")
FORCING_RULES = set(EMBED_RULES) | set(PREP_RULES)  # --forcerun of these makes embedding jobs run
if MAIN_PROCESS:
    # A job lost with its node (NODE_FAIL, BOOT_FAIL, PREEMPTED) is submitted again and is not the run's
    # failure; one that failed on its own is not submitted again (docs/cluster.md, "A node dies").
    JOB_LOSSES = JobLosses(workflow, RUN, SESSION)
if MAIN_PROCESS and DAEMON_MODE:
    RUN_WATCH = RunWatch(
        RUN,
        SESSION,
        idle_timeout=config["idle_timeout"],
        daemon_restarts=config["daemon_restarts"],
        guarded=(Path("logs").absolute(),),
        losses=JOB_LOSSES,
        job_settings={
            "client_timeout": config["client_timeout"],
            "on_failure": "record" if config["failure_policy"] == "continue" else "fail",
        },
    )


onstart:
    check_progress()
    check_cluster_fit()
    if DAEMON_MODE:
        plan = SnakemakePlan(workflow, embed_rules=EMBED_RULES, prep_rules=PREP_RULES, serve_rule="serve_model")
        RUN_WATCH.job_settings["progress"] = get_progress_settings()
        keep_going = bool(getattr(workflow.execution_settings, "keep_going", False))
        try:
            RUN_WATCH.start(
                logger,
                specs=get_daemon_specs(),  # here: the executor (local or cluster) is known only now
                plan=plan,
                keep_going=keep_going,
                local=workflow.local_exec,
                workdir=os.getcwd(),
            )
        except UserError as error:
            raise WorkflowError(str(error)) from None


onsuccess:
    if DAEMON_MODE:
        RUN_WATCH.close(success=True)


onerror:
    if DAEMON_MODE:
        RUN_WATCH.close(success=False)
    JOB_LOSSES.report(logger)  # the run's last words when it stops after losing jobs with a node


# A serve job has no input and one tracked param, `attempt`: the session of the run that needs it (it runs
# when its model has embeddings to make) or of the run that last ran it (it does not). What its daemon is
# (its spec: model, device, precision, transport, timeouts) is in the run's settings (RUN_DIR/settings.json,
# written at start), so that changing any of it never makes snakemake redo finished work; the embeddings
# depend on the model (embed.smk).
rule serve_model:
    output:
        RUN_FILES.daemon_stats("{daemon}"),
    params:
        attempt=get_serve_attempt,
        run_dir=untracked(RUN_DIR),
        attempts_log=lambda wildcards, output: f"logs/daemons/{wildcards.daemon}.attempts.log",
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
        " --attempts-log {params.attempts_log:q} 2>> {log:q}"


rule collect_run_stats:
    input:
        stats=get_daemon_stats,
        samples=get_sample_outputs(),
    output:
        report(RUN_FILES.run_stats, caption="../report/run_stats.rst", category="Run statistics"),
    params:
        run_dir=untracked(RUN_DIR),
    log:
        "logs/daemons/run_stats.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro run-stats {input.stats:q} --run-dir {params.run_dir:q} --output {output:q} 2> {log:q}"
