"""What the Snakemake report shows: per sample, plots (the score distribution, the verdicts, the failures)
and a summary page (counts, the verdict table, the top-scoring reads, a capped preview of ``reads.tsv``,
the failures); per run, the daemons' throughput and load times.

The inputs are the workflow's own outputs: ``reads.tsv``, ``prediction_results.txt``, ``failures.tsv``
(per sample) and ``run_stats.json``. The per-read tables are read once, a row at a time, into counts,
histograms and capped lists: memory and the size of what the report embeds do not grow with the reads.
The plots are PNG files drawn with matplotlib's Agg renderer (no display needed); matplotlib is
imported only when drawing. The summary page is one self-contained HTML file (no scripts).
"""

from __future__ import annotations

import heapq
import html
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from virnucpro import atomic
from virnucpro.atomic import atomic_path
from virnucpro.errors import UserError
from virnucpro.layout import SAMPLE_PLOTS, PlotFiles, RunFiles
from virnucpro.tables import read_rows

VERDICTS = ("virus", "others")
TOP_READS = 50  # reads listed on the summary page by best virus score
PREVIEW_ROWS = 100  # first rows of reads.tsv shown on the summary page
FAILURE_ROWS = 20  # first failures shown on the summary page
SCORE_BINS = 20  # histogram bins over [0, 1]
READS_NEEDED = ("read_id", "chunks", "frames", "frames_scored", "virus_chunks", "best_virus_score", "verdict", "reason")
PREDICTIONS_NEEDED = ("Sequence_ID", "Prediction", "score2")
_VIRUS, _OTHERS, _NONE, _BAR = "#c0392b", "#2e86c1", "#7f8c8d", "#5d6d7e"


def read_table(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a tab-separated file with a header line that has at least ``columns`` (small tables)."""
    return list(read_rows(path, columns, what="table"))


def verdict_counts(reads: Iterable[dict[str, str]]) -> dict[str, int]:
    """Reads per verdict: ``virus``, ``others``, then one entry per reason a read has no verdict
    (``no verdict: <reason>``, the reason without its details), most frequent first."""
    tally = _VerdictTally()
    for row in reads:
        tally.add(row)
    return tally.counts()


def viral_fraction(reads: list[dict[str, str]]) -> float:
    """The share of input reads whose verdict is ``virus`` (0 for no reads)."""
    return sum(row["verdict"] == "virus" for row in reads) / len(reads) if reads else 0.0


def best_read_scores(reads: Iterable[dict[str, str]]) -> list[float]:
    """The best virus score of each read that has one."""
    return [float(row["best_virus_score"]) for row in reads if row.get("best_virus_score")]


def frame_scores(predictions: Iterable[dict[str, str]]) -> list[float]:
    """The virus score (``score2``) of each frame of ``prediction_results.txt``."""
    return [float(row["score2"]) for row in predictions]


def failure_counts(failures: Iterable[dict[str, str]]) -> dict[str, int]:
    """Failures per ``stage: error_class``, most frequent first."""
    return dict(Counter(f"{row['stage'] or '?'}: {row['error_class'] or '?'}" for row in failures).most_common())


def score_histogram(scores: Iterable[float], bins: int = SCORE_BINS) -> list[int]:
    """Counts of ``scores`` in ``bins`` equal bins over [0, 1] (the last one holds 1.0, as numpy's does);
    a score outside [0, 1] counts in the nearest bin, a NaN in none."""
    counts = [0] * bins
    for score in scores:
        if not math.isnan(score):
            counts[min(bins - 1, max(0, int(score * bins)))] += 1
    return counts


def daemon_metrics(run_stats: dict) -> list[tuple[str, float, float, int]]:
    """Per daemon: (daemon ID, tokens per second, model load seconds, shards)."""
    return [
        (
            str(entry.get("daemon_id", "?")),
            float(entry.get("tokens_per_second") or 0.0),
            float(entry.get("load_seconds") or 0.0),
            int(entry.get("shards") or 0),
        )
        for entry in run_stats.get("daemons", [])
    ]


# --- one pass over a sample's tables --------------------------------------------------------------


class _VerdictTally:
    def __init__(self) -> None:
        self.verdicts = Counter({verdict: 0 for verdict in VERDICTS})
        self.missing: Counter = Counter()

    def add(self, row: dict[str, str]) -> None:
        if row["verdict"] in VERDICTS:
            self.verdicts[row["verdict"]] += 1
        else:
            self.missing[f"no verdict: {(row.get('reason') or 'unknown').split(':')[0]}"] += 1

    def counts(self) -> dict[str, int]:
        return {**self.verdicts, **dict(self.missing.most_common())}


@dataclass
class SampleSummary:
    """What the report shows of one sample: totals, the verdicts, score histograms and capped lists."""

    sample: str
    reads: int = 0
    chunks: int = 0
    frames: int = 0
    frames_scored: int = 0
    virus_chunks: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    read_score_bins: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    predicted_frames: int = 0
    predicted_virus_frames: int = 0
    frame_score_bins: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    read_columns: list[str] = field(default_factory=list)
    top_reads: list[dict[str, str]] = field(default_factory=list)
    preview: list[dict[str, str]] = field(default_factory=list)
    failures: int = 0
    failure_counts: dict[str, int] = field(default_factory=dict)
    first_failures: list[dict[str, str]] = field(default_factory=list)
    top_limit: int = TOP_READS

    @property
    def viral_fraction(self) -> float:
        return self.verdicts.get("virus", 0) / self.reads if self.reads else 0.0


def summarize_sample(
    sample: str,
    reads_table: Path,
    predictions: Path,
    failures: Path,
    *,
    top: int = TOP_READS,
    preview: int = PREVIEW_ROWS,
) -> SampleSummary:
    """Read a sample's ``reads.tsv``, ``prediction_results.txt`` and ``failures.tsv`` once, a row at a time."""
    summary = SampleSummary(sample, top_limit=top)
    tally = _VerdictTally()
    best: list[tuple[float, int, dict[str, str]]] = []  # a min-heap of the `top` best-scoring reads
    what = "reads table (reads.tsv)"
    for index, row in enumerate(read_rows(reads_table, READS_NEEDED, what=what)):
        if index == 0:
            summary.read_columns = list(row)
        line = index + 2
        summary.reads += 1
        summary.chunks += _number(reads_table, line, row["chunks"], int)
        summary.frames += _number(reads_table, line, row["frames"], int)
        summary.frames_scored += _number(reads_table, line, row["frames_scored"], int)
        summary.virus_chunks += _number(reads_table, line, row["virus_chunks"], int)
        tally.add(row)
        if row["best_virus_score"]:
            score = _number(reads_table, line, row["best_virus_score"], float)
            summary.read_score_bins[_bin(score)] += 1
            if top > 0:
                item = (score, -index, row)
                if len(best) < top:
                    heapq.heappush(best, item)
                elif item[:2] > best[0][:2]:
                    heapq.heapreplace(best, item)
        if index < preview:
            summary.preview.append(row)
    summary.verdicts = tally.counts()
    summary.top_reads = [row for _, _, row in sorted(best, key=lambda item: item[:2], reverse=True)]

    what = "prediction table (prediction_results.txt)"
    for index, row in enumerate(read_rows(predictions, PREDICTIONS_NEEDED, what=what)):
        summary.predicted_frames += 1
        summary.predicted_virus_frames += row["Prediction"] == "virus"
        summary.frame_score_bins[_bin(_number(predictions, index + 2, row["score2"], float))] += 1

    failed = _read_failures(Path(failures))
    summary.failures = len(failed)
    summary.failure_counts = failure_counts(failed)
    summary.first_failures = failed[:FAILURE_ROWS]
    return summary


def _bin(score: float) -> int:
    return min(SCORE_BINS - 1, max(0, int(score * SCORE_BINS))) if not math.isnan(score) else 0


def _number(path: Path, line: int, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{path}: line {line}: '{text}' is not a number") from None


def _read_failures(path: Path) -> list[dict[str, str]]:
    from virnucpro.manifest import read_failure_table

    if not path.is_file():
        raise UserError(f"{path}: failures table not found")
    return read_failure_table(path)


def why_unfinished(logs: Iterable[Path]) -> str:
    """Why a sample has no outputs, from the logs of its jobs: the last error line of the most recently
    written log that has one (``virnucpro CMD: error: ...``, or the last line of a traceback), with that
    log's path; or that no job of it failed."""
    found = []
    for log in logs:
        try:
            lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
            written = Path(log).stat().st_mtime_ns
        except OSError:
            continue
        errors = [line.strip() for line in lines if _ERROR_LINE.match(line)]
        if errors:
            found.append((written, str(log), errors[-1]))
    if not found:
        return "not finished: no job of it failed (was the run stopped, or not run for it yet?)"
    _, log, line = max(found)
    return f"{line} (in {log})"


_ERROR_LINE = re.compile(r"virnucpro [a-z-]+: error: |[A-Za-z_.]*(Error|Exception): ")  # ours, or a traceback's end


# --- the files ------------------------------------------------------------------------------------


def sample_plots(sample: str, reads_table: Path, predictions: Path, failures: Path, output_dir: Path) -> list[Path]:
    """Draw ``scores.png``, ``verdicts.png`` and ``failures.png`` of one sample into ``output_dir``."""
    return draw_sample_plots(summarize_sample(sample, reads_table, predictions, failures), output_dir)


def draw_sample_plots(summary: SampleSummary, output_dir: Path) -> list[Path]:
    """Draw a sample's ``scores.png``, ``verdicts.png`` and ``failures.png`` into ``output_dir``."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    plots = PlotFiles(os.fspath(output_dir))
    paths = {name: Path(plots.png(name)) for name in SAMPLE_PLOTS}
    _save(_scores_figure(summary.sample, summary.frame_score_bins, summary.read_score_bins), paths["scores"])
    _save(_verdicts_figure(summary), paths["verdicts"])
    title = f"{summary.sample}: failures ({summary.failures})"
    _save(_counts_figure(title, summary.failure_counts, "no failures"), paths["failures"])
    return list(paths.values())


def write_summary_page(summary: SampleSummary, output_dir: Path) -> Path:
    """Write the sample's ``summary.html`` into ``output_dir``: its size is bounded, whatever the reads."""
    path = Path(PlotFiles(os.fspath(output_dir)).summary_page)
    atomic.write_text(path, summary_page(summary))
    return path


def daemons_plot(run_stats: Path, output_dir: Path) -> Path:
    """Draw ``daemons.png`` (tokens per second and model load time per daemon) into ``output_dir``."""
    try:
        stats = json.loads(Path(run_stats).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{run_stats}: file not found") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{run_stats}: not JSON ({error})") from None
    path = Path(RunFiles(os.fspath(output_dir)).daemons_plot)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(_daemons_figure(daemon_metrics(stats)), path)
    return path


# --- the summary page -----------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; font-size: 14px; margin: 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
.note { color: #666; }
"""


def summary_page(summary: SampleSummary) -> str:
    """The summary page of a sample as HTML text (every value from the tables is escaped)."""
    sample = summary.sample
    counts = [
        ("input reads", summary.reads),
        ("reads with the verdict virus", summary.verdicts.get("virus", 0)),
        ("reads with the verdict others", summary.verdicts.get("others", 0)),
        (
            "reads without a verdict",
            summary.reads - summary.verdicts.get("virus", 0) - summary.verdicts.get("others", 0),
        ),
        ("viral fraction (virus reads / input reads)", f"{100 * summary.viral_fraction:.2f} %"),
        ("chunks", summary.chunks),
        ("viral chunks", summary.virus_chunks),
        ("kept frames (stop-free)", summary.frames),
        ("frames scored", summary.frames_scored),
        ("rows of prediction_results.txt", summary.predicted_frames),
        ("of which predicted virus", summary.predicted_virus_frames),
        ("failures (failures.tsv)", summary.failures),
    ]
    verdicts = [
        (label, count, f"{100 * count / summary.reads:.2f} %" if summary.reads else "-")
        for label, count in summary.verdicts.items()
    ]
    top_columns = [column for column in READS_NEEDED if column != "frames_scored"]
    failure_columns = ("stage", "shard", "sequence_id", "error_class", "attempts", "daemon", "message")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(sample)}: summary</title><style>{_STYLE}</style></head><body>",
        f"<h1>Sample {_text(sample)}</h1>",
        '<p class="note">A summary of the sample\'s outputs; the whole tables are the files <code>reads.tsv</code> '
        "(one row per input read), <code>prediction_results.txt</code> (one row per kept frame) and "
        "<code>failures.tsv</code> in the sample's results folder.</p>",
        "<h2>Counts</h2>",
        _table(("", "value"), counts, numeric=(1,)),
        "<h2>Verdicts</h2>",
        _table(("verdict", "reads", "share"), verdicts, numeric=(1, 2)),
        f"<h2>Top-scoring reads ({len(summary.top_reads)})</h2>",
        f'<p class="note">The reads with the highest best virus score (at most {summary.top_limit}; ties in input order).</p>',
        _table(
            ["rank", *top_columns],
            [(rank, *(row[c] for c in top_columns)) for rank, row in enumerate(summary.top_reads, start=1)],
            numeric=(0, 2, 3, 4, 5),
        ),
        f"<h2>First {len(summary.preview)} of {summary.reads} reads</h2>",
        '<p class="note">The first rows of <code>reads.tsv</code>, in input order.</p>',
        _table(summary.read_columns, [[row[c] for c in summary.read_columns] for row in summary.preview]),
        f"<h2>Failures ({summary.failures})</h2>",
    ]
    if summary.failures:
        parts.append(_table(("stage: error class", "count"), list(summary.failure_counts.items()), numeric=(1,)))
        parts.append(f'<p class="note">The first {len(summary.first_failures)} of {summary.failures}:</p>')
        rows = [[_clip(row.get(c, "")) for c in failure_columns] for row in summary.first_failures]
        parts.append(_table(failure_columns, rows))
    else:
        parts.append("<p>No failures.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _table(header: Iterable[str], rows: Iterable[Iterable[object]], numeric: tuple[int, ...] = ()) -> str:
    lines = ["<table>", "<tr>" + "".join(f"<th>{_text(name)}</th>" for name in header) + "</tr>"]
    for row in rows:
        cells = [
            f'<td class="n">{_text(value)}</td>' if index in numeric else f"<td>{_text(value)}</td>"
            for index, value in enumerate(row)
        ]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


# --- drawing --------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas draws it: no display, no pyplot state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure, path: Path) -> None:
    """Write the PNG atomically (temporary file, then rename)."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", metadata={"Software": None})


def _scores_figure(sample: str, frames: list[int], reads: list[int]):
    figure = _figure(9, 3.6)
    bins = [step / SCORE_BINS for step in range(SCORE_BINS + 1)]
    for axes, counts, what in zip(figure.subplots(1, 2), (frames, reads), ("frames", "reads (best frame)")):
        axes.hist(bins[:-1], bins=bins, weights=counts, color=_BAR, edgecolor="white")
        axes.axvline(0.5, color=_VIRUS, linestyle="--", linewidth=1)
        axes.set_xlim(0, 1)
        axes.set_xlabel("virus score")
        axes.set_ylabel(what.split()[0])
        axes.set_title(f"{what}: {sum(counts)}")
    figure.suptitle(f"{sample}: virus score distribution")
    return figure


def _verdicts_figure(summary: SampleSummary):
    counts = summary.verdicts
    figure = _figure(8, 1.2 + 0.45 * len(counts))
    axes = figure.subplots()
    labels = list(counts)[::-1]
    colors = [_VIRUS if label == "virus" else _OTHERS if label == "others" else _NONE for label in labels]
    bars = axes.barh(labels, [counts[label] for label in labels], color=colors)
    axes.bar_label(bars, padding=3)
    axes.set_xlabel("reads")
    axes.margins(x=0.15)
    fraction = summary.viral_fraction
    axes.set_title(f"{summary.sample}: {counts['virus']} of {summary.reads} reads viral ({100 * fraction:.1f} %)")
    return figure


def _counts_figure(title: str, counts: dict[str, int], empty: str):
    figure = _figure(8, 1.2 + 0.45 * max(1, len(counts)))
    axes = figure.subplots()
    if counts:
        labels = list(counts)[::-1]
        bars = axes.barh(labels, [counts[label] for label in labels], color=_BAR)
        axes.bar_label(bars, padding=3)
        axes.margins(x=0.15)
    else:
        axes.text(0.5, 0.5, empty, ha="center", va="center", transform=axes.transAxes)
        axes.set_yticks([])
    axes.set_xlabel("count")
    axes.set_title(title)
    return figure


def _daemons_figure(metrics: list[tuple[str, float, float, int]]):
    figure = _figure(10, 1.4 + 0.5 * max(1, len(metrics)))
    throughput, load = figure.subplots(1, 2, sharey=True)
    labels = [f"{daemon} ({shards} shards)" for daemon, _, _, shards in metrics]
    for axes, values, title, fmt in (
        (throughput, [metric[1] for metric in metrics], "throughput (tokens/s)", "{:,.0f}"),
        (load, [metric[2] for metric in metrics], "model load (s)", "{:.1f}"),
    ):
        bars = axes.barh(labels, values, color=_BAR)
        axes.bar_label(bars, fmt=fmt, padding=3)
        axes.margins(x=0.2)
        axes.set_title(title)
    figure.suptitle(f"model daemons: {len(metrics)}")
    return figure
