# Stage 2: six-frame translation of the chunks; only the stop-free frames are kept.


rule translate_chunks:
    input:
        SAMPLE.chunked,
    output:
        nucleotide=SAMPLE.nucleotide_frames,
        protein=SAMPLE.protein_frames,
    log:
        "logs/translate/{sample}.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro translate {input:q} --nucleotide-output {output.nucleotide:q}"
        " --protein-output {output.protein:q} 2> {log:q}"
