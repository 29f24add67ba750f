# What the Snakemake report shows (snakemake --report report.html, after a run): per sample, a summary
# page (counts, verdicts, top-scoring reads, a capped preview of reads.tsv, failures) and plots of the
# score distribution, the verdicts and the failures; per run, the daemons' throughput and load times.
# Never the per-read tables themselves: the report's size does not grow with the reads. A report made
# after a run with failed samples (--keep-going) shows the finished ones and lists the others with why.

import glob

from virnucpro.outputs.report import why_unfinished


report: "../report/workflow.rst"


if REPORT_ONLY:
    # The samples without outputs, and why (the last error their jobs logged), for workflow.rst.
    config["_report_unfinished_samples"] = {
        sample: why_unfinished(glob.glob(f"logs/*/{sample}.log") + glob.glob(f"logs/*/{sample}/*.log"))
        .replace("``", "` `")
        .strip()
        for sample in SAMPLES
        if not sample_finished(sample)
    }


rule plot_sample:
    input:
        reads=SAMPLE.reads_table,
        predictions=SAMPLE.prediction_results,
        failures=SAMPLE.failures,
    output:
        report(
            SAMPLE.plots.png("scores"),
            caption="../report/scores.rst",
            category="Samples",
            subcategory="{sample}",
            labels={"sample": "{sample}", "plot": "virus scores"},
        ),
        report(
            SAMPLE.plots.png("verdicts"),
            caption="../report/verdicts.rst",
            category="Samples",
            subcategory="{sample}",
            labels={"sample": "{sample}", "plot": "verdicts"},
        ),
        report(
            SAMPLE.plots.png("failures"),
            caption="../report/failures_plot.rst",
            category="Samples",
            subcategory="{sample}",
            labels={"sample": "{sample}", "plot": "failures"},
        ),
        report(
            SAMPLE.plots.summary_page,
            caption="../report/summary.rst",
            category="Samples",
            subcategory="{sample}",
            labels={"sample": "{sample}", "plot": "summary"},
        ),
    log:
        "logs/report/{sample}.log",
    conda:
        "../../envs/virnucpro.yaml"
    params:
        output_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "virnucpro report-plots --sample {wildcards.sample} --reads-table {input.reads:q}"
        " --predictions {input.predictions:q} --failures {input.failures:q}"
        " --output-dir {params.output_dir:q} 2> {log:q}"


rule plot_daemons:
    input:
        RUN_FILES.run_stats,
    output:
        report(
            RUN_FILES.daemons_plot,
            caption="../report/daemons.rst",
            category="Run statistics",
            labels={"plot": "model daemons"},
        ),
    log:
        "logs/report/daemons.log",
    conda:
        "../../envs/virnucpro.yaml"
    params:
        output_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "virnucpro report-plots --run-stats {input:q} --output-dir {params.output_dir:q} 2> {log:q}"
