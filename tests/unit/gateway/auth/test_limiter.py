"""gateway/auth/limiter.py: one ledger shared over a socket, exact under concurrency."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from gateway.auth.ledger import Limits
from gateway.auth.limiter import LimiterAddress, LimiterClient, LimiterServer
from gateway.errors import ServiceUnavailableError


async def _started() -> tuple[LimiterServer, LimiterAddress]:
    server = LimiterServer("127.0.0.1")
    return server, await server.start()


async def _found(address: LimiterAddress | None) -> LimiterAddress | None:
    return address


async def test_two_clients_share_one_ledger_without_overshoot() -> None:
    server, address = await _started()
    clients = [LimiterClient(lambda: _found(address)) for _ in range(2)]
    limits = Limits(rpm=20, tpm=1000)
    rng = random.Random(3)
    wants = [rng.randint(1, 200) for _ in range(64)]
    decisions = await asyncio.gather(
        *(clients[i % 2].reserve("k", limits, want) for i, want in enumerate(wants))
    )
    admitted = [(d, want) for d, want in zip(decisions, wants) if d.reservation is not None]
    assert len(admitted) <= 20
    assert sum(want for _, want in admitted) <= 1000
    for decision, want in zip(decisions, wants):  # refused only when it would not fit
        if decision.refusal is not None:
            assert decision.refusal.used + decision.refusal.requested > decision.refusal.value
    used = 0
    for i, (decision, want) in enumerate(admitted):
        clients[i % 2].settle(decision.reservation, want // 2)  # type: ignore[arg-type]
        used += want // 2
    await asyncio.sleep(0.05)
    usage, in_flight = await clients[0].usage("k", limits)
    assert usage.remaining_tokens == 1000 - used and in_flight == 0
    for client in clients:
        await client.close()
    await server.stop()


async def test_a_client_that_goes_away_releases_its_places_and_keeps_its_tokens() -> None:
    server, address = await _started()
    leaving, staying = LimiterClient(lambda: _found(address)), LimiterClient(lambda: _found(address))
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
    await staying.close()
    await server.stop()


async def test_an_unreachable_limiter_answers_503() -> None:
    client = LimiterClient(lambda: _found(None))
    with pytest.raises(ServiceUnavailableError):
        await client.reserve("k", Limits(rpm=1), 0)


async def test_a_wrong_token_gets_nothing() -> None:
    server, address = await _started()
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b'{"token": "guess"}\n{"op": "usage", "id": 1, "key": "k", "limits": [1, null, null]}\n')
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    ok = LimiterClient(lambda: _found(address))
    assert (await ok.usage("k", Limits(rpm=1)))[0].remaining_requests == 1
    await ok.close()
    await server.stop()
    json.dumps(address._asdict())  # the address travels as replica metadata
