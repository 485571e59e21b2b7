"""models/llm/relay.py: an ingress that leaves before a stream's first frame
(its client hung up while the request was queued on the replica, or while
the engine prefilled its prompt) ends the request there, on the real relay;
a burst of new connections waits for the replica in the kernel's queue."""

from __future__ import annotations

import asyncio
import logging
import selectors
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import sse
from gateway.errors import OverloadedError, ServiceUnavailableError
from gateway.http.relay import ReplicaRelay
from gateway.http.relay_connection import connect
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from models.llm.relay import StreamServer
from tests.unit.gateway.http.test_relay import CALL, Router, serve
from tests.unit.gateway.http.test_relay_connection import until
from tests.unit.gateway.http.test_relay_routing import held_stream
from tests.unit.gateway.protocol.test_peer import LOOPS, reset, run_on


async def test_an_ingress_that_leaves_before_the_first_frame_ends_the_engine_request() -> None:
    opened, aborted = asyncio.Event(), asyncio.Event()

    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            opened.set()
            try:
                await asyncio.sleep(30)  # an engine busy with other requests, or a long prompt
                yield sse.frame({"n": 0})
            finally:
                aborted.set()

        return stream(), Outcome

    opening = asyncio.ensure_future(ReplicaRelay(Router(await serve(opener))).open(CALL))
    await asyncio.wait_for(opened.wait(), timeout=2)
    opening.cancel()  # the client left: the ingress closes the relay connection
    await asyncio.wait_for(aborted.wait(), timeout=2)
    assert opening.cancelled()


async def test_a_queued_request_whose_ingress_leaves_gives_its_place_up_and_never_starts() -> None:
    release, served = asyncio.Event(), []
    address = await serve(await held_stream(release, served, 1), max_ongoing=1, max_queued=1)
    streams = ReplicaRelay(Router(address))
    running = await streams.open(CALL)
    queued = asyncio.ensure_future(streams.open(CALL))
    await asyncio.sleep(0.05)  # reached the replica's queue
    assert not queued.done() and served == [1]
    queued.cancel()  # its client left while it waited
    await asyncio.gather(queued, return_exceptions=True)
    # Its place in the queue is free again: the next request waits there, not refused.
    deadline = asyncio.get_running_loop().time() + 2
    while True:
        later = asyncio.ensure_future(streams.open(CALL))
        await asyncio.sleep(0.05)
        if not later.done():
            break
        with pytest.raises(OverloadedError):  # the replica had not yet seen the first one leave
            later.result()
        assert asyncio.get_running_loop().time() < deadline, "the queue kept a request whose ingress left"
    release.set()
    assert b"".join([chunk async for chunk in running.chunks()]).endswith(sse.DONE)
    third = await asyncio.wait_for(later, timeout=2)
    assert b"".join([chunk async for chunk in third.chunks()]).endswith(sse.DONE)
    assert served == [1, 1]  # the request that left was never started


# New relay connections an ingress opens at once on one replica (one per
# stream: a burst of clients), well within the replica's default limits.
BURST = 300


def listen_queue_limit() -> int:
    """The kernel's cap on any socket's queue of connections not yet accepted."""
    with open("/proc/sys/net/core/somaxconn") as limit:
        return int(limit.read())


def connected_within(addresses: list[socket.socket], timeout_s: float) -> int:
    """How many of the connecting sockets complete their connection within ``timeout_s``."""
    pending = set(addresses)
    with selectors.DefaultSelector() as selector:
        for sock in pending:
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + timeout_s
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                selector.unregister(key.fileobj)
                pending.discard(key.fileobj)  # type: ignore[arg-type]
    return len(addresses) - len(pending)


async def test_a_burst_of_new_connections_waits_for_a_busy_replica_in_the_kernel() -> None:
    # The replica accepts connections on its event loop, which the engine's
    # output keeps busy: a connection beyond its port's queue has its SYN
    # dropped and retried a second or more later (asyncio's default queue of
    # 100 cost a burst of 1,500 streams seconds of first-token time).
    address = await StreamServer(await held_stream(asyncio.Event(), [], 0), "127.0.0.1").start()
    socks = [socket.socket() for _ in range(BURST)]
    try:
        for sock in socks:
            sock.setblocking(False)
            sock.connect_ex((address.host, address.port))
        # The event loop has not run since: the replica has accepted none of them.
        assert connected_within(socks, 0.5) == min(BURST, listen_queue_limit() + 1)
    finally:
        for sock in socks:
            sock.close()


async def test_reading_a_stored_response_is_answered_at_once_by_a_replica_busy_generating() -> None:
    """Retrieving (cancelling, deleting, listing the input of) a stored
    response generates nothing: it never waits behind the replica's streams."""
    release, served = asyncio.Event(), []

    async def answer(request: EngineRequest, tally: Any = None) -> Reply:
        return Reply(b'{"id":"resp_1","model":"m"}', Outcome())

    opener = await held_stream(release, served, 1)
    server = StreamServer(opener, "127.0.0.1", max_ongoing=1, max_queued=1, answer=answer)
    replicas = ReplicaRelay(Router(await server.start()))
    running = await replicas.open(CALL)
    queued = asyncio.ensure_future(replicas.open(CALL))
    await asyncio.sleep(0.05)  # the one place taken, the queue full
    for endpoint in ("responses_retrieve", "responses_input_items", "responses_cancel", "responses_delete"):
        call = EngineRequest(endpoint, {"response_id": "resp_1"}, "r", "m")
        reply = await asyncio.wait_for(replicas.call(call), timeout=2)
        assert reply.body == b'{"id":"resp_1","model":"m"}'
    with pytest.raises(OverloadedError):  # a generation is refused, as before
        await replicas.call(EngineRequest("chat", CALL.body, "r2", "m"))
    release.set()
    assert b"".join([chunk async for chunk in running.chunks()]).endswith(sse.DONE)
    assert b"".join([chunk async for chunk in (await queued).chunks()]).endswith(sse.DONE)


async def test_the_replica_counts_its_relayed_requests_running_and_waiting_for_serves_autoscaler() -> None:
    # Serve's own count misses them: an LLM with autoscaling never grew past its first replica.
    release, served = asyncio.Event(), []
    server = StreamServer(await held_stream(release, served, 1), "127.0.0.1", max_ongoing=1, max_queued=2)
    streams = ReplicaRelay(Router(await server.start()))
    assert server.ongoing == 0
    running = await streams.open(CALL)
    queued = asyncio.ensure_future(streams.open(CALL))
    deadline = asyncio.get_running_loop().time() + 2
    while server.ongoing < 2:
        assert asyncio.get_running_loop().time() < deadline, f"ongoing {server.ongoing}"
        await asyncio.sleep(0.01)
    release.set()
    assert b"".join([chunk async for chunk in running.chunks()]).endswith(sse.DONE)
    second = await asyncio.wait_for(queued, timeout=2)
    assert b"".join([chunk async for chunk in second.chunks()]).endswith(sse.DONE)
    while server.ongoing:
        assert asyncio.get_running_loop().time() < deadline + 2, f"ongoing {server.ongoing}"
        await asyncio.sleep(0.01)
    await server.stop()


async def test_the_replica_watches_each_ingress_connection_for_a_host_gone_without_a_word(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A queued request of an ingress whose host vanished waited forever, then generated in full.
    watched: list[tuple[int, int, bool]] = []

    def watch(sock: Any, unacknowledged: bool = True) -> None:
        keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        from gateway.http.relay_connection import watch_peer

        watch_peer(sock, unacknowledged)
        watched.append((keepalive, sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), unacknowledged))

    monkeypatch.setattr("models.llm.relay.watch_peer", watch)
    release, served = asyncio.Event(), []
    release.set()
    streams = ReplicaRelay(Router(await serve(await held_stream(release, served, 1))))
    stream = await streams.open(CALL)
    assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)
    assert watched == [(0, 1, False)]  # keepalive on; no user timeout where writes wait on a slow reader


@pytest.mark.parametrize("loop", LOOPS)
def test_an_ingress_that_resets_its_connection_mid_stream_ends_the_engine_request_without_an_error(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An ingress closing a connection with frames unread (its client hung up), or dying, resets it.
    # On uvloop a write after that raised RuntimeError: logged as the model failing, the handler's
    # task ending in an unhandled exception.
    async def scenario() -> None:
        ended = asyncio.Event()

        async def opener(request: EngineRequest) -> Any:
            async def stream() -> AsyncIterator[bytes]:
                try:
                    for n in range(100_000):
                        yield sse.frame({"n": n})
                        await asyncio.sleep(0)
                finally:
                    ended.set()

            return stream(), Outcome

        server = StreamServer(opener, "127.0.0.1", handoff=False)
        address = await server.start()
        try:
            reader, writer = await connect(address)
            writer.write(relay.encode_request(CALL, address.token))
            await reader.readuntil(b"\r\n\r\n")
            await reader.read(100)
            reset(writer)
            await asyncio.wait_for(ended.wait(), timeout=2)
            await until(lambda: server.ongoing == 0 and not server._connections)
        finally:
            await server.stop()

    with caplog.at_level(logging.ERROR):
        run_on(loop, scenario)
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def test_a_count_whose_ingress_leaves_is_stopped_on_the_replica() -> None:
    # The ingress gives a count up at the model's request_timeout_s: the
    # replica's count (a render, on a stuck replica) was left running.
    started, stopped = asyncio.Event(), asyncio.Event()

    async def count(request: EngineRequest) -> int:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            stopped.set()
        raise AssertionError

    server = StreamServer(lambda request: None, "127.0.0.1", count=count)  # type: ignore[arg-type,return-value]
    counting = asyncio.ensure_future(ReplicaRelay(Router(await server.start())).most_tokens(CALL))
    await asyncio.wait_for(started.wait(), timeout=2)
    counting.cancel()  # the ingress's bound ran out: it closes the relay connection
    await asyncio.wait_for(stopped.wait(), timeout=2)


async def test_a_count_is_answered_and_its_connection_kept_for_the_next_request() -> None:
    counted: list[str] = []

    async def count(request: EngineRequest) -> int:
        counted.append(request.request_id)
        return 7

    server = StreamServer(lambda request: None, "127.0.0.1", count=count)  # type: ignore[arg-type,return-value]
    relay_ = ReplicaRelay(Router(await server.start()))
    for n in range(3):
        assert await relay_.most_tokens(EngineRequest("chat", {}, f"c{n}", "m")) == 7
    assert counted == ["c0", "c1", "c2"]
    assert len(server._connections) == 1  # one connection carried them all


@pytest.mark.parametrize("replaced", [True, False], ids=["by-a-new-replica", "alone"])
async def test_a_request_queued_on_a_replica_that_stops_is_moved_at_once(replaced: bool) -> None:
    # It waited out the stop's grace (55 s by default), then was cut; a request_timeout_s below that
    # answered it 504 without its ever starting. Refused there before any byte, it goes to the
    # replica replacing it, looked for then; with none, the stopping replica's 503 is the answer.
    release, served = asyncio.Event(), []
    server = StreamServer(await held_stream(release, served, 1), "127.0.0.1", max_ongoing=1)
    router = Router(await server.start())
    streams = ReplicaRelay(router)
    running = await streams.open(CALL)
    queued = asyncio.ensure_future(streams.open(CALL))
    await until(lambda: server.ongoing == 2)
    if replaced:  # Serve starts the new replica before it stops the old one
        router.addresses.append(await serve(await held_stream(release, served, 2)))
    stop = asyncio.ensure_future(server.stop(grace_s=30))
    if replaced:
        moved = await asyncio.wait_for(queued, timeout=2)
        assert served == [1, 2]
    else:
        with pytest.raises(ServiceUnavailableError, match="is stopping") as refused:
            await asyncio.wait_for(queued, timeout=2)
        assert refused.value.retry_after_s and served == [1]  # never started
    release.set()
    for stream in (running, moved) if replaced else (running,):  # in flight: it finishes
        assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)
    await asyncio.wait_for(stop, timeout=2)
