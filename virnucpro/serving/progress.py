"""How far a run's embedding is, per model, with the time left (docs/daemons.md, "Progress").

Three small parts:

- ``DaemonMeter``, held by each daemon: what it adds to its registry entry at every refresh (every few
  seconds, ``progress``): the shards, frames and tokens it embedded, the bytes of those shard files, the
  shards it holds (running or queued) and its current rate (tokens per second of wall time over the last
  five minutes, or over the last five shards when they take longer).
- ``read_progress``, what a run stands at, from files only: the shard files (their sizes), the embeddings
  present and the daemons' registry entries. It never asks a daemon anything, so a status request costs
  the daemons nothing but the file system's attention.
- ``ProgressReport``, for the run's watch: ``tick`` is called at every heartbeat; every ``every`` seconds,
  while the daemons of a model have shards to embed, it says one line per model, and once when a model's
  last shard is embedded.

The time left of a model is the remaining shards' tokens over its daemons' current rate. The tokens of a
shard not embedded yet are estimated from the size of its file, at the tokens per byte of the shards that
this run's daemons embedded (exact for the ESM-2 tokens of a protein, its residues and 2, up to the
length of its FASTA header; DNABERT-S's BPE tokens per base are what the shards so far show).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from virnucpro.serving import registry
from virnucpro.serving.protocol import State
from virnucpro.serving.rundir import RunDir

log = logging.getLogger(__name__)

PROGRESS_EVERY = 60.0  # seconds between two progress lines of a run (config key progress_every)
RATE_WINDOW = 300.0  # the shortest span of a daemon's current rate, in seconds
RATE_SHARDS = 5  # ... and at least this many shards' mean wall time
_WILDCARD = re.compile(r"\{(\w+)\}")


# --- in the daemon ----------------------------------------------------------------------------------


class DaemonMeter:
    """A daemon's progress for its registry entry: call ``shard_done`` for every shard it computed, and put
    ``snapshot`` into the entry at every refresh."""

    def __init__(self) -> None:
        self.bytes = 0  # of the shard files embedded (computed, done)
        self.samples: deque[tuple[float, int]] = deque()  # (time, tokens) of the snapshots within the rate's span
        self.started = 0.0  # the time of the first snapshot of the span's series

    def shard_done(self, shard: str | os.PathLike) -> None:
        try:
            self.bytes += os.stat(shard).st_size
        except OSError:  # gone meanwhile: its tokens count, its bytes cannot
            pass

    def snapshot(self, *, shards: int, frames: int, tokens: int, queued: int, running: int,
                 now: float | None = None) -> dict:  # fmt: skip
        """The ``progress`` field of the registry entry: the counts, and the current rate in tokens/s (``now``:
        the time of the snapshot, ``time.time()`` by default)."""
        now = time.time() if now is None else now
        if tokens == 0 and running == 0:  # loading, or nothing to do yet: the rate's span starts with the first shard
            self.samples.clear()
        if not self.samples:
            self.started = now
        self.samples.append((now, tokens))
        span = max(RATE_WINDOW, RATE_SHARDS * (now - self.started) / shards) if shards else RATE_WINDOW
        while len(self.samples) > 2 and now - self.samples[1][0] >= span:
            self.samples.popleft()
        then, tokens_then = self.samples[0]
        rate = (tokens - tokens_then) / (now - then) if now > then else 0.0
        if rate == 0.0 and tokens and now > self.started:  # no shard ended within the span: the mean since the first
            rate = tokens / (now - self.started)
        return {"shards": shards, "frames": frames, "tokens": tokens, "bytes": self.bytes, "queued": queued,
                "running": running, "rate": round(rate, 3)}  # fmt: skip


# --- what a run stands at ---------------------------------------------------------------------------


def workflow_settings(paths: dict[str, tuple[str, str]], samples: list[str], every: float) -> dict:
    """The ``progress`` entry of a run's settings (RUN_DIR/settings.json): per model, the path patterns of its
    shard files and of their embeddings (with ``{sample}`` and ``{shard}``, made absolute), the samples, and
    the seconds between two progress lines."""
    return {
        "every": every,
        "samples": list(samples),
        "models": {model: {"shards": os.path.abspath(shards), "embeddings": os.path.abspath(embeddings)}
                   for model, (shards, embeddings) in paths.items()},
    }  # fmt: skip


def run_settings(run: RunDir) -> dict:
    """The ``progress`` entry of the run's settings as the run's watch wrote them (any session); {} if none."""
    try:
        settings = json.loads(run.settings.read_text())
    except (OSError, ValueError):
        return {}
    progress = settings.get("progress") if isinstance(settings, dict) else None
    return progress if isinstance(progress, dict) else {}


@dataclass
class ModelProgress:
    """One model's progress: shards (known so far), the live daemons' counts and rate, the work left."""

    model: str
    total: int = 0
    done: int = 0
    queued: int = 0  # held by a daemon (running or waiting), not done
    daemons: int = 0  # ready to embed
    loading: int = 0
    frames: int = 0  # embedded by the live daemons of the model
    tokens: int = 0
    rate: float = 0.0  # tokens/s, the live daemons' current rates summed
    remaining_bytes: int = 0  # of the shard files with no embedding yet
    tokens_per_byte: float | None = None  # of the shards the live daemons embedded
    samples_pending: int = 0  # samples whose shards are not known yet

    @property
    def seconds_left(self) -> float | None:
        """The time left for the shards known so far; None while it cannot be estimated."""
        if self.total and self.done == self.total:
            return 0.0
        if not self.rate or not self.tokens_per_byte:
            return None
        return self.remaining_bytes * self.tokens_per_byte / self.rate


def read_progress(run: RunDir, settings: dict, sizes: dict[str, int] | None = None) -> list[ModelProgress]:
    """Each model's progress, from the shard and embedding files that ``settings`` (``workflow_settings``)
    name and the live daemons' registry entries. ``sizes``, a cache of shard file sizes (shard files do not
    change once written), saves the repeated ``stat`` of a watch that asks again and again."""
    sizes = {} if sizes is None else sizes
    entries = _live_entries(run)
    found = []
    for model, paths in settings.get("models", {}).items():
        progress = ModelProgress(model)
        for sample in settings.get("samples", []):
            shards = _shard_files(paths["shards"], sample)
            if shards is None:
                progress.samples_pending += 1
                continue
            for shard, path in shards.items():
                progress.total += 1
                if os.path.exists(paths["embeddings"].format(sample=sample, shard=shard)):
                    progress.done += 1
                else:
                    if path not in sizes:
                        sizes[path] = _size(path)
                    progress.remaining_bytes += sizes[path]
        embedded_bytes = 0
        for entry in entries:
            if entry.get("model") != model:
                continue
            state, counts = entry.get("state"), entry.get("progress") or {}
            progress.daemons += state == State.READY
            progress.loading += state == State.LOADING
            progress.queued += int(counts.get("queued", 0)) + int(counts.get("running", 0))
            progress.frames += int(counts.get("frames", 0))
            progress.tokens += int(counts.get("tokens", 0))
            progress.rate += float(counts.get("rate", 0.0))
            embedded_bytes += int(counts.get("bytes", 0))
        if progress.tokens and embedded_bytes:
            progress.tokens_per_byte = progress.tokens / embedded_bytes
        found.append(progress)
    return found


def describe(progress: ModelProgress) -> str:
    """One line, e.g. ``esm2: 412/1000 shards done, 6 queued, 2 daemons, 4,120,000 frames and 693,000,000 tokens
    embedded, 152,000 tokens/s, about 31 min left``."""
    total = f"{progress.total}" + (f" (+ {progress.samples_pending} sample(s) not sharded yet)"
                                   if progress.samples_pending else "")  # fmt: skip
    parts = [f"{progress.model}: {progress.done}/{total} shards done", f"{progress.queued} queued"]
    daemons = f"{progress.daemons} daemon{'s' if progress.daemons != 1 else ''}"
    parts.append(daemons + (f" ({progress.loading} loading)" if progress.loading else ""))
    parts.append(f"{progress.frames:,} frames and {progress.tokens:,} tokens embedded")
    parts.append(f"{progress.rate:,.0f} tokens/s")
    parts.append(time_left(progress.seconds_left) + (" for the shards so far" if progress.samples_pending else ""))
    return ", ".join(parts)


def time_left(seconds: float | None) -> str:
    """``about 31 min left``, ``about 2 h 05 min left``, ``under a minute left``, ``time left not known yet``."""
    if seconds is None:
        return "time left not known yet"
    if seconds <= 0:
        return "done"
    if seconds < 60:
        return "under a minute left"
    minutes = round(seconds / 60)
    return f"about {minutes} min left" if minutes < 90 else f"about {minutes // 60} h {minutes % 60:02d} min left"


def status_lines(run_dir: Path) -> list[str]:
    """What ``virnucpro status RUN_DIR`` prints: one line per model, from files only."""
    run = RunDir(run_dir)
    settings = run_settings(run)
    if not settings.get("models"):
        return [f"{run.root}: no run's progress settings here (settings.json): is this a run folder of the workflow?"]
    return [describe(progress) for progress in read_progress(run, settings)]


# --- in the run's watch -------------------------------------------------------------------------------


class ProgressReport:
    """Says each model's progress every ``every`` seconds while its shards are being embedded (daemons ready,
    shards left), and once when its last shard is embedded."""

    def __init__(self, run: RunDir, settings: dict, say: Callable[[str], None]):
        self.run, self.settings, self.say = run, settings, say
        self.every = float(settings.get("every", PROGRESS_EVERY))
        self.sizes: dict[str, int] = {}
        self.last = time.monotonic()
        self.finished: set[str] = set()

    def tick(self) -> None:
        """Called at every heartbeat of the run; never raises (the heartbeat must go on)."""
        if not self.settings.get("models") or self.every <= 0 or time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        try:
            self._report()
        except Exception as error:  # a file system hiccup, or a bug: no progress line this time
            log.warning("virnucpro: no progress report this time: %s: %s", type(error).__name__, error)

    def _report(self) -> None:
        for progress in read_progress(self.run, self.settings, self.sizes):
            if progress.model in self.finished:
                continue
            if progress.total and progress.done == progress.total and not progress.samples_pending:
                self.finished.add(progress.model)
                self.say(f"progress {progress.model}: all {progress.total} shards embedded")
            elif progress.daemons and progress.total > progress.done:
                self.say(f"progress {describe(progress)}")


def _live_entries(run: RunDir) -> list[dict]:
    """The registry entries of live daemons, read only (no stale entry is removed here)."""
    entries = []
    for path in sorted(run.registry.glob("*.json")) if run.registry.is_dir() else []:
        entry = registry.read_entry(run, path.stem)
        if entry and entry.get("state") != State.FAILED and registry.is_alive(entry) and not registry.is_stale(entry):
            entries.append(entry)
    return entries


def _shard_files(pattern: str, sample: str) -> dict[str, str] | None:
    """Shard name -> file of one sample; None while the sample's shards are not made (no folder yet)."""
    pattern = pattern.replace("{sample}", sample)
    if not os.path.isdir(os.path.dirname(pattern)):
        return None
    match = re.compile(_WILDCARD.sub(r"(?P<\1>[^/]+)", re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}")))
    files = {}
    for path in glob.glob(_WILDCARD.sub("*", pattern)):
        found = match.fullmatch(path)
        if found:
            files[found["shard"]] = path
    return files


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
