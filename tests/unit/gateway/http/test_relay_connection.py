"""gateway/http/relay_connection.py with models/llm/relay.py: one kept
connection to a replica carries request after request, for real."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway import sse
from gateway.errors import InvalidRequestError
from gateway.http.relay import ReplicaRelay
from gateway.http import relay_connection
from gateway.http.relay_connection import connect
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from models.llm.relay import StreamServer
from models.llm.tally import GenerationTally
from tests.unit.gateway.http.test_relay import OUTCOME, Router
from tests.unit.gateway.protocol.test_peer import LOOPS, proving_then_resetting, run_on


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Returns once ``condition`` holds; fails the test after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def echo_server(**options: Any) -> StreamServer:
    """A replica whose streams say which request they answer and whose whole answers echo the body."""

    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            yield sse.frame({"id": request.request_id})
            yield sse.DONE

        return stream(), lambda: OUTCOME

    async def answer(request: EngineRequest, tally: GenerationTally) -> Reply:
        if request.body.get("fail"):
            raise InvalidRequestError("bad", param="fail")
        return Reply(json.dumps(request.body).encode(), OUTCOME)

    async def count(request: EngineRequest) -> int:
        return 42

    return StreamServer(opener, "127.0.0.1", answer=answer, count=count, **options)


async def test_requests_of_every_kind_share_one_kept_connection() -> None:
    server = echo_server()
    address = await server.start()
    relay_ = ReplicaRelay(Router(address))
    for n in range(3):
        assert await relay_.call(EngineRequest("chat", {"n": n}, f"w{n}", "m")) == Reply(b'{"n": %d}' % n, OUTCOME)
        stream = await relay_.open(EngineRequest("chat", {"stream": True}, f"s{n}", "m"))
        received = b"".join([chunk async for chunk in stream.chunks()])
        assert received == sse.frame({"id": f"s{n}"}) + sse.DONE and stream.outcome == OUTCOME
        assert await relay_.most_tokens(EngineRequest("chat", {}, f"c{n}", "m")) == 42
        with pytest.raises(InvalidRequestError):  # an error answer leaves the connection clean too
            await relay_.call(EngineRequest("chat", {"fail": True}, f"e{n}", "m"))
    assert server.accepted == 1


async def test_a_stream_left_early_on_a_kept_connection_aborts_and_the_connection_is_not_reused() -> None:
    aborted = asyncio.Event()

    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            try:
                yield sse.frame({"n": 0})
                if request.request_id == "long":
                    await asyncio.sleep(30)  # an engine between tokens
                yield sse.DONE
            finally:
                if request.request_id == "long":
                    aborted.set()

        return stream(), lambda: OUTCOME

    server = StreamServer(opener, "127.0.0.1")
    relay_ = ReplicaRelay(Router(await server.start()))
    short = await relay_.open(EngineRequest("chat", {"stream": True}, "short", "m"))
    [_ async for _ in short.chunks()]
    long = await relay_.open(EngineRequest("chat", {"stream": True}, "long", "m"))
    assert server.accepted == 1  # the first stream's connection
    chunks = long.chunks()
    await anext(chunks)
    await chunks.aclose()  # type: ignore[attr-defined]  # the client leaves
    await asyncio.wait_for(aborted.wait(), timeout=2)
    again = await relay_.open(EngineRequest("chat", {"stream": True}, "short", "m"))
    [_ async for _ in again.chunks()]
    assert server.accepted == 2


class ClosesKeptConnections(StreamServer):
    """A replica that closes each kept connection just as the next request arrives."""

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> bool:
        if first:  # a kept connection's next request
            return False  # closed unanswered
        return await super()._serve_one(reader, writer, first)


async def test_a_kept_connection_closed_under_a_request_is_retried_on_a_new_one_and_the_replica_kept() -> None:
    server = ClosesKeptConnections(echo_server()._open, "127.0.0.1", answer=echo_server()._answer_body)
    address = await server.start()
    router = Router(address)
    relay_ = ReplicaRelay(router)
    await relay_.call(EngineRequest("chat", {}, "r", "m"))
    samples = router.samples
    for n in range(3):
        assert await relay_.call(EngineRequest("chat", {"n": n}, "r", "m")) == Reply(b'{"n": %d}' % n, OUTCOME)
    assert server.accepted == 4  # the first, then a new one for each request after it
    assert router.samples == samples  # the replica was not taken for gone and looked for again


async def test_a_call_left_while_it_connects_again_settles_as_never_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its key's reservation is given back whole: the request never reached a replica.
    server = ClosesKeptConnections(echo_server()._open, "127.0.0.1", answer=echo_server()._answer_body)
    relay_ = ReplicaRelay(Router(await server.start()))
    await relay_.call(EngineRequest("chat", {}, "r", "m"))  # a kept connection, which the replica will close
    connecting = asyncio.Event()

    async def stalled(address: relay.RelayAddress) -> Any:
        connecting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr("gateway.http.relay.connect", stalled)
    settled: list[Any] = []
    call = asyncio.ensure_future(relay_.call(EngineRequest("chat", {"n": 1}, "r", "m"), abandoned=settled.append))
    await asyncio.wait_for(connecting.wait(), timeout=2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert settled == [Outcome()]


async def test_an_idle_connection_the_replica_closes_is_closed_and_not_used_again() -> None:
    server = echo_server(idle_s=0.05)
    address = await server.start()
    relay_ = ReplicaRelay(Router(address))
    await relay_.call(EngineRequest("chat", {}, "r", "m"))
    assert relay_._pool.idle(address) == 1
    kept = relay_._pool.take(address)
    assert kept is not None
    relay_._pool.give(address, *kept)
    # The replica closes it after its idle time; so does the ingress (no socket left open).
    await until(lambda: kept[1].transport.is_closing())
    assert await relay_.call(EngineRequest("chat", {"n": 1}, "r", "m")) == Reply(b'{"n": 1}', OUTCOME)
    assert server.accepted == 2


async def test_stopping_closes_idle_connections_at_once_and_lets_running_requests_finish() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def answer(request: EngineRequest, tally: GenerationTally) -> Reply:
        if request.body.get("slow"):
            started.set()
            await release.wait()
        return Reply(b"{}", OUTCOME)

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    server = StreamServer(no_streams, "127.0.0.1", answer=answer)
    address = await server.start()
    relay_ = ReplicaRelay(Router(address))
    await asyncio.gather(*(relay_.call(EngineRequest("chat", {}, "r", "m")) for _ in range(3)))
    slow = asyncio.ensure_future(relay_.call(EngineRequest("chat", {"slow": True}, "r", "m")))
    await asyncio.wait_for(started.wait(), timeout=2)
    assert len(server._idle) == 2 and len(server._connections) == 3
    stopping = asyncio.ensure_future(server.stop(grace_s=30))
    # Well before the idle timeout (60 s), only the running request's connection is left.
    await until(lambda: not server._idle and len(server._connections) == 1)
    assert not stopping.done()
    release.set()
    assert await asyncio.wait_for(slow, timeout=2) == Reply(b"{}", OUTCOME)
    await asyncio.wait_for(stopping, timeout=2)  # not the grace period, nor the idle connections' timeout


async def test_a_caller_that_asks_to_close_gets_its_answer_then_the_close() -> None:
    server = echo_server()
    address = await server.start()
    reader, writer = await connect(address)
    request = relay.encode_request(EngineRequest("chat", {"n": 1}, "r", "m"), address.token)
    writer.write(request.replace(b"connection: keep-alive", b"connection: close"))
    answer = await asyncio.wait_for(reader.read(), timeout=2)  # to the close
    writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head
    body, end, outcome = rest.partition(relay.END)
    assert (body, end, relay.decode_outcome(outcome)) == (b'{"n": 1}', relay.END, OUTCOME)


async def test_a_replica_host_that_vanishes_without_a_word_is_found_out_by_the_kernel() -> None:
    # No FIN nor reset ever comes from a host that lost power: keepalive probes
    # and a bound on unacknowledged data fail the connection, and its client
    # gets an error rather than waiting for ever.
    address = await echo_server().start()
    reader, writer = await relay_connection.connect(address)
    sock = writer.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == relay_connection.KEEP_ALIVE_IDLE_S
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == relay_connection.KEEP_ALIVE_PROBES
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == relay_connection.DEAD_PEER_S * 1000
    writer.close()


async def test_a_replica_host_that_does_not_accept_in_time_is_taken_for_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    # (A host that is gone answers no SYN: the kernel would retry for about two minutes.)
    loop = asyncio.get_running_loop()

    async def unanswered(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(30)

    monkeypatch.setattr(relay_connection, "CONNECT_TIMEOUT_S", 0.05)
    monkeypatch.setattr(loop, "create_connection", unanswered)
    with pytest.raises(OSError):  # as a replica that refused it: the relay routes around it
        await relay_connection.connect(relay.RelayAddress("10.0.0.9", 4100, "t"))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_write_to_a_replica_that_reset_the_connection_is_a_connection_error(loop: str) -> None:
    # A replica killed as the ingress connects to it (its engine died): the relay tries another
    # replica, or answers 503, on a ConnectionError. On uvloop the write raised RuntimeError,
    # which reached the client as a 500.
    async def scenario() -> None:
        token = "replica-token"
        server, port = await proving_then_resetting(token)
        address = relay.RelayAddress("127.0.0.1", port, token, "r1")
        try:
            reader, writer = await connect(address)
            with pytest.raises(ConnectionResetError):
                await reader.read()
            await until(writer.transport.is_closing)
            for _ in range(3):  # uvloop releases the handle a turn later
                await asyncio.sleep(0)
            with pytest.raises(ConnectionResetError):
                writer.write(relay.encode_request(EngineRequest("chat", {}, "r", "m"), token))
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)
