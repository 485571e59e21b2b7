"""gateway/http/relay.py and relay_stream.py with models/llm/relay.py over a
connection that delivers the replica's bytes a few at a time, as TCP may:
heads, first frames, end marks and outcome lines split anywhere are read
the same, and the connection is kept for the next request."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from gateway import sse
from gateway.errors import InvalidRequestError
from gateway.http.relay import ReplicaRelay
from gateway.http.relay_stream import StreamCutError
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from models.llm.relay import StreamServer
from models.llm.tally import GenerationTally
from tests.unit.gateway.http.test_handoff import ClientSocketSink
from tests.unit.gateway.http.test_relay import CALL, OUTCOME, Router
from tests.unit.gateway.http.test_relay_answers import whole
from tests.unit.gateway.http.test_relay_response import Written, _unchunk, frames_server, uvicorn_serving
from tests.unit.models.llm.test_handoff import client_pair, readable_eof


Passing = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Proxy:
    """A TCP proxy in front of a replica's port: the replica's bytes go
    through ``passing``, the ingress's through ``upstream`` (each until their
    end, which it passes on; ``passed_as_is``: as they come). ``close`` ends
    every connection."""

    def __init__(self, target: relay.RelayAddress, passing: Passing, upstream: Passing | None = None) -> None:
        self._target, self._passing, self._upstream = target, passing, upstream or passed_as_is
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> relay.RelayAddress:
        self._server = await asyncio.start_server(self._proxied, "127.0.0.1", 0)
        return self._target._replace(port=self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _proxied(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        their_reader, their_writer = await asyncio.open_connection(self._target.host, self._target.port)
        self._writers += [writer, their_writer]
        with contextlib.suppress(ConnectionError):
            await asyncio.gather(self._upstream(reader, their_writer), self._passing(their_reader, writer))
        writer.close()
        their_writer.close()


async def passed_as_is(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


def trickled(seed: int) -> Passing:
    """Passes bytes on in pieces of 1 to 7, each sent on its own (and so
    each read on its own), as TCP may deliver them."""
    pieces = random.Random(seed)

    async def passing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(0)
        while data := await reader.read(65536):
            while data:
                size = pieces.randint(1, 7)
                writer.write(data[:size])
                data = data[size:]
                await writer.drain()
                await asyncio.sleep(0)  # a turn of the loop: the next piece is another segment
        writer.write_eof()

    return passing


FRAMES = [sse.frame({"n": i, "text": "x" * i}) for i in range(12)] + [sse.DONE]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("immediate", [True, False], ids=["forwarded", "sent"])
async def test_a_relayed_stream_split_anywhere_arrives_whole_with_its_outcome(immediate: bool, seed: int) -> None:
    replica = frames_server(FRAMES, handoff=False)
    proxy = Proxy(await replica.start(), trickled(seed))
    address = await proxy.start()
    streams = ReplicaRelay(Router(address))
    for _ in range(3):
        stream = await streams.open(CALL)
        sink = Written()
        sink.immediate = immediate
        assert await asyncio.wait_for(stream.pipe(sink), 5) is True
        assert b"".join(sink.data) == b"".join(FRAMES) and stream.outcome == OUTCOME
        assert all(data.endswith(b"\n\n") for data in sink.data)  # each write whole events
    assert replica.accepted == 1  # one connection carried all three
    proxy.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_handed_over_stream_whose_outcome_comes_split_ends_whole(seed: int) -> None:
    replica = frames_server(FRAMES)
    proxy = Proxy(await replica.start(), trickled(seed))
    address = await proxy.start()
    streams = ReplicaRelay(Router(address))
    for _ in range(3):
        stream = await streams.open(CALL)
        with client_pair() as (ours, theirs):
            sink = ClientSocketSink(ours)
            assert await asyncio.wait_for(stream.pipe(sink), 5) is True
            ours.close()
            body = await readable_eof(theirs)
        assert stream.handed_off and stream.outcome == dataclasses.replace(OUTCOME, body_ended=True)
        assert _unchunk(body) == b"".join(FRAMES) and body.count(b"\r\n0\r\n\r\n") == 1
    assert replica.accepted == 1
    proxy.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_whole_answers_and_errors_split_anywhere_arrive_as_sent(seed: int) -> None:
    body = b'{"choices":[{"text":"' + b"y" * 40 + b'"}]}'
    call = EngineRequest("chat", {"model": "m"}, "r", "m")
    proxy = Proxy(await whole(Reply(body, OUTCOME), asyncio.Event(), asyncio.Event()), trickled(seed))
    address = await proxy.start()
    streams = ReplicaRelay(Router(address))
    for _ in range(3):
        assert await asyncio.wait_for(streams.call(call), 5) == Reply(body, OUTCOME)
    proxy.close()
    error = InvalidRequestError("bad", param="max_tokens")
    proxy = Proxy(await whole(error, asyncio.Event(), asyncio.Event()), trickled(seed))
    address = await proxy.start()
    streams = ReplicaRelay(Router(address))
    for _ in range(2):
        with pytest.raises(InvalidRequestError) as caught:
            await asyncio.wait_for(streams.call(call), 5)
        assert caught.value.to_dict() == error.to_dict()
    proxy.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_background_answer_done_at_once_reports_its_outcome_when_its_line_is_in(seed: int) -> None:
    """Nothing left to generate: the replica keeps the connection for another
    request, and the outcome (split from its END) is not held until the
    replica closes that connection for idleness."""

    async def answer(request: EngineRequest, tally: GenerationTally) -> Reply:
        tally.prompt_tokens, tally.completion_tokens = 4, 1
        return Reply(b'{"status":"completed"}', tally.outcome())

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    proxy = Proxy(await StreamServer(no_streams, "127.0.0.1", answer=answer).start(), trickled(seed))
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    call = EngineRequest("responses", {"model": "m", "background": True}, "r", "m")
    relayed = ReplicaRelay(Router(await proxy.start()))
    assert (await asyncio.wait_for(relayed.call(call, later=reported.set_result), 5)).body == b'{"status":"completed"}'
    outcome = await asyncio.wait_for(reported, 5)
    assert outcome is not None and (outcome.prompt_tokens, outcome.completion_tokens) == (4, 1)
    proxy.close()


def cut_inside(frame: bytes) -> Passing:
    """Passes the replica's bytes on up to the middle of ``frame``, at once,
    then closes the connection: a replica that died as it wrote it."""

    async def passing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        read, sent = b"", 0
        while data := await reader.read(65536):
            read += data
            if (at := read.find(frame)) >= 0:
                writer.write(read[sent : at + len(frame) // 2])
                await writer.drain()
                writer.close()
                return
            # (Past the stream's head, a read may end with the start of ``frame``.)
            keep = len(frame) - 1 if sse.MEDIA_TYPE.encode() in read else 0
            writer.write(read[sent : max(sent, len(read) - keep)])
            sent = max(sent, len(read) - keep)
            await writer.drain()
        raise AssertionError("the replica never wrote the frame")

    return passing


@pytest.mark.parametrize("immediate", [True, False], ids=["forwarded", "sent"])
async def test_a_stream_cut_inside_an_event_passes_on_only_the_whole_events_before_it(immediate: bool) -> None:
    proxy = Proxy(await frames_server(FRAMES, handoff=False).start(), cut_inside(FRAMES[5]))
    stream = await ReplicaRelay(Router(await proxy.start())).open(CALL)
    sink = Written()
    sink.immediate = immediate
    with pytest.raises(StreamCutError):
        await asyncio.wait_for(stream.pipe(sink), 5)
    assert b"".join(sink.data) == b"".join(FRAMES[:5])
    proxy.close()


async def test_a_clients_stream_cut_inside_an_event_ends_with_whole_events_then_the_error() -> None:
    """What an SDK reads: every event decodes, the error is one of its own."""
    proxy = Proxy(await frames_server(FRAMES, handoff=False).start(), cut_inside(FRAMES[5]))
    streams = ReplicaRelay(Router(await proxy.start()))
    async with uvicorn_serving(streams, [], []) as url:
        async with httpx.AsyncClient() as client:
            body = (await client.get(url)).content
    payloads = sse.parse(body)
    assert payloads[:5] == [{"n": i, "text": "x" * i} for i in range(5)]
    assert payloads[5]["error"]["code"] == "service_unavailable" and payloads[6:] == [None]
    proxy.close()

