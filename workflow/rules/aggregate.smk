# Stage 6: per sample, the published outputs (rows in input order), the per-read table that
# accounts for every read, and the sample's failures from the run's failure manifest.


rule aggregate_sample:
    input:
        reads_index=SAMPLE.reads_index,
        nucleotide=SAMPLE.nucleotide_frames,
        predictions=get_predictions,
    output:
        # Not in the report: these grow with the reads; the report shows summary.html and the plots
        # (report.smk), which stay small whatever the sample's size.
        SAMPLE.prediction_results,
        SAMPLE.highest_scores,
        SAMPLE.reads_table,
        SAMPLE.failures,
    params:
        manifest=untracked(RUN.failures),
        output_dir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        "logs/aggregate/{sample}.log",
    conda:
        "../../envs/virnucpro.yaml"
    shell:
        "virnucpro aggregate --sample {wildcards.sample} --reads-table {input.reads_index:q}"
        " --nucleotide {input.nucleotide:q} --predictions {input.predictions:q}"
        " --failure-manifest {params.manifest:q} --output-dir {params.output_dir:q} 2> {log:q}"
