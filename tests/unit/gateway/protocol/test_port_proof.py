"""gateway/protocol/port_proof.py: a port proves it holds its token before a caller sends it anything."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from gateway.protocol import port_proof

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def listening(handler: Handler) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection to a port that ``handler`` serves."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        yield reader, writer
    finally:
        writer.close()
        server.close()


class Impostor:
    """A port another process took at an address callers still know: it
    answers their challenge without the token, and keeps what it hears."""

    def __init__(self) -> None:
        self.heard: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listens; returns its port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.heard.append(await reader.readline())
        writer.write(port_proof.answer("guess", port_proof.nonce_of(self.heard[0])))
        self.heard.append(await reader.read())
        writer.close()

    async def heard_only_a_challenge(self) -> bool:
        """Whether the caller sent its challenge, then closed: no token, nothing else."""
        for _ in range(100):
            if len(self.heard) == 2:
                break
            await asyncio.sleep(0.01)
        return bool(port_proof.nonce_of(self.heard[0])) and self.heard[1:] == [b""]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_the_token_holder_answers_and_the_caller_goes_on() -> None:
    after: list[bytes] = []

    async def port(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await port_proof.prove(reader, writer, "secret", 1):
            after.append(await reader.readline())
        writer.close()

    async with listening(port) as (reader, writer):
        await port_proof.check(reader, writer, "secret", 1)
        writer.write(b"the request\n")
        await writer.drain()
        for _ in range(100):
            if after:
                break
            await asyncio.sleep(0.01)
    assert after == [b"the request\n"]


async def test_each_challenge_is_new_and_its_answer_differs() -> None:
    (one, line_one), (two, line_two) = port_proof.challenge(), port_proof.challenge()
    assert one != two and len(one) == port_proof.NONCE_BYTES
    assert port_proof.nonce_of(line_one) == one and port_proof.nonce_of(line_two) == two
    assert port_proof.answer("secret", one) != port_proof.answer("secret", two)
    assert port_proof.answer("secret", one) != port_proof.answer("other", one)


async def wrong_token(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await port_proof.prove(reader, writer, "a guess", 1)
    await reader.read()
    writer.close()


async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())  # answers with the challenge itself
    await reader.read()
    writer.close()


async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


@pytest.mark.parametrize("impostor", [wrong_token, echoes, closes, silent])
async def test_a_port_that_cannot_prove_the_token_is_an_impostor(impostor: Handler) -> None:
    async with listening(impostor) as (reader, writer):
        with pytest.raises(port_proof.PortImpostorError):
            await port_proof.check(reader, writer, "secret", 0.2)


@pytest.mark.parametrize(
    "sent",
    [
        b"POST /relay/chat HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer x\r\n\r\n",  # no challenge first
        port_proof.PREFIX + b"zz" * port_proof.NONCE_BYTES + b"\r\n",  # not hex
        port_proof.PREFIX + b"00" * port_proof.NONCE_BYTES + b"\n\n",  # not its line's end
    ],
)
async def test_a_port_answers_nothing_but_a_challenge(sent: bytes) -> None:
    proved: list[bool] = []

    async def port(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proved.append(await port_proof.prove(reader, writer, "secret", 1))
        writer.close()

    async with listening(port) as (reader, writer):
        writer.write(sent)
        assert await asyncio.wait_for(reader.read(), 2) == b""
    assert proved == [False]


async def test_a_caller_that_says_nothing_is_not_waited_for_longer_than_asked() -> None:
    proved: list[bool] = []

    async def port(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proved.append(await port_proof.prove(reader, writer, "secret", 0.1))
        writer.close()

    async with listening(port) as (reader, _):
        assert await asyncio.wait_for(reader.read(), 2) == b""
    assert proved == [False]
