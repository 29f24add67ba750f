"""The ``virnucpro`` command line: it parses arguments and delegates; the work is in the modules."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from virnucpro import __version__
from virnucpro.engines.embed import MODEL_NAMES as MODEL_CHOICES
from virnucpro.engines.embed import PRECISIONS
from virnucpro.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, environmental
from virnucpro.prep.chunk import EXPECTED_LENGTHS as LENGTHS
from virnucpro.prep.shard import DEFAULT_SHARD_SIZE
from virnucpro.serving.spec import QUEUE_LIMIT, TRANSPORTS
from virnucpro.serving.timing import DRAIN_GRACE


def _cmd_chunk(args: argparse.Namespace) -> None:
    from virnucpro.prep.chunk import chunk_fasta

    summary = chunk_fasta(args.input, args.length, args.output, reads_table=args.reads_table)
    logging.info("%d reads -> %d chunks (%d reads skipped)", summary.reads, summary.chunks, summary.skipped)


def _cmd_translate(args: argparse.Namespace) -> None:
    from virnucpro.prep.translate import translate_fasta

    summary = translate_fasta(args.input, args.nucleotide_output, args.protein_output)
    logging.info("%d chunks -> %d stop-free frames", summary.chunks, summary.frames)


def _cmd_shard(args: argparse.Namespace) -> None:
    from virnucpro.prep.shard import shard_frames

    count = shard_frames(args.nucleotide, args.protein, args.shard_size, args.output_dir)
    logging.info("wrote %d shard(s) to %s", count, args.output_dir)


def _cmd_embed(args: argparse.Namespace) -> None:
    if args.weights is None and args.run_dir is None:
        raise UserError("embed needs --weights PATH (in-process) or --run-dir DIR (ask a running daemon)")
    if args.weights is None:
        from virnucpro.serving.client import embed_for_run

        if args.failure_manifest is not None:
            raise UserError("--failure-manifest is for in-process embedding; daemons record in RUN_DIR/failures.tsv")
        embed_for_run(
            args.run_dir,
            args.model,
            args.input,
            args.output,
            sample=args.sample,
            shard=args.shard,
            timeout=args.timeout,
            on_failure=args.on_failure,
            stop_file=args.stop_file,
            precision=args.precision,
            fingerprint=args.model_fingerprint,
        )
    else:
        _embed_in_process(args)
    if args.record is not None:
        from virnucpro.engines.embed import canonical_model_name
        from virnucpro.engines.provenance import write_record

        write_record(args.record, args.output, source=args.input, model=canonical_model_name(args.model),
                     fingerprint=args.model_fingerprint, precision=args.precision or "fp32")  # fmt: skip


def _embed_in_process(args: argparse.Namespace) -> None:
    from virnucpro.engines.embed import embed_shard

    manifest, on_failure = args.failure_manifest, args.on_failure
    if args.run_dir is not None:
        from virnucpro.serving.rundir import RunDir

        run = RunDir(args.run_dir)
        manifest = manifest or run.failures
        on_failure = on_failure or run.read_settings().get("on_failure")
    if on_failure == "record" and manifest is None:
        raise UserError("--on-failure record needs --failure-manifest PATH or --run-dir DIR")
    summary = embed_shard(
        args.input,
        args.model,
        args.weights,
        args.output,
        device=args.device,
        precision=args.precision or "fp32",
        manifest=manifest,
        sample=args.sample,
        shard=args.shard,
        on_failure=on_failure or "fail",
    )
    if summary is not None:
        logging.info("embedded %d sequences (%d tokens) -> %s", summary.sequences, summary.tokens, args.output)


def _cmd_classify(args: argparse.Namespace) -> None:
    from virnucpro.classify.predictions import classify_shard

    count = classify_shard(args.nucleotide, args.dnabert_s, args.esm2, args.classifier, args.output)
    logging.info("classified %d frames -> %s", count, args.output)


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from virnucpro.outputs.aggregate import aggregate_sample

    aggregate_sample(
        sample=args.sample,
        reads_table=args.reads_table,
        nucleotide=args.nucleotide,
        predictions=args.predictions,
        manifest=args.failure_manifest,
        output_dir=args.output_dir,
    )


def _cmd_run_stats(args: argparse.Namespace) -> None:
    from virnucpro.serving.history import run_history
    from virnucpro.serving.rundir import RunDir
    from virnucpro.serving.stats import write_run_stats

    write_run_stats(run_history(RunDir(args.run_dir)), args.output)


def _cmd_report_plots(args: argparse.Namespace) -> None:
    from virnucpro.outputs.report import daemons_plot, draw_sample_plots, summarize_sample, write_summary_page

    sample_inputs = (args.reads_table, args.predictions, args.failures)
    if args.sample is None and args.run_stats is None:
        raise UserError("report-plots needs --sample (with --reads-table, --predictions, --failures) or --run-stats")
    if args.sample is not None:
        if None in sample_inputs:
            raise UserError("report-plots --sample needs --reads-table, --predictions and --failures")
        summary = summarize_sample(args.sample, *sample_inputs, top=args.top, preview=args.preview)
        for path in [*draw_sample_plots(summary, args.output_dir), write_summary_page(summary, args.output_dir)]:
            logging.info("wrote %s", path)
    if args.run_stats is not None:
        logging.info("wrote %s", daemons_plot(args.run_stats, args.output_dir))


def _cmd_predict(args: argparse.Namespace) -> None:
    from virnucpro.pipeline import predict

    predict(
        args.input,
        args.length,
        esm2=args.esm2,
        dnabert_s=args.dnabert_s,
        classifier=args.classifier,
        output_dir=args.output_dir,
        device=args.device,
        precision=args.precision,
        shard_size=args.shard_size,
    )


def _cmd_serve(args: argparse.Namespace) -> None:
    from virnucpro.engines.embed import canonical_model_name
    from virnucpro.serving.daemon import serve
    from virnucpro.serving.spec import DaemonSpec, spec_of_run

    if args.from_run:
        if args.daemon_id is None:
            raise UserError("serve --from-run needs --daemon-id (the daemon the run's settings name)")
        spec = spec_of_run(args.run_dir, args.daemon_id)
    else:
        missing = [option for option, value in (("--model", args.model), ("--weights", args.weights)) if value is None]
        if missing:
            raise UserError(f"serve needs {' and '.join(missing)} (or --from-run inside a workflow run)")
        spec = DaemonSpec(
            daemon_id=args.daemon_id or f"{canonical_model_name(args.model)}-{socket.gethostname()}-{os.getpid()}",
            model=args.model,
            weights=args.weights,
            device=args.device,
            precision=args.precision,
            transport=args.transport,
            bind_host=args.bind_host,
            allowed_roots=tuple(args.allowed_root or [Path.cwd()]),
            cache_clear_every=args.cache_clear_every,
            max_queue=args.max_queue,
            drain_grace=args.drain_grace,
            idle_timeout=args.idle_timeout,
            stop_file=args.stop_file,
            esm2_engine=args.esm2_engine,
        )
    serve(spec, args.run_dir, args.stats_output)


def _cmd_serve_job(args: argparse.Namespace) -> None:
    from virnucpro.serving.servejob import serve_job

    code = serve_job(args.run_dir, args.daemon_id, args.stats_output, attempts_log=args.attempts_log)
    if code:
        raise SystemExit(code)


def _cmd_stop_daemons(args: argparse.Namespace) -> None:
    from virnucpro.serving.client import stop_daemons

    stopped = stop_daemons(args.run_dir, model=args.model, stop_file=args.stop_file)
    logging.info("asked %d daemon(s) to stop", stopped)


def _cmd_status(args: argparse.Namespace) -> None:
    from virnucpro.serving.progress import status_lines

    print("\n".join(status_lines(args.run_dir)))


def _cmd_make_test_models(args: argparse.Namespace) -> None:
    from virnucpro.testmodels import make_test_models

    paths = make_test_models(args.output_dir, seed=args.seed)
    for name, path in paths.items():
        logging.info("%s: %s", name, path)


def _cmd_models_download(args: argparse.Namespace) -> None:
    from virnucpro.engines.download import download_models, parse_base_url, resolve_base_urls

    overrides = dict(parse_base_url(text) for text in args.base_url or [])
    results = download_models(args.dest, groups=args.only, base_urls=resolve_base_urls(overrides, mirror=args.mirror))
    counts: dict[str, int] = {}
    for result in results:
        counts[result.action] = counts.get(result.action, 0) + 1
    logging.info("%s in %s", ", ".join(f"{n} {action}" for action, n in sorted(counts.items())), args.dest)


def _cmd_models_convert_classifier(args: argparse.Namespace) -> None:
    from virnucpro.classify.classifier import convert_classifier

    convert_classifier(args.src, args.dst)
    logging.info("wrote %s", args.dst)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virnucpro",
        description="Find viral reads with the VirNucPro method (six-frame translation, DNABERT-S and "
        "ESM-2 embeddings, MLP classifier).",
    )
    parser.add_argument("--version", action="version", version=f"virnucpro {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("chunk", _cmd_chunk, "cut reads into chunks of the expected length (published semantics)")
    sub.add_argument("input", type=Path, help="reads, FASTA or FASTQ (plain or gzip)")
    sub.add_argument("--length", type=int, choices=LENGTHS, required=True, help="expected read length")
    sub.add_argument("--output", type=Path, required=True, help="chunked FASTA to write")
    sub.add_argument("--reads-table", type=Path, help="also write one row per input read (TSV)")

    sub = command("translate", _cmd_translate, "six-frame translate chunks, keep the stop-free frames")
    sub.add_argument("input", type=Path, help="chunked FASTA")
    sub.add_argument("--nucleotide-output", type=Path, required=True, help="nucleotide slices of kept frames")
    sub.add_argument("--protein-output", type=Path, required=True, help="proteins of kept frames")

    sub = command("shard", _cmd_shard, "split paired nucleotide/protein frame files into shards")
    sub.add_argument("nucleotide", type=Path, help="nucleotide frames FASTA")
    sub.add_argument("protein", type=Path, help="protein frames FASTA")
    sub.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"frames per shard (default {DEFAULT_SHARD_SIZE})"
    )
    sub.add_argument("--output-dir", type=Path, required=True, help="folder for shard_NNNNN.fa/.faa")

    sub = command("embed", _cmd_embed, "embed a FASTA file with one model (in-process, or through a daemon)")
    sub.add_argument("input", type=Path, help="FASTA to embed")
    sub.add_argument("--model", choices=MODEL_CHOICES, required=True)
    sub.add_argument("--output", type=Path, required=True, help="embedding file to write (.pt)")
    sub.add_argument(
        "--weights",
        type=Path,
        help="model file or snapshot folder: embed in this process (else ask a daemon of --run-dir)",
    )
    sub.add_argument("--device", default="cpu", help="in-process: cpu, cuda or cuda:N (default cpu)")
    sub.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="in-process: default fp32; daemon mode: only ask daemons of this precision",
    )
    sub.add_argument("--run-dir", type=Path,
                     help="the run folder: without --weights, send the file to a daemon registered there; with "
                     "--weights, record failures in its manifest. Inside a workflow run, --timeout and --on-failure "
                     "default to the run's settings (RUN_DIR/settings.json)")  # fmt: skip
    sub.add_argument("--model-fingerprint", help="daemon mode: only ask daemons holding the model of this fingerprint")
    sub.add_argument("--record", type=Path,
                     help="once OUT.pt is complete, write what made it here (JSON: model, fingerprint, precision, "
                     "bytes), which a re-run compares with its own before it plans any daemon")  # fmt: skip
    sub.add_argument("--sample", default="", help="sample name, for the failure manifest")
    sub.add_argument("--shard", default="", help="shard name, for the failure manifest")
    sub.add_argument("--timeout", type=float, help="seconds to wait for a daemon (default 3600)")
    sub.add_argument("--on-failure", choices=("fail", "record"),
                     help="a shard that fails for good: exit non-zero (fail, default), or, once it is in the failure "
                     "manifest, write an embedding file with no rows and exit 0 with a warning (record)")  # fmt: skip
    sub.add_argument(
        "--failure-manifest",
        type=Path,
        help="in-process mode: record failures in this manifest (daemon mode: RUN_DIR/failures.tsv)",
    )
    sub.add_argument("--stop-file", type=Path,
                     help="daemon mode: give up waiting for a daemon once this file's content changes "
                     "(default: the run folder's stop file)")  # fmt: skip

    sub = command("classify", _cmd_classify, "merge the embeddings of one shard by ID and classify its frames")
    sub.add_argument("nucleotide", type=Path, help="the shard's nucleotide FASTA (fixes the row order)")
    sub.add_argument("--dnabert-s", type=Path, required=True, help="DNABERT-S embedding file")
    sub.add_argument("--esm2", type=Path, required=True, help="ESM-2 embedding file")
    sub.add_argument("--classifier", type=Path, required=True, help="classifier (.pth or .safetensors)")
    sub.add_argument("--output", type=Path, required=True, help="per-frame predictions (TSV)")

    sub = command("aggregate", _cmd_aggregate, "write a sample's compatible outputs, reads.tsv and failures.tsv")
    sub.add_argument("--sample", required=True)
    sub.add_argument("--reads-table", type=Path, required=True, help="reads table written by chunk")
    sub.add_argument("--nucleotide", type=Path, required=True, help="all kept frames (nucleotide FASTA)")
    sub.add_argument("--predictions", type=Path, nargs="*", default=[], help="per-shard predictions, in order")
    sub.add_argument("--failure-manifest", type=Path, help="run-wide failure manifest")
    sub.add_argument("--output-dir", type=Path, required=True)

    sub = command("run-stats", _cmd_run_stats,
                  "write the run's statistics: every attempt's daemons, losses and events, and the totals")  # fmt: skip
    sub.add_argument("daemon_stats", type=Path, nargs="*",
                     help="this attempt's daemon statistics files (the workflow's inputs; every attempt's are read "
                     "from RUN_DIR/sessions/)")  # fmt: skip
    sub.add_argument("--run-dir", type=Path, required=True, help="the run folder (its events and sessions)")
    sub.add_argument("--output", type=Path, required=True)

    sub = command("report-plots", _cmd_report_plots,
                  "draw the report's plots (PNG) and summary page (HTML) of a sample, or the daemons' plot")  # fmt: skip
    sub.add_argument("--output-dir", type=Path, required=True, help="folder for the PNG and HTML files")
    sub.add_argument("--sample", help="sample name: draw scores.png, verdicts.png, failures.png, write summary.html")
    sub.add_argument("--top", type=int, default=50, help="summary.html: list this many top-scoring reads (default 50)")
    sub.add_argument("--preview", type=int, default=100, help="summary.html: show this many first reads (default 100)")
    sub.add_argument("--reads-table", type=Path, help="the sample's reads.tsv")
    sub.add_argument("--predictions", type=Path, help="the sample's prediction_results.txt")
    sub.add_argument("--failures", type=Path, help="the sample's failures.tsv")
    sub.add_argument("--run-stats", type=Path, help="run_stats.json: draw daemons.png")

    sub = command("predict", _cmd_predict, "the whole method in one process (counterpart of prediction.py)")
    sub.add_argument("input", type=Path, help="reads, FASTA or FASTQ (plain or gzip)")
    sub.add_argument("--length", type=int, choices=LENGTHS, required=True, help="expected read length")
    sub.add_argument("--esm2", type=Path, required=True, help="ESM-2 checkpoint (.pt, fair-esm format)")
    sub.add_argument("--dnabert-s", type=Path, required=True, help="DNABERT-S snapshot folder")
    sub.add_argument("--classifier", type=Path, required=True, help="classifier matching --length")
    sub.add_argument("--output-dir", type=Path, required=True)
    sub.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    sub.add_argument("--precision", choices=PRECISIONS, default="fp32", help="default fp32")
    sub.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"frames embedded together (default {DEFAULT_SHARD_SIZE})",
    )

    sub = command("serve", _cmd_serve, "run a daemon that holds one model and embeds shards sent over ZeroMQ")
    sub.add_argument("--model", choices=MODEL_CHOICES, help="the model (required unless --from-run)")
    sub.add_argument("--weights", type=Path, help="model file or snapshot folder (required unless --from-run)")
    sub.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    sub.add_argument("--precision", choices=PRECISIONS, default="fp32", help="default fp32")
    sub.add_argument("--esm2-engine", default="default",
                     help="ESM-2's engine paths: default, all, or some of fused-qkv, packed, device-mean, compile, "
                          "cuda-graphs, overlap, comma-separated (docs/models.md); ignored by DNABERT-S")  # fmt: skip
    sub.add_argument("--run-dir", type=Path, required=True, help="run folder holding the registry")
    sub.add_argument("--stats-output", type=Path, required=True, help="statistics JSON written on exit")
    sub.add_argument("--daemon-id", default=None, help="name in the registry (default: model-host-pid)")
    sub.add_argument("--from-run", action="store_true",
                     help="take everything but --run-dir, --daemon-id and --stats-output from the daemon's spec in the "
                     "workflow run's settings (RUN_DIR/settings.json; how a serve job starts its daemon)")  # fmt: skip
    sub.add_argument(
        "--allowed-root",
        type=Path,
        action="append",
        help="folder the daemon may read and write (repeatable; default .)",
    )
    sub.add_argument("--idle-timeout", type=float, default=600.0, help="exit after this many idle seconds (0: never)")
    sub.add_argument("--cache-clear-every", type=int, default=10, help="clear the CUDA cache every N shards")
    sub.add_argument(
        "--stop-file",
        type=Path,
        help="stop once this file's content differs from its content at start (default: RUN_DIR/stop and "
        "RUN_DIR/stop-MODEL)",
    )
    sub.add_argument(
        "--max-queue",
        type=int,
        default=QUEUE_LIMIT,
        help=f"shards accepted at once (queued or running); more get 'busy, retry after' (default {QUEUE_LIMIT})",
    )
    sub.add_argument(
        "--drain-grace",
        type=float,
        default=DRAIN_GRACE,
        help=f"when stopping, seconds to finish the shard in progress before handing it back (default {DRAIN_GRACE:.0f})",
    )
    sub.add_argument("--transport", choices=TRANSPORTS, default="ipc",
                     help="ipc: a private local socket (default); tcp: across nodes, CURVE-encrypted and "
                     "authenticated with the run's keys in RUN_DIR/keys/")  # fmt: skip
    sub.add_argument("--bind-host", default="*", help="tcp: interface address to listen on (default: all)")

    sub = command(
        "serve-job",
        _cmd_serve_job,
        "a workflow's serve job: run one of the run's daemons (its spec is in RUN_DIR/settings.json) as a child, "
        "stop it when the run is gone, kill it when it freezes; exit 0 when it stopped, could not start (its "
        "registry entry says why) or its work is taken over, 1 when a restart must replace it, 3 when the run is gone",
    )
    sub.add_argument("--run-dir", type=Path, required=True, help="the run folder of the workflow run")
    sub.add_argument("--daemon-id", required=True, help="the daemon, as the run's settings name it")
    sub.add_argument("--stats-output", type=Path, required=True, help="statistics JSON written on exit")
    sub.add_argument("--attempts-log", type=Path,
                     help="append the daemon's log of every attempt of this serve job here (the job's own log "
                     "holds the current attempt's)")  # fmt: skip

    sub = command("stop-daemons", _cmd_stop_daemons, "ask the daemons registered under a run folder to stop")
    sub.add_argument("--run-dir", type=Path, required=True)
    sub.add_argument("--model", choices=MODEL_CHOICES, help="only daemons of this model")
    sub.add_argument(
        "--stop-file",
        type=Path,
        help="write the fresh stop token here instead of RUN_DIR/stop (daemons started with --stop-file)",
    )

    sub = command("status", _cmd_status, "how far a run's embedding is, per model, and the time left (from files only)")
    sub.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="the run folder (config key run_dir, default .virnucpro)"
    )

    from virnucpro.engines.download import GROUPS  # stdlib only: cheap

    sub = command("models", None, "get the published model files, convert the classifier")
    actions = sub.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    action = actions.add_parser(
        "download",
        help="fetch the published ESM-2 3B, DNABERT-S and classifier files (verified, resumable)",
        description="Fetch the published model files into DIR (verified against the known sizes and "
        "checksums, resumed from DIR/*.part, skipped when present and verified); see docs/models.md.",
    )
    action.set_defaults(handler=_cmd_models_download)
    action.add_argument("--dest", type=Path, default=Path("models"), help="destination folder (default models)")
    action.add_argument("--only", action="append", choices=GROUPS,
                        help="fetch only this group (repeatable; default all)")  # fmt: skip
    action.add_argument("--base-url", action="append", metavar="GROUP=URL",
                        help=f"fetch GROUP ({', '.join(GROUPS)}) from URL instead (repeatable)")  # fmt: skip
    action.add_argument("--mirror", metavar="URL",
                        help="fetch every group from URL/GROUP/... (also: $VIRNUCPRO_MODELS_MIRROR)")  # fmt: skip
    action = actions.add_parser(
        "convert-classifier",
        help="rewrite a classifier (.pth, whole module or state dict) as .safetensors",
        description="Read a classifier .pth safely (allow-listed unpickling) and write its weights to DST as "
        "safetensors, with its widths in the metadata (--classifier accepts either file).",
    )
    action.set_defaults(handler=_cmd_models_convert_classifier)
    action.add_argument("src", type=Path, help="classifier to read (.pth or .safetensors)")
    action.add_argument("dst", type=Path, help="safetensors file to write")

    sub = command("make-test-models", _cmd_make_test_models, "write small random models in the published formats")
    sub.add_argument("output_dir", type=Path)
    sub.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s virnucpro %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.handler(args)
    except UserError as error:
        print(f"virnucpro {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        cause = environmental(error)
        if cause is None:
            raise
        print(f"virnucpro {args.command}: error: {cause}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"virnucpro {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
