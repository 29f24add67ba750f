# Stage 5: per shard, join both embeddings by frame ID and run the classifier (CPU). The classifier's
# fingerprint is a param: another classifier file (even one with the same name) redoes the predictions.


rule classify_shard:
    input:
        nucleotide=SAMPLE.shard_nucleotide("{shard}"),
        dnabert_s=SAMPLE.embedding("{shard}", "dnabert_s"),
        esm2=SAMPLE.embedding("{shard}", "esm2"),
    output:
        SAMPLE.predictions("{shard}"),
    params:
        classifier=get_model_fingerprint("classifier"),
        classifier_file=untracked(config["models"]["classifier"]),
    log:
        "logs/classify/{sample}/{shard}.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro classify {input.nucleotide:q} --dnabert-s {input.dnabert_s:q} --esm2 {input.esm2:q}"
        " --classifier {params.classifier_file:q} --output {output:q} 2> {log:q}"
