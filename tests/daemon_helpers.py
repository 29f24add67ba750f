"""Helpers of the daemon tests (tests/test_daemon.py, tests/test_daemon_faults.py, tests/test_worker.py):
shard files, `virnucpro serve` processes, raw ZeroMQ exchanges, and gates that hold a shard until the
test lets it be read. Their fixtures are in conftest.py.

Tests wait on events and state, never on a shard that "should take about N seconds": a shard that must
still be in progress when the test acts is a ``Gate``, which no one can open until the test opens it.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

from virnucpro.engines.embed import embed_fasta, read_embeddings
from virnucpro.serving import registry
from virnucpro.serving.protocol import State

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
READY_TIMEOUT = 90.0
F_SETLEASE, F_GETLEASE = getattr(fcntl, "F_SETLEASE", 1024), getattr(fcntl, "F_GETLEASE", 1025)  # Linux


# --- shard files ----------------------------------------------------------------------------------
def proteins(name: str, count: int, seed: int, length: tuple[int, int] = (20, 160)) -> str:
    """FASTA text of ``count`` random proteins named ``<name>_p<i>``."""
    rng = random.Random(seed)
    return "".join(f">{name}_p{i}\n{''.join(rng.choices(AMINO_ACIDS, k=rng.randint(*length)))}\n" for i in range(count))


def nucleotides(name: str, count: int, seed: int) -> str:
    """FASTA text of ``count`` random DNA frames named ``<name>_n<i>F1``."""
    rng = random.Random(seed)
    return "".join(f">{name}_n{i}F1\n{''.join(rng.choices('ACGT', k=rng.randint(100, 499)))}\n" for i in range(count))


def write_proteins(path: Path, count: int, seed: int, length: tuple[int, int] = (20, 160)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(proteins(path.stem, count, seed, length))
    return path


def write_nucleotides(path: Path, count: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nucleotides(path.stem, count, seed))
    return path


def fasta_ids(path: Path) -> list[str]:
    return [line[1:].split()[0] for line in Path(path).read_text().splitlines() if line.startswith(">")]


def assert_same_as_in_process(output: Path, fasta: Path, model: str, weights: Path) -> None:
    """The daemon's file equals what the in-process mode computes for the same input (a regular file)."""
    reference = output.with_name(output.stem + ".reference.pt")
    embed_fasta(fasta, model, weights, reference)
    ids, vectors = read_embeddings(output)
    expected_ids, expected = read_embeddings(reference)
    assert ids == expected_ids == fasta_ids(fasta)
    assert vectors.shape == expected.shape
    assert (vectors - expected).abs().max().item() <= 1e-6


class Gate:
    """A shard file that no one can open until the test opens the gate.

    The test holds a write lease on the file (``fcntl`` ``F_SETLEASE``): another process's ``open()`` of
    it blocks until the lease is given up, so a daemon's model thread that starts the shard stays in the
    middle of it, before it has read anything, for as long as the test needs. ``waiting`` tells that a
    reader is blocked on it. The kernel breaks a lease by itself after ``/proc/sys/fs/lease-break-time``
    seconds (45 by default; the ``long_leases`` fixture makes it 600 as root); ``open`` fails the test if that
    happened. Nothing may read the file before the gate is open, the test included. The ``gate`` fixture makes gates (and ignores SIGIO, the
    kernel's notice to a lease holder).
    """

    def __init__(self, path: Path, text: str | None = None):
        """Write ``text`` to ``path`` and hold it; with no text, hold the file already there (no one else
        may have it open)."""
        self.path = Path(path)
        if text is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(text)
        text = self.path.read_text()
        self.ids = [line[1:].split()[0] for line in text.splitlines() if line.startswith(">")]
        self.descriptor: int | None = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.fcntl(self.descriptor, F_SETLEASE, fcntl.F_WRLCK)
        except OSError:  # EAGAIN: someone else has the file open
            os.close(self.descriptor)
            raise

    def _lease(self) -> int:
        return fcntl.fcntl(self.descriptor, F_GETLEASE)

    @property
    def is_open(self) -> bool:
        return self.descriptor is None

    def waiting(self) -> bool:
        """Whether someone is blocked opening the file (the lease is being broken)."""
        return not self.is_open and self._lease() != fcntl.F_WRLCK

    def open(self) -> None:
        """Let whoever is blocked opening the file, and everyone after, open it."""
        assert not self.is_open, f"{self.path}: the gate is open already"
        lease = self._lease()
        self.close()
        assert lease != fcntl.F_UNLCK, f"{self.path}: held for so long that the kernel broke the lease"

    def open_when_waiting(self, timeout: float = 60.0) -> None:
        """Wait until someone is blocked opening the file, then open the gate."""
        wait_for(self.waiting, timeout, f"someone opening {self.path}")
        self.open()

    def close(self) -> None:
        """Give up the lease (at the end of a test, whatever happened)."""
        if self.descriptor is not None:
            try:
                fcntl.fcntl(self.descriptor, F_SETLEASE, fcntl.F_UNLCK)
            finally:
                os.close(self.descriptor)
                self.descriptor = None


# --- daemon processes -----------------------------------------------------------------------------
class DaemonProcess:
    """One `virnucpro serve` process started by a test, logging to RUN/logs/<daemon_id>.log."""

    def __init__(self, run_dir: Path, daemon_id: str, model: str, weights: Path, roots: list[Path], *extra: str):
        self.run_dir, self.daemon_id = run_dir, daemon_id
        self.stats = run_dir / "stats" / f"{daemon_id}.json"
        self.log = run_dir / "logs" / f"{daemon_id}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "virnucpro.cli", "serve", "--model", model, "--weights", str(weights),
            "--run-dir", str(run_dir), "--stats-output", str(self.stats), "--daemon-id", daemon_id, *extra,
        ]  # fmt: skip
        for root in roots:
            command += ["--allowed-root", str(root)]
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def entry(self) -> dict | None:
        return registry.read_entry(self.run_dir, self.daemon_id)

    def wait_ready(self) -> dict:
        end = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < end:
            entry = self.entry()
            if entry and entry["pid"] == self.process.pid and entry["state"] == State.READY:
                return entry
            assert self.process.poll() is None, f"daemon exited early:\n{self.log.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {READY_TIMEOUT} s:\n{self.log.read_text()}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout} s:\n{self.log.read_text()}") from None

    def wait_heartbeat_after(self, since: float, timeout: float = 30.0) -> dict:
        """Its registry entry once refreshed after ``since`` (a registry heartbeat): its main loop has run
        every periodic check (stop file, idle time) at least once by then."""
        end = time.monotonic() + timeout
        while True:
            entry = self.entry()
            if entry and entry["heartbeat"] > since:
                return entry
            assert time.monotonic() < end, f"no registry heartbeat within {timeout} s:\n{self.log.read_text()}"
            assert self.process.poll() is None, f"daemon exited:\n{self.log.read_text()}"
            time.sleep(0.05)

    def final_stats(self) -> dict:
        return json.loads(self.stats.read_text())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# --- talking to a daemon directly -----------------------------------------------------------------
def ask(endpoint: str, *frames: bytes, timeout: float = 10.0) -> dict:
    """Send raw frames from a DEALER socket and return the first reply."""
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(list(frames))
        assert sock.poll(int(timeout * 1000)), f"no reply within {timeout} s"
        return json.loads(sock.recv())


def ask_json(endpoint: str, message: dict, timeout: float = 10.0) -> dict:
    return ask(endpoint, json.dumps(message).encode(), timeout=timeout)


def receive_until(sock: zmq.Socket, done, timeout: float = 30.0) -> list[dict]:
    """Replies on ``sock`` until one for which ``done(reply)`` is true (included)."""
    collected: list[dict] = []
    while not collected or not done(collected[-1]):
        assert sock.poll(int(timeout * 1000)), f"no further reply within {timeout} s: {collected}"
        collected.append(sock.recv_json())
    return collected


def receive_all(sock: zmq.Socket, until: set[str], timeout: float = 30.0) -> list[dict]:
    """Replies on ``sock`` until one of the kinds in ``until``."""
    return receive_until(sock, lambda reply: reply["reply"] in until, timeout)


def replies(endpoint: str, message: dict, until: set[str], timeout: float = 30.0) -> list[dict]:
    """Send one message and collect the replies until one of the kinds in ``until``."""
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_json(message)
        return receive_all(sock, until, timeout)


def status(endpoint: str) -> dict:
    return ask_json(endpoint, {"op": "status"})


def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    """Poll ``condition`` until it returns something true (returned); fail with ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < end, f"not within {timeout} s: {what}"
        time.sleep(interval)


def wait_running(endpoint: str, timeout: float = 30.0) -> None:
    wait_for(lambda: status(endpoint)["running"], timeout, "the daemon started the shard")


def in_thread(function, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run ``function`` in a thread; the list receives its exception (or None once it returned)."""
    outcome: list = []

    def target() -> None:
        try:
            function(*args, **kwargs)
            outcome.append(None)
        except BaseException as error:  # reported by the test
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome
