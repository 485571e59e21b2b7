"""Connections from an ingress to its LLM replicas' relay ports: opened
with a protocol that can hand each read to a forwarder (``RelayProtocol``),
and kept between requests (``ConnectionPool``)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Protocol

from gateway.protocol import port_proof, relay
from gateway.protocol.peer import PeerWriter

READ_BYTES = 64 * 1024
# Connections to a replica are kept for its next request once an answer has
# been read to its end: at most KEEP_PER_REPLICA idle ones, none used again
# after KEEP_IDLE_S idle (the replica closes its own later:
# models.llm.relay.IDLE_S).
KEEP_PER_REPLICA = 64
KEEP_IDLE_S = 20.0
# A new connection's port answers its challenge in this long, or is not the replica.
PROOF_TIMEOUT_S = 10.0
# A replica's host that takes this long to accept a connection is taken for gone.
CONNECT_TIMEOUT_S = 10.0
# A replica's host that vanishes without a reset (power lost, partitioned) is
# found out by TCP keepalive: probes after KEEP_ALIVE_IDLE_S of silence (a
# long prefill says nothing; a live host's kernel answers them), every
# KEEP_ALIVE_INTERVAL_S, KEEP_ALIVE_PROBES unanswered: the connection fails,
# and its client gets the error instead of waiting for ever. Data unacknowledged
# for DEAD_PEER_S fails it too.
KEEP_ALIVE_IDLE_S = 10
KEEP_ALIVE_INTERVAL_S = 5
KEEP_ALIVE_PROBES = 3
DEAD_PEER_S = 30

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Forwarder(Protocol):
    """Takes a relay connection's reads while set on its protocol."""

    def feed(self, data: bytes) -> None: ...

    def cut(self, why: str) -> None: ...


class RelayReader(asyncio.StreamReader):
    def take_held(self) -> bytes:
        """The bytes read from the socket and not yet from this reader, taken
        from it without waiting (which StreamReader has no public way to do)."""
        held = bytes(self._buffer)  # type: ignore[attr-defined]
        self._buffer.clear()  # type: ignore[attr-defined]
        self._maybe_resume_transport()  # type: ignore[attr-defined]
        return held


class RelayProtocol(asyncio.StreamReaderProtocol):
    """A relay connection's protocol: one kept idle that the replica closes is
    closed here too; while ``forward`` is set, what arrives goes to it instead
    of the reader."""

    idle = False
    forward: Forwarder | None = None

    def data_received(self, data: bytes) -> None:
        forward = self.forward
        if forward is None:
            super().data_received(data)
        else:
            forward.feed(data)

    def eof_received(self) -> bool:
        if self.forward is not None:
            self.forward.cut("the replica closed the stream before its end")
        keep_open = super().eof_received()
        return bool(keep_open) and not self.idle

    def connection_lost(self, exc: Exception | None) -> None:
        if self.forward is not None:
            self.forward.cut(str(exc) if exc is not None else "the replica's connection was lost")
        super().connection_lost(exc)


async def connect(address: relay.RelayAddress) -> Connection:
    """A new connection to the replica at ``address`` (``asyncio.open_connection``'s, with ``RelayProtocol``),
    once its port has proved it holds the replica's token (``port_proof``:
    else ``PortImpostorError``, and nothing is sent there)."""
    loop = asyncio.get_running_loop()
    reader = RelayReader(loop=loop)
    protocol = RelayProtocol(reader, loop=loop)
    transport, _ = await asyncio.wait_for(
        loop.create_connection(lambda: protocol, address.host, address.port), CONNECT_TIMEOUT_S
    )
    sock = transport.get_extra_info("socket")
    if sock is not None:
        watch_peer(sock)
    writer = PeerWriter(transport, protocol, reader, loop)
    try:
        await port_proof.check(reader, writer, address.token, PROOF_TIMEOUT_S)
    except BaseException:
        writer.close()
        raise
    return reader, writer


def watch_peer(sock: socket.socket, unacknowledged: bool = True) -> None:
    """Has the kernel find out a peer that is gone without a word (see
    KEEP_ALIVE_IDLE_S); with ``unacknowledged``, also one that stops
    acknowledging what is sent to it (``TCP_USER_TIMEOUT``): not for a
    replica's side, whose writes may wait on an ingress that reads no faster
    than its client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEP_ALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEP_ALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEP_ALIVE_PROBES)
    if unacknowledged:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_S * 1000)


# A kept connection: since when it is idle, its reader, writer and protocol
# (its transport forgets the protocol once closed).
_Kept = tuple[float, asyncio.StreamReader, asyncio.StreamWriter, RelayProtocol]


class ConnectionPool:
    """Idle connections to one model's replicas, the most recently used first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._idle: dict[relay.RelayAddress, list[_Kept]] = {}

    def take(self, address: relay.RelayAddress) -> Connection | None:
        """A kept connection to ``address`` still open, if there is one."""
        kept = self._idle.get(address)
        now = self._clock()
        while kept:
            since, reader, writer, protocol = kept.pop()
            protocol.idle = False
            if now - since < KEEP_IDLE_S and not writer.transport.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    def give(self, address: relay.RelayAddress, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Keeps a connection whose answer has been read to its end (or closes it)."""
        kept = self._idle.setdefault(address, [])
        protocol = writer.transport.get_protocol()
        if (
            not isinstance(protocol, RelayProtocol)
            or len(kept) >= KEEP_PER_REPLICA
            or writer.transport.is_closing()
            or reader.at_eof()
        ):
            writer.close()
            return
        protocol.idle = True
        kept.append((self._clock(), reader, writer, protocol))

    def idle(self, address: relay.RelayAddress) -> int:
        """How many connections to ``address`` are kept (open or not yet seen closed)."""
        return len(self._idle.get(address, ()))

    def drop(self, address: relay.RelayAddress | None = None) -> None:
        """Closes the kept connections to ``address`` (None: to every replica)."""
        for key in [address] if address is not None else list(self._idle):
            for _, _, writer, _ in self._idle.pop(key, ()):
                writer.close()


class StreamCutError(ConnectionError):
    """The replica's stream ended without its end mark: the replica failed mid-stream."""
