"""gateway/http/relay_stream.py with models/llm/relay.py: streams whose
replica is handed the client's socket and writes to it itself, for real
(a TCP connection stands for HAProxy's to the ingress)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import sse
from gateway.http.answers import Answers
from gateway.http.relay import ReplicaRelay
from gateway.http.relay_connection import connect
from gateway.http.relay_stream import StreamCutError
from gateway.metrics.recorder import GatewayMetrics, RequestRecord
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest
from models.llm.relay import StreamServer
from tests.unit.gateway.http.test_relay import CALL, OUTCOME, Router
from tests.unit.gateway.http.test_relay_connection import until
from tests.unit.gateway.http.test_relay_response import Written, _unchunk, frames_server
from tests.unit.models.llm.test_handoff import client_pair, readable_eof


class ClientSocketSink(Written):
    """The ingress's socket to its client, as uvicorn's would be: writable at
    once, and its descriptor can be handed over."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def write(self, data: bytes) -> bool:
        self.before, self.last = self.last[-256:], data
        self._sock.sendall(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    def socket_fd(self) -> int | None:
        return self._sock.fileno()


async def received_until(sock: socket.socket, mark: bytes, timeout_s: float = 2.0) -> bytes:
    sock.setblocking(False)
    data = b""
    async with asyncio.timeout(timeout_s):
        while mark not in data:
            data += await asyncio.get_running_loop().sock_recv(sock, 65536)
    return data


async def test_the_replica_writes_the_stream_to_the_clients_socket_and_the_relay_keeps_its_connection() -> None:
    frames = [sse.frame({"n": i}) for i in range(30)] + [sse.DONE]
    server = frames_server(frames, gap_s=0.001)
    streams = ReplicaRelay(Router(await server.start()))
    for _ in range(2):
        stream = await streams.open(CALL)
        with client_pair() as (ours, theirs):
            sink = ClientSocketSink(ours)
            assert await stream.pipe(sink) is True
            assert stream.handed_off and stream.outcome == dataclasses.replace(OUTCOME, body_ended=True)
            ours.close()  # the ingress's copy: the replica closed its own before its outcome
            body = await readable_eof(theirs)
        # The replica ended the body with the last frame: the ingress writes nothing more.
        assert body.endswith(sse.DONE + b"\r\n0\r\n\r\n") and body.count(b"\r\n0\r\n\r\n") == 1
        assert _unchunk(body) == b"".join(frames)
        assert stream.body_ended and sink.whole and not sink.closes
    assert server.accepted == 1


async def test_a_replica_that_stops_mid_stream_is_reported_cut_after_whole_chunks() -> None:
    server = frames_server([sse.frame({"n": i}) for i in range(1000)], gap_s=0.01)
    stream = await ReplicaRelay(Router(await server.start())).open(CALL)
    with client_pair() as (ours, theirs):
        sink = ClientSocketSink(ours)
        piping = asyncio.ensure_future(stream.pipe(sink))
        first = await received_until(theirs, b"\n\n\r\n")
        await server.stop()
        with pytest.raises(StreamCutError):
            await asyncio.wait_for(piping, 2)
        await asyncio.wait_for(stream.released(), 0.1)  # its copy is closed: the ingress may write
        ours.close()
        rest = await readable_eof(theirs)
    assert not (first + rest).endswith(b"0\r\n\r\n")  # a stopped stream's body is not ended
    body = _unchunk(first + rest + b"0\r\n\r\n")
    assert body.endswith(b"\n\n") and body.startswith(sse.frame({"n": 0}))
    # The ingress cannot tell how far a replica that stopped got: the connection ends after its error frame.
    assert sink.closes and not sink.whole and not stream.body_ended


async def test_a_client_gone_mid_stream_is_told_apart_and_aborts_the_engine_request() -> None:
    aborted = asyncio.Event()
    server = frames_server([sse.frame({"n": i}) for i in range(1000)], gap_s=0.01, aborted=aborted)
    stream = await ReplicaRelay(Router(await server.start())).open(CALL)
    record = RequestRecord(CALL.request_id, "/v1/chat/completions", 0.0)
    with client_pair() as (ours, theirs):
        sink = ClientSocketSink(ours)
        piping = asyncio.ensure_future(Answers(GatewayMetrics())._deliver(stream, sink, "chat", record))
        await received_until(theirs, b"\n\n\r\n")
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        theirs.close()  # a reset: the replica's next write fails
        await asyncio.wait_for(piping, 2)
    await asyncio.wait_for(aborted.wait(), 2)
    assert stream.outcome is not None and stream.outcome.client_left
    # Seen by the replica first, the hang-up is still the request's outcome
    # (it was logged and counted 200), and the connection is not kept.
    assert (record.late_status, record.outcome) == (499, None)
    assert sink.closes


async def test_a_stream_stopped_by_the_ingress_is_released_once_the_replica_writes_no_more() -> None:
    aborted = asyncio.Event()
    server = frames_server([sse.frame({"n": i}) for i in range(1000)], gap_s=0.005, aborted=aborted)
    stream = await ReplicaRelay(Router(await server.start())).open(CALL)
    reported: list[Any] = []
    stream.when_ended(reported.append)
    with client_pair() as (ours, theirs):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):  # as a model's request_timeout_s does
                await stream.pipe(ClientSocketSink(ours))
        assert stream.handed_off
        await asyncio.wait_for(stream.released(), 2)
        assert aborted.is_set() and reported and reported[0] is not None
        assert not reported[0].body_ended and not stream.body_ended  # stopped before its end: the ingress ends it
        ClientSocketSink(ours).write(b"data: the ingress's error frame\n\n")
        ours.close()
        body = _unchunk(await readable_eof(theirs) + b"0\r\n\r\n")
    assert body.endswith(b"\n\ndata: the ingress's error frame\n\n")


async def test_a_stream_whose_ingress_dies_goes_on_to_its_end_and_the_replica_ends_the_body() -> None:
    aborted = asyncio.Event()
    frames = [sse.frame({"n": i}) for i in range(100)] + [sse.DONE]
    server = frames_server(frames, gap_s=0.005, aborted=aborted)
    stream = await ReplicaRelay(Router(await server.start())).open(CALL)
    with client_pair() as (ours, theirs):
        piping = asyncio.ensure_future(stream.pipe(ClientSocketSink(ours)))
        first = await received_until(theirs, b"\n\n\r\n")
        assert stream.handed_off
        # The ingress's process dies: the kernel closes its sockets, and it says nothing.
        stream._writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        ours.close()
        rest = await readable_eof(theirs, timeout_s=5)
        piping.cancel()
    assert rest.endswith(b"\r\n0\r\n\r\n")  # the body ended as the ingress would have ended it
    assert _unchunk(first + rest) == b"".join(frames)
    assert not aborted.is_set()


async def test_a_sink_that_cannot_give_its_socket_gets_the_stream_relayed() -> None:
    frames = [sse.frame({"n": i}) for i in range(5)] + [sse.DONE]
    stream = await ReplicaRelay(Router(await frames_server(frames).start())).open(CALL)
    with client_pair() as (ours, theirs):
        sink = ClientSocketSink(ours)
        sink.socket_fd = lambda: None  # type: ignore[method-assign]
        assert await stream.pipe(sink) is True
        ours.close()
        body = _unchunk(await readable_eof(theirs) + b"0\r\n\r\n")
    assert body == b"".join(frames) and not stream.handed_off


async def test_an_ingress_with_the_handoff_off_offers_none_and_relays_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ingress.stream_handoff: false``: the replica is not offered the socket
    (it sends no ticket, so nothing is handed over) and the ingress relays."""
    frames = [sse.frame({"n": i}) for i in range(5)] + [sse.DONE]
    stream = await ReplicaRelay(Router(await frames_server(frames).start()), handoff=False).open(CALL)
    handed: list[Any] = []

    async def record(*args: Any) -> None:
        handed.append(args)

    monkeypatch.setattr("gateway.http.relay_stream.hand_over", record)
    with client_pair() as (ours, theirs):
        assert await stream.pipe(ClientSocketSink(ours)) is True
        ours.close()
        body = _unchunk(await readable_eof(theirs) + b"0\r\n\r\n")
    assert body == b"".join(frames) and not stream.handed_off and handed == []
    await until(lambda: stream.outcome == OUTCOME)


async def test_a_port_that_takes_nothing_gets_the_stream_relayed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica whose handoff port stopped answering: told ``RELAY_OWN``, it relays as before."""
    frames = [sse.frame({"n": i}) for i in range(5)] + [sse.DONE]
    server = frames_server(frames)
    stream = await ReplicaRelay(Router(await server.start())).open(CALL)

    async def refused(*_: Any) -> None:
        raise ConnectionRefusedError("the port is gone")

    monkeypatch.setattr("gateway.http.relay_stream.hand_over", refused)
    with client_pair() as (ours, theirs):
        assert await stream.pipe(ClientSocketSink(ours)) is True
        ours.close()
        body = _unchunk(await readable_eof(theirs) + b"0\r\n\r\n")
    assert body == b"".join(frames) and not stream.handed_off
    await until(lambda: stream.outcome == OUTCOME)


async def test_a_responses_stream_is_relayed_its_error_event_numbered_after_what_was_sent() -> None:
    frames = [sse.frame({"type": "response.created", "sequence_number": 0}), sse.DONE]
    stream = await ReplicaRelay(Router(await frames_server(frames).start())).open(
        EngineRequest("responses", {"model": "m", "stream": True, "input": "hi"}, "req-2", "m")
    )
    with client_pair() as (ours, theirs):
        sink = ClientSocketSink(ours)
        assert await stream.pipe(sink) is True
        ours.close()
        body = _unchunk(await readable_eof(theirs) + b"0\r\n\r\n")
    assert body == b"".join(frames) and not stream.handed_off
    assert sink.last  # what the ingress wrote: an error event after a cut is numbered from it


def paired_server(frames: list[bytes], aborted: asyncio.Event | None = None) -> StreamServer:
    """A replica whose streams start as a chat stream does: the first two
    frames from one engine step (no wait between them), then one every 10 ms."""

    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            try:
                for i, frame in enumerate(frames):
                    if i >= 2:
                        await asyncio.sleep(0.01)
                    yield frame
            finally:
                if aborted is not None:
                    aborted.set()

        return stream(), lambda: OUTCOME

    return StreamServer(opener, "127.0.0.1")


async def offered(address: relay.RelayAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A relay request offering a handoff, sent by hand; the connection and the answer's head."""
    reader, writer = await connect(address)
    writer.write(relay.encode_request(CALL, address.token, offer=True))
    return reader, writer, await reader.readuntil(b"\r\n\r\n")


async def test_the_frames_a_replica_has_at_once_come_with_its_head_and_the_rest_waits_for_the_ingress() -> None:
    frames = [sse.frame({"n": i}) for i in range(6)] + [sse.DONE]
    reader, writer, head = await offered(await paired_server(frames).start())
    answer = relay.status_of(head)
    assert answer.status == 200 and len(answer.ticket) == relay.TICKET_BYTES
    assert answer.first == len(frames[0] + frames[1])
    assert await reader.readexactly(answer.first) == frames[0] + frames[1]
    await asyncio.sleep(0.05)  # the engine makes more meanwhile: held until the ingress says
    assert not reader._buffer  # type: ignore[attr-defined]
    writer.write(relay.RELAY_OWN)
    rest = await reader.readuntil(relay.END)
    assert rest[:-1] == b"".join(frames[2:])
    writer.close()


async def test_an_ingress_that_leaves_before_it_says_aborts_the_engine_request() -> None:
    aborted = asyncio.Event()
    frames = [sse.frame({"n": i}) for i in range(100)]
    reader, writer, _ = await offered(await paired_server(frames, aborted).start())
    writer.write_eof()
    await asyncio.wait_for(aborted.wait(), 2)
    data = await asyncio.wait_for(reader.read(), 2)
    assert data.endswith(b"\n") and relay.END in data  # what was generated, for the key's limits
    writer.close()


async def test_a_handed_over_stream_reaches_the_client_in_order_after_the_frames_sent_with_its_head() -> None:
    frames = [sse.frame({"n": i}) for i in range(8)] + [sse.DONE]
    stream = await ReplicaRelay(Router(await paired_server(frames).start())).open(CALL)
    with client_pair() as (ours, theirs):
        assert await stream.pipe(ClientSocketSink(ours)) is True
        ours.close()
        body = _unchunk(await readable_eof(theirs))
    assert body == b"".join(frames) and stream.handed_off and stream.body_ended


async def test_no_clients_socket_goes_to_a_port_another_user_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handoff name left by a replica that stopped may be bound by any
    local user: the ingress hands a socket only to a process of its own user."""
    import os

    from gateway.http import handoff
    from models.llm.handoff import HandoffPort

    port = HandoffPort()
    address = relay.RelayAddress("127.0.0.1", 1, "t", handoff=port.start())
    try:
        assert handoff.reachable(address)
        monkeypatch.setattr(handoff, "peer_uid", lambda _sock: os.getuid() + 1)
        assert not handoff.reachable(address)
        with client_pair() as (ours, _), pytest.raises(PermissionError, match="another user's"):
            await handoff.hand_over(address, b"x" * relay.TICKET_BYTES, ours.fileno())
    finally:
        port.stop()
