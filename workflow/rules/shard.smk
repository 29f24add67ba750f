# Stage 3: paired nucleotide/protein shards of `shard_size` frames. A checkpoint: the number of
# shards is known only once the frames are (possibly none, when no frame was kept).


checkpoint shard_frames:
    input:
        nucleotide=SAMPLE.nucleotide_frames,
        protein=SAMPLE.protein_frames,
    output:
        directory(SAMPLE.shards),
    params:
        shard_size=config["shard_size"],
    log:
        "logs/shard/{sample}.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro shard {input.nucleotide:q} {input.protein:q} --shard-size {params.shard_size}"
        " --output-dir {output:q} 2> {log:q}"
