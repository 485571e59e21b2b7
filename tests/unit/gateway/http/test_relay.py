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
    ResponseNotFoundError,
    ServiceUnavailableError,
)
from gateway.http.relay import ReplicaRelay
from gateway.http.relay_stream import StreamCutError
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from models.llm.relay import StreamServer
from models.llm.tally import GenerationTally

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
    received = [chunk async for chunk in stream.chunks()]
    assert b"".join(received) == b"".join(frames)
    assert len(received) <= len(frames)  # one chunk per socket read, never more
    assert stream.outcome == OUTCOME
    assert seen == [CALL]


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
    with pytest.raises(InvalidRequestError) as caught:
        await ReplicaRelay(Router(address._replace(token="guess"))).open(CALL)
    assert caught.value.status_code == 401


async def held_stream(release: asyncio.Event, served: list[int], tag: int) -> Any:
    async def opener(request: EngineRequest) -> Any:
        served.append(tag)

        async def stream() -> AsyncIterator[bytes]:
            yield sse.frame({"replica": tag})
            await release.wait()
            yield sse.DONE

        return stream(), Outcome

    return opener


async def test_streams_go_to_the_replica_with_fewest_open() -> None:
    releases, served = (asyncio.Event(), asyncio.Event()), []
    first = await serve(await held_stream(releases[0], served, 1))
    second = await serve(await held_stream(releases[1], served, 2))
    streams = ReplicaRelay(Router(first, second))
    opened = [await streams.open(CALL) for _ in range(4)]
    assert sorted(served) == [1, 1, 2, 2]
    releases[0].set()  # the first replica's streams end; the second's stay open
    ended = [stream for stream, tag in zip(opened, served) if tag == 1]
    for stream in ended:
        assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)
    # Uneven load: both new streams go to the idle replica (turn by turn would send one to each).
    opened += [await streams.open(CALL) for _ in range(2)]
    assert served[4:] == [1, 1]
    releases[1].set()
    for stream in opened:
        if stream not in ended:
            assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)


async def test_a_replica_holds_streams_to_its_limits_and_refuses_beyond_its_queue() -> None:
    release, served = asyncio.Event(), []
    address = await serve(await held_stream(release, served, 1), max_ongoing=1, max_queued=1)
    streams = ReplicaRelay(Router(address))
    running = await streams.open(CALL)
    queued = asyncio.ensure_future(streams.open(CALL))
    await asyncio.sleep(0.05)
    assert not queued.done() and served == [1]
    with pytest.raises(OverloadedError) as caught:
        await streams.open(CALL)
    assert caught.value.status_code == 503 and caught.value.headers()["retry-after"] == "1"
    release.set()
    assert b"".join([chunk async for chunk in running.chunks()]).endswith(sse.DONE)
    second = await asyncio.wait_for(queued, timeout=2)
    assert b"".join([chunk async for chunk in second.chunks()]).endswith(sse.DONE)
    assert served == [1, 1]


async def whole(reply: Reply | BaseException, started: asyncio.Event, cancelled: asyncio.Event) -> Any:
    async def answer(request: EngineRequest, tally: Any = None) -> Reply:
        started.set()
        try:
            await asyncio.sleep(0.01 if not isinstance(reply, BaseException) else 0)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        if isinstance(reply, BaseException):
            raise reply
        if reply.body == b"slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return reply

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    return await StreamServer(no_streams, "127.0.0.1", answer=answer).start()


async def test_a_whole_answer_arrives_with_its_outcome() -> None:
    body = b'{"choices":[{"text":"hi"}]}'
    address = await whole(Reply(body, OUTCOME), asyncio.Event(), asyncio.Event())
    reply = await ReplicaRelay(Router(address)).call(EngineRequest("chat", {"model": "m"}, "r", "m"))
    assert reply == Reply(body, OUTCOME)


async def test_a_whole_answers_error_arrives_as_raised() -> None:
    error = InvalidRequestError("bad", param="max_tokens")
    address = await whole(error, asyncio.Event(), asyncio.Event())
    with pytest.raises(InvalidRequestError) as caught:
        await ReplicaRelay(Router(address)).call(EngineRequest("chat", {"model": "m"}, "r", "m"))
    assert caught.value.to_dict() == error.to_dict()


async def test_cancelling_a_whole_answer_stops_the_replicas_work() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    address = await whole(Reply(b"slow", OUTCOME), started, cancelled)
    call = asyncio.ensure_future(ReplicaRelay(Router(address)).call(EngineRequest("chat", {}, "r", "m")))
    await asyncio.wait_for(started.wait(), timeout=2)
    await asyncio.sleep(0.05)
    call.cancel()
    await asyncio.wait_for(cancelled.wait(), timeout=2)


async def test_first_requests_share_one_look_up_of_the_replicas() -> None:
    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            yield sse.DONE

        return stream(), Outcome

    router = Router(await serve(opener))
    relay_ = ReplicaRelay(router)
    streams = await asyncio.gather(*(relay_.open(CALL) for _ in range(8)))
    # One sample to start (shared by all eight), then one background refresh.
    assert router.samples <= 1 + 12
    for stream in streams:
        assert b"".join([chunk async for chunk in stream.chunks()]) == sse.DONE


async def test_an_abandoned_whole_answer_reports_what_was_generated() -> None:
    started = asyncio.Event()

    async def answer(request: EngineRequest, tally: Any) -> Reply:
        tally.prompt_tokens, tally.completion_tokens = 5, 7  # generated before the client left
        started.set()
        await asyncio.sleep(30)
        raise AssertionError("not cancelled")

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    address = await StreamServer(no_streams, "127.0.0.1", answer=answer).start()
    reported: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(
        ReplicaRelay(Router(address)).call(EngineRequest("chat", {}, "r", "m"), reported.set_result)
    )
    await asyncio.wait_for(started.wait(), timeout=2)
    call.cancel()
    outcome = await asyncio.wait_for(reported, timeout=3)
    assert outcome is not None and (outcome.prompt_tokens, outcome.completion_tokens) == (5, 7)


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
    stream.when_ended(reported.set_result)
    await chunks.aclose()  # the client leaves
    outcome = await asyncio.wait_for(reported, timeout=3)
    await asyncio.wait_for(aborted.wait(), timeout=2)  # the engine's stream was closed
    assert outcome is not None and outcome.prompt_tokens == 4 and 1 <= outcome.completion_tokens < 999


class Starting(Router):
    """Serve's router for a model with no running replica: it waits until one is up."""

    def __init__(self) -> None:
        super().__init__()
        self.up = asyncio.Event()

    @asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        await self.up.wait()
        async with super().choose_replica(_reserve) as selection:
            yield selection


async def test_with_no_running_replica_a_request_waits_at_most_wait_s_and_later_ones_not_at_all() -> None:
    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            yield sse.DONE

        return stream(), lambda: OUTCOME

    router = Starting()
    replicas = ReplicaRelay(router, wait_s=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = [asyncio.ensure_future(replicas.open(CALL)) for _ in range(3)]  # one look-up, shared
    for outcome in await asyncio.gather(*first, return_exceptions=True):
        assert isinstance(outcome, ServiceUnavailableError) and outcome.retry_after_s
    assert 0.95 <= loop.time() - started <= 3.0
    started = loop.time()
    with pytest.raises(ServiceUnavailableError, match="No replica of the model is running"):
        await replicas.open(CALL)  # the model is still down: answered at once
    assert loop.time() - started < 0.5

    router.addresses.append(await serve(opener))  # the replica comes up
    router.up.set()
    await asyncio.sleep(0)
    stream = await replicas.open(CALL)
    assert b"".join([chunk async for chunk in stream.chunks()]) == sse.DONE


async def test_past_a_replicas_capacity_the_ingress_refuses_without_calling_it() -> None:
    opened: list[str] = []
    release = asyncio.Event()

    async def opener(request: EngineRequest) -> Any:
        opened.append(request.request_id)

        async def stream() -> AsyncIterator[bytes]:
            yield sse.frame({"n": 0})
            await release.wait()
            yield sse.DONE

        return stream(), lambda: OUTCOME

    replicas = ReplicaRelay(Router(await serve(opener)))
    replicas.capacity = 2
    held = [await replicas.open(EngineRequest("chat", CALL.body, f"r{i}", "m")) for i in range(2)]
    with pytest.raises(OverloadedError) as refused:
        await replicas.open(EngineRequest("chat", CALL.body, "r3", "m"))
    assert refused.value.status_code == 503 and refused.value.retry_after_s == 1
    assert opened == ["r0", "r1"]  # the third never reached the replica
    release.set()
    for stream in held:
        assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)
    stream = await replicas.open(EngineRequest("chat", CALL.body, "r4", "m"))  # room again
    assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)


async def test_a_call_naming_a_replica_reaches_that_one_and_no_other() -> None:
    """A follow-up of a stored response goes where the response is kept, however busy."""
    answered: dict[str, list[str]] = {"aaaaaaaaaaaa": [], "bbbbbbbbbbbb": []}

    def opener_of(replica: str) -> Any:
        async def opener(request: EngineRequest) -> Any:
            answered[replica].append(request.request_id)

            async def stream() -> AsyncIterator[bytes]:
                yield sse.DONE

            return stream(), Outcome

        return opener

    addresses = [await StreamServer(opener_of(r), "127.0.0.1", replica=r).start() for r in answered]
    assert [a.replica for a in addresses] == list(answered)
    streams = ReplicaRelay(Router(*addresses))
    for n in range(4):
        call = EngineRequest("chat", CALL.body, f"req-{n}", "m", replica="bbbbbbbbbbbb")
        stream = await streams.open(call)
        assert b"".join([chunk async for chunk in stream.chunks()]) == sse.DONE
    assert answered == {"aaaaaaaaaaaa": [], "bbbbbbbbbbbb": ["req-0", "req-1", "req-2", "req-3"]}
    assert await streams.holds("aaaaaaaaaaaa") and not await streams.holds("cccccccccccc")


async def test_a_call_naming_a_replica_that_is_gone_is_a_404() -> None:
    async def opener(request: EngineRequest) -> Any:
        raise AssertionError("another replica must not answer")

    running = await StreamServer(opener, "127.0.0.1", replica="aaaaaaaaaaaa").start()
    gone = relay.RelayAddress("127.0.0.1", closed_port(), "t", "bbbbbbbbbbbb")
    for replica in ("bbbbbbbbbbbb", "cccccccccccc"):  # gone, and never seen
        with pytest.raises(ResponseNotFoundError):
            await ReplicaRelay(Router(running, gone)).open(EngineRequest("chat", CALL.body, "r", "m", replica=replica))


async def test_the_owner_travels_to_the_replica() -> None:
    seen: list[EngineRequest] = []

    async def opener(request: EngineRequest) -> Any:
        seen.append(request)

        async def stream() -> AsyncIterator[bytes]:
            yield sse.DONE

        return stream(), Outcome

    stream = await ReplicaRelay(Router(await serve(opener))).open(EngineRequest("chat", CALL.body, "r", "m", owner="team-a"))
    [_ async for _ in stream.chunks()]
    assert [(request.owner, request.replica) for request in seen] == [("team-a", None)]


async def test_a_background_answer_comes_at_once_and_its_outcome_once_generated() -> None:
    """A background response: the body before the generation ends, the outcome after."""
    generating = asyncio.Event()

    async def answer(request: EngineRequest, tally: GenerationTally) -> Reply:
        async def generate() -> None:
            await generating.wait()
            tally.prompt_tokens, tally.completion_tokens = 4, 9

        tally.continues = asyncio.ensure_future(generate())
        return Reply(b'{"status":"queued"}', tally.outcome())

    async def no_streams(request: EngineRequest) -> Any:
        raise AssertionError("a whole answer was asked for")

    address = await StreamServer(no_streams, "127.0.0.1", answer=answer).start()
    outcomes: list[Outcome | None] = []
    ended = asyncio.Event()

    def later(outcome: Outcome | None) -> None:
        outcomes.append(outcome)
        ended.set()

    call = EngineRequest("responses", {"model": "m", "background": True}, "r", "m")
    reply = await asyncio.wait_for(ReplicaRelay(Router(address)).call(call, later=later), timeout=2)
    assert reply == Reply(b'{"status":"queued"}', Outcome()) and outcomes == []
    generating.set()
    await asyncio.wait_for(ended.wait(), timeout=2)
    assert outcomes == [Outcome(prompt_tokens=4, completion_tokens=9)]
