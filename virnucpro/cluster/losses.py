"""A failed job told apart: lost to the infrastructure, or failed on its own (docs/cluster.md, "A node
dies").

A job that ended because its node failed (``NODE_FAIL``), its node did not boot (``BOOT_FAIL``) or it was
preempted (``PREEMPTED``) did nothing wrong: snakemake submits it again (the profile's ``retries``; a serve
job's ``daemon_restarts``) and the run goes on; such a loss is recorded in the run's events (``job_lost``:
rule, job, SLURM job, state, node) and listed in ``run_stats.json``. A job that failed on its own (its
command's exit status, ``TIMEOUT`` or ``OUT_OF_MEMORY`` of its own request, ``sbatch`` refusing it) is not
submitted again, whatever ``retries`` says: the run stops as it would without retries. Only a serve job is
restarted after its own failure (its daemon was the model's last one: ``daemon_restarts``), and no job at all
once the run has decided to stop.

The SLURM executor (snakemake-executor-plugin-slurm 2.8.0) reports an ended job's state in its message
("SLURM status is: 'NODE_FAIL'"), but not for a group job's members; the state and node then come from
SLURM (``sacct``, else ``squeue``). It reports a ``PREEMPTED`` job to no one (it waits for SLURM to
requeue it); a cluster that preempts by cancelling leaves that job pending in snakemake's eyes.

``JobLosses`` lives in snakemake's main process (the run's watch asks it about each failed job) and works on
snakemake's objects, passed in: it finds the failed job among the scheduler's running jobs and spends its
remaining attempts when it must not run again (snakemake retries a job while ``restart_times > attempt - 1``).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from virnucpro.cluster.slurm import job_state

log = logging.getLogger(__name__)

INFRASTRUCTURE_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED"})
_REPORTED_STATE = re.compile(r"SLURM status is: '([A-Z_]+)'")


@dataclass(frozen=True)
class Loss:
    """A job lost to the infrastructure."""

    job: str  # the rule and its wildcards, e.g. "classify_shard (sample=s1, shard=shard_00003)"
    rule: str
    state: str  # NODE_FAIL, BOOT_FAIL, PREEMPTED
    node: str  # where it ran ("" if SLURM no longer knows)
    slurm_job: str
    retried: bool


@dataclass(frozen=True)
class Verdict:
    """What became of a failed job: ``loss`` if the infrastructure lost it (None: it failed on its own), and
    whether snakemake submits it again."""

    loss: Loss | None
    retried: bool

    @property
    def fails_the_run(self) -> bool:
        """Whether this failure is the run's (anything but a loss that snakemake submits again)."""
        return not (self.loss is not None and self.retried)

    @property
    def why(self) -> str | None:
        """What the run says when a lost job makes it stop (None for a job that failed on its own)."""
        if self.loss is None or self.retried:
            return None
        return (f"{self.loss.job} was lost with node {self.loss.node or '(unknown)'} ({self.loss.state}) and is "
                "submitted no more (profile key retries, or the run is stopping)")  # fmt: skip


def reported_state(message: str | None, slurm_job: str | None, ask=job_state) -> tuple[str | None, str]:
    """The SLURM state a failed job ended in, and, for a lost job, its node: the state from the executor's
    message when it gives one, the node (and otherwise the state) from SLURM, asked only then. (None, "")
    for a job that was never a SLURM job (a local job, or one that ``sbatch`` refused)."""
    if not slurm_job:
        return None, ""
    match = _REPORTED_STATE.search(message or "")
    if match and match.group(1) not in INFRASTRUCTURE_STATES:
        return match.group(1), ""  # failed on its own: where does not matter
    asked = ask(slurm_job)
    state = match.group(1) if match else (asked[0] if asked else None)
    return state, (asked[1] if asked else "")


def describe(rule: str, wildcards: dict[str, str]) -> str:
    """A job as the run's messages name it: its rule and wildcards."""
    if not wildcards:
        return rule
    return f"{rule} ({', '.join(f'{name}={value}' for name, value in wildcards.items())})"


class JobLosses:
    """Judges the failed jobs of a workflow run (inside snakemake's main process; ``workflow`` is snakemake's
    workflow object) and records the losses in ``run``'s events."""

    def __init__(self, workflow, run, session: str, own_error_retried: tuple[str, ...] = ("serve_model",)):
        self.workflow, self.run, self.session = workflow, run, session
        self.own_error_retried = own_error_retried  # rules whose own failure snakemake may retry
        self.lost: list[Loss] = []
        self.lock = threading.Lock()

    def judge(self, record, stopping: bool) -> Verdict:
        """A failed job's verdict, from snakemake's ``job_error`` log record; a job that must not run again has
        its remaining attempts spent. ``stopping``: the run has decided to stop (no job is submitted again).
        Never raises (it runs inside snakemake's callbacks): on an unexpected error the job counts as failed
        on its own, as without this judge."""
        try:
            return self._judge(record, stopping)
        except Exception as error:  # a failure here must not break snakemake's job handling
            log.warning("virnucpro: could not tell whether job %s was lost with its node: %s",
                        getattr(record, "jobid", "?"), error)  # fmt: skip
            return Verdict(None, False)

    def _judge(self, record, stopping: bool) -> Verdict:
        rule = str(getattr(record, "rule_name", ""))
        aux = getattr(record, "aux", None) or {}
        slurm_job = str(aux.get("external_jobid") or "") if isinstance(aux, dict) else ""
        state, node = reported_state(getattr(record, "rule_msg", None), slurm_job)
        job = self._running_job(getattr(record, "jobid", None))
        lost = state in INFRASTRUCTURE_STATES
        submitted = bool(slurm_job) or job is None or job.is_local  # not refused by sbatch
        may_retry = lost or (rule in self.own_error_retried and submitted)
        retried = bool(job is not None and not stopping and may_retry and job.restart_times > job.attempt - 1)
        if job is not None and not retried:
            job.attempt = max(job.attempt, job.restart_times + 1)  # snakemake submits it no more
        if not lost:
            return Verdict(None, retried)
        member = self._member(job, getattr(record, "jobid", None))
        wildcards = dict(member.wildcards.items()) if member is not None else {}
        loss = Loss(describe(rule, wildcards), rule, str(state), node, slurm_job, retried)
        with self.lock:
            self.lost.append(loss)
        self.run.record_event(event="job_lost", session=self.session, rule=rule, job=loss.job, state=loss.state,
                              node=node, slurm_job=slurm_job, retried=retried)  # fmt: skip
        return Verdict(loss, retried)

    def report(self, logger) -> None:
        """Log the summary of the losses (if any) as an error: the run's last words when it stops."""
        if summary := self.summary():
            logger.error(f"virnucpro: {summary}")

    def summary(self) -> str | None:
        """One line: each lost node and what was lost with it (None if nothing was lost)."""
        with self.lock:
            lost = list(self.lost)
        if not lost:
            return None
        by_node: dict[str, list[Loss]] = {}
        for loss in lost:
            by_node.setdefault(loss.node or "an unknown node", []).append(loss)
        parts = []
        for node, losses in by_node.items():
            states = "/".join(sorted({loss.state for loss in losses}))
            jobs = ", ".join(loss.job for loss in losses)
            parts.append(f"{node} ({states}) with {len(losses)} job(s): {jobs}")
        return "lost to the cluster: " + "; ".join(parts)

    def _running_job(self, jobid):
        """The scheduler's running job (a group job, for one of its members) that snakemake's ``jobid`` names."""
        scheduler = getattr(self.workflow, "scheduler", None)
        if scheduler is None or jobid is None:
            return None
        for _ in range(3):  # the scheduler's thread may change the set meanwhile
            try:
                running = list(scheduler.running)
                break
            except RuntimeError:
                continue
        else:
            return None
        for job in running:
            if self._member(job, jobid) is not None:
                return job
        return None

    def _member(self, job, jobid):
        if job is None:
            return None
        members = job.jobs if job.is_group() else [job]
        return next((member for member in members if self.workflow.dag.jobid(member) == jobid), None)
