"""A listening socket on the front door's address that outlives the
ingress replicas of a local gateway (``runtime.http_proxy: gateway``).

Each ingress replica listens on a socket of its own on the port
(``SO_REUSEPORT``: the kernel spreads new connections evenly over the
sockets bound there). With those alone, the port was closed whenever no
replica was up: when the single ingress replica died (a crash, the OOM
killer) clients were refused until its successor bound the port (216 refused
connections in the 5 s that took here).

So the process that starts a local cluster (``llm-gateway serve``, the test
session) binds one more socket into the port's group before Ray starts and
keeps it until the cluster stops (``SocketKeeper``); each ingress replica on
the machine asks it for that socket (``kept_socket``) and accepts from it
besides its own, as the workers of uvicorn or gunicorn accept from their
parent's. The kept socket takes its share of new connections, which
whichever replica is first to wake accepts; when no replica is up it is the
only socket on the port and takes them all, and they wait in its queue for
the next replica instead of being refused. (One queue shared by every
replica, without sockets of their own, spread them badly: 29 to 32 of 32
connections opened at once went to one of two replicas.)

The socket travels over an abstract Unix socket (no file; gone with the
keeper's process) with a random name, which the cluster's processes find in
their environment (``KEEPER_VARIABLE``, set with the local cluster's other
variables before Ray starts: another user cannot take the name first), each
end checking the other's user with ``SO_PEERCRED``: a process of another user
gets nothing, and nothing is taken from one (Linux lets only the same user
join a port's ``SO_REUSEPORT`` group anyway). In a cluster started otherwise
(``--address``, KubeRay) the variable is not set and replicas listen on their
own sockets alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import threading

logger = logging.getLogger(__name__)

BACKLOG = 2048
ASK_TIMEOUT_S = 5.0
KEEPER_VARIABLE = "LLMGW_FRONT_DOOR_KEEPER"  # the keeper's name, in the local cluster's environment
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def keeper_name() -> str:
    """A new keeper's name: its abstract Unix socket is ``@`` and this."""
    return f"llmgw-front-door-{secrets.token_hex(8)}"


def peer_uid(conn: socket.socket) -> int:
    """The user of the process at the other end of a Unix socket."""
    _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


def tcp_socket(host: str) -> socket.socket:
    """An unbound TCP socket for ``host``: IPv6 for an IPv6 address, and for
    ``::`` IPv4 too, whatever the system's default (``net.ipv6.bindv6only``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6 and host.strip("[]") == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


class SocketKeeper:
    """Binds ``host:port`` and listens (OSError when the port is taken), and
    hands the socket to each ingress replica of this user that asks the
    keeper ``name``, until ``close``."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.socket = tcp_socket(host)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the replicas' sockets join it
            self.socket.bind((host, port))
            self.socket.listen(BACKLOG)
            self._server.bind("\0" + name)
            self._server.listen(64)
        except OSError:
            self.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="front-door-keeper", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            with conn, contextlib.suppress(OSError):
                if peer_uid(conn) == os.getuid():
                    socket.send_fds(conn, [b"L"], [self.socket.fileno()])

    def close(self) -> None:
        """Stops handing the socket out and closes this process's copy (the
        replicas' copies stay open until they stop)."""
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept above
        self._server.close()
        self.socket.close()


def kept_socket(port: int) -> socket.socket | None:
    """The listening socket on ``port`` that the keeper this process's
    environment names holds, for this process to accept from; None where
    none is named or it does not answer as this user. OSError when it
    answered but what it sent is not such a socket."""
    if not (name := os.environ.get(KEEPER_VARIABLE)):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(ASK_TIMEOUT_S)
        try:
            conn.connect("\0" + name)
        except ConnectionRefusedError:
            logger.warning("the front door's keeper %s does not answer: listening on a socket of its own", name)
            return None
        if (uid := peer_uid(conn)) != os.getuid():
            logger.warning("the front door's keeper %s runs as user %s, not this one: ignored", name, uid)
            return None
        _, fds, _, _ = socket.recv_fds(conn, 1, 1)
    if len(fds) != 1:
        raise OSError(f"the front door's keeper {name} sent no socket")
    sock = socket.socket(fileno=fds[0])
    sock.set_inheritable(False)  # as every socket Python makes (recv_fds leaves it inheritable)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening or sock.getsockname()[1] != port:
        sock.close()
        raise OSError(f"the front door's keeper {name} sent another socket than one listening on {port}")
    return sock
