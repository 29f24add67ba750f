# Stage 4: embed every shard with both models. In daemon mode each job is a light client that
# hands the shard to a running daemon (daemons.smk) and waits, giving up early when the run's stop
# file changes; in in_process mode it loads the model itself. A shard that fails for good is in
# the failure manifest either way; failure_policy says whether that fails the job (fail) or gives
# the shard an embedding file with no rows, so that its reads are marked `embedding failed` (continue).


# The failure policy of the embedding jobs, and where they record failures (daemon mode: the daemons
# record in RUN_DIR/failures.tsv) or watch for the end of the run.
EMBED_FAILURE_ARGS = "--on-failure {} {}".format(
    "record" if config["failure_policy"] == "continue" else "fail",
    f"--stop-file {shlex.quote(STOP_FILE)}" if DAEMON_MODE else f"--failure-manifest {shlex.quote(FAILURE_MANIFEST)}",
)


rule embed_esm2:
    input:
        shard="results/{sample}/work/shards/{shard}.faa",
        weights=embed_weights("esm2"),
    output:
        "results/{sample}/work/embeddings/{shard}.esm2.pt",
    params:
        model_access=embed_args("esm2"),
        failures=EMBED_FAILURE_ARGS,
    log:
        "logs/embed/{sample}/{shard}.esm2.log",
    resources:
        gpu=embed_gpus("esm2"),
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro embed {input.shard:q} --model esm2 --output {output:q} --sample {wildcards.sample}"
        " --shard {wildcards.shard} {params.model_access} {params.failures} 2> {log:q}"


rule embed_dnabert_s:
    input:
        shard="results/{sample}/work/shards/{shard}.fa",
        weights=embed_weights("dnabert_s"),
    output:
        "results/{sample}/work/embeddings/{shard}.dnabert_s.pt",
    params:
        model_access=embed_args("dnabert_s"),
        failures=EMBED_FAILURE_ARGS,
    log:
        "logs/embed/{sample}/{shard}.dnabert_s.log",
    resources:
        gpu=embed_gpus("dnabert_s"),
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro embed {input.shard:q} --model dnabert_s --output {output:q} --sample {wildcards.sample}"
        " --shard {wildcards.shard} {params.model_access} {params.failures} 2> {log:q}"
