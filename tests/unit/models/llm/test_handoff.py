"""models/llm/handoff.py with gateway/http/handoff.py: clients' sockets handed to a
replica's port with a ticket, and the replica's chunked writes to them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from gateway.http.handoff import hand_over, reachable
from gateway.protocol import relay
from models.llm.handoff import ClientSocket, HandoffPort
from tests.unit.models.llm.test_relay import BURST, listen_queue_limit


@asynccontextmanager
async def started_port() -> AsyncIterator[tuple[HandoffPort, relay.RelayAddress]]:
    port = HandoffPort()
    name = port.start()
    try:
        yield port, relay.RelayAddress("127.0.0.1", 1, "t", handoff=name)
    finally:
        port.stop()


@contextmanager
def client_pair(small: bool = False) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair: the ingress's socket to its client, and the
    client's end (``small``: both with small buffers, set before connecting)."""
    with socket.socket() as listener:
        if small:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours = socket.socket()
        if small:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours.connect(listener.getsockname())
        theirs, _ = listener.accept()
    ours.setblocking(False)
    with ours, theirs:
        yield ours, theirs


async def readable_eof(sock: socket.socket, timeout_s: float = 2.0) -> bytes:
    """Everything ``sock`` receives until its peer's end is closed."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout_s):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return data


async def test_a_socket_handed_over_with_its_ticket_reaches_the_stream_waiting_for_it() -> None:
    async with started_port() as (port, address):
        assert reachable(address)
        ticket, waiter = port.ticket()
        with client_pair() as (ours, theirs):
            await hand_over(address, ticket, ours.fileno())
            handed = await asyncio.wait_for(waiter, 2)
            with handed:
                handed.send(b"from the replica")
            assert theirs.recv(100) == b"from the replica"


async def test_a_burst_of_handovers_waits_for_a_busy_replica_in_the_kernel() -> None:
    # Past the port's queue an ingress finds it full and relays the stream
    # itself: every byte of it then crosses the ingress.
    async with started_port() as (_, address):
        socks: list[socket.socket] = []
        try:
            for _ in range(BURST):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                socks.append(sock)
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):  # the queue is full
                    sock.connect("\0" + address.handoff)
            # The event loop has not run since: the port has accepted none of them.
            connected = sum(1 for sock in socks if peer_of(sock))
            assert connected == min(BURST, listen_queue_limit() + 1)
        finally:
            for sock in socks:
                sock.close()


def peer_of(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def test_a_socket_with_a_ticket_nobody_gave_out_is_closed_unused() -> None:
    async with started_port() as (port, address):
        _, waiter = port.ticket()
        with client_pair() as (ours, theirs):
            await hand_over(address, os.urandom(relay.TICKET_BYTES), ours.fileno())
            ours.close()  # only the port's copy could keep the connection open now
            assert await readable_eof(theirs) == b""
        assert not waiter.done()


async def test_a_port_that_is_gone_is_not_reachable_and_takes_nothing() -> None:
    async with started_port() as (_, address):
        pass
    assert not reachable(address)
    assert not reachable(address._replace(handoff=""))
    with client_pair() as (ours, _), pytest.raises(OSError):
        await hand_over(address, os.urandom(relay.TICKET_BYTES), ours.fileno())


@pytest.mark.parametrize(("said", "expected"), [(relay.RELAY_OWN, True), (b"", False), (b"x", False)])
async def test_the_ingress_relays_the_stream_itself_or_leaves(said: bytes, expected: bool) -> None:
    async with started_port() as (port, _):
        ticket, waiter = port.ticket()
        reader = asyncio.StreamReader()
        if said:
            reader.feed_data(said)
        else:
            reader.feed_eof()
        assert await port.decision(ticket, waiter, reader) is expected
        assert waiter.cancelled()  # a socket handed over later would be closed


async def test_the_ingress_hands_over_its_socket_as_the_decision() -> None:
    async with started_port() as (port, address):
        ticket, waiter = port.ticket()
        reader = asyncio.StreamReader()
        with client_pair() as (ours, _):
            decided = asyncio.ensure_future(port.decision(ticket, waiter, reader))
            await hand_over(address, ticket, ours.fileno())
            handed = await asyncio.wait_for(decided, 2)
            assert isinstance(handed, socket.socket)
            handed.close()


@pytest.mark.parametrize("taken", [True, False], ids=["socket taken", "socket still queued"])
async def test_a_socket_sent_by_an_ingress_that_died_at_once_carries_the_stream_on(taken: bool) -> None:
    # Its relay connection ends without LEFT (the process died, not the client) in the same
    # turn of the replica's loop as its socket is taken, or before the port has taken it.
    async with started_port() as (port, address):
        ticket, waiter = port.ticket()
        reader = asyncio.StreamReader()
        with client_pair() as (ours, theirs):
            await hand_over(address, ticket, ours.fileno())
            if taken:
                await asyncio.wait({waiter}, timeout=2)
                assert waiter.done()
            reader.feed_eof()
            handed = await asyncio.wait_for(port.decision(ticket, waiter, reader), 2)
            assert isinstance(handed, socket.socket)
            ours.close()  # the dead ingress's copy
            with handed:
                handed.send(b"from the replica")
            assert await readable_eof(theirs) == b"from the replica"


async def test_a_socket_whose_client_left_before_the_decision_is_closed() -> None:
    async with started_port() as (port, address):
        ticket, waiter = port.ticket()
        reader = asyncio.StreamReader()
        with client_pair() as (ours, theirs):
            await hand_over(address, ticket, ours.fileno())
            await asyncio.wait({waiter}, timeout=2)
            reader.feed_data(relay.LEFT)
            assert await port.decision(ticket, waiter, reader) is False
            ours.close()  # the ingress's copy: only the replica's could keep the connection open
            assert await readable_eof(theirs) == b""


async def test_a_stopping_port_tells_the_streams_still_waiting() -> None:
    port = HandoffPort()
    port.start()
    _, waiter = port.ticket()
    port.stop()
    with pytest.raises(ConnectionError):
        await waiter


async def test_each_write_is_one_chunk_and_a_slow_client_gets_every_byte_after_a_drain() -> None:
    with client_pair(small=True) as (ours, theirs):
        client = ClientSocket(socket.socket(fileno=os.dup(ours.fileno())))
        frames = [b"data: %d %s\n\n" % (i, b"x" * 5000) for i in range(100)]
        for frame in frames:
            client.write(frame)
        assert client.get_write_buffer_size() > 0  # the client has not read: held here
        drained = asyncio.ensure_future(client.drain())
        await asyncio.sleep(0.05)
        assert not drained.done()
        reading = asyncio.ensure_future(readable_eof(theirs, timeout_s=5))
        await asyncio.wait_for(drained, 5)
        assert client.get_write_buffer_size() == 0
        client.close()
        ours.close()  # the ingress's copy: the client now sees the end
        body = await reading
    expected = b"".join(b"%x\r\n%b\r\n" % (len(frame), frame) for frame in frames)
    assert body == expected


async def test_closing_with_a_chunk_half_written_ends_the_connection_itself() -> None:
    with client_pair(small=True) as (ours, theirs):
        client = ClientSocket(socket.socket(fileno=os.dup(ours.fileno())))
        for _ in range(50):
            client.write(b"y" * 10_000)
        assert client.get_write_buffer_size() > 0
        client.close()
        # The ingress still holds its copy, yet the client sees the end: no
        # later chunk could follow a torn one.
        data = await readable_eof(theirs)
        assert 0 < len(data) < 50 * 10_000


async def test_writing_to_a_client_that_is_gone_raises_connection_error() -> None:
    with client_pair() as (ours, theirs):
        client = ClientSocket(socket.socket(fileno=os.dup(ours.fileno())))
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        theirs.close()  # a reset
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectionError):
            for _ in range(3):
                client.write(b"data: 1\n\n")
                await asyncio.sleep(0.01)
        client.close()


class CountedSocket(socket.socket):
    """A socket that counts its sends."""

    sends = 0

    def send(self, data: Any, flags: int = 0) -> int:
        self.sends += 1
        return super().send(data, flags)


async def test_chunks_written_in_one_turn_of_the_loop_leave_in_one_send() -> None:
    with client_pair() as (ours, theirs):
        counted = CountedSocket(fileno=os.dup(ours.fileno()))
        client = ClientSocket(counted)
        for i in range(3):
            client.write(b"data: %d\n\n" % i)
        assert counted.sends == 0  # nothing leaves before the loop turns
        await asyncio.sleep(0)
        assert counted.sends == 1
        await client.drain()
        client.write(b"data: 3\n\n")
        await client.drain()
        assert counted.sends == 2
        client.close()
        ours.close()
        body = await readable_eof(theirs)
    assert body == b"".join(b"%x\r\ndata: %d\n\n\r\n" % (len(b"data: 0\n\n"), i) for i in range(4))


async def test_closing_sends_what_was_written_and_keeps_the_connection() -> None:
    with client_pair() as (ours, theirs):
        client = ClientSocket(socket.socket(fileno=os.dup(ours.fileno())))
        client.write(b"data: last\n\n")
        client.close()  # before the loop turned: still sent, whole
        ours.send(b"0\r\n\r\n")  # the ingress's copy still works: it ends the body itself
        ours.close()
        body = await readable_eof(theirs)
    assert body == b"c\r\ndata: last\n\n\r\n0\r\n\r\n"


async def test_the_body_ends_in_the_same_send_as_the_last_chunk() -> None:
    """The client has the whole answer as its last frame arrives, as from
    ``vllm serve``: no wait for the ingress to end the body."""
    with client_pair() as (ours, theirs):
        counted = CountedSocket(fileno=os.dup(ours.fileno()))
        client = ClientSocket(counted)
        client.write(b"data: [DONE]\n\n")
        client.end()
        await client.drain()
        assert counted.sends == 1
        client.close()
        ours.close()
        body = await readable_eof(theirs)
    assert body == b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
