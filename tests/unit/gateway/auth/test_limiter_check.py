"""gateway/auth/limiter.py's ``check``: a key its request limit refuses is
told so before its request's tokens are counted, asking the shared ledger
only while an earlier refusal may stand, and never refused by it wrongly."""

from __future__ import annotations

from typing import Any

from gateway.auth.ledger import Limits
from gateway.auth.limiter_server import LimiterServer
from tests.unit.gateway.auth.conftest import Part
from tests.unit.gateway.auth.test_limiter import _client, _frozen, _started


class CheckCountingServer(LimiterServer):
    def __init__(self) -> None:
        super().__init__("127.0.0.1", _frozen())
        self.checks = 0

    def _serve(self, message: dict[str, Any], peer: Any) -> dict[str, Any] | None:
        self.checks += message.get("op") == "check"
        return super()._serve(message, peer)


async def test_a_key_refused_by_its_request_limit_is_refused_by_a_check_until_it_fits(parts: list[Part]) -> None:
    server = CheckCountingServer()
    _, address = await _started(parts, server)
    client = _client(parts, address)
    limits = Limits(rpm=1, tpm=1000)
    assert await client.check("k", limits) is None
    assert server.checks == 0  # never refused: a key's requests cost no round trip more
    admitted = await client.reserve("k", limits, 10)
    assert admitted.reservation is not None
    client.settle(admitted.reservation, 10)
    refused = await client.reserve("k", limits, 10)
    assert refused.refusal is not None and refused.refusal.limit == "requests"
    checked = await client.check("k", limits)
    assert checked is not None and checked.refusal == refused.refusal and checked.usage == refused.usage
    assert server.checks == 1
    usage, in_flight = await client.usage("k", limits)
    assert (usage.remaining_requests, usage.remaining_tokens, in_flight) == (0, 990, 0)  # the check booked nothing
    # A new minute for the key (as a live change raising its limit): the next check lets it through.
    assert await client.check("k", Limits(rpm=2, tpm=1000)) is None
    assert await client.check("k", limits) is None and server.checks == 2  # and asks no more


async def test_a_check_refuses_nothing_while_the_keys_leases_are_out(parts: list[Part]) -> None:
    server, address = await _started(parts)
    holder, other = _client(parts, address), _client(parts, address)
    limits = Limits(rpm=1000, tpm=1_000_000)
    for _ in range(3):  # a busy key: its replica is leased a block of its requests
        decision = await holder.reserve("k", limits, 10)
        assert decision.reservation is not None
    assert holder._demand["k"].lease is not None
    counted = limits.rpm - server.ledger.usage("k", limits).remaining_requests  # (the leased block counts as used)
    tight = Limits(rpm=counted, tpm=1_000_000)
    assert server.ledger.check("k", tight) is not None  # the ledger's counts alone would refuse the next
    other._over["k"] = float("inf")  # (as after a refusal seen earlier)
    assert await other.check("k", tight) is None  # the leased block may come back: only a reservation decides
