"""A daemon under hostile conditions (issue 10, cases 3, 4, 5 and 7): paths swapped for symbolic links
while a shard waits, requests that aim at the run folder, the model or the shard itself, floods of
unauthenticated TCP connections, and what a killed daemon or a long run leaves behind.

Real `virnucpro serve` processes with the small test models, real sockets on loopback only. A shard
that must still wait in the queue while the test acts waits behind a gate (daemon_helpers.Gate): the
model thread blocks reading it until the test opens it. Every loop is bounded in time and count.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from daemon_helpers import (
    READY_TIMEOUT,
    ask_json,
    fasta_ids,
    proteins,
    receive_until,
    replies,
    status,
    wait_for,
    write_nucleotides,
    write_proteins,
)

from virnucpro.engines.embed import read_embeddings
from virnucpro.serving import registry
from virnucpro.serving.client import request_embedding
from virnucpro.serving.protocol import ProtocolError
from virnucpro.serving.rundir import RunDir

FINAL = {"done", "failed", "error", "expired", "busy", "stopping"}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and link under ``folder`` with what it is: content digest, size, mtime, inode."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), info.st_size, info.st_mtime_ns,
                                info.st_ino)  # fmt: skip
        else:
            found[str(path)] = ("folder", info.st_ino)
    return found


def fingerprint_of(path: Path) -> tuple | None:
    """A file's content digest, size, mtime and inode (None if there is none)."""
    try:
        info = path.lstat()
        return hashlib.sha256(path.read_bytes()).hexdigest(), info.st_size, info.st_mtime_ns, info.st_ino
    except FileNotFoundError:
        return None


def swap_for_link(path: Path, target: Path) -> Path:
    """Move ``path`` aside (to ``<path>.orig``) and put a symbolic link to ``target`` in its place."""
    aside = path.with_name(path.name + ".orig")
    os.rename(path, aside)
    os.symlink(target, path)
    return aside


def ids_in_embedding_files(folder: Path) -> set[str]:
    """The sequence IDs of every embedding file under ``folder``."""
    ids: set[str] = set()
    for path in Path(folder).rglob("*.pt"):
        if path.is_file() and not path.is_symlink() and "models" not in path.parts:
            try:
                ids.update(read_embeddings(path)[0])
            except Exception:  # not an embedding file (a model): nothing to look at
                continue
    return ids


class Requests:
    """Raw embed requests to one daemon, each on its own DEALER socket, answered in any order."""

    def __init__(self, endpoint: str):
        self.context = zmq.Context()
        self.endpoint = endpoint
        self.sockets: dict[str, zmq.Socket] = {}
        self.first: dict[str, dict] = {}

    def send(self, name: str, input_path: Path | str, output_path: Path | str, **fields) -> dict:
        """Send one request; its first reply (``accepted``, or a final one)."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        sock.send_json({"op": "embed", "input": str(input_path), "output": str(output_path), **fields})
        self.sockets[name] = sock
        self.first[name] = receive_until(sock, lambda reply: reply["reply"] in FINAL | {"accepted"}, timeout=30)[-1]
        return self.first[name]

    def final(self, name: str, timeout: float = 120.0) -> dict:
        """The final reply to request ``name``."""
        if self.first[name]["reply"] in FINAL:
            return self.first[name]
        return receive_until(self.sockets[name], lambda reply: reply["reply"] in FINAL, timeout=timeout)[-1]

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.context.term()


# --- case 3: a symbolic link swapped in between the check and the use ------------------------------
def confinement_tree(base: Path) -> tuple[Path, Path]:
    """``base/root``, the allowed root, with ``a/b/in.faa`` and an output folder ``a/b/out``; and
    ``base/outside``, laid out so that each component of those paths, swapped for a link to it, leads
    to a file of the same name there (``secret`` sequences)."""
    root, outside = base / "root", base / "outside"
    (root / "a" / "b" / "out").mkdir(parents=True)
    (root / "a" / "b" / "in.faa").write_text(">inside\nMKVL\n")
    for folder in (outside, outside / "b", outside / "b" / "out"):
        folder.mkdir(parents=True, exist_ok=True)
    for path in (outside / "in.faa", outside / "b" / "in.faa"):
        path.write_text(">secret\nMKVL\n")
    return root, outside


# Each path component, and the outside thing it is swapped for (relative to the two roots).
INPUT_SWAPS = [("a", "."), ("a/b", "b"), ("a/b/in.faa", "in.faa")]
OUTPUT_SWAPS = [("a", "."), ("a/b", "b"), ("a/b/out", "b/out")]


@pytest.mark.parametrize("component,target", INPUT_SWAPS)
def test_an_input_path_swapped_for_a_link_after_the_check_is_refused_at_open(tmp_path, component, target):
    from virnucpro.serving.confine import Confinement

    root, outside = confinement_tree(tmp_path)
    confinement = Confinement([root], never_write=[tmp_path / "run"])
    real = confinement.check(str(root / "a" / "b" / "in.faa"), "input")
    swap_for_link(root / component, outside / target)
    assert (root / "a" / "b" / "in.faa").read_text().startswith(">secret")  # by name it now leads outside
    with pytest.raises(ProtocolError, match="symbolic link"):
        with confinement.open_input(real) as source:
            pytest.fail(f"opened {source}: {Path(source).read_text()!r}")


@pytest.mark.parametrize("component,target", OUTPUT_SWAPS)
def test_an_output_folder_swapped_for_a_link_after_the_check_is_refused_at_open(tmp_path, component, target):
    from virnucpro.serving.confine import Confinement

    root, outside = confinement_tree(tmp_path)
    confinement = Confinement([root], never_write=[tmp_path / "run"])
    real = confinement.check(str(root / "a" / "b" / "out" / "x.pt"), "output")
    before = snapshot(outside)
    swap_for_link(root / component, outside / target)
    with pytest.raises(ProtocolError, match="symbolic link"):
        with confinement.output_folder(real) as folder:
            (folder / "x.pt").write_text("written")
    assert snapshot(outside) == before


class SwapBeforeOpen:
    """Stands in for the ``os`` module of virnucpro.serving.confine: runs ``swap`` just before its
    ``open`` call number ``when`` (0 is the first), so that a swap lands at each step of the walk."""

    def __init__(self, when: int, swap):
        self.when, self.swap, self.calls, self.swapped = when, swap, 0, False

    def __getattr__(self, name: str):
        return getattr(os, name)

    def open(self, *args, **kwargs):
        if self.calls == self.when:
            self.swap()
            self.swapped = True
        self.calls += 1
        return os.open(*args, **kwargs)


@pytest.mark.parametrize("component,target", INPUT_SWAPS)
def test_no_interleaving_of_a_swap_with_opening_an_input_reads_outside_the_root(tmp_path, monkeypatch, component,
                                                                                target):  # fmt: skip
    """The swap lands before each of the walk's steps in turn: the open either fails or reads the file that
    was checked, never the one outside."""
    from virnucpro.serving import confine

    outcomes = []
    for when in range(5):  # the root, a, b, in.faa: 4 opens; one more to land after the last
        root, outside = confinement_tree(tmp_path / f"when{when}")
        confinement = confine.Confinement([root], never_write=[tmp_path / "run"])
        real = confinement.check(str(root / "a" / "b" / "in.faa"), "input")
        proxy = SwapBeforeOpen(
            when, lambda root=root, outside=outside: swap_for_link(root / component, outside / target)
        )
        with monkeypatch.context() as patch:
            patch.setattr(confine, "os", proxy)
            try:
                with confinement.open_input(real) as source:
                    text = Path(source).read_text()
            except ProtocolError as error:
                text = f"refused: {error}"
        assert not text.startswith(">secret"), (when, text)
        outcomes.append((proxy.swapped, text.split(":")[0]))
    # the swap landed before each open of the walk at least once, and at least one was refused
    assert sum(swapped for swapped, _ in outcomes) == 4, outcomes
    assert "refused" in {text for _, text in outcomes}, outcomes


@pytest.mark.parametrize("component,target", OUTPUT_SWAPS)
def test_no_interleaving_of_a_swap_with_opening_an_output_folder_writes_outside_the_root(tmp_path, monkeypatch,
                                                                                         component, target):  # fmt: skip
    from virnucpro.serving import confine

    for when in range(5):
        root, outside = confinement_tree(tmp_path / f"when{when}")
        before = snapshot(outside)
        confinement = confine.Confinement([root], never_write=[tmp_path / "run"])
        real = confinement.check(str(root / "a" / "b" / "out" / "x.pt"), "output")
        proxy = SwapBeforeOpen(
            when, lambda root=root, outside=outside: swap_for_link(root / component, outside / target)
        )
        with monkeypatch.context() as patch:
            patch.setattr(confine, "os", proxy)
            try:
                with confinement.output_folder(real) as folder:
                    (folder / "x.pt").write_text("written")
            except ProtocolError as error:
                assert "symbolic link" in str(error)
        assert snapshot(outside) == before, when
        written = [path for path in root.rglob("x.pt")]
        assert all(path.read_text() == "written" for path in written) and len(written) <= 1


@pytest.mark.slow
def test_folders_swapped_for_links_while_their_shards_wait_are_not_followed(start_daemon, models, gate, tmp_path):
    """A shard's input folder, and another's output folder, become links to an outside folder while both
    shards wait behind a gated one: both fail, saying why; nothing outside is read or written."""
    data = tmp_path / "data" / ("a_folder_with_a_long_name_" * 3)  # messages name files in full, not in 80 characters
    outside, run_dir = tmp_path / "outside", tmp_path / "run"
    outside.mkdir()
    (outside / "in.faa").write_text(proteins("secret", 4, seed=71))  # what the swapped input path leads to
    (data / "victim").mkdir(parents=True)
    (data / "victim" / "in.faa").write_text(proteins("victim", 4, seed=72))
    ok = write_proteins(data / "ok.faa", 3, seed=73)
    (data / "outdir").mkdir()
    hold = gate(data / "hold.faa", proteins("hold", 2, seed=74))
    before = snapshot(outside)

    daemon = start_daemon(run_dir, "esm2-race", "esm2", models["esm2"], [data])
    endpoint = daemon.wait_ready()["endpoint"]
    requests = Requests(endpoint)
    try:
        assert requests.send("hold", hold.path, data / "hold.pt")["reply"] == "accepted"
        wait_for(lambda: status(endpoint)["running"], 30, "the gated shard started")
        assert requests.send("input", data / "victim" / "in.faa", data / "victim" / "out.pt")["reply"] == "accepted"
        assert requests.send("output", ok, data / "outdir" / "ok.pt")["reply"] == "accepted"
        assert status(endpoint)["queued"] == 2  # both checked and waiting behind the gated shard
        swap_for_link(data / "victim", outside)
        swap_for_link(data / "outdir", outside)
        hold.open()
        requests.final("hold")
        swapped_input, swapped_output = requests.final("input"), requests.final("output")
    finally:
        requests.close()
    for reply in (swapped_input, swapped_output):
        assert reply["reply"] == "failed", reply
        assert "symbolic link" in reply["message"] and "refused" in reply["message"], reply
    real = Path(os.path.realpath(data.parent)) / data.name  # as the daemon resolved it
    # (the shard's output folder, victim/ too, is opened first: the link is found on its way)
    assert f"'{real / 'victim'}' changed while it was being opened" in swapped_input["message"]
    assert f"'{real / 'outdir'}' changed while it was being opened" in swapped_output["message"]
    assert snapshot(outside) == before  # nothing written there
    assert not any(name.startswith("secret") for name in ids_in_embedding_files(tmp_path))  # nothing read there
    assert ask_json(endpoint, {"op": "ping"})["reply"] == "pong"


# --- case 4: never into the run folder, over the model or over the shard itself --------------------
@pytest.mark.slow
def test_no_request_writes_into_the_run_folder_over_the_model_or_over_its_own_input(start_daemon, models, tmp_path):
    """The allowed root is the parent of the run folder and of the model (as `serve`'s default, its
    working directory, would be): requests aiming at them, or at their own input, are refused."""
    work = tmp_path / "work"
    run_dir, data = work / ".virnucpro", work / "data"
    weights = work / "models" / "esm2_t2_64_test.pt"
    weights.parent.mkdir(parents=True)
    shutil.copy(models["esm2"], weights)
    run = RunDir(run_dir)
    run.write_stop_token()
    fasta = write_proteins(data / "in.faa", 3, seed=81)
    registry.write_entry(run, {"daemon_id": "esm2-other", "pid": os.getpid(), "host": socket.gethostname(),
                               "model": "esm2", "state": "ready", "endpoint": "ipc:///nowhere"})  # fmt: skip
    daemon = start_daemon(run_dir, "esm2-own", "esm2", weights, [work])
    endpoint = daemon.wait_ready()["endpoint"]
    broken = data / "broken.faa"
    broken.write_text("not a FASTA file\n")  # a failure manifest with one entry
    assert ask_json(endpoint, {"op": "embed", "input": str(broken), "output": str(data / "broken.pt"),
                               "shard": "shard_00001"})["reply"] == "accepted"  # fmt: skip
    wait_for(lambda: run.failures.exists() and "shard_00001" in run.failures.read_text(), 60, "a manifest entry")
    (work / "to_run").symlink_to(run_dir, target_is_directory=True)
    (work / "alias.faa").symlink_to(fasta)
    record = next(run.requests.glob("*.json"))
    targets = [
        run.entry("esm2-other"),  # another daemon's registry entry
        run.entry("esm2-own"),  # its own
        run.failures,
        run.stop_file,
        record,  # a request record
        run_dir / "new.pt",  # a new file in the run folder
        run.sockets / "x.pt",
        weights,  # the model
        fasta,  # the input itself
    ]
    spelled = {
        str(work / "to_run" / "failures.tsv"): run.failures,  # through a link inside the root
        f"{data}/../data/in.faa": fasta,  # the input, spelled otherwise
        str(work / "alias.faa"): fasta,  # the input, through a link
    }
    watched = [*targets, *spelled.values()]
    before = {path: fingerprint_of(path) for path in watched}
    for output in [*map(str, targets), *spelled]:
        reply = ask_json(endpoint, {"op": "embed", "input": str(fasta), "output": output})
        assert reply["reply"] == "error", (output, reply)
        assert "refused" in reply["message"], (output, reply)
    own = registry.read_entry(run, "esm2-own")
    assert own is not None and own["pid"] == daemon.process.pid  # still its entry, refreshed by the daemon only
    after = {path: fingerprint_of(path) for path in watched}
    assert {path: fingerprint for path, fingerprint in after.items() if path != run.entry("esm2-own")} == {
        path: fingerprint for path, fingerprint in before.items() if path != run.entry("esm2-own")
    }
    assert not (run_dir / "new.pt").exists() and not (run.sockets / "x.pt").exists()
    assert status(endpoint)["state"] == "ready" and daemon.process.poll() is None  # its stop file is unchanged


def test_an_output_folder_moved_out_of_the_root_before_the_write_gets_nothing(tmp_path):
    """The check at write time: a folder opened under the root, then moved out of it, is refused before
    the output is created and before it is renamed into place; nothing lands where it went."""
    from virnucpro.atomic import atomic_output
    from virnucpro.serving.confine import Confinement

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub2").mkdir(parents=True)
    elsewhere.mkdir()
    confinement = Confinement([root], never_write=[tmp_path / "run"])
    real = confinement.check(str(root / "sub2" / "huge.pt"), "output")
    for moved_while in ("computing", "writing"):
        with confinement.output_folder(real) as folder:
            check = functools.partial(confinement.check_in_place, folder)
            if moved_while == "computing":
                os.rename(root / "sub2", elsewhere / "sub2")
            with pytest.raises(ProtocolError, match="moved or replaced"):
                with atomic_output(folder / "huge.pt", "wb", before_commit=check) as handle:
                    handle.write(b"embeddings")
                    if moved_while == "writing":
                        os.rename(root / "sub2", elsewhere / "sub2")
        assert list((elsewhere / "sub2").iterdir()) == [], moved_while
        os.rename(elsewhere / "sub2", root / "sub2")
    with confinement.output_folder(real) as folder:  # left in place: written
        with atomic_output(folder / "huge.pt", "wb", before_commit=functools.partial(confinement.check_in_place,
                                                                                      folder)) as handle:  # fmt: skip
            handle.write(b"embeddings")
    assert (root / "sub2" / "huge.pt").read_bytes() == b"embeddings"


@pytest.mark.slow
def test_a_folder_moved_out_of_the_root_while_its_shard_computes_fails_the_request(start_daemon, models, gate,
                                                                                   tmp_path):  # fmt: skip
    """Issue 17, case 6: a request for ROOT/sub2/huge.pt; while the shard is in progress, ``mv ROOT/sub2
    /elsewhere``: the request fails, nothing is written into /elsewhere (it was written there)."""
    root, elsewhere, run_dir = tmp_path / "root", tmp_path / "elsewhere", tmp_path / "run"
    (root / "sub2").mkdir(parents=True)
    elsewhere.mkdir()
    hold = gate(root / "in.faa", proteins("moved", 5, seed=91))
    daemon = start_daemon(run_dir, "esm2-moved", "esm2", models["esm2"], [root])
    endpoint = daemon.wait_ready()["endpoint"]
    requests = Requests(endpoint)
    try:
        assert requests.send("moved", hold.path, root / "sub2" / "huge.pt")["reply"] == "accepted"
        wait_for(hold.waiting, 60, "the daemon started the shard (its output folder open, its input opening)")
        os.rename(root / "sub2", elsewhere / "sub2")
        hold.open()
        reply = requests.final("moved")
    finally:
        requests.close()
    assert reply["reply"] == "failed", reply
    assert "moved or replaced" in reply["message"] and str(os.path.realpath(root / "sub2")) in reply["message"], reply
    assert list((elsewhere / "sub2").iterdir()) == []
    assert not (root / "sub2").exists()
    assert ask_json(endpoint, {"op": "ping"})["reply"] == "pong"


@pytest.mark.slow
def test_a_standalone_daemon_never_writes_over_its_model_files_log_or_statistics(models, tmp_path):
    """Issue 17, case 5: `virnucpro serve` with the default allowed root (its working directory), which holds
    the ESM-2 checkpoint and its -contact-regression.pt companion, a DNABERT-S snapshot whose files are links
    into a blob folder (as in a Hugging Face cache), the daemons' logs and statistics: requests that aim at any
    of them are refused, and each file is as it was."""
    from virnucpro.engines.esm2 import contact_regression_path
    from virnucpro.testmodels import write_random_checkpoint

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    esm2 = write_random_checkpoint(work / "models" / "esm2_t2_64_test.pt", seed=5)
    companion = contact_regression_path(esm2)
    snapshot, blobs = work / "models" / "DNABERT-S", work / "models" / "blobs"
    snapshot.mkdir()
    blobs.mkdir()
    for file in sorted(Path(models["dnabert_s"]).iterdir()):
        shutil.copy(file, blobs / hashlib.sha256(file.name.encode()).hexdigest())
        (snapshot / file.name).symlink_to(Path("..") / "blobs" / hashlib.sha256(file.name.encode()).hexdigest())
    fasta = {"esm2": write_proteins(work / "data" / "in.faa", 3, seed=93),
             "dnabert_s": write_nucleotides(work / "data" / "in.fa", 3, seed=94)}  # fmt: skip
    daemons, logs = {}, []
    try:
        for model, weights in (("esm2", esm2), ("dnabert_s", snapshot)):
            log = work / f"{model}.log"
            logs.append(log)
            with open(log, "w") as handle:
                daemons[model] = subprocess.Popen(
                    [sys.executable, "-m", "virnucpro", "serve", "--model", model, "--weights", str(weights),
                     "--run-dir", str(work / ".virnucpro"), "--stats-output", str(work / f"{model}.stats.json"),
                     "--daemon-id", f"{model}-own"], cwd=work, stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip
        endpoints = {model: wait_ready(work / ".virnucpro", f"{model}-own", daemons[model])["endpoint"]
                     for model in daemons}  # fmt: skip
        own = {
            "esm2": [esm2, companion],
            "dnabert_s": [*(snapshot / file.name for file in Path(models["dnabert_s"]).iterdir()), *blobs.iterdir()],
        }
        for model in own:
            (work / f"{model}.stats.json").write_text("{}")  # where the daemon will write its statistics
            own[model] += [work / f"{model}.log", work / f"{model}.stats.json"]
        before = {path: fingerprint_of(path) for paths in own.values() for path in paths}
        for model, endpoint in endpoints.items():
            for output in own[model]:
                reply = ask_json(endpoint, {"op": "embed", "input": str(fasta[model]), "output": str(output)})
                assert reply["reply"] == "error" and "refused" in reply["message"], (model, output, reply)
        assert {path for path in before if path not in logs and fingerprint_of(path) != before[path]} == set()
        for model, endpoint in endpoints.items():  # an ordinary output is still written
            output = work / "data" / f"{model}.pt"
            assert replies(endpoint, {"op": "embed", "input": str(fasta[model]), "output": str(output)},
                           {"done", "failed", "error"})[-1]["reply"] == "done"  # fmt: skip
            assert read_embeddings(output)[0] == fasta_ids(fasta[model])
    finally:
        for process in daemons.values():
            process.kill()
            process.wait()


# --- case 5: unauthenticated TCP peers ---------------------------------------------------------------
FLOOD_CONNECTIONS = 1100
FLOOD_HOLD_SECONDS = 20.0  # beyond the daemon's handshake timeout (5 s)
RECONNECT_SECONDS = 15.0
RECONNECT_BATCH = 50
RECONNECT_LIMIT = 200_000  # connections opened in the reconnecting phase, at most
DAEMON_SOFT_LIMIT = 1024  # open files, as on a typical cluster node; the hard limit is left as it is
HEARTBEAT_LIMIT = 10.0  # the daemon refreshes its entry every 5 s


def open_files(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def soft_file_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses on which something listens on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


class Sampler:
    """Samples a daemon every 0.1 s: its open descriptors and its registry heartbeat's age."""

    def __init__(self, run_dir: Path, daemon_id: str, pid: int):
        self.run_dir, self.daemon_id, self.pid = run_dir, daemon_id, pid
        self.peak_files, self.max_age, self.samples = 0, 0.0, 0
        self.last_files: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            files = open_files(self.pid)
            if files is not None:
                self.peak_files, self.last_files = max(self.peak_files, files), files
            entry = registry.read_entry(self.run_dir, self.daemon_id)
            if entry is not None:
                self.max_age = max(self.max_age, registry.heartbeat_age(entry))
            self.samples += 1


def connect_raw(port: int, count: int, deadline: float) -> tuple[list[socket.socket], int]:
    """Up to ``count`` plain TCP connections to 127.0.0.1:``port`` (no ZMTP, no CURVE), until ``deadline``;
    the connections and the number of failed attempts."""
    made, failed = [], 0
    while len(made) < count and time.monotonic() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            failed += 1
            continue
        made.append(sock)
    return made, failed


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the daemon closed this connection (what it sent before is read and dropped)."""
    sock.setblocking(False)
    try:
        for _ in range(100):
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


def timed_request(run_dir: Path, fasta: Path, output: Path) -> tuple[threading.Thread, dict]:
    """An authenticated embed request in a thread; ``result`` gets ``ok`` and ``seconds``."""
    result: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            result["ok"] = request_embedding(run_dir, "esm2", fasta, output, timeout=120)
        except Exception as error:  # reported by the test
            result["ok"], result["error"] = False, f"{type(error).__name__}: {error}"
        result["seconds"] = round(time.monotonic() - started, 3)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.fixture
def many_files():
    """This test process may hold a few thousand descriptors (the attacker's connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < FLOOD_CONNECTIONS + 200:
        pytest.skip(f"the hard limit on open files ({hard}) is too low for {FLOOD_CONNECTIONS} test connections")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def start_limited_daemon(run_dir: Path, daemon_id: str, weights: Path, root: Path, *extra: str) -> subprocess.Popen:
    """`virnucpro serve` over tcp on loopback, started with a soft limit of DAEMON_SOFT_LIMIT open files."""
    log = run_dir / "logs" / f"{daemon_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)

    def limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (DAEMON_SOFT_LIMIT, hard))

    command = [
        sys.executable, "-m", "virnucpro.cli", "serve", "--model", "esm2", "--weights", str(weights),
        "--run-dir", str(run_dir), "--stats-output", str(run_dir / "stats" / f"{daemon_id}.json"),
        "--daemon-id", daemon_id, "--allowed-root", str(root), "--transport", "tcp", *extra,
    ]  # fmt: skip
    with open(log, "a") as stream:
        return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, preexec_fn=limit)


def wait_ready(run_dir: Path, daemon_id: str, process: subprocess.Popen) -> dict:
    log = run_dir / "logs" / f"{daemon_id}.log"

    def ready():
        assert process.poll() is None, f"daemon exited early:\n{log.read_text()}"
        entry = registry.read_entry(run_dir, daemon_id)
        return entry if entry and entry.get("pid") == process.pid and entry.get("state") == "ready" else None

    return wait_for(ready, READY_TIMEOUT, f"daemon {daemon_id} ready", interval=0.05)


@pytest.mark.slow
def test_a_flood_of_unauthenticated_tcp_connections_neither_exhausts_descriptors_nor_stalls_the_daemon(
        models, many_files, tmp_path):  # fmt: skip
    """1,100 raw connections held for 20 s, then 15 s of reconnecting, against a daemon started with a soft
    limit of 1,024 open files: its heartbeat stays fresh and a real request is served meanwhile."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    fasta = write_proteins(data / "flood.faa", 8, seed=91)
    daemon_id = "esm2-flood"
    process = start_limited_daemon(run_dir, daemon_id, models["esm2"], data, "--bind-host", "127.0.0.1")
    connections: list[socket.socket] = []
    figures: dict = {"daemon_soft_limit_at_start": DAEMON_SOFT_LIMIT}
    try:
        entry = wait_ready(run_dir, daemon_id, process)
        port = int(entry["endpoint"].rsplit(":", 1)[1])
        assert entry["endpoint"] == f"tcp://127.0.0.1:{port}"
        assert listening_addresses(port) == {"127.0.0.1"}  # loopback only, as asked
        figures["daemon_soft_limit_running"] = soft_file_limit(process.pid)
        figures["descriptors_idle"] = open_files(process.pid)

        # phase 1: 1,100 connections that never start a handshake, held for 20 s
        with Sampler(run_dir, daemon_id, process.pid) as sampler:
            started = time.monotonic()
            connections, failed = connect_raw(port, FLOOD_CONNECTIONS, started + 60.0)
            figures["connections"], figures["failed_connects"] = len(connections), failed
            figures["connect_seconds"] = round(time.monotonic() - started, 2)
            thread, request = timed_request(run_dir, fasta, data / "flood.pt")
            thread.join(150)
            hold_end = started + FLOOD_HOLD_SECONDS
            while time.monotonic() < hold_end:  # the load is held for its time whatever happens meanwhile
                time.sleep(min(0.5, max(0.0, hold_end - time.monotonic())))
            figures["seconds_held"] = round(time.monotonic() - started, 1)
            figures["closed_by_daemon"] = sum(closed_by_peer(sock) for sock in connections)
        figures.update(peak_descriptors=sampler.peak_files, descriptors_at_end=sampler.last_files,
                       max_heartbeat_age=round(sampler.max_age, 2), request=request)  # fmt: skip
        for sock in connections:
            sock.close()
        connections = []

        # phase 2: an attacker that keeps reconnecting (closing its oldest connections, opening new ones)
        with Sampler(run_dir, daemon_id, process.pid) as sampler:
            started = time.monotonic()
            end, opened = started + RECONNECT_SECONDS, 0
            connections, _ = connect_raw(port, FLOOD_CONNECTIONS, started + 30.0)
            opened += len(connections)
            thread, churn_request = None, {}
            while time.monotonic() < end and opened < RECONNECT_LIMIT:
                for sock in connections[:RECONNECT_BATCH]:
                    sock.close()
                fresh, _ = connect_raw(port, RECONNECT_BATCH, end)
                connections = connections[RECONNECT_BATCH:] + fresh
                opened += len(fresh)
                if thread is None and time.monotonic() - started > 2.0:
                    thread, churn_request = timed_request(run_dir, fasta, data / "churn.pt")
            if thread is not None:
                thread.join(150)
        figures["reconnecting"] = {
            "seconds": round(time.monotonic() - started, 1), "connections_opened": opened,
            "peak_descriptors": sampler.peak_files, "max_heartbeat_age": round(sampler.max_age, 2),
            "request": churn_request,
        }  # fmt: skip
        print("\nflood figures:", json.dumps(figures, indent=1))
        log = (run_dir / "logs" / f"{daemon_id}.log").read_text()
        assert process.poll() is None, log
        assert figures["connections"] == FLOOD_CONNECTIONS, figures
        assert request.get("ok") is True, figures
        assert read_embeddings(data / "flood.pt")[0] == [f"flood_p{i}" for i in range(8)]
        assert figures["max_heartbeat_age"] < HEARTBEAT_LIMIT, figures
        assert figures["peak_descriptors"] < figures["daemon_soft_limit_running"], figures
        assert figures["closed_by_daemon"] == FLOOD_CONNECTIONS, figures  # reaped after the handshake timeout
        assert churn_request.get("ok") is True, figures
        assert figures["reconnecting"]["max_heartbeat_age"] < HEARTBEAT_LIMIT, figures
        assert "Too many open files" not in log and "could not refresh" not in log, log
    finally:
        for sock in connections:
            sock.close()
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
def test_a_tcp_daemon_bound_to_an_interface_name_registers_that_interfaces_address(start_daemon, models, tmp_path):
    """`--bind-host lo` (an interface name, as a cluster's `ib0`): the daemon listens there only and its
    registry entry names the address, which clients can reach."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    fasta = write_proteins(data / "lo.faa", 3, seed=93)
    daemon = start_daemon(run_dir, "esm2-lo", "esm2", models["esm2"], [data], "--transport", "tcp",
                          "--bind-host", "lo")  # fmt: skip
    entry = daemon.wait_ready()
    port = int(entry["endpoint"].rsplit(":", 1)[1])
    assert entry["endpoint"] == f"tcp://127.0.0.1:{port}" and entry["address"] == "127.0.0.1", entry
    assert listening_addresses(port) == {"127.0.0.1"}
    assert request_embedding(run_dir, "esm2", fasta, data / "lo.pt", timeout=60) is True


# --- case 7: what a killed daemon and a long run leave behind --------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("deep", [False, True], ids=["run-folder-socket", "temporary-socket-folder"])
def test_the_socket_of_a_killed_daemon_is_removed_by_whoever_watched_it(start_daemon, models, tmp_path, deep):
    from virnucpro.serving.transport import remove_dead_socket

    run_dir = tmp_path / ("d" * 120 if deep else "run")
    daemon = start_daemon(run_dir, "esm2-killed", "esm2", models["esm2"], [tmp_path])
    entry = daemon.wait_ready()
    socket_file = Path(entry["endpoint"].removeprefix("ipc://"))
    assert socket_file.exists() and (socket_file.parent == run_dir.resolve() / "sockets") is not deep
    assert remove_dead_socket(RunDir(run_dir), "esm2-killed", daemon.process.pid) is None  # alive: left alone
    assert socket_file.exists()
    daemon.process.kill()
    daemon.process.wait()
    assert socket_file.exists()  # SIGKILL: the daemon could not remove it; its watcher does
    assert remove_dead_socket(RunDir(run_dir), "esm2-killed", daemon.process.pid) == socket_file
    assert not socket_file.exists()
    assert socket_file.parent.exists() is not deep  # a temporary folder goes with it; sockets/ stays
    assert remove_dead_socket(RunDir(run_dir), "esm2-killed", daemon.process.pid) is None  # nothing left

    # a new daemon of the same ID binds the same place and answers
    again = start_daemon(run_dir, "esm2-killed", "esm2", models["esm2"], [tmp_path])
    endpoint = again.wait_ready()["endpoint"]
    assert ask_json(endpoint, {"op": "ping"})["reply"] == "pong"


def test_a_new_daemon_replaces_the_socket_file_a_killed_one_of_its_id_left(tmp_path):
    from virnucpro.serving.transport import bind, socket_path

    run = RunDir(tmp_path / "run")
    path, _ = socket_path(run, "esm2-x")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file that no one listens on any more
    stale.close()
    with zmq.Context() as context:
        binding = bind(context, run, "esm2-x", "ipc")
        try:
            assert binding.endpoint == f"ipc://{path}"
            with context.socket(zmq.DEALER) as client:
                client.connect(binding.endpoint)
                client.send(b"hello")
                assert binding.router.poll(5000)
        finally:
            binding.close()
    assert not path.exists()


def test_prune_request_records_removes_every_record_no_daemon_holds(tmp_path):
    from virnucpro.serving.worker import prune_request_records

    run = RunDir(tmp_path / "run")
    assert prune_request_records(run) == 0  # no requests folder yet
    run.requests.mkdir(parents=True, mode=0o700)
    done = run.request_record("a" * 64)
    done.write_text(json.dumps({"reply": "done", "sequences": 3}))
    empty = run.request_record("b" * 64)
    empty.touch()
    held = run.request_record("c" * 64)
    other = run.requests / "notes.txt"
    other.write_text("not a record")
    holder = os.open(held, os.O_RDWR | os.O_CREAT, 0o600)  # a daemon computing that shard holds its lock
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert prune_request_records(run) == 2
        assert not done.exists() and not empty.exists()
        assert held.exists() and other.exists()
    finally:
        os.close(holder)
    assert prune_request_records(run) == 1 and not held.exists()


@pytest.mark.slow
def test_pruning_request_records_leaves_the_shard_a_daemon_is_on(start_daemon, models, gate, tmp_path):
    from virnucpro.serving.worker import prune_request_records

    data, run_dir = tmp_path / "data", tmp_path / "run"
    run = RunDir(run_dir)
    earlier = write_proteins(data / "earlier.faa", 2, seed=95)
    daemon = start_daemon(run_dir, "esm2-prune", "esm2", models["esm2"], [data])
    endpoint = daemon.wait_ready()["endpoint"]
    assert request_embedding(run_dir, "esm2", earlier, data / "earlier.pt", timeout=60) is True
    hold = gate(data / "hold.faa", proteins("hold", 2, seed=96))
    requests = Requests(endpoint)
    try:
        accepted = requests.send("hold", hold.path, data / "hold.pt")
        wait_for(lambda: status(endpoint)["running"], 30, "the gated shard started")
        held = run.request_record(accepted["request_id"])
        assert held.exists() and len(list(run.requests.glob("*.json"))) == 2
        assert prune_request_records(run) == 1  # the earlier shard's record; the running one is locked
        assert [path.name for path in run.requests.glob("*.json")] == [held.name]
        hold.open()
        requests.final("hold")
    finally:
        requests.close()
    wait_for(lambda: not status(endpoint)["running"], 30, "the gated shard finished")
    assert prune_request_records(run) == 1 and not list(run.requests.glob("*.json"))
