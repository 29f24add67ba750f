"""Plots for the Snakemake report: per sample, the score distribution, the verdicts (the viral fraction and
the reads without a verdict, by reason) and the failures; per run, the daemons' throughput and load times.

The inputs are the workflow's own outputs: ``reads.tsv``, ``prediction_results.txt``, ``failures.tsv``
(per sample) and ``run_stats.json``. The plots are PNG files drawn with matplotlib's Agg renderer (no
display needed); matplotlib is imported only when drawing.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from virnucpro.atomic import atomic_path
from virnucpro.errors import UserError

SAMPLE_PLOTS = ("scores.png", "verdicts.png", "failures.png")
DAEMONS_PLOT = "daemons.png"
VERDICTS = ("virus", "others")
_VIRUS, _OTHERS, _NONE, _BAR = "#c0392b", "#2e86c1", "#7f8c8d", "#5d6d7e"


def read_table(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a tab-separated file with a header line that has at least ``columns``."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = [column for column in columns if column not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)} in the header line")
            return list(reader)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None


def verdict_counts(reads: list[dict[str, str]]) -> dict[str, int]:
    """Reads per verdict: ``virus``, ``others``, then one entry per reason a read has no verdict
    (``no verdict: <reason>``, the reason without its details), most frequent first."""
    counts = Counter({verdict: 0 for verdict in VERDICTS})
    missing = Counter()
    for row in reads:
        if row["verdict"] in VERDICTS:
            counts[row["verdict"]] += 1
        else:
            missing[f"no verdict: {(row.get('reason') or 'unknown').split(':')[0]}"] += 1
    return {**counts, **dict(missing.most_common())}


def viral_fraction(reads: list[dict[str, str]]) -> float:
    """The share of input reads whose verdict is ``virus`` (0 for no reads)."""
    return sum(row["verdict"] == "virus" for row in reads) / len(reads) if reads else 0.0


def best_read_scores(reads: list[dict[str, str]]) -> list[float]:
    """The best virus score of each read that has one."""
    return [float(row["best_virus_score"]) for row in reads if row.get("best_virus_score")]


def frame_scores(predictions: list[dict[str, str]]) -> list[float]:
    """The virus score (``score2``) of each frame of ``prediction_results.txt``."""
    return [float(row["score2"]) for row in predictions]


def failure_counts(failures: list[dict[str, str]]) -> dict[str, int]:
    """Failures per ``stage: error_class``, most frequent first."""
    return dict(Counter(f"{row['stage'] or '?'}: {row['error_class'] or '?'}" for row in failures).most_common())


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


def sample_plots(sample: str, reads_table: Path, predictions: Path, failures: Path, output_dir: Path) -> list[Path]:
    """Draw ``scores.png``, ``verdicts.png`` and ``failures.png`` of one sample into ``output_dir``."""
    reads = read_table(reads_table, ("read_id", "best_virus_score", "verdict", "reason"))
    frames = read_table(predictions, ("Sequence_ID", "score2"))
    failed = read_table(failures, ("stage", "error_class"))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / name for name in SAMPLE_PLOTS]
    _save(_scores_figure(sample, frame_scores(frames), best_read_scores(reads)), paths[0])
    _save(_verdicts_figure(sample, reads), paths[1])
    _save(_counts_figure(f"{sample}: failures ({len(failed)})", failure_counts(failed), "no failures"), paths[2])
    return paths


def daemons_plot(run_stats: Path, output_dir: Path) -> Path:
    """Draw ``daemons.png`` (tokens per second and model load time per daemon) into ``output_dir``."""
    try:
        stats = json.loads(Path(run_stats).read_text())
    except FileNotFoundError:
        raise UserError(f"{run_stats}: file not found") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{run_stats}: not JSON ({error})") from None
    path = Path(output_dir) / DAEMONS_PLOT
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(_daemons_figure(daemon_metrics(stats)), path)
    return path


# --- drawing --------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas draws it: no display, no pyplot state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure, path: Path) -> None:
    """Write the PNG atomically (temporary file, then rename)."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", metadata={"Software": None})


def _scores_figure(sample: str, frames: list[float], reads: list[float]):
    figure = _figure(9, 3.6)
    bins = [step / 20 for step in range(21)]
    for axes, values, what in zip(figure.subplots(1, 2), (frames, reads), ("frames", "reads (best frame)")):
        axes.hist(values, bins=bins, color=_BAR, edgecolor="white")
        axes.axvline(0.5, color=_VIRUS, linestyle="--", linewidth=1)
        axes.set_xlim(0, 1)
        axes.set_xlabel("virus score")
        axes.set_ylabel(what.split()[0])
        axes.set_title(f"{what}: {len(values)}")
    figure.suptitle(f"{sample}: virus score distribution")
    return figure


def _verdicts_figure(sample: str, reads: list[dict[str, str]]):
    counts = verdict_counts(reads)
    figure = _figure(8, 1.2 + 0.45 * len(counts))
    axes = figure.subplots()
    labels = list(counts)[::-1]
    colors = [_VIRUS if label == "virus" else _OTHERS if label == "others" else _NONE for label in labels]
    bars = axes.barh(labels, [counts[label] for label in labels], color=colors)
    axes.bar_label(bars, padding=3)
    axes.set_xlabel("reads")
    axes.margins(x=0.15)
    fraction = viral_fraction(reads)
    axes.set_title(f"{sample}: {counts['virus']} of {len(reads)} reads viral ({100 * fraction:.1f} %)")
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
