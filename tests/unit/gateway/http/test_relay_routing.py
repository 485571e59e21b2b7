"""gateway/http/relay.py with models/llm/relay.py, for real: which replica a call reaches (the fewest open
streams, a named one), a replica's and the ingress's limits, and a model with no replica running."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway import sse
from gateway.errors import (
    ENGINE_DEAD,
    ENGINE_DIED,
    REPLICA_STOPPING,
    OverloadedError,
    ResponseNotFoundError,
    ServiceUnavailableError,
)
from gateway.http.relay import ReplicaRelay
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from models.llm.relay import StreamServer
from tests.unit.gateway.http.test_relay import CALL, OUTCOME, Router, closed_port, serve


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


async def done_at_once(request: EngineRequest) -> Any:
    """A replica's stream that ends at once."""

    async def stream() -> AsyncIterator[bytes]:
        yield sse.DONE

    return stream(), lambda: OUTCOME


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

    router.addresses.append(await serve(done_at_once))  # the replica comes up
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


async def test_asking_whether_a_replica_is_the_models_is_bounded_while_none_runs() -> None:
    # Serve's router waits for a running replica however long it takes: a
    # stored response's look-up walked into that wait with no end.
    now = [0.0]
    router = Starting()
    router.up.set()
    router.addresses = [await StreamServer(done_at_once, "127.0.0.1", replica="aaaaaaaaaaaa").start()]
    streams = ReplicaRelay(router, clock=lambda: now[0], wait_s=0.2)
    assert await streams.holds("aaaaaaaaaaaa")
    router.up.clear()  # its replica stopped; Serve starts another
    now[0] += 1_000
    with pytest.raises(ServiceUnavailableError):
        await asyncio.wait_for(streams.holds("cccccccccccc"), timeout=5)


async def test_a_call_on_a_stored_response_is_not_refused_for_the_replicas_generations() -> None:
    # Cancelling a background response must work when its replica is busiest.
    release, served = asyncio.Event(), []
    cancelled: list[str] = []

    async def answer(request: EngineRequest, tally: Any) -> Reply:
        cancelled.append(request.endpoint)
        return Reply(b'{"status":"cancelled"}', Outcome())

    address = await StreamServer(
        await held_stream(release, served, 1), "127.0.0.1", max_ongoing=1, max_queued=1, answer=answer,
        replica="aaaaaaaaaaaa",
    ).start()
    streams = ReplicaRelay(Router(address))
    streams.capacity = 2  # as the serving table sets it: running and queued
    running = await streams.open(CALL)
    queued = asyncio.ensure_future(streams.open(CALL))
    await asyncio.sleep(0.05)
    with pytest.raises(OverloadedError):
        await streams.open(CALL)
    cancel = EngineRequest("responses_cancel", {"response_id": "resp_1"}, "c", "m", replica="aaaaaaaaaaaa")
    reply = await asyncio.wait_for(streams.call(cancel), timeout=5)
    # The ingress let it through, and the replica answered it past its limits.
    assert (reply.body, cancelled, served) == (b'{"status":"cancelled"}', ["responses_cancel"], [1])
    release.set()
    assert b"".join([chunk async for chunk in running.chunks()]).endswith(sse.DONE)
    second = await asyncio.wait_for(queued, timeout=2)
    assert b"".join([chunk async for chunk in second.chunks()]).endswith(sse.DONE)


async def test_a_call_naming_a_replica_that_is_gone_is_a_404() -> None:
    async def opener(request: EngineRequest) -> Any:
        raise AssertionError("another replica must not answer")

    running = await StreamServer(opener, "127.0.0.1", replica="aaaaaaaaaaaa").start()
    gone = relay.RelayAddress("127.0.0.1", closed_port(), "t", "bbbbbbbbbbbb")
    for replica in ("bbbbbbbbbbbb", "cccccccccccc"):  # gone, and never seen
        with pytest.raises(ResponseNotFoundError):
            await ReplicaRelay(Router(running, gone)).open(EngineRequest("chat", CALL.body, "r", "m", replica=replica))


async def test_a_stored_response_whose_replica_is_gone_is_answered_as_not_kept() -> None:
    # As once no look-up lists that replica: a follow-up gets OpenAI's 400 (clients resend the turns on it).
    running = await StreamServer(_must_not_open, "127.0.0.1", replica="aaaaaaaaaaaa").start()
    gone = relay.RelayAddress("127.0.0.1", closed_port(), "t", "bbbbbbbbbbbb")
    previous = "resp_bbbbbbbbbbbb0123"
    for replica in ("bbbbbbbbbbbb", "cccccccccccc"):  # listed but gone, and no longer listed
        follow_up = EngineRequest("responses", {"input": "more", "previous_response_id": previous}, "r", "m", replica)
        with pytest.raises(ResponseNotFoundError) as caught:
            await ReplicaRelay(Router(running, gone)).open(follow_up)
        assert (caught.value.status_code, caught.value.code, caught.value.param) == (
            400, "previous_response_not_found", "previous_response_id"
        )
        retrieve = EngineRequest("responses_retrieve", {"response_id": previous}, "r", "m", replica)
        with pytest.raises(ResponseNotFoundError) as caught:
            await ReplicaRelay(Router(running, gone)).call(retrieve)
        assert (caught.value.status_code, caught.value.param) == (404, "response_id")


async def _must_not_open(request: EngineRequest) -> Any:
    raise AssertionError("another replica must not answer")


async def test_the_owner_travels_to_the_replica() -> None:
    seen: list[EngineRequest] = []

    async def opener(request: EngineRequest) -> Any:
        seen.append(request)

        async def stream() -> AsyncIterator[bytes]:
            yield sse.DONE

        return stream(), Outcome

    call = EngineRequest("chat", CALL.body, "r", "m", owner="team-a")
    stream = await ReplicaRelay(Router(await serve(opener))).open(call)
    [_ async for _ in stream.chunks()]
    assert [(request.owner, request.replica) for request in seen] == [("team-a", None)]


async def test_a_warmed_relay_opens_its_first_stream_without_asking_the_router() -> None:
    router = Starting()
    router.addresses.append(await serve(done_at_once))
    router.up.set()
    replicas = ReplicaRelay(router, wait_s=5.0)
    await replicas.warm()  # as a new ingress replica does before it takes clients
    assert router.samples == 1
    router.up.clear()  # the router is slow now (its controller busy): the first request does not wait on it
    stream = await asyncio.wait_for(replicas.open(CALL), 1)
    assert b"".join([chunk async for chunk in stream.chunks()]) == sse.DONE


async def test_a_replica_forgotten_while_it_served_and_found_again_is_counted_with_its_streams() -> None:
    # Once unreachable (a connect timed out under load), it came back counted at 0 with a stream still
    # open from here: least busy on paper, it took the next requests past its capacity.
    release, served = asyncio.Event(), []
    address = await serve(await held_stream(release, served, 1))
    replicas = ReplicaRelay(Router(address))
    replicas.capacity = 1
    first = await replicas.open(EngineRequest("chat", CALL.body, "r1", "m"))
    replicas._forget(address)  # as when a connection to it failed once (an ingress out of sockets)
    with pytest.raises(OverloadedError):  # found again, with the stream still open from here
        await replicas.open(EngineRequest("chat", CALL.body, "r2", "m"))
    assert replicas._open[address] == 1
    release.set()
    assert b"".join([chunk async for chunk in first.chunks()]).endswith(sse.DONE)
    first.close()
    assert replicas._open[address] == 0 and not replicas._unseen  # never below 0, nothing left over
    second = await replicas.open(EngineRequest("chat", CALL.body, "r3", "m"))
    assert b"".join([chunk async for chunk in second.chunks()]).endswith(sse.DONE)


async def test_a_replica_that_could_not_be_reached_is_picked_last_while_serves_router_still_names_it() -> None:
    """Serve's router names a replica until the controller has removed it:
    found again by the next look-up, it is tried after the ones that answer."""
    release, served = asyncio.Event(), []
    release.set()
    gone = relay.RelayAddress("127.0.0.1", closed_port(), "t")
    replicas = ReplicaRelay(Router(gone, await serve(await held_stream(release, served, 1))))
    tried: list[relay.RelayAddress] = []
    forget = replicas._gone

    def gone_again(call: EngineRequest, address: relay.RelayAddress) -> None:
        tried.append(address)
        forget(call, address)

    replicas._gone = gone_again  # type: ignore[method-assign]
    for number in range(8):
        if number:
            await replicas._discover()  # the router names it again
            assert gone in replicas._open
        stream = await replicas.open(EngineRequest("chat", CALL.body, f"r{number}", "m"))
        assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)
    assert tried == [gone] * tried.count(gone) and len(tried) <= 1 and len(served) == 8


async def test_a_replica_that_failed_once_still_takes_what_the_others_have_no_room_for() -> None:
    release, served = asyncio.Event(), []
    first = await serve(await held_stream(release, served, 1))
    second = await serve(await held_stream(release, served, 2))
    replicas = ReplicaRelay(Router(first, second))
    replicas.capacity = 1
    await replicas._discover()
    replicas._failed[second] = replicas._clock()  # as after one connection to it failed
    opened = [await replicas.open(EngineRequest("chat", CALL.body, f"r{n}", "m")) for n in range(2)]
    assert served == [1, 2]  # the first full: the second, not a 503
    assert second not in replicas._failed  # it answered
    release.set()
    for stream in opened:
        assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)


def _refusing(message: str, refused: list[str]) -> tuple[Any, Any, Any]:
    """A replica's stream opener, answerer and counter that each refuse 503 with ``message``."""

    async def stream(request: EngineRequest) -> Any:
        refused.append("stream")
        raise ServiceUnavailableError(message)

    async def answer(request: EngineRequest, tally: Any) -> Reply:
        refused.append("answer")
        raise ServiceUnavailableError(message)

    async def count(request: EngineRequest) -> int:
        refused.append("count")
        raise ServiceUnavailableError(message)

    return stream, answer, count


@pytest.mark.parametrize(
    ("dead", "message"),
    [(True, ENGINE_DEAD), (True, REPLICA_STOPPING), (False, "The LoRA adapter `x` could not be loaded on this replica.")],
    ids=["engine-dead", "replica-stopping", "adapter-not-loaded"],
)
async def test_a_replica_that_refuses_before_generating_leaves_the_request_to_another(dead: bool, message: str) -> None:
    # Answering 503 at once, it was always the least busy: it took nearly every request, and its
    # 503 went to the client while another replica could answer.
    refused: list[str] = []
    stream, answer, count = _refusing(message, refused)

    async def answer_well(request: EngineRequest, tally: Any) -> Reply:
        return Reply(b"{}", Outcome(completion_tokens=1))

    async def count_well(request: EngineRequest) -> int:
        return 42

    release, served = asyncio.Event(), []
    release.set()
    failing = await StreamServer(stream, "127.0.0.1", answer=answer, count=count).start()
    alive = await StreamServer(
        await held_stream(release, served, 2), "127.0.0.1", answer=answer_well, count=count_well
    ).start()
    streams = ReplicaRelay(Router(failing, alive))
    await streams._discover()  # both known, as once the model's replicas have been looked up
    whole = EngineRequest("chat", {"model": "m"}, "r", "m")
    for _ in range(4):
        stream_ = await streams.open(CALL)
        assert b"".join([chunk async for chunk in stream_.chunks()]).endswith(sse.DONE)
        assert (await streams.call(whole)).body == b"{}"
        assert await streams.most_tokens(whole) == 42
    assert served == [2] * 4
    if dead:
        assert len(refused) <= 3  # tried once at most by each kind of call, then passed over for a while
    else:
        # Its other requests (the base model's, other adapters') are not its failure's: only the call moves on.
        assert refused and not streams._failed
    lone = ReplicaRelay(Router(failing))
    with pytest.raises(ServiceUnavailableError) as caught:  # no other: its own 503
        await lone.open(CALL)
    assert caught.value.message == message


class _StallingRouter(Router):
    """Serve's router, that stops answering (a replica replaced, its successor not yet up) once ``stall`` is set."""

    def __init__(self, *addresses: relay.RelayAddress) -> None:
        super().__init__(*addresses)
        self.stall = False
        self.stalled = asyncio.Event()

    @asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        if self.stall:
            self.stalled.set()
            await asyncio.Event().wait()
        async with super().choose_replica(_reserve) as selection:
            yield selection


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_call_given_up_while_its_stopping_replicas_successor_is_looked_for_is_told_nothing_was_generated(
    stream: bool,
) -> None:
    # A key's place and reservation were held for ever by a whole answer cut by its timeout there.
    _, answer, count = _refusing(REPLICA_STOPPING, [])

    async def opener(request: EngineRequest) -> Any:
        raise ServiceUnavailableError(REPLICA_STOPPING)

    router = _StallingRouter(await StreamServer(opener, "127.0.0.1", answer=answer, count=count).start())
    streams = ReplicaRelay(router)
    await streams._discover()
    router.stall = True
    told: list[Outcome | None] = []
    if stream:
        call = asyncio.ensure_future(streams.open(CALL, told.append))
    else:
        call = asyncio.ensure_future(streams.call(EngineRequest("chat", {"model": "m"}, "r", "m"), told.append))
    await router.stalled.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert told == [Outcome()]
    assert streams._refresh is not None
    streams._refresh.cancel()  # (the look-up, shared, stays with the relay)


async def test_a_call_whose_engine_stopped_while_serving_it_is_tried_nowhere_else() -> None:
    # It may be what stopped the engine (a prompt that crashes it): tried on the next replica, it would
    # stop that one too, and a route's every replica in turn. The replica is passed over meanwhile.
    refused: list[str] = []
    stream, answer, _ = _refusing(ENGINE_DIED, refused)
    release, served = asyncio.Event(), []
    release.set()
    failing = await StreamServer(stream, "127.0.0.1", answer=answer).start()
    alive = await StreamServer(await held_stream(release, served, 2), "127.0.0.1", answer=answer).start()
    streams = ReplicaRelay(Router(failing, alive))
    await streams._discover()
    streams._open[alive] = 5  # the failing replica is the least busy: it is picked first
    with pytest.raises(ServiceUnavailableError) as caught:
        await streams.open(CALL)
    assert caught.value.message == ENGINE_DIED and refused == ["stream"] and served == []
    streams._open[alive] = 0
    opened = await streams.open(CALL)  # the next call goes to the other
    assert b"".join([chunk async for chunk in opened.chunks()]).endswith(sse.DONE) and served == [2]


async def test_a_request_arrives_at_its_replica_before_it_waits_for_a_place_there() -> None:
    # (The origin of its time to first token.)
    release, served, arrived = asyncio.Event(), [], {}

    async def opener(request: EngineRequest) -> Any:
        arrived[request.request_id] = (request.arrived, time.time())
        return await (await held_stream(release, served, 1))(request)

    streams = ReplicaRelay(Router(await serve(opener, max_ongoing=1)))
    first = await streams.open(EngineRequest("chat", CALL.body, "first", "m"))
    queued = asyncio.ensure_future(streams.open(EngineRequest("chat", CALL.body, "queued", "m")))
    await asyncio.sleep(0.2)  # (it waits for the first's place)
    release.set()
    assert b"".join([chunk async for chunk in first.chunks()]).endswith(sse.DONE)
    second = await asyncio.wait_for(queued, timeout=2)
    assert b"".join([chunk async for chunk in second.chunks()]).endswith(sse.DONE)
    came, opened = arrived["queued"]
    assert came is not None and opened - came >= 0.15  # (the 0.2 s wait, less the clocks' grain)


async def test_a_replica_serves_router_no_longer_names_gets_no_new_requests_while_another_has_room() -> None:
    # Stopping: Serve routes nothing more to it, but its relay port takes requests until its drain
    # starts, and streams sent then are cut at its grace's end. Its open streams keep it known.
    release, served = asyncio.Event(), []
    stopping = await serve(await held_stream(release, served, 1))
    staying = await serve(await held_stream(release, served, 2))
    router = Router(stopping, staying)
    streams = ReplicaRelay(router)
    await streams._discover()
    opened = [await streams.open(CALL) for _ in range(2)]
    assert sorted(served) == [1, 2]
    router.addresses.remove(stopping)
    await streams._discover()  # once unnamed: chance, with many replicas
    opened.append(await streams.open(CALL))
    await streams._discover()
    opened += [await streams.open(CALL) for _ in range(3)]
    assert served[3:] == [2, 2, 2] and stopping in streams._open
    release.set()
    for stream in opened:
        assert b"".join([chunk async for chunk in stream.chunks()]).endswith(sse.DONE)
