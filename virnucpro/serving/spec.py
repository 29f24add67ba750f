"""A daemon's spec: what it is and how it serves, one typed record from the config to the model thread.

Inside a workflow run the run's watch writes every daemon's spec once, into the run's settings
(``RUN/settings.json``, key ``daemons``); the serve job and the daemon it starts each read their own
from there (``DaemonSpec.from_run``). A standalone ``virnucpro serve`` builds one from its options. The
daemon hands it to its model thread; no process passes its fields one by one.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from virnucpro.errors import UserError
from virnucpro.serving import timing

DAEMON_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TRANSPORTS = ("ipc", "tcp")
MODELS = ("esm2", "dnabert_s")
QUEUE_LIMIT = 32


@dataclass(frozen=True)
class DaemonSpec:
    """One daemon. ``weights`` and ``allowed_roots`` are absolute once ``checked``."""

    daemon_id: str
    model: str  # canonical: esm2 or dnabert_s
    weights: Path
    device: str = "cpu"
    precision: str = "fp32"
    transport: str = "ipc"
    bind_host: str = "*"  # tcp: the interface to listen on
    allowed_roots: tuple[Path, ...] = ()
    cache_clear_every: int = 10  # shards between two clears of the CUDA cache
    max_queue: int = QUEUE_LIMIT  # shards accepted at once (queued or running)
    drain_grace: float = timing.DRAIN_GRACE
    idle_timeout: float = 0.0  # 0: never idles out (a workflow's watch decides when it stops)
    orphan_timeout: float = 300.0  # serve job: the run's heartbeat unchanged this long means the run is gone
    freeze_timeout: float = 60.0  # serve job: a registry entry this old means the daemon froze (0: never)
    stop_file: Path | None = None  # None: the run folder's stop files
    esm2_engine: str = "default"  # ESM-2's engine paths (docs/models.md); DNABERT-S ignores it

    def checked(self) -> DaemonSpec:
        """This spec with absolute paths; UserError naming the field for a value no daemon can serve with."""
        from virnucpro.engines.embed import canonical_model_name

        if not DAEMON_ID.fullmatch(self.daemon_id):
            raise UserError(f"daemon id '{self.daemon_id}': use letters, digits, '.', '_' and '-' only (at most 128)")
        if self.transport not in TRANSPORTS:
            raise UserError(f"unknown transport '{self.transport}': choose ipc or tcp")
        if self.max_queue < 1 or self.drain_grace < 0:
            raise UserError("the queue limit must be at least 1 and the drain grace at least 0")
        if self.cache_clear_every < 1:
            raise UserError("the cache-clear interval must be at least 1 shard")
        from virnucpro.engines.esm2_options import parse_engine

        parse_engine(self.esm2_engine)  # UserError naming a wrong path
        return replace(
            self,
            model=canonical_model_name(self.model),
            weights=Path(self.weights).absolute(),
            allowed_roots=tuple(Path(root).absolute() for root in self.allowed_roots),
            stop_file=Path(self.stop_file).absolute() if self.stop_file is not None else None,
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (paths as text)."""
        values = asdict(self)
        values["weights"] = str(self.weights)
        values["allowed_roots"] = [str(root) for root in self.allowed_roots]
        values["stop_file"] = str(self.stop_file) if self.stop_file is not None else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> DaemonSpec:
        """The spec a ``to_dict`` wrote; UserError if a field is missing or unknown."""
        names = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"daemon spec: unknown field(s) {', '.join(unknown)}")
        try:
            spec = cls(**values)
        except TypeError as error:
            raise UserError(f"daemon spec: {error}") from None
        return replace(
            spec,
            weights=Path(spec.weights),
            allowed_roots=tuple(Path(root) for root in spec.allowed_roots),
            stop_file=Path(spec.stop_file) if spec.stop_file is not None else None,
        )


def spec_of_run(run_dir: Path, daemon_id: str) -> DaemonSpec:
    """The spec the workflow run that owns ``run_dir`` recorded for ``daemon_id``, for a process of that run
    (``$VIRNUCPRO_SESSION``); UserError outside it or for a daemon it does not name."""
    from virnucpro.serving.rundir import SESSION_VARIABLE, RunDir

    run = RunDir(run_dir)
    settings = run.read_settings()
    if not settings:
        raise UserError(f"no running workflow owns {run.root} (no settings of session "
                        f"${SESSION_VARIABLE}={os.environ.get(SESSION_VARIABLE)}); outside a workflow, give the "
                        "daemon's options (virnucpro serve --help)")  # fmt: skip
    values = settings.get("daemons", {}).get(daemon_id)
    if not isinstance(values, dict):
        raise UserError(f"the run's settings ({run.settings}) name no daemon '{daemon_id}'")
    return DaemonSpec.from_dict(values)
