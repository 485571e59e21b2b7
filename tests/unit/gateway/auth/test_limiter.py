"""gateway/auth/limiter.py and limiter_server.py: one ledger shared over a socket, exact under concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import Any

import pytest

from gateway.auth import ledger, limiter, places
from gateway.auth.ledger import Ledger, Limits, Usage
from gateway.auth.limiter import LimiterClient
from gateway.auth.limiter_wire import LimiterAddress
from gateway.auth.local import LocalLimiter
from gateway.auth.limiter_server import LimiterServer
from gateway.errors import ServiceUnavailableError
from gateway.protocol import port_proof
from tests.unit.gateway.auth.conftest import Part
from tests.unit.gateway.protocol.test_peer import LOOPS, proving_then_resetting, reset, run_on
from tests.unit.gateway.protocol.test_port_proof import Impostor


def _frozen() -> Ledger:
    """A ledger whose clock stays early in one slot: leases are always granted
    (their holders still end them after one slot of their own time)."""
    return Ledger(clock=lambda: 5000.01)




@pytest.fixture
def one_second_slots(monkeypatch: pytest.MonkeyPatch) -> float:
    """Slots (and so leases) of a second: counting round trips must not
    depend on the host never pausing this test for a quarter slot, which
    would let a lease run out between two waves of requests."""
    monkeypatch.setattr(ledger, "SLOT_S", 1.0)  # leases read it there too
    return 1.0


async def _started(
    parts: list[Part], server: LimiterServer | None = None
) -> tuple[LimiterServer, LimiterAddress]:
    server = server if server is not None else LimiterServer("127.0.0.1", _frozen())
    parts.append(server)
    return server, await server.start()


def _client(parts: list[Part], address: LimiterAddress | None) -> LimiterClient:
    client = LimiterClient(lambda: _found(address))
    parts.append(client)
    return client


async def _found(address: LimiterAddress | None) -> LimiterAddress | None:
    return address


async def test_two_clients_share_one_ledger_without_overshoot(parts: list[Part]) -> None:
    _, address = await _started(parts)
    clients = [_client(parts, address) for _ in range(2)]
    limits = Limits(rpm=20, tpm=1000)
    rng = random.Random(3)
    wants = [rng.randint(1, 200) for _ in range(64)]
    decisions = await asyncio.gather(
        *(clients[i % 2].reserve("k", limits, want) for i, want in enumerate(wants))
    )
    admitted = [(i, d, want) for i, (d, want) in enumerate(zip(decisions, wants)) if d.reservation is not None]
    assert len(admitted) <= 20
    assert sum(want for _, _, want in admitted) <= 1000
    for decision, want in zip(decisions, wants):  # refused only when it would not fit
        if decision.refusal is not None:
            assert decision.refusal.used + decision.refusal.requested > decision.refusal.value
    used = 0
    for i, decision, want in admitted:
        clients[i % 2].settle(decision.reservation, want // 2)  # type: ignore[arg-type]
        used += want // 2
    usage, in_flight = await _settled(clients[0], "k", limits)
    assert usage.remaining_tokens == 1000 - used and in_flight == 0


async def _settled(client: LimiterClient, key: str, limits: Limits) -> tuple[Usage, int]:
    """The key's counts once every lease has come back (each lasts one slot at most)."""
    usage, in_flight = await client.usage(key, limits)
    deadline = asyncio.get_running_loop().time() + 4 * ledger.SLOT_S
    while in_flight and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        usage, in_flight = await client.usage(key, limits)
    return usage, in_flight


class CountingServer(LimiterServer):
    """Counts the reservations decided in the ledger (not those made from leases)."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", _frozen())
        self.reserves = 0

    def _serve(self, message, peer):  # type: ignore[no-untyped-def]
        self.reserves += message.get("op") == "reserve"
        return super()._serve(message, peer)


async def test_a_busy_key_is_admitted_from_leases_without_a_round_trip_each(
    parts: list[Part], one_second_slots: float
) -> None:
    server = CountingServer()
    _, address = await _started(parts, server)
    client = _client(parts, address)
    limits = Limits(rpm=100_000, tpm=10_000_000, max_concurrent=1000)
    for wave in range(10):  # ten waves of 32 concurrent requests, each ending before the next
        decisions = await asyncio.gather(*(client.reserve("k", limits, 50) for _ in range(32)))
        assert all(d.reservation is not None for d in decisions)
        if wave == 0:  # the first request alone, the second with a lease asked for, which the rest wait for
            assert server.reserves == 2
        for decision in decisions:
            client.settle(decision.reservation, 20)  # type: ignore[arg-type]
    # Then each lease is asked for while the last still admits, and requests that find it spent
    # wait for the next. A pause of the host past a lease's end costs one reservation more.
    assert server.reserves <= 10
    usage, in_flight = await _settled(client, "k", limits)
    # What went unused in the leases came back; tokens are what was used.
    assert in_flight == 0
    assert usage.remaining_requests == 100_000 - 320
    assert usage.remaining_tokens == 10_000_000 - 320 * 20


class WithholdingServer(LimiterServer):
    """Answers nothing that asks for a lease, and says when something did."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", _frozen())
        self.asked = asyncio.Event()

    def _serve(self, message, peer):  # type: ignore[no-untyped-def]
        if "lease" in message:
            self.asked.set()
            return None
        return super()._serve(message, peer)


async def test_requests_waiting_for_a_lease_get_503_at_once_when_the_ledger_goes_away(parts: list[Part]) -> None:
    server = WithholdingServer()
    _, address = await _started(parts, server)
    client = _client(parts, address)
    wave = asyncio.gather(*(client.reserve("k", Limits(rpm=1000), 0) for _ in range(8)), return_exceptions=True)
    await asyncio.wait_for(server.asked.wait(), 2)
    await server.stop()
    # Well before the reply timeout: the waiting requests learn the ledger is gone with the one that asked.
    outcomes = await asyncio.wait_for(wave, limiter.REPLY_TIMEOUT_S / 2)
    assert outcomes[0].reservation is not None  # type: ignore[union-attr]  # decided before the ledger went
    assert all(isinstance(outcome, ServiceUnavailableError) for outcome in outcomes[1:])


async def test_a_key_without_a_token_limit_keeps_its_lease_whatever_its_requests_used(
    parts: list[Part], one_second_slots: float
) -> None:
    server = CountingServer()
    _, address = await _started(parts, server)
    client = _client(parts, address)
    limits = Limits(rpm=100_000, max_concurrent=10)
    for _ in range(200):  # one at a time, each reporting the tokens it used
        decision = await client.reserve("k", limits, 0)
        client.settle(decision.reservation, 9)  # type: ignore[arg-type]
    assert server.reserves < 20  # the first, while leases grow to what the key asks


async def test_leases_never_let_two_replicas_pass_a_limit_or_refuse_under_it(parts: list[Part]) -> None:
    _, address = await _started(parts)
    clients = [_client(parts, address) for _ in range(2)]
    limits = Limits(rpm=300, tpm=30_000, max_concurrent=40)
    rng = random.Random(5)
    admitted, held = 0, []
    for _ in range(20):  # waves from both replicas, some requests ending between them
        wants = [rng.randint(1, 120) for _ in range(24)]
        decisions = await asyncio.gather(*(clients[i % 2].reserve("k", limits, w) for i, w in enumerate(wants)))
        for i, (decision, want) in enumerate(zip(decisions, wants)):
            if decision.refusal is not None:
                refusal = decision.refusal
                # Refused only when it would not fit the key's real counts (leases called back first).
                assert refusal.used + refusal.requested > refusal.value, refusal
                continue
            admitted += 1
            held.append((clients[i % 2], decision.reservation, want))
        assert len(held) <= 40
        rng.shuffle(held)
        for client, ticket, want in held[: len(held) // 2]:
            client.settle(ticket, want)
        del held[: len(held) // 2]
    assert admitted <= 300
    for client, ticket, want in held:
        client.settle(ticket, want)
    usage, in_flight = await _settled(clients[0], "k", limits)
    assert in_flight == 0 and usage.remaining_requests == 300 - admitted


async def test_a_request_waiting_on_anothers_lease_is_admitted_once_it_comes_back(
    parts: list[Part], one_second_slots: float
) -> None:
    _, address = await _started(parts)
    busy, other = _client(parts, address), _client(parts, address)
    limits = Limits(rpm=20)
    first = await asyncio.gather(*(busy.reserve("k", limits, 0) for _ in range(4)))
    assert all(d.reservation is not None for d in first)
    taken = 20 - (await busy.usage("k", limits))[0].remaining_requests
    assert taken > 4  # busy holds a lease
    more = await asyncio.gather(*(other.reserve("k", limits, 0) for _ in range(20 - 4)))
    # The lease was called back: every request up to the limit was admitted.
    assert all(d.reservation is not None for d in more)
    assert (await other.reserve("k", limits, 0)).refusal is not None


async def test_a_client_that_goes_away_releases_its_places_and_keeps_its_tokens(parts: list[Part]) -> None:
    _, address = await _started(parts)
    leaving, staying = _client(parts, address), _client(parts, address)
    limits = Limits(tpm=100, max_concurrent=1)
    assert (await leaving.reserve("k", limits, 40)).reservation is not None
    assert (await staying.reserve("k", limits, 10)).refusal is not None  # the one place is taken
    await leaving.close()
    for _ in range(100):
        usage, in_flight = await staying.usage("k", limits)
        if in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert in_flight == 0 and usage.remaining_tokens == 60
    assert (await staying.reserve("k", limits, 10)).reservation is not None


@pytest.fixture
def long_place_wait(monkeypatch: pytest.MonkeyPatch) -> float:
    """A request waits seconds for a place: whether it is still waiting must
    not depend on the host never pausing this test for a quarter second."""
    monkeypatch.setattr(places, "PLACE_WAIT_S", 30.0)
    return 30.0


async def _still_waiting(reserving: asyncio.Future[ledger.Decision]) -> bool:
    """A refused request would have been answered within a round trip."""
    await asyncio.wait({reserving}, timeout=0.1)
    return not reserving.done()


async def _one_place_taken_and_one_waiting(
    parts: list[Part], shared: bool
) -> tuple[LimiterClient | LocalLimiter, Limits, int, asyncio.Future[ledger.Decision]]:
    """A key of one place (and 1,000 tokens a minute) on the shared ledger or
    the local one: a request of 300 tokens admitted, another waiting for its place."""
    one = _client(parts, (await _started(parts))[1]) if shared else LocalLimiter(_frozen())
    limits = Limits(tpm=1000, max_concurrent=1)
    first = (await one.reserve("k", limits, 300)).reservation
    assert first is not None
    waiting = asyncio.ensure_future(one.reserve("k", limits, 300))
    assert await _still_waiting(waiting)
    return one, limits, first, waiting


async def test_a_grant_that_arrives_as_its_request_is_cancelled_goes_back(
    parts: list[Part], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.12's wait_for raises the caller's cancellation even where the
    # reply it awaited has come: the place and tokens granted were booked for ever.
    _, address = await _started(parts)
    client = _client(parts, address)
    limits = Limits(None, 1000, 1)
    wait_for = asyncio.wait_for

    async def cancelled_on_arrival(awaitable: Any, timeout: float | None) -> Any:
        await wait_for(awaitable, timeout)
        raise asyncio.CancelledError

    await client.usage("k", limits)  # (connected: the reply is the only thing waited for)
    monkeypatch.setattr(limiter.asyncio, "wait_for", cancelled_on_arrival)
    with pytest.raises(asyncio.CancelledError):
        await client.reserve("k", limits, 300)
    monkeypatch.setattr(limiter.asyncio, "wait_for", wait_for)
    usage, in_flight = await _settled(client, "k", limits)
    assert (in_flight, usage.remaining_tokens) == (0, 1000)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "local"])
async def test_a_request_at_the_concurrency_limit_takes_the_place_its_key_frees(
    parts: list[Part], long_place_wait: float, shared: bool
) -> None:
    # A client cancels its stream and asks again at once: the second request
    # arrives before the first is seen to go, and is admitted when it does.
    one, limits, first, regenerate = await _one_place_taken_and_one_waiting(parts, shared)
    one.leave(first)  # its client left: the place is free before the engine has stopped
    assert (await asyncio.wait_for(regenerate, 5)).reservation is not None
    _, in_flight = await one.usage("k", limits)
    assert in_flight == 2  # the first is in flight until it settles
    third = asyncio.ensure_future(one.reserve("k", limits, 300))
    assert await _still_waiting(third)
    one.settle(first, 100)  # settling a request that left frees no second place
    assert await _still_waiting(third)
    third.cancel()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "local"])
async def test_a_request_cancelled_while_it_waits_for_a_place_books_nothing_when_one_frees(
    parts: list[Part], long_place_wait: float, shared: bool
) -> None:
    # Its client hung up while the ledger still kept it waiting: the place the
    # ledger gives it later goes back at once, with its tokens.
    one, limits, first, gave_up = await _one_place_taken_and_one_waiting(parts, shared)
    gave_up.cancel()
    one.settle(first, 100)  # the place frees: the ledger admits the request no one waits for
    third = await asyncio.wait_for(one.reserve("k", limits, 300), 5)
    assert third.reservation is not None
    usage, in_flight = await one.usage("k", limits)
    assert (in_flight, usage.remaining_tokens) == (1, 1000 - 100 - 300)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "local"])
async def test_a_key_at_its_concurrency_limit_is_refused_after_a_moment_and_no_more_wait_than_it_has_places(
    parts: list[Part], shared: bool
) -> None:
    one = _client(parts, (await _started(parts))[1]) if shared else LocalLimiter(_frozen())
    limits = Limits(max_concurrent=2)
    assert all([(await one.reserve("k", limits, 0)).reservation for _ in range(2)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    refused = await asyncio.gather(*(one.reserve("k", limits, 0) for _ in range(3)))
    assert all(d.refusal is not None and d.refusal.limit == "concurrent" for d in refused)
    assert loop.time() - started >= places.PLACE_WAIT_S  # two of them waited for a place
    started = loop.time()
    waiting = [asyncio.ensure_future(one.reserve("k", limits, 0)) for _ in range(2)]
    assert await _still_waiting(waiting[0]) and not waiting[1].done()
    beyond = await one.reserve("k", limits, 0)  # two wait already: refused at once
    assert beyond.refusal is not None and loop.time() - started < places.PLACE_WAIT_S
    for task in waiting:
        task.cancel()


async def test_places_freed_by_clients_that_left_never_let_a_key_pass_its_limit_or_refuse_under_it(
    parts: list[Part], one_second_slots: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(places, "PLACE_WAIT_S", 0.01)  # nothing frees while one client waits on itself
    client = _client(parts, (await _started(parts))[1])
    limits = Limits(max_concurrent=16)  # room for leases of several places
    rng = random.Random(7)
    taking: set[int] = set()  # admitted, neither left nor settled
    left: set[int] = set()  # left, not yet settled
    for _ in range(300):
        if rng.random() < 0.3 or not taking | left:
            # Bursts, so that the key is leased blocks of places and admits from them too.
            for decision in await asyncio.gather(*(client.reserve("k", limits, 0) for _ in range(rng.randint(1, 4)))):
                if decision.reservation is None:
                    assert len(taking) == 16, "refused under the limit"
                else:
                    taking.add(decision.reservation)
                    assert len(taking) <= 16, "admitted past the limit"
            continue
        ticket = rng.choice(sorted(taking | left))
        if ticket in taking and rng.random() < 0.5:
            taking.discard(ticket)
            left.add(ticket)
            client.leave(ticket)
        else:
            taking.discard(ticket)
            left.discard(ticket)
            client.settle(ticket, 0)


async def test_a_warmed_client_reaches_the_ledger_before_its_first_request(parts: list[Part]) -> None:
    _, address = await _started(parts)
    looked_up: list[None] = []

    async def find() -> LimiterAddress | None:
        looked_up.append(None)
        return address

    client = LimiterClient(find)
    parts.append(client)
    await client.warm()  # as a new ingress replica does before it takes clients
    assert len(looked_up) == 1
    decision = await client.reserve("k", Limits(rpm=5), 0)
    assert decision.reservation is not None and len(looked_up) == 1  # over the connection made: no look-up more
    with pytest.raises(ServiceUnavailableError):  # a ledger that cannot be found: as a request would be
        await _client(parts, None).warm()


async def test_an_unreachable_limiter_answers_503(parts: list[Part]) -> None:
    client = _client(parts, None)
    with pytest.raises(ServiceUnavailableError):
        await client.reserve("k", Limits(rpm=1), 0)


@pytest.mark.parametrize("hello", [b'{"token": "guess"}', b"[]", b"null", b'"token"'])
async def test_a_wrong_token_gets_nothing(parts: list[Part], hello: bytes, caplog: pytest.LogCaptureFixture) -> None:
    _, address = await _started(parts)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(port_proof.challenge()[1])  # (the ledger proves itself to anyone: it is the caller that must)
    await reader.readuntil(b"\r\n")
    writer.write(hello + b'\n{"op": "usage", "id": 1, "key": "k", "limits": [1, null, null]}\n')
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]  # no failure of its own
    ok = _client(parts, address)
    assert (await ok.usage("k", Limits(rpm=1)))[0].remaining_requests == 1
    json.dumps(address._asdict())  # the address travels as replica metadata


async def test_a_port_that_cannot_prove_it_is_the_ledger_is_sent_nothing(parts: list[Part]) -> None:
    # Another process took the address of a ledger that stopped before the ingress looked again.
    impostor = Impostor()
    taken = LimiterAddress("127.0.0.1", await impostor.start(), "the ledger's token")
    with pytest.raises(ServiceUnavailableError):
        await _client(parts, taken).reserve("k", Limits(rpm=1), 0)
    assert await impostor.heard_only_a_challenge()  # no token, no key
    impostor.close()


async def test_a_ledger_being_restarted_is_waited_for_a_bounded_time_then_503_at_once_until_it_is_back(
    parts: list[Part],
) -> None:
    # Serve restarts the hub's replica within seconds; until then its address cannot be found.
    _, address = await _started(parts)
    back = asyncio.Event()

    async def find() -> LimiterAddress:
        await back.wait()
        return address

    client = LimiterClient(find, wait_s=1.0)
    parts.append(client)
    with pytest.raises(ServiceUnavailableError) as first:
        await asyncio.wait_for(client.reserve("k", Limits(rpm=5), 0), 3)  # the bound, not forever
    assert first.value.message == limiter.UNAVAILABLE and first.value.retry_after_s
    with pytest.raises(ServiceUnavailableError):
        await asyncio.wait_for(client.reserve("k", Limits(rpm=5), 0), 0.5)  # still down: at once
    back.set()
    decision = await asyncio.wait_for(client.reserve("k", Limits(rpm=5), 0), 2)
    assert decision.reservation is not None


async def _restarted(parts: list[Part], where: list[LimiterAddress], old: LimiterServer) -> LimiterServer:
    """Serve replaces the hub's replica: a new, empty ledger at a new address, the old one gone."""
    new, where[0] = await _started(parts)
    await old.stop()
    return new


async def test_a_restarted_ledger_is_told_what_runs_and_what_ended_within_the_minute_and_never_confused(
    parts: list[Part], one_second_slots: float
) -> None:
    old, address = await _started(parts)
    where = [address]
    client = LimiterClient(lambda: _found(where[0]))
    parts.append(client)
    one = Limits(tpm=1000, max_concurrent=1)
    first = (await client.reserve("k", one, 300)).reservation
    busy = Limits(rpm=1000, tpm=100_000)  # a busy key: admitted from leases too
    burst = [d.reservation for d in await asyncio.gather(*(client.reserve("b", busy, 10) for _ in range(8)))]
    assert first is not None and None not in burst
    client.leave(burst[0])  # its client left: its place stays free in the new ledger
    minute = Limits(rpm=5, tpm=1000)
    for _ in range(3):  # ended within the minute: the new ledger counts them too
        client.settle((await client.reserve("m", minute, 50)).reservation, 7)  # type: ignore[arg-type]
    new = await _restarted(parts, where, old)
    other = _client(parts, where[0])  # another ingress replica: the new ledger's first reservations are its
    assert (await other.reserve("x", Limits(max_concurrent=1), 0)).reservation is not None
    # What was admitted and has not ended is counted in the new ledger, as in the old one: the client
    # tells it once it reaches it, unasked (no request of its own may come to this replica meanwhile).
    await _counted(new, "k", 1)
    usage, in_flight = await other.usage("k", one)
    assert in_flight == 1 and usage.remaining_tokens == 700
    usage, _ = await other.usage("m", minute)
    assert (usage.remaining_requests, usage.remaining_tokens) == (2, 1000 - 3 * 7)
    refused = await other.reserve("k", one, 10)
    assert refused.refusal is not None and refused.refusal.limit == "concurrent"
    assert new.ledger.in_flight("b") == 8 and new.ledger.usage("b", busy).remaining_tokens == 100_000 - 80
    client.settle(first, 120)
    for ticket in burst:
        client.settle(ticket, 5)  # type: ignore[arg-type]
    await _counted(new, "b", 0)
    # Each settled what it used, in the new ledger, and nothing of the other replica's was touched.
    assert new.ledger.in_flight("k") == 0 and new.ledger.usage("k", one).remaining_tokens == 880
    assert new.ledger.usage("b", busy).remaining_tokens == 100_000 - 40
    assert new.ledger.in_flight("x") == 1


async def _counted(server: LimiterServer, key: str, in_flight: int) -> None:
    for _ in range(300):
        if server.ledger.in_flight(key) == in_flight:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key}: {server.ledger.in_flight(key)} in flight, not {in_flight}")


async def test_requests_running_while_no_ledger_can_be_reached_are_booked_once_one_can(parts: list[Part]) -> None:
    old, address = await _started(parts)
    where: list[LimiterAddress | None] = [address]
    client = LimiterClient(lambda: _found(where[0]))
    parts.append(client)
    one = Limits(max_concurrent=1)
    running = (await client.reserve("k", one, 0)).reservation
    where[0] = None  # the hub's replica is being restarted: no address yet
    await old.stop()
    with pytest.raises(ServiceUnavailableError):
        await client.reserve("k", one, 0)
    new, where[0] = await _started(parts)
    await _counted(new, "k", 1)  # retried by itself, not waiting for a request to come
    client.leave(running)
    assert (await client.reserve("k", one, 0)).reservation is not None


class ReserveSeenServer(LimiterServer):
    """Says when a reservation has arrived."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", _frozen())
        self.reserving = asyncio.Event()

    def _serve(self, message, peer):  # type: ignore[no-untyped-def]
        if message.get("op") == "reserve":
            self.reserving.set()
        return super()._serve(message, peer)


async def test_a_new_ledger_decides_nothing_until_the_other_replicas_could_tell_it_what_runs(
    parts: list[Part],
) -> None:
    old, address = await _started(parts)
    found_by: dict[str, LimiterAddress | None] = {"first": address, "second": address}
    first = LimiterClient(lambda: _found(found_by["first"]))
    second = LimiterClient(lambda: _found(found_by["second"]))
    parts.extend([first, second])
    one = Limits(max_concurrent=1)
    assert (await first.reserve("k", one, 0)).reservation is not None  # running on the first replica
    assert (await second.reserve("z", Limits(), 0)).reservation is not None
    new, address = await _started(parts, ReserveSeenServer())
    found_by["second"] = address  # the second replica finds the new ledger first
    found_by["first"] = None
    await old.stop()
    loop = asyncio.get_running_loop()
    asking = loop.create_task(_reserved(second, "k", one))
    await asyncio.wait_for(new.reserving.wait(), 5)
    started = loop.time()
    found_by["first"] = address  # now the first: it books its running request
    decision = await asyncio.wait_for(asking, 10)
    assert decision.refusal is not None and decision.refusal.limit == "concurrent"
    assert loop.time() - started < limiter.REPLY_TIMEOUT_S + places.PLACE_WAIT_S


async def _reserved(client: LimiterClient, key: str, limits: Limits) -> ledger.Decision:
    """Reserves once the client has seen its old connection end (503 until then)."""
    for _ in range(100):
        with contextlib.suppress(ServiceUnavailableError):
            return await client.reserve(key, limits, 0)
        await asyncio.sleep(0.01)
    raise AssertionError("no ledger reached")


class _Written:
    """A replica's connection to the ledger, as the ledger writes to it."""

    def __init__(self) -> None:
        self.lines: list[dict[str, object]] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.lines += [json.loads(line) for line in data.splitlines()]

    def close(self) -> None:
        return None


async def test_a_request_whose_replica_goes_while_it_waits_for_a_place_is_booked_to_no_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its replica left while the ledger kept it waiting for a place, and
    another replica's lease of the key was out when the wait ended: the
    place that lease gives back is not booked for a request no one holds."""
    from gateway.auth.limiter_server import _Peer

    monkeypatch.setattr(places, "PLACE_WAIT_S", 0.05)
    server = LimiterServer("127.0.0.1", _frozen())
    holder, leaving = _Peer(_Written()), _Peer(_Written())  # type: ignore[arg-type]
    server._peers |= {holder, leaving}
    limits = list(Limits(max_concurrent=4).__dict__.values())

    def reserve(peer: _Peer, number: int, lease: bool = False) -> None:
        message = {"op": "reserve", "id": number, "key": "k", "limits": limits, "tokens": 0}
        reply = server._serve({**message, "lease": [4, 0]} if lease else message, peer)
        if reply is not None:
            peer.send(reply)

    for number in range(4):
        reserve(holder, number)
    taken = [line["r"] for line in holder.writer.lines]  # type: ignore[attr-defined]
    reserve(leaving, 0)  # waits for a place
    for reservation in taken[:3]:  # in one read: three settle, one comes with a lease, one more
        server._serve({"op": "settle", "r": reservation, "used": None}, holder)
    reserve(holder, 4, lease=True)
    reserve(holder, 5)
    await asyncio.sleep(0)
    server._peers.discard(leaving)  # its replica goes
    server._gone(leaving)
    await asyncio.sleep(places.PLACE_WAIT_S * 4)  # its wait ends, behind the lease
    lease = next(line["lease"][0] for line in holder.writer.lines if line.get("lease"))  # type: ignore[attr-defined]
    server._serve({"op": "release", "r": lease, "requests": 0, "tokens": 0, "places": 0, "end": True}, holder)
    for line in holder.writer.lines[4:]:  # type: ignore[attr-defined]
        if line.get("r") is not None:
            server._serve({"op": "settle", "r": line["r"], "used": None}, holder)
    server._serve({"op": "settle", "r": taken[3], "used": None}, holder)
    assert server.ledger.in_flight("k") == 0 and not leaving.owned
    await server.stop()


def _reset_seen_before_the_hello(monkeypatch: pytest.MonkeyPatch, ports: set[int]) -> None:
    """Has the client see the reset of a connection to one of ``ports`` as soon
    as the port has proved itself, before it writes its hello (as it may)."""
    check = port_proof.check

    async def checked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, timeout_s: float) -> None:
        await check(reader, writer, token, timeout_s)
        if writer.get_extra_info("peername")[1] in ports:
            while not writer.transport.is_closing():
                await asyncio.sleep(0.001)

    monkeypatch.setattr(port_proof, "check", checked)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_ledger_that_resets_the_connection_once_proven_is_unavailable_not_a_failure(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ledger's process killed as a replica connects: on uvloop the hello's write raised
    # RuntimeError, which reached the limited key's client as a 500 rather than a 503.
    async def scenario() -> None:
        server, port = await proving_then_resetting("ledger-token")
        _reset_seen_before_the_hello(monkeypatch, {port})
        client = LimiterClient(lambda: _found(LimiterAddress("127.0.0.1", port, "ledger-token")))
        try:
            with pytest.raises(ServiceUnavailableError):
                await client.warm()
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)




async def test_requests_in_flight_are_booked_by_the_next_ledger_when_one_is_lost_as_it_is_told_of_them(
    parts: list[Part], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, address = await _started(parts)
    where = [address]
    client = LimiterClient(lambda: _found(where[0]))
    parts.append(client)
    one = Limits(max_concurrent=1)
    assert (await client.reserve("k", one, 0)).reservation is not None
    # The hub's replica is replaced, and the first new one dies just as this replica tells it what runs:
    # its reset reaches the client between the port's proof and the hello.
    told, reset_sent = asyncio.Event(), asyncio.Event()

    async def dies_once_proven(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await port_proof.prove(reader, writer, address.token, 2)
        await told.wait()
        reset(writer)
        reset_sent.set()

    dying = await asyncio.start_server(dies_once_proven, "127.0.0.1", 0)
    port = dying.sockets[0].getsockname()[1]
    check = port_proof.check

    async def checked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, timeout_s: float) -> None:
        await check(reader, writer, token, timeout_s)
        if writer.get_extra_info("peername")[1] == port:
            writer.transport.pause_reading()  # (the reset stays unseen until a write meets it)
            told.set()
            await reset_sent.wait()
            await asyncio.sleep(0.05)
            writer.transport.resume_reading()

    monkeypatch.setattr(port_proof, "check", checked)
    where[0] = LimiterAddress("127.0.0.1", port, address.token)
    try:
        await old.stop()
        await asyncio.wait_for(reset_sent.wait(), 5)
        await asyncio.sleep(0.1)
        new, where[0] = await _started(parts)
        # The request still running is counted there: the key's one place is taken.
        await _counted(new, "k", 1)
    finally:
        dying.close()
        await dying.wait_closed()
