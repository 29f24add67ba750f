# Stage 5: per shard, join both embeddings by frame ID and run the classifier (CPU). The classifier's
# fingerprint is a param: another classifier file (even one with the same name) redoes the predictions.


rule classify_shard:
    input:
        nucleotide="results/{sample}/work/shards/{shard}.fa",
        dnabert_s="results/{sample}/work/embeddings/{shard}.dnabert_s.pt",
        esm2="results/{sample}/work/embeddings/{shard}.esm2.pt",
    output:
        "results/{sample}/work/predictions/{shard}.tsv",
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
