# Stage 4: embed every shard with both models. In daemon mode each job is a light client that
# hands the shard to a running daemon (daemons.smk) and waits; in in_process mode it loads the
# model itself.


rule embed_esm2:
    input:
        shard="results/{sample}/work/shards/{shard}.faa",
        weights=embed_weights("esm2"),
    output:
        "results/{sample}/work/embeddings/{shard}.esm2.pt",
    params:
        model_access=embed_args("esm2"),
    log:
        "logs/embed/{sample}/{shard}.esm2.log",
    resources:
        gpu=embed_gpus("esm2"),
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro embed {input.shard:q} --model esm2 --output {output:q} --sample {wildcards.sample}"
        " --shard {wildcards.shard} {params.model_access} 2> {log:q}"


rule embed_dnabert_s:
    input:
        shard="results/{sample}/work/shards/{shard}.fa",
        weights=embed_weights("dnabert_s"),
    output:
        "results/{sample}/work/embeddings/{shard}.dnabert_s.pt",
    params:
        model_access=embed_args("dnabert_s"),
    log:
        "logs/embed/{sample}/{shard}.dnabert_s.log",
    resources:
        gpu=embed_gpus("dnabert_s"),
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro embed {input.shard:q} --model dnabert_s --output {output:q} --sample {wildcards.sample}"
        " --shard {wildcards.shard} {params.model_access} 2> {log:q}"
