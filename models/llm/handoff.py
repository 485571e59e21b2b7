"""A replica's handoff port: an ingress on the same host hands over its
client's socket for one stream, and the replica writes the stream there
itself (``gateway.protocol.relay``, "Handing over the client's socket").

The port is an abstract Unix socket (no file to clean up; it goes with the
process) of type ``SOCK_SEQPACKET``: each message is one ticket with one
file descriptor. Only processes of this replica's user may connect, and a
socket counts only with a ticket this replica gave out on a relay
connection (which itself takes the relay's token).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import struct
from typing import Any

from gateway.protocol import relay

_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


class HandoffPort:
    """Takes clients' sockets for the tickets it is told to expect."""

    def __init__(self) -> None:
        self.name = f"llmgw-handoff-{secrets.token_hex(8)}"
        self._listener: socket.socket | None = None
        self._peers: set[socket.socket] = set()
        self._waiting: dict[bytes, asyncio.Future[socket.socket]] = {}

    def start(self) -> str:
        """Listens; returns the port's name (``RelayAddress.handoff``)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind("\0" + self.name)
        listener.listen(relay.BACKLOG)
        listener.setblocking(False)
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)
        self._listener = listener
        return self.name

    def stop(self) -> None:
        """Takes no more sockets; a stream still waiting for one is told so (ConnectionError)."""
        loop = asyncio.get_running_loop()
        for sock in [self._listener, *self._peers]:
            if sock is not None:
                loop.remove_reader(sock.fileno())
                sock.close()
        self._listener = None
        self._peers.clear()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the handoff port closed"))
        self._waiting.clear()

    def ticket(self) -> tuple[bytes, asyncio.Future[socket.socket]]:
        """A new ticket, and what gets the client's socket handed over with it."""
        ticket = secrets.token_bytes(relay.TICKET_BYTES)
        waiter: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self._waiting[ticket] = waiter
        return ticket, waiter

    def forget(self, ticket: bytes) -> None:
        """The ticket's stream no longer waits (a socket handed over later is closed)."""
        waiter = self._waiting.pop(ticket, None)
        if waiter is not None:
            waiter.cancel()

    async def decision(
        self, ticket: bytes, waiter: asyncio.Future[socket.socket], reader: asyncio.StreamReader
    ) -> socket.socket | bool:
        """What the ingress makes of the ticket it was given: the client's
        socket; True when it relays the stream itself (``RELAY_OWN``); False
        when it left (or sent anything else).

        A relay connection that ends without ``LEFT`` lost its ingress, not
        its client: a socket the ingress sent before it died is the stream's
        even when the end is seen first, or in the same turn of the loop."""
        said = asyncio.ensure_future(reader.read(1))
        either: set[asyncio.Future[Any]] = {waiter, said}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not said.done() and (waiter.cancelled() or waiter.exception() is not None):
                await said  # the port closed: the ingress's send failed, it says so here
            if not waiter.done() and _ended(said):
                self._take_queued()  # the socket it sent last may be in the port's queue still
        finally:
            self.forget(ticket)
            said.cancel()
            await asyncio.wait({said})
        answer = None if not said.done() or said.cancelled() or said.exception() is not None else said.result()
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            if answer not in (None, b"", relay.RELAY_OWN):  # its client left
                waiter.result().close()
                return False
            return waiter.result()
        return answer == relay.RELAY_OWN

    def _take_queued(self) -> None:
        """Takes every socket already sent to the port, as the loop would at its next turns."""
        if self._listener is not None:
            self._accept()
        for peer in list(self._peers):
            self._receive(peer)

    def _accept(self) -> None:
        """Accepts every connection waiting: one per socket to be handed over."""
        assert self._listener is not None
        while True:
            try:
                peer, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            _pid, uid, _gid = _CREDENTIALS.unpack(
                peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
            )
            if uid != os.getuid():
                peer.close()
                continue
            peer.setblocking(False)
            self._peers.add(peer)
            asyncio.get_running_loop().add_reader(peer.fileno(), self._receive, peer)

    def _receive(self, peer: socket.socket) -> None:
        try:
            message, fds, _, _ = socket.recv_fds(peer, relay.TICKET_BYTES + 1, 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message, fds = b"", []
        if not message and not fds:  # the ingress closed its end
            asyncio.get_running_loop().remove_reader(peer.fileno())
            self._peers.discard(peer)
            peer.close()
            return
        waiter = self._waiting.pop(message, None)
        if waiter is None or waiter.done() or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        waiter.set_result(socket.socket(fileno=fds[0]))


def _ended(said: asyncio.Future[bytes]) -> bool:
    """Whether the relay connection ended (or broke) without a word from the ingress."""
    return said.done() and not said.cancelled() and (said.exception() is not None or not said.result())


class ClientSocket:
    """The client's socket as a replica writes a stream to it: each write one
    HTTP chunk of a chunked body (the ingress wrote the head), then the last
    chunk once the stream has ended (``end``). Never reads, and never shuts
    the socket down unless bytes were left unsent: the ingress still owns
    the connection."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock  # non-blocking: the ingress's own socket, shared
        self._loop = asyncio.get_running_loop()
        self._backlog = bytearray()
        self._broken: OSError | None = None
        self._flushed: asyncio.Future[None] | None = None
        self._watching = False  # for the socket to be writable

    def write(self, data: bytes) -> None:
        """Writes ``data`` as one chunk at the loop's next turn, with every
        chunk written to this socket before then; raises ConnectionError once
        the client has gone.

        One engine step wakes every stream it advanced in the same turn of
        the loop, so their chunks leave back to back at the next: the front
        door and the client each wake once for the step's bytes, not once
        per stream (at 32 streams on 2 vCPUs, a quarter fewer wake-ups per
        token for each of the replica, HAProxy and the client)."""
        if self._broken is not None:
            raise ConnectionResetError(str(self._broken))
        if not self._backlog:
            self._loop.call_soon(self._send)
        self._backlog += b"%x\r\n%b\r\n" % (len(data), data)

    def _send(self) -> None:
        """Sends what the socket takes now; watches for it to be writable
        while bytes are left."""
        if self._broken is not None or not self._backlog:
            return
        try:
            sent = self._sock.send(self._backlog)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._break(exc)
            return
        del self._backlog[:sent]
        if self._backlog and not self._watching:
            self._watching = True
            self._loop.add_writer(self._sock.fileno(), self._send)
        elif not self._backlog:
            if self._watching:
                self._watching = False
                self._loop.remove_writer(self._sock.fileno())
            self._wake()

    def end(self) -> None:
        """Ends the chunked body after every chunk written, in the same send
        as the last of them where it has not left yet: the client has the
        whole answer as the stream's last frame reaches it, without waiting
        for the ingress. ``drain`` waits for it to be sent."""
        if self._broken is None:
            if not self._backlog:
                self._loop.call_soon(self._send)
            self._backlog += b"0\r\n\r\n"

    def get_write_buffer_size(self) -> int:
        return len(self._backlog)

    async def drain(self) -> None:
        """Returns once every byte written is in the socket; raises ConnectionError if the client went."""
        if self._backlog and self._broken is None:
            if self._flushed is None:
                self._flushed = self._loop.create_future()
            await asyncio.shield(self._flushed)
        if self._broken is not None:
            raise ConnectionResetError(str(self._broken))

    def close(self) -> None:
        """Closes this process's copy of the socket, after sending what it
        takes at once. With bytes still unsent, the connection itself is shut
        down: the client could not tell what it missed, and nothing written
        after a half-written chunk could be read."""
        self._watching = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(self._sock.fileno())
        if self._backlog and self._broken is None:
            with contextlib.suppress(OSError):
                del self._backlog[: self._sock.send(self._backlog)]
        if self._backlog and self._broken is None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._backlog.clear()
        self._sock.close()
        self._wake()

    def _break(self, exc: OSError) -> None:
        self._broken = exc
        self._watching = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(self._sock.fileno())
        self._backlog.clear()
        self._wake()

    def _wake(self) -> None:
        flushed, self._flushed = self._flushed, None
        if flushed is not None and not flushed.done():
            flushed.set_result(None)
