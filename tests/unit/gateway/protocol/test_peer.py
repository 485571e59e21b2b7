"""gateway/protocol/peer.py: a write to a connection already lost raises
ConnectionResetError, on asyncio's own loop and on uvloop's (the one Ray
Serve runs the ingress and the replicas on), where a plain StreamWriter
raises RuntimeError."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.protocol import port_proof
from gateway.protocol.peer import PeerWriter

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(scenario())


def reset(writer: asyncio.StreamWriter) -> None:
    """Closes ``writer``'s connection with a reset (RST), as a process killed mid-connection does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def proving_then_resetting(token: str) -> tuple[asyncio.Server, int]:
    """A port that proves it holds ``token`` to each new connection, then
    resets it (its process killed as a caller connects); and its number."""

    async def proves_then_resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await port_proof.prove(reader, writer, token, 2)
        reset(writer)

    server = await asyncio.start_server(proves_then_resets, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def lost_connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Server]:
    """A connection whose peer reset it, once this side has seen the reset."""
    server = await asyncio.start_server(lambda _, writer: reset(writer), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    with pytest.raises(ConnectionResetError):
        await reader.read()
    for _ in range(3):  # uvloop releases the handle a turn later
        await asyncio.sleep(0)
    return reader, writer, server


@pytest.mark.parametrize("loop", LOOPS)
def test_a_write_after_the_peer_reset_the_connection_raises_connection_reset(loop: str) -> None:
    async def scenario() -> None:
        reader, writer, server = await lost_connection()
        peer = PeerWriter.over(reader, writer)
        try:
            for write in (lambda: peer.write(b"x"), lambda: peer.writelines([b"x"]), peer.write_eof):
                with pytest.raises(ConnectionResetError):
                    write()
        finally:
            peer.close()
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_writer_over_an_opened_connection_keeps_it_open_and_writes_through(loop: str) -> None:
    async def scenario() -> None:
        served = asyncio.Event()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(await reader.readline())
                await writer.drain()
                await reader.read()
            finally:
                writer.close()
                served.set()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        peer = PeerWriter.over(reader, writer)
        del writer  # (asyncio's writer closes its connection when collected)
        gc.collect()
        try:
            peer.write(b"ping\n")
            await peer.drain()
            assert await reader.readline() == b"ping\n"
        finally:
            peer.close()
            await served.wait()
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)
