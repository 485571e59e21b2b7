"""The ingress's side of a handoff (``gateway.protocol.relay``, "Handing over
the client's socket"): a stream's ticket sent with the client's socket to
the replica's handoff port, one short connection per stream."""

from __future__ import annotations

import asyncio
import os
import socket

from gateway.http.front_door_socket import peer_uid
from gateway.protocol import relay

# Streams of these endpoints may be handed over: their error frame after a
# cut needs nothing of what was sent (a Responses stream's numbers its event
# after the last one).
ENDPOINTS = frozenset({"chat", "completion", "messages"})


def _connect(address: relay.RelayAddress) -> socket.socket:
    """A connection to the replica's handoff port; OSError unless a process
    of this user listens there (a name left by a replica that stopped may
    be bound by anyone: no client's socket goes to another user)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.setblocking(False)
        sock.connect("\0" + address.handoff)  # a full backlog raises BlockingIOError
        if peer_uid(sock) != os.getuid():
            raise PermissionError(f"the handoff port {address.handoff} is another user's")
    except BaseException:
        sock.close()
        raise
    return sock


def reachable(address: relay.RelayAddress) -> bool:
    """Whether the replica at ``address`` has a handoff port on this host
    (an abstract socket: a replica elsewhere has none here)."""
    if not address.handoff:
        return False
    try:
        _connect(address).close()
    except OSError:
        return False
    return True


async def hand_over(address: relay.RelayAddress, ticket: bytes, fd: int) -> None:
    """Sends the client's socket ``fd`` with ``ticket`` to the replica at
    ``address``; raises OSError when its port takes nothing."""
    with _connect(address) as sock:
        while True:
            try:
                socket.send_fds(sock, [ticket], [fd])
                return
            except (BlockingIOError, InterruptedError):
                await _writable(sock)


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    writable: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock.fileno(), _wake, writable)
    try:
        await writable
    finally:
        loop.remove_writer(sock.fileno())


def _wake(writable: asyncio.Future[None]) -> None:
    if not writable.done():
        writable.set_result(None)
