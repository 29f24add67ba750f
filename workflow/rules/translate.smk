# Stage 2: six-frame translation of the chunks; only the stop-free frames are kept.


rule translate_chunks:
    input:
        "results/{sample}/work/chunked.fa",
    output:
        nucleotide="results/{sample}/work/identified_nucleotide.fa",
        protein="results/{sample}/work/identified_protein.faa",
    log:
        "logs/translate/{sample}.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro translate {input:q} --nucleotide-output {output.nucleotide:q}"
        " --protein-output {output.protein:q} 2> {log:q}"
