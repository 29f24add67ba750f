"""How daemons and clients reach each other: ``ipc://`` in a private folder on one machine, ``tcp://``
with CURVE encryption and authentication across nodes (docs/daemons.md, "Transport").

The daemon side binds a ROUTER socket (``bind``); the client side connects DEALER sockets to a
registry entry's endpoint (``connect``) and asks several daemons at once (``ask_all``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from virnucpro import atomic
from virnucpro.errors import UserError
from virnucpro.serving.protocol import MAX_MESSAGE_BYTES, Reply, decode_reply, encode
from virnucpro.serving.rundir import RunDir, private_dir

log = logging.getLogger(__name__)

TRANSPORTS = ("ipc", "tcp")
SOCKET_PATH_LIMIT = 100  # bytes; sun_path holds 108 on Linux, 104 on macOS, with the final NUL
SEND_TIMEOUT_MS = 2000
HANDSHAKE_SECONDS = 5.0  # tcp: time a connecting peer has to complete the CURVE handshake
KEY_NAMES = ("server", "client")
ZAP_DOMAIN = "virnucpro"


def socket_path(run: RunDir, daemon_id: str) -> tuple[Path, bool]:
    """Where to bind the ``ipc://`` socket, in a private (0700) folder, and whether that folder is a
    temporary one (used when ``<run_dir>/sockets/`` would make the path too long for the OS)."""
    path = Path(os.path.realpath(run.sockets)) / f"{daemon_id}.sock"
    temporary = len(os.fsencode(path)) > SOCKET_PATH_LIMIT
    if temporary:
        path = Path(tempfile.mkdtemp(prefix="virnucpro-")) / f"{daemon_id[:40]}.sock"
    private_dir(path.parent)
    return path, temporary


@dataclass
class Binding:
    """A bound daemon socket: its endpoint, its CURVE public key (tcp) and what to undo on close."""

    router: zmq.Socket
    endpoint: str
    server_key: str | None = None
    address: str | None = None
    _auth: object = None
    _socket_file: Path | None = None
    _temporary_dir: bool = field(default=False)

    def close(self) -> None:
        self.router.close()
        if self._auth is not None:
            self._auth.stop()
        if self._socket_file is not None:
            self._socket_file.unlink(missing_ok=True)
            if self._temporary_dir:
                shutil.rmtree(self._socket_file.parent, ignore_errors=True)


def bind(context: zmq.Context, run: RunDir, daemon_id: str, transport: str, bind_host: str = "*") -> Binding:
    """A ROUTER socket listening on ``ipc`` (private socket file) or ``tcp`` (CURVE server letting in only
    the run's client key, on a random port of ``bind_host``)."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 1000)  # at exit, up to 1 s to deliver the last replies
    router.setsockopt(zmq.MAXMSGSIZE, 16 * MAX_MESSAGE_BYTES)
    try:
        if transport == "tcp":
            return _bind_tcp(context, run, router, bind_host)
        path, temporary = socket_path(run, daemon_id)
        path.unlink(missing_ok=True)  # a socket file left by a killed daemon of this ID
        endpoint = f"ipc://{path}"
        router.bind(endpoint)
        return Binding(router, endpoint, _socket_file=path, _temporary_dir=temporary)
    except BaseException:
        router.close(linger=0)
        raise


def _bind_tcp(context: zmq.Context, run: RunDir, router: zmq.Socket, bind_host: str) -> Binding:
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = curve_keys(run, "server", create=True)
    client_public, _ = curve_keys(run, "client", create=True)
    auth = ThreadAuthenticator(context, log=logging.getLogger("virnucpro.serving.auth"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_AllowKeys({client_public}))
    router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    # A peer that connects but does not complete the CURVE handshake (no key, a port scan, a flood of raw
    # connections) is dropped after HANDSHAKE_SECONDS, so that such peers cannot pile up descriptors.
    router.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_SECONDS * 1000))
    router.setsockopt(zmq.TCP_KEEPALIVE, 1)
    router.curve_secretkey, router.curve_publickey, router.curve_server = secret, public, True
    port = router.bind_to_random_port(f"tcp://{bind_host}")
    # The address bound: an interface name (``ib0``, ``lo``) is resolved to that interface's address here.
    bound = router.getsockopt(zmq.LAST_ENDPOINT).decode().removeprefix("tcp://").rsplit(":", 1)[0]
    host = socket.gethostname() if bound in ("0.0.0.0", "[::]", "*") else bound
    return Binding(router, f"tcp://{host}:{port}", server_key=public.decode(), address=host, _auth=auth)


def remove_dead_socket(run: RunDir, daemon_id: str, pid: int) -> Path | None:
    """Remove the ``ipc`` socket file (and its temporary folder, if it had one) of daemon ``daemon_id``
    whose process ``pid`` on this host is gone without closing it (SIGKILL); the path removed, if any.
    For whoever watched the daemon die (its serve job): only the socket its registry entry names, only
    in the run's ``sockets/`` or a temporary folder of ours, and only while that entry is still the
    dead process's."""
    from virnucpro.serving import registry

    entry = registry.read_entry(run, daemon_id)
    if (entry is None or entry.get("pid") != pid or entry.get("host") != socket.gethostname()
            or registry.pid_alive(pid)):  # fmt: skip
        return None
    endpoint = str(entry.get("endpoint") or "")
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint.removeprefix("ipc://"))
    folder = os.path.realpath(path.parent)
    in_run = folder == os.path.realpath(run.sockets) and path.name == f"{daemon_id}.sock"
    temporary = (os.path.dirname(folder) == os.path.realpath(tempfile.gettempdir())
                 and path.parent.name.startswith("virnucpro-") and path.name == f"{daemon_id[:40]}.sock")  # fmt: skip
    if not (in_run or temporary) or not os.path.lexists(path):
        return None
    path.unlink(missing_ok=True)
    if temporary:
        shutil.rmtree(path.parent, ignore_errors=True)
    return path


class _AllowKeys:
    """ZAP credentials provider: only the run's client public key(s) may connect."""

    def __init__(self, keys: set[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def connect(context: zmq.Context, run: RunDir, entry: dict) -> zmq.Socket:
    """A DEALER socket connected to the daemon's endpoint, with the run's CURVE keys for ``tcp://``."""
    endpoint = str(entry.get("endpoint"))
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    try:
        if endpoint.startswith("tcp://"):
            server_key = entry.get("server_key")
            if not isinstance(server_key, str) or len(server_key) != 40:
                raise UserError(f"the registry entry of {entry.get('daemon_id')} has no server key for {endpoint}")
            public, secret = curve_keys(run, "client")
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key.encode(), public, secret
        elif not endpoint.startswith("ipc://"):
            raise UserError(f"unknown endpoint '{endpoint}' in the registry entry of {entry.get('daemon_id')}")
        sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def ask_all(context: zmq.Context, run: RunDir, entries: list[dict], message: dict,
            timeout: float) -> dict[str, dict]:  # fmt: skip
    """Send one message to several daemons at once; their first replies within ``timeout``, by daemon ID
    (``unreachable`` for a daemon that cannot be connected to)."""
    sockets: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    replies: dict[str, dict] = {}
    try:
        for entry in entries:
            try:
                sock = connect(context, run, entry)
            except (zmq.ZMQError, UserError) as error:
                replies[entry["daemon_id"]] = {"reply": Reply.UNREACHABLE.value, "message": str(error)}
                continue
            sockets[sock] = entry["daemon_id"]
            try:
                sock.send(encode(message))
            except zmq.ZMQError:
                continue
            poller.register(sock, zmq.POLLIN)
        end = time.monotonic() + timeout
        while poller.sockets and time.monotonic() < end:
            for sock, _ in poller.poll(max(1, int((end - time.monotonic()) * 1000))):
                poller.unregister(sock)
                replies[sockets[sock]] = decode_reply(sock.recv())
        return replies
    finally:
        for sock in sockets:
            sock.close(linger=0)


def curve_keys(run: RunDir | Path | str, name: str, create: bool = False) -> tuple[bytes, bytes]:
    """The run's CURVE key pair ``name`` (``server`` or ``client``) as Z85 (public, secret).

    With ``create``, a missing pair is made (safely, if several daemons start at once). A key file
    that others may read, or that is missing or unreadable, is a UserError.
    """
    if name not in KEY_NAMES:
        raise ValueError(f"unknown key pair {name!r}")
    run = run if isinstance(run, RunDir) else RunDir(run)
    if create:
        private_dir(run.keys)
    path = run.key(name)
    if create and not path.exists():
        public, secret = zmq.curve_keypair()
        try:
            with atomic.atomic_output(path, replace=False, permissions=0o600) as stream:
                json.dump({"public": public.decode(), "secret": secret.decode()}, stream)
        except FileExistsError:
            pass  # another daemon made it first: use theirs
    try:
        if os.stat(path).st_mode & 0o077 or os.stat(run.keys).st_mode & 0o077:
            raise UserError(f"{path}: key file or folder readable by others; make them private (chmod 600, 700)")
        data = json.loads(path.read_text())
        public, secret = data["public"].encode(), data["secret"].encode()
    except FileNotFoundError:
        raise UserError(f"{path}: no CURVE key for the tcp transport (a tcp daemon of this run writes it)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: unreadable CURVE key file ({error})") from None
    if len(public) != 40 or len(secret) != 40:
        raise UserError(f"{path}: unreadable CURVE key file (keys must be 40 Z85 characters)")
    return public, secret
