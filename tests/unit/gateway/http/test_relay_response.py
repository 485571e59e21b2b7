"""gateway/http/relay_response.py with gateway/http/relay_stream.py: a replica's stream
forwarded to the client's socket as it arrives, under a real uvicorn and a real
replica port (models/llm/relay.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from gateway import sse
from gateway.http.answers import Answers
from gateway.http.relay import ReplicaRelay
from gateway.http.relay_stream import RelayedStream, StreamCutError
from gateway.http.relay_response import AsgiSink, RelayResponse, SocketSink
from gateway.metrics.recorder import GatewayMetrics, RequestRecord
from gateway.protocol import port_proof, relay
from gateway.protocol.engine import EngineRequest, Outcome
from models.llm.handoff import ClientSocket
from models.llm.relay import StreamServer
from tests.unit.gateway.http.test_relay import CALL, OUTCOME, Router, closed_port
from tests.unit.gateway.http.test_relay_connection import until


def frames_server(
    frames: list[bytes], gap_s: float = 0.0, aborted: asyncio.Event | None = None, handoff: bool = True
) -> StreamServer:
    """A replica whose every stream is ``frames``, ``gap_s`` apart (an engine
    between tokens); ``aborted`` is set when a stream is closed before its end;
    ``handoff``: it takes clients' sockets."""

    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            finished = False
            try:
                for frame in frames:
                    yield frame
                    if gap_s:
                        await asyncio.sleep(gap_s)
                finished = True
            finally:
                if not finished and aborted is not None:
                    aborted.set()

        return stream(), lambda: OUTCOME

    return StreamServer(opener, "127.0.0.1", handoff=handoff)


@asynccontextmanager
async def uvicorn_serving(
    streams: ReplicaRelay,
    opened: list[RelayedStream],
    records: list[RequestRecord],
    cors: bool = False,
    timeout_s: float | None = None,
    completed: list[bool] | None = None,
) -> AsyncIterator[str]:
    """A real uvicorn whose route relays a stream of ``streams`` as the
    gateway's ingress answers it (``Answers.streamed``, each request's
    record in ``records``, its deadline ``timeout_s`` away), with the CORS
    middleware, which wraps ``send`` in a ``functools.partial``, when ``cors``;
    ``completed`` gets, per request, whether its response was completed (its
    last body message sent, as the access log's middleware sees it)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.routing import Route

    async def endpoint(request: Request) -> RelayResponse:
        stream = await streams.open(CALL)
        opened.append(stream)
        records.append(RequestRecord(CALL.request_id, "/s", 0.0))
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        headers = {"x-gateway-variant": "m"}
        return Answers(GatewayMetrics()).streamed(stream, "chat", records[-1], headers, deadline, timeout_s)

    middleware = [Middleware(CORSMiddleware, allow_origins=["https://page.example"])] if cors else []
    app = Starlette(routes=[Route("/s", endpoint)], middleware=middleware)

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        ended = [False]

        async def watching(message: Any) -> None:
            ended[0] = ended[0] or (message["type"] == "http.response.body" and not message.get("more_body"))
            await send(message)

        try:
            await app(scope, receive, watching)
        finally:
            if completed is not None and scope["type"] == "http":
                completed.append(ended[0])

    server = uvicorn.Server(uvicorn.Config(watched, host="127.0.0.1", port=closed_port(), log_level="error"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}/s"
    finally:
        server.should_exit = True
        await task


def no_chunks(self: RelayedStream) -> Any:
    raise AssertionError("a read went through a task (chunks), not straight to the client's socket")


@pytest.mark.parametrize("cors", [False, True])
@pytest.mark.parametrize("handoff", [False, True], ids=["relayed", "handed-over"])
async def test_under_uvicorn_each_read_goes_straight_to_the_clients_socket(
    monkeypatch: pytest.MonkeyPatch, cors: bool, handoff: bool
) -> None:
    """Relayed: each read of the replica's connection is written from its
    callback. Handed over: the replica writes each frame to the client's
    socket itself, and the relay connection carries only the outcome."""
    monkeypatch.setattr(RelayedStream, "chunks", no_chunks)
    if handoff:
        monkeypatch.setattr(RelayedStream, "_forward", no_chunks)
    frames = [sse.frame({"n": i}) for i in range(20)] + [sse.DONE]
    server = frames_server(frames, gap_s=0.001, handoff=handoff)
    opened: list[RelayedStream] = []
    records: list[RequestRecord] = []
    async with uvicorn_serving(ReplicaRelay(Router(await server.start())), opened, records, cors) as url:
        async with httpx.AsyncClient() as client:
            for _ in range(2):
                response = await client.get(url)
                assert response.content == b"".join(frames)
                assert response.headers["transfer-encoding"] == "chunked"
                assert response.headers["content-type"] == sse.MEDIA_TYPE
                assert response.headers["x-gateway-variant"] == "m"
        # Handed over, the client has the whole body before the ingress has read the stream's
        # outcome, and here leaves at once: each is counted as answered all the same.
        await until(lambda: all(record.outcome is not None for record in records))
    outcome = dataclasses.replace(OUTCOME, body_ended=handoff)  # the replica ended the body it wrote
    assert [stream.outcome for stream in opened] == [outcome, outcome]
    assert [(record.outcome, record.error) for record in records] == [(outcome, None), (outcome, None)]
    assert [stream.handed_off for stream in opened] == [handoff, handoff]
    assert server.accepted == 1  # the relay connection was kept for the second stream


@pytest.mark.parametrize("handoff", [False, True], ids=["relayed", "handed-over"])
async def test_under_uvicorn_a_hang_up_aborts_the_engine_stream_at_once(handoff: bool) -> None:
    aborted = asyncio.Event()
    server = frames_server([sse.frame({"n": 0}), sse.DONE], gap_s=30, aborted=aborted, handoff=handoff)
    opened: list[RelayedStream] = []
    async with uvicorn_serving(ReplicaRelay(Router(await server.start())), opened, []) as url:
        async with httpx.AsyncClient() as client:
            async with client.stream("GET", url) as response:
                async for _ in response.aiter_raw():
                    break  # first bytes arrived: leave
        await asyncio.wait_for(aborted.wait(), timeout=2)
    assert opened[0].outcome is None
    assert opened[0].handed_off is handoff


async def read_to_the_end(url: str) -> bytes:
    """A stream read to its last chunk, on a connection kept for more, then closed at once."""
    port = int(url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /s HTTP/1.1\r\nhost: t\r\n\r\n")
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 5)
    writer.close()
    return answer


def outcome_late(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
    """The replica says how a handed-over stream ended ``delay_s`` after it
    ended the client's body (a busy replica's loop, or a slow relay)."""
    from models.llm import relay as replica_relay

    stop_watching = replica_relay.stop_watching

    async def late(hang_up: asyncio.Task[bytes]) -> bool:
        await asyncio.sleep(delay_s)
        return await stop_watching(hang_up)

    monkeypatch.setattr(replica_relay, "stop_watching", late)


async def test_a_client_that_leaves_once_the_replica_has_ended_its_body_was_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client has the whole answer before the ingress hears how it
    ended: it hanging up then is no hang-up. Counted as answered."""
    outcome_late(monkeypatch, 0.3)
    frames = [sse.frame({"n": i}) for i in range(5)] + [sse.DONE]
    aborted = asyncio.Event()
    opened: list[RelayedStream] = []
    records: list[RequestRecord] = []
    server = frames_server(frames, aborted=aborted)
    async with uvicorn_serving(ReplicaRelay(Router(await server.start())), opened, records) as url:
        answer = await read_to_the_end(url)
        assert not opened[0].body_ended  # the client left before the ingress heard of the end
        await until(lambda: records[0].outcome is not None)
    assert _unchunk(answer.partition(b"\r\n\r\n")[2]) == b"".join(frames)
    assert records[0].outcome == dataclasses.replace(OUTCOME, body_ended=True) and records[0].error is None
    assert opened[0].handed_off and not aborted.is_set()


async def test_a_deadline_that_comes_once_the_replica_has_ended_the_body_writes_no_error_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcome_late(monkeypatch, 0.3)
    frames = [sse.frame({"n": i}) for i in range(5)] + [sse.DONE]
    opened: list[RelayedStream] = []
    records: list[RequestRecord] = []
    async with uvicorn_serving(
        ReplicaRelay(Router(await frames_server(frames).start())), opened, records, timeout_s=0.15
    ) as url:
        port = int(url.split(":")[2].split("/")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # the connection stays good for the next request
            writer.write(b"GET /s HTTP/1.1\r\nhost: t\r\n\r\n")
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 5)
            assert _unchunk(answer.partition(b"\r\n\r\n")[2]) == b"".join(frames)
            await until(lambda: records[-1].outcome is not None)
        await asyncio.sleep(0.05)
        assert not reader._buffer  # type: ignore[attr-defined]  # nothing written after either body's end
        writer.close()
    assert [(record.error, record.late_status) for record in records] == [(None, None), (None, None)]


@pytest.mark.parametrize("handoff", [False, True], ids=["relayed", "handed-over"])
async def test_under_uvicorn_a_client_that_reads_slowly_gets_every_byte(
    monkeypatch: pytest.MonkeyPatch, handoff: bool
) -> None:
    """Whoever writes to the client (the ingress, or the replica it handed
    the socket to) waits for it, and the engine stream with them."""
    drained: list[int] = []
    waiter: Any = ClientSocket if handoff else SocketSink
    drain = waiter.drain

    async def counted(self: Any) -> None:
        drained.append(1)
        await drain(self)

    monkeypatch.setattr(waiter, "drain", counted)
    frames = [sse.frame({"n": i, "pad": "x" * 60_000}) for i in range(200)] + [sse.DONE]  # about 12 MB
    server = frames_server(frames, handoff=handoff)
    opened: list[RelayedStream] = []
    async with uvicorn_serving(ReplicaRelay(Router(await server.start())), opened, []) as url:
        port = int(url.split(":")[2].split("/")[0])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /s HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        # Not reading: the relay waits for the client, reading nothing more from the replica.
        await until(lambda: bool(drained), timeout_s=5)
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert _unchunk(body) == b"".join(frames)
    assert body.endswith(b"\r\n0\r\n\r\n") and body.count(b"\r\n0\r\n\r\n") == 1  # ended once, by either
    assert opened[0].outcome == dataclasses.replace(OUTCOME, body_ended=handoff)
    assert opened[0].handed_off is handoff


def _unchunk(body: bytes) -> bytes:
    out, at = [], 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[line_end + 2 : line_end + 2 + size])
        at = line_end + 2 + size + 2


class Written:
    """A client socket that takes every write (``immediate``), or leaves after ``room`` writes."""

    immediate = True

    def __init__(self, room: int = 10**9) -> None:
        self.data: list[bytes] = []
        self.last = self.before = b""
        self._room = room
        self.whole = self.closes = False  # the body ended by the replica; the connection's last response

    def write(self, data: bytes) -> bool:
        if len(self.data) >= self._room:
            return False
        self.data.append(data)
        self.before, self.last = self.last[-256:], data
        return True

    def congested(self) -> bool:
        return False

    async def drain(self) -> None:
        return None

    async def send(self, data: bytes) -> None:
        self.write(data)

    def socket_fd(self) -> int | None:
        return None

    def ended_elsewhere(self) -> None:
        self.whole = True

    def last_on_connection(self) -> None:
        self.closes = True


@asynccontextmanager
async def fake_replica(answer: bytes, then_close: bool = True) -> AsyncIterator[relay.RelayAddress]:
    """A replica port that answers every request with ``answer`` in one write
    (then closes), listening until the block ends."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await port_proof.prove(reader, writer, "t", 5)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if then_close:
            writer.close()

    async with await asyncio.start_server(serve, "127.0.0.1", 0) as server:
        yield relay.RelayAddress("127.0.0.1", server.sockets[0].getsockname()[1], "t")


async def test_a_stream_read_whole_with_its_head_is_forwarded_with_its_outcome() -> None:
    body = sse.frame({"n": 0}) + sse.DONE
    answer = relay.response_head(200, sse.MEDIA_TYPE, keep=False) + body + relay.END + relay.encode_outcome(OUTCOME)
    async with fake_replica(answer) as address:
        stream = await ReplicaRelay(Router(address)).open(CALL)
        # All of it has arrived, held by the connection's reader before the stream is piped.
        await until(lambda: relay.END in bytes(stream._reader._buffer))  # type: ignore[attr-defined]
        sink = Written()
        assert await stream.pipe(sink) is True
    assert b"".join(sink.data) == body
    assert stream.outcome == OUTCOME


async def test_a_forwarded_stream_that_breaks_off_is_reported_cut() -> None:
    answer = relay.response_head(200, sse.MEDIA_TYPE) + sse.frame({"n": 0})
    async with fake_replica(answer) as address:
        stream = await ReplicaRelay(Router(address)).open(CALL)
        sink = Written()
        with pytest.raises(StreamCutError):
            await stream.pipe(sink)
    assert b"".join(sink.data) == sse.frame({"n": 0})
    assert stream.outcome is None


async def test_a_client_gone_mid_stream_aborts_the_engine_request_and_hears_what_was_generated() -> None:
    aborted = asyncio.Event()
    frames = [sse.frame({"n": i}) for i in range(100)] + [sse.DONE]
    address = await frames_server(frames, gap_s=0.01, aborted=aborted).start()
    stream = await ReplicaRelay(Router(address)).open(CALL)
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    stream.when_ended(reported.set_result)
    sink = Written(room=3)
    assert await stream.pipe(sink) is False
    await asyncio.wait_for(aborted.wait(), timeout=2)
    # What it generated, stopped before its last frame.
    assert await asyncio.wait_for(reported, timeout=3) == dataclasses.replace(OUTCOME, stopped=True)
    assert len(sink.data) == 3 and not stream.delivered


async def test_outside_uvicorn_each_read_is_one_asgi_message() -> None:
    frames = [sse.frame({"n": i}) for i in range(5)] + [sse.DONE]
    address = await frames_server(frames, gap_s=0.001).start()
    stream = await ReplicaRelay(Router(address)).open(CALL)
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    sink = AsgiSink(send)
    assert await stream.pipe(sink) is True
    assert b"".join(message["body"] for message in messages) == b"".join(frames)
    assert all(message["more_body"] for message in messages)
    assert sink.last == messages[-1]["body"] and stream.outcome == OUTCOME
