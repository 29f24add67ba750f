# Stage 1: cut every read into chunks of the expected length; one row per read in the reads index.


rule chunk_reads:
    input:
        get_fasta,
    output:
        chunked=SAMPLE.chunked,
        reads_index=SAMPLE.reads_index,
    params:
        length=config["length"],
    log:
        "logs/chunk/{sample}.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro chunk {input:q} --length {params.length} --output {output.chunked:q}"
        " --reads-table {output.reads_index:q} 2> {log:q}"
