"""Every timing constant of the serving machinery, in seconds, named by what it bounds.

The daemons, their clients, the serve jobs and the run's watch all read their timings here and
nowhere else (docs/daemons.md, "Timings"). Timeouts that a user sets (``client_timeout``,
``idle_timeout``, ``orphan_timeout``, ``freeze_timeout``) are config keys, not constants; their
defaults are in the config schema.
"""

from __future__ import annotations

# --- a daemon ----------------------------------------------------------------------------------------
DAEMON_POLL = 0.25
"""The daemon's socket poll: how long a request, an event of the model thread or a signal may wait."""
PROGRESS_EVERY = 2.0
"""A daemon tells every requester of an accepted shard that it is alive (a ``progress`` reply)."""
ENTRY_REFRESH_EVERY = 5.0
"""A daemon rewrites its registry entry (its heartbeat, which the serve job's freeze check reads)."""
STOP_CHECK_EVERY = 1.0
"""A daemon reads its stop files: a stop reaches it within this, whatever happens to messages."""
DRAIN_GRACE = 25.0
"""A stopping daemon finishes the shard in progress within this, else hands it back (below SLURM's
default KillWait of 30 s, so that a cancelled job drains before it is killed)."""
WORKER_EXIT_WAIT = 5.0
"""A stopped daemon waits this long for its model thread to leave before it exits."""
RETRY_AFTER_BOUNDS = (0.5, 30.0)
"""The ``retry_after`` a busy daemon suggests: its mean shard time, kept within these bounds."""

# --- the registry -------------------------------------------------------------------------------------
STALE_AFTER = 120.0
"""A daemon on another host whose entry is older than this counts as gone (its host may be)."""

# --- the transport ------------------------------------------------------------------------------------
SEND_TIMEOUT = 2.0
"""A client's send to a daemon that does not take the message."""
HANDSHAKE = 5.0
"""tcp: a connecting peer completes the CURVE handshake within this, or is dropped."""

# --- a client (an embedding job) ----------------------------------------------------------------------
SILENCE_CHECK_EVERY = 2.0
"""While waiting on a shard, a client checks this often that its daemon's process still exists."""
LOST_AFTER = 20.0
"""A daemon that sent nothing for this long (it sends progress every PROGRESS_EVERY) has lost the
client's shard: the client fails over."""
RESTART_WAIT = 60.0
"""Outside a workflow run (no watch to ask): after losing its daemon with none other alive, how long a
client waits for one to come back."""
BACKOFF_CAP = 30.0
"""The longest pause between two tries at a busy daemon."""
CLIENT_LOG_EVERY = 30.0
"""A waiting client logs that it still waits this often."""
STATUS_ANSWER = 2.0
"""A daemon answers a ``status`` within this, or is not picked this round."""
STOP_ANSWER = 5.0
"""``stop-daemons`` waits this long for the acknowledgements (the stop token reaches the daemons
whatever they answer)."""
REGISTRY_POLL = 0.5
"""A client with no ready daemon reads the registry again after this."""
CLIENT_TIMEOUT = 3600.0
"""The default of config key ``client_timeout`` outside a workflow run."""

# --- a serve job --------------------------------------------------------------------------------------
SERVE_CHECK_EVERY = 0.5
"""A serve job checks its daemon, the run's heartbeat and stop tokens this often."""
KILL_GRACE = 10.0
"""Past its drain grace, a stopping daemon that has not exited is killed."""
START_GRACE = 60.0
"""A daemon that has not registered within ``freeze_timeout`` + this is stuck while starting."""

# --- the run's watch (in the main snakemake process) --------------------------------------------------
RUN_HEARTBEAT_EVERY = 2.0
"""The run's heartbeat: serve jobs take a heartbeat unchanged for ``orphan_timeout`` as the run gone."""
AFTER_ERROR = 5.0
"""After a job failed (no job started since, or only serve jobs ran), the daemons stop within this."""
LEFTOVER_WAIT = 120.0
"""At start, the longest wait for the daemons of an earlier run to exit."""
LIVE_RUN_CHECK = 2 * RUN_HEARTBEAT_EVERY + 1.0
"""At start, a run folder whose heartbeat (from another host) changes within this is in use."""
