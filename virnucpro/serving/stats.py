"""The daemons' statistics: one file per daemon at exit, merged into the run's ``run_stats.json``."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from virnucpro import atomic
from virnucpro.errors import UserError

LOSS_EVENTS = ("lost", "frozen")  # RUN/events.jsonl kinds that mean a daemon is gone


@dataclass
class DaemonCounters:
    """What a daemon counts while it serves (docs/daemons.md, "Statistics")."""

    model_loads: int = 0
    load_seconds: float | None = None
    shards: int = 0  # computed: done and failed
    sequences: int = 0
    tokens: int = 0
    compute_seconds: float = 0.0
    cache_clears: int = 0
    failures: int = 0  # shards
    sequence_failures: int = 0
    cached: int = 0  # answered from a done record
    attached: int = 0  # requests joined to one in progress
    expired: int = 0
    busy_replies: int = 0
    taken_over: int = 0  # shards accepted from a client that had lost a daemon on them
    handed_back: int = 0  # shards given back when stopping
    peak_queued: int = 0
    bad_messages: int = 0

    def mean_shard_seconds(self) -> float:
        return self.compute_seconds / self.shards if self.shards else 1.0


def final_stats(identity: dict, counters: DaemonCounters, exit_reason: str, device: str) -> dict:
    """A daemon's statistics file: its identity, its counters, throughput, peak memory, why it exited."""
    peak_gpu = None
    if device.startswith("cuda") and "torch" in sys.modules:
        peak_gpu = int(sys.modules["torch"].cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = counters.compute_seconds
    return {
        **identity, **asdict(counters), "compute_seconds": round(seconds, 6),
        "tokens_per_second": round(counters.tokens / seconds, 3) if seconds else 0.0,
        "peak_host_memory_bytes": rss if sys.platform == "darwin" else rss * 1024,
        "peak_gpu_memory_bytes": peak_gpu, "exit_reason": exit_reason,
    }  # fmt: skip


def write_stats(path: Path, stats: dict) -> None:
    atomic.write_json(Path(path), stats)


def read_stats(path: Path) -> dict:
    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable daemon statistics ({error})") from None
    if not isinstance(stats, dict):
        raise UserError(f"{path}: unreadable daemon statistics (not a JSON object)")
    return stats


def read_stats_session(path: Path) -> str | None:
    """The workflow run (session) whose serve job wrote a statistics file, or None (no file, unreadable)."""
    try:
        session = read_stats(path).get("session")
    except UserError:
        return None
    return session if isinstance(session, str) else None


def write_run_stats(attempts: list[dict], output: Path) -> None:
    """Write ``run_stats.json``: every attempt of the run (``history.run_history``) with its daemons' statistics
    and events, and the totals over attempts (``daemons``, ``daemons_lost`` and ``events`` list them all)."""
    daemons = [daemon for attempt in attempts for daemon in attempt["daemons"]]
    events = [event for attempt in attempts for event in attempt["events"]]

    def total(key: str, entries: list[dict]) -> int:
        return sum(int(entry.get(key) or 0) for entry in entries)

    def done(key: str, attempt: dict) -> int:
        """What the attempt's daemons did: their statistics, and what the lost ones had done (their last
        published progress: a daemon lost with its node writes no statistics)."""
        losses = [event.get("progress") or {} for event in attempt["events"] if event.get("event") in LOSS_EVENTS]
        return total(key, attempt["daemons"]) + total(key, losses)

    summary = {
        "attempts": [
            {**{key: value for key, value in attempt.items() if key not in ("daemons", "events")},
             "daemons": [daemon.get("daemon_id") for daemon in attempt["daemons"]],
             "model_loads": total("model_loads", attempt["daemons"]), "shards": done("shards", attempt),
             "tokens": done("tokens", attempt),
             "losses": [event for event in attempt["events"] if event.get("event") in LOSS_EVENTS]}
            for attempt in attempts
        ],
        "daemons": daemons,
        "model_loads": total("model_loads", daemons),
        "shards": sum(done("shards", attempt) for attempt in attempts),
        "tokens": sum(done("tokens", attempt) for attempt in attempts),
        "daemons_lost": [event for event in events if event.get("event") in LOSS_EVENTS],
        "jobs_lost": [event for event in events if event.get("event") == "job_lost"],  # with their node (cluster)
        "events": events,
    }  # fmt: skip
    atomic.write_text(Path(output), json.dumps(summary, indent=2) + "\n")
