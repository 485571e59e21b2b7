"""gateway/http/relay.py and relay_stream.py with models/llm/relay.py: streams over a replica's own port, for real."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import sse
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    OverloadedError,
    ServiceUnavailableError,
)
from gateway.http.relay import ReplicaRelay
from gateway.http.relay_stream import StreamCutError
from gateway.protocol import port_proof, relay
from gateway.protocol.engine import EngineRequest, Outcome
from models.llm.relay import StreamServer
from tests.unit.gateway.protocol.test_port_proof import Impostor

CALL = EngineRequest("chat", {"model": "m", "stream": True, "messages": []}, "req-1", "m")
OUTCOME = Outcome(prompt_tokens=4, completion_tokens=3, first_token_s=0.02,
                  inter_token_counts=(2,) + (0,) * 19, inter_token_sum_s=0.004)


class Router:
    """Serve's router as the relay sees it: names the replicas in turn, with their metadata."""

    def __init__(self, *addresses: relay.RelayAddress) -> None:
        self.addresses = list(addresses)
        self.samples = 0

    @asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        assert _reserve is False, "the relay never holds Serve slots"
        address = self.addresses[self.samples % len(self.addresses)]
        self.samples += 1
        yield SimpleNamespace(replica_metadata=address.metadata())


async def serve(opener: Any, **limits: int) -> relay.RelayAddress:
    return await StreamServer(opener, "127.0.0.1", **limits).start()


async def test_bytes_arrive_unchanged_then_the_outcome_and_the_slot_goes_back() -> None:
    frames = [sse.frame({"n": i}) for i in range(50)] + [sse.DONE]
    seen: list[EngineRequest] = []

    async def opener(request: EngineRequest) -> Any:
        seen.append(request)

        async def stream() -> AsyncIterator[bytes]:
            for frame in frames:
                yield frame

        return stream(), lambda: OUTCOME

    stream = await ReplicaRelay(Router(await serve(opener))).open(CALL)
    ended: list[Outcome | None] = []
    left: list[None] = []
    stream.when_ended(ended.append, lambda: left.append(None))
    received = [chunk async for chunk in stream.chunks()]
    stream.close()
    assert b"".join(received) == b"".join(frames)
    assert len(received) <= len(frames)  # one chunk per socket read, never more
    assert stream.outcome == OUTCOME
    assert seen == [CALL]
    assert ended == [OUTCOME] and left == []  # a stream read to its end was not left


async def test_leaving_early_aborts_the_engine_stream_and_frees_the_slot() -> None:
    aborted = asyncio.Event()

    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            try:
                yield sse.frame({"n": 0})
                await asyncio.sleep(30)  # an engine between tokens
                yield sse.DONE
            finally:
                aborted.set()

        return stream(), Outcome

    stream = await ReplicaRelay(Router(await serve(opener))).open(CALL)
    chunks = stream.chunks()
    assert await anext(chunks) == sse.frame({"n": 0})
    await chunks.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(aborted.wait(), timeout=2)


@pytest.mark.parametrize(
    "error",
    [OverloadedError("full", status=429, retry_after_s=3), InvalidRequestError("bad", param="n")],
    ids=["overloaded", "invalid"],
)
async def test_an_error_before_the_first_byte_arrives_as_raised(error: GatewayError) -> None:
    async def opener(request: EngineRequest) -> Any:
        raise error

    with pytest.raises(GatewayError) as caught:
        await ReplicaRelay(Router(await serve(opener))).open(CALL)
    assert type(caught.value) is type(error)
    assert (caught.value.status_code, caught.value.headers()) == (error.status_code, error.headers())
    assert caught.value.to_dict() == error.to_dict()


async def test_an_error_after_the_first_byte_is_an_error_frame_then_done() -> None:
    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            yield sse.frame({"n": 0})
            raise ServiceUnavailableError("engine died")

        return stream(), Outcome

    stream = await ReplicaRelay(Router(await serve(opener))).open(CALL)
    payloads = sse.parse(b"".join([chunk async for chunk in stream.chunks()]))
    assert payloads[0] == {"n": 0}
    assert payloads[1]["error"]["code"] == "service_unavailable"
    assert payloads[2] is None
    # The outcome says how the stream ended, for the access log and the error counters.
    assert stream.outcome is not None
    assert (stream.outcome.error, stream.outcome.error_status) == ("service_unavailable", 503)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_replica_that_is_gone_is_skipped_for_the_next() -> None:
    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            yield sse.DONE

        return stream(), Outcome

    gone = relay.RelayAddress("127.0.0.1", closed_port(), "t")
    streams = ReplicaRelay(Router(gone, await serve(opener)))
    for _ in range(4):
        stream = await streams.open(CALL)
        assert b"".join([chunk async for chunk in stream.chunks()]) == sse.DONE


async def test_no_reachable_replica_is_a_503() -> None:
    with pytest.raises(ServiceUnavailableError):
        await ReplicaRelay(Router(relay.RelayAddress("127.0.0.1", closed_port(), "t"))).open(CALL)


async def test_a_stream_that_breaks_off_is_reported_cut() -> None:
    async def fake_replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await port_proof.prove(reader, writer, "t", 5)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(relay.response_head(200, sse.MEDIA_TYPE) + sse.frame({"n": 0}))
        await writer.drain()
        writer.close()  # dies without the end mark

    server = await asyncio.start_server(fake_replica, "127.0.0.1", 0)
    address = relay.RelayAddress("127.0.0.1", server.sockets[0].getsockname()[1], "t")
    stream = await ReplicaRelay(Router(address)).open(CALL)
    chunks = stream.chunks()
    assert await anext(chunks) == sse.frame({"n": 0})
    with pytest.raises(StreamCutError):
        await anext(chunks)
    server.close()


async def test_a_caller_without_the_token_is_refused() -> None:
    async def opener(request: EngineRequest) -> Any:
        raise AssertionError("reached the engine without the token")

    address = await serve(opener)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(port_proof.challenge()[1])  # (the port proves itself to anyone: it is the caller that must)
    await reader.readuntil(b"\r\n")
    writer.write(relay.encode_request(CALL, "guess"))
    assert relay.status_of(await reader.readuntil(b"\r\n\r\n")).status == 401
    writer.close()


@pytest.mark.parametrize("body", [b"{not json", b"[1]", b"\xff\xfe"])
async def test_a_body_that_is_not_a_json_object_is_refused_and_the_replica_serves_on(body: bytes) -> None:
    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            yield sse.DONE

        return stream(), Outcome

    address = await serve(opener)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(port_proof.challenge()[1])
    await reader.readuntil(b"\r\n")
    head = relay.encode_request(EngineRequest("chat", {}, "r", "m"), address.token).split(b"\r\n\r\n")[0]
    writer.write(head.replace(b"content-length: 2", b"content-length: %d" % len(body)) + b"\r\n\r\n" + body)
    assert relay.status_of(await reader.readuntil(b"\r\n\r\n")).status == 400
    writer.close()
    stream = await ReplicaRelay(Router(address)).open(CALL)
    assert b"".join([chunk async for chunk in stream.chunks()]) == sse.DONE


async def test_a_port_that_cannot_prove_it_is_the_replica_is_sent_nothing_and_skipped() -> None:
    # Another process took the address of a replica that stopped before the ingress forgot it.
    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            yield sse.DONE

        return stream(), Outcome

    impostor = Impostor()
    taken = relay.RelayAddress("127.0.0.1", await impostor.start(), "the replica's token")
    stream = await ReplicaRelay(Router(taken, await serve(opener))).open(CALL)
    assert b"".join([chunk async for chunk in stream.chunks()]) == sse.DONE
    assert await impostor.heard_only_a_challenge()
    impostor.close()


async def test_an_abandoned_stream_reports_what_was_generated() -> None:
    aborted = asyncio.Event()

    async def opener(request: EngineRequest) -> Any:
        generated = Outcome(prompt_tokens=4, completion_tokens=0)

        async def stream() -> AsyncIterator[bytes]:
            nonlocal generated
            try:
                for n in range(1, 1000):
                    generated = Outcome(prompt_tokens=4, completion_tokens=n)
                    yield sse.frame({"n": n})
                    await asyncio.sleep(0.01)
            finally:
                aborted.set()

        return stream(), lambda: generated

    address = await serve(opener)
    stream = await ReplicaRelay(Router(address)).open(EngineRequest("chat", {"stream": True}, "r", "m"))
    chunks = stream.chunks()
    await anext(chunks)
    await asyncio.sleep(0.05)
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    left: list[bool] = []
    stream.when_ended(reported.set_result, lambda: left.append(reported.done()))
    await chunks.aclose()  # the client leaves
    stream.close()
    # Told at once, while the replica is still stopping the engine (its key's place is free).
    assert left == [False]
    outcome = await asyncio.wait_for(reported, timeout=3)
    await asyncio.wait_for(aborted.wait(), timeout=2)  # the engine's stream was closed
    assert outcome is not None and outcome.prompt_tokens == 4 and 1 <= outcome.completion_tokens < 999


