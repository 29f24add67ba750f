# Stage 4: embed every shard with both models (the models are checked at start, common.smk). In daemon
# mode each job is a light client that hands the shard to a running daemon (daemons.smk) and waits; in
# in_process mode it loads the model itself. An embedding depends on what made it: the model's files (their fingerprint) and the
# precision are params, so changing either re-embeds; how a job reaches its model is an untracked
# param, and its timeout and the failure policy come from the run's settings (RUN_DIR/settings.json),
# so changing them never does. Beside each embedding, its record says what made it (the model's
# fingerprint, the precision): a re-run plans the daemons of a model only when a record differs or misses.
# A shard that fails for good is in the failure manifest either way.


rule embed_esm2:
    input:
        shard=SAMPLE.shard_input("{shard}", "esm2"),
    output:
        embedding=SAMPLE.embedding("{shard}", "esm2"),
        record=SAMPLE.embedding_record("{shard}", "esm2"),
    params:
        model=get_model_fingerprint("esm2"),
        precision=config["precision"],
        run_dir=untracked(RUN_DIR),
        access=untracked(get_embed_access("esm2")),
    log:
        "logs/embed/{sample}/{shard}.esm2.log",
    resources:
        gpu=get_embed_gpus("esm2"),
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro embed {input.shard:q} --model esm2 --output {output.embedding:q} --record {output.record:q}"
        " --sample {wildcards.sample}"
        " --shard {wildcards.shard} --precision {params.precision} --model-fingerprint {params.model}"
        " --run-dir {params.run_dir:q} {params.access} 2> {log:q}"


rule embed_dnabert_s:
    input:
        shard=SAMPLE.shard_input("{shard}", "dnabert_s"),
    output:
        embedding=SAMPLE.embedding("{shard}", "dnabert_s"),
        record=SAMPLE.embedding_record("{shard}", "dnabert_s"),
    params:
        model=get_model_fingerprint("dnabert_s"),
        precision=config["precision"],
        run_dir=untracked(RUN_DIR),
        access=untracked(get_embed_access("dnabert_s")),
    log:
        "logs/embed/{sample}/{shard}.dnabert_s.log",
    resources:
        gpu=get_embed_gpus("dnabert_s"),
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro embed {input.shard:q} --model dnabert_s --output {output.embedding:q} --record {output.record:q}"
        " --sample {wildcards.sample}"
        " --shard {wildcards.shard} --precision {params.precision} --model-fingerprint {params.model}"
        " --run-dir {params.run_dir:q} {params.access} 2> {log:q}"
