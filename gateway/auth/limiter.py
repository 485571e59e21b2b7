"""The one ledger every ingress replica shares, reached over a socket.

``LimiterServer`` (``gateway.auth.limiter_server``) runs in the gateway's one shared replica (the metrics hub)
and serves a ``Ledger`` on a port guarded by a random token, published as
Serve replica metadata (key ``limiter``). Each ingress replica keeps one
connection to it (``LimiterClient``): a reservation is one JSON line each
way, a settlement one line out, so admission costs a loopback round trip,
not a Serve call. A busy key costs less: its replica is leased blocks of the
key's limits and admits from them alone (see ``LimiterClient``), and the
ledger calls unused blocks back before it refuses anyone. A lone ingress
replica (no hub is deployed then) keeps the ledger in its own process
(``LocalLimiter``).

Reservations belong to the connection that made them: when an ingress
replica goes away unsettled reservations end there, keeping the tokens they
reserved (the conservative count), so nothing is left in flight forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.auth.ledger import SLOT_S, Decision, Ledger, Limits, Refusal, Usage
from gateway.errors import ServiceUnavailableError
from gateway.protocol.relay import RelayAddress

logger = logging.getLogger(__name__)

METADATA_KEY = "limiter"
CONNECT_TIMEOUT_S = 2.0
READ_BYTES = 256 * 1024
REPLY_TIMEOUT_S = 2.0
RECALL_WAIT_S = 0.5  # longest a request waits for other replicas' leases to come back
LEASE_AFTER = 2  # a key admitted this often in one slot on a replica gets leases there
MAX_LEASE = 1024  # requests in one lease, at most
UNAVAILABLE = "Rate limits cannot be checked right now; please retry shortly."


class LimiterAddress(RelayAddress):
    """Where the ledger listens, and the token it asks for."""

    @classmethod
    def metadata_key(cls) -> str:
        return METADATA_KEY


def limits_of(data: list[int | None]) -> Limits:
    return Limits(*data)


def encode_decision(decision: Decision) -> dict[str, Any]:
    refusal = decision.refusal
    return {
        "r": decision.reservation,
        "usage": list(decision.usage.__dict__.values()),
        "refusal": list(refusal.__dict__.values()) if refusal is not None else None,
    }


def decode_decision(data: dict[str, Any]) -> Decision:
    refusal = data.get("refusal")
    return Decision(
        data.get("r"), Usage(*data["usage"]), Refusal(*refusal) if refusal is not None else None
    )


class LocalLimiter:
    """A ledger in this process, behind ``LimiterClient``'s methods: for a
    gateway of one ingress replica (and tests, tools)."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger if ledger is not None else Ledger()

    async def reserve(self, key: str, limits: Limits, tokens: int) -> Decision:
        return self.ledger.reserve(key, limits, tokens)

    async def usage(self, key: str, limits: Limits) -> tuple[Usage, int]:
        return self.ledger.usage(key, limits), self.ledger.in_flight(key)

    def settle(self, reservation: int, used_tokens: int) -> None:
        self.ledger.settle(reservation, used_tokens)

    async def close(self) -> None:
        pass


@dataclass
class _Lease:
    """A block of the ledger this replica admits from on its own until ``deadline``."""

    reservation: int
    deadline: float  # loop time
    requests: int
    tokens: int
    places: int
    usage: Usage  # the key's counts when it was granted, the block counted as used
    metered: bool = True  # whether the key has a token limit (else tokens are not counted here)
    in_flight: int = 0
    open: bool = True
    timer: asyncio.TimerHandle | None = None
    granted: int = 0

    def fits(self, tokens: int, now: float) -> bool:
        return self.open and now < self.deadline and self.requests >= 1 and self.places >= 1 and self.tokens >= tokens

    def running_low(self, tokens: int, now: float) -> bool:
        """A quarter or less left of its requests, tokens or time, or no place left."""
        low = self.granted // 4
        return (self.requests <= low or self.places < 1 or self.tokens < tokens * max(1, low)
                or now > self.deadline - SLOT_S / 4)

    def remaining(self) -> Usage:
        """The key's counts as this replica knows them: what was left when
        the block was granted, plus what is left of the block."""
        usage = self.usage
        return Usage(
            usage.limit_requests, usage.remaining_requests + self.requests, usage.reset_requests_s,
            usage.limit_tokens, usage.remaining_tokens + max(0, self.tokens), usage.reset_tokens_s,
        )


@dataclass
class _Demand:
    """How much one key asks of this replica: admissions in this slot and the last."""

    lease: _Lease | None = None
    asking: dict[str, Any] | None = None  # the reservation that asks for a lease
    slot: int = -1
    count: int = 0
    last: int = 0
    tokens: int = 0  # the most tokens one request reserved, this slot

    def note(self, now: float, tokens: int) -> None:
        slot = int(now / SLOT_S)
        if slot != self.slot:
            self.last = self.count if slot == self.slot + 1 else 0
            self.slot, self.count, self.tokens = slot, 0, 0
        self.count += 1
        self.tokens = max(self.tokens, tokens)

    def want(self) -> int:
        """Requests to ask a lease for: twice the recent rate (none when low)."""
        recent = max(self.count, self.last)
        return min(MAX_LEASE, 2 * recent) if recent >= LEASE_AFTER else 0


class LimiterClient:
    """One ingress replica's connection to the shared ledger.

    A key that this replica admits often gets leases (blocks of requests,
    tokens and places booked in the ledger for one slot), and admits from
    them without a round trip; the rest of the block goes back when the
    slot ends or the ledger recalls it. Otherwise each request is one
    reservation (what one event-loop turn asks leaves in one write).

    ``find`` returns the server's address (Serve replica metadata). Calls
    raise ``ServiceUnavailableError`` (503) when the ledger cannot be
    reached: a limited key is never let through unchecked.
    """

    def __init__(self, find: Callable[[], Any]) -> None:
        self._find = find
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()
        self._outbox: list[dict[str, Any]] = []
        self._demand: dict[str, _Demand] = {}
        # Admitted requests: the ledger's reservation, or the lease and the tokens taken from it.
        self._tickets: dict[int, int | tuple[_Lease, int]] = {}
        self._tickets_ids = itertools.count(1)
        self._renewing: set[asyncio.Task[None]] = set()
        self._releases: dict[int, dict[str, Any]] = {}  # per lease, the release not yet sent

    async def reserve(self, key: str, limits: Limits, tokens: int) -> Decision:
        demand = self._demand.get(key)
        if demand is None:
            demand = self._demand[key] = _Demand()
        now = asyncio.get_running_loop().time()
        demand.note(now, tokens)
        lease = demand.lease
        if lease is not None:
            if lease.fits(tokens, now):
                lease.requests -= 1
                lease.places -= 1
                lease.tokens -= tokens
                lease.in_flight += 1
                if demand.asking is None and lease.running_low(tokens, now):
                    self._renew(key, limits, demand, now)
                return Decision(self._ticket((lease, tokens)), lease.remaining())
            self._close(key, lease)  # what is left of it goes back before this request is decided
        message: dict[str, Any] = {"op": "reserve", "key": key, "limits": list(limits.__dict__.values()),
                                   "tokens": tokens}
        want = demand.want()
        asking = demand.asking
        if asking is not None and any(m is asking for m in self._outbox):
            asking["lease"] = [want, want * demand.tokens]  # not sent yet: ask for this one's share too
        elif want and asking is None:
            message["lease"] = [want, want * demand.tokens]
            demand.asking = message
        try:
            reply = await self._ask(message)
        finally:
            if demand.asking is message:
                demand.asking = None
        granted = reply.get("lease")
        if granted is not None:
            self._open(key, demand, granted, now, reply["_via"])
        decision = decode_decision(reply)
        if decision.reservation is None:
            return decision
        return Decision(self._ticket(decision.reservation), decision.usage)

    async def usage(self, key: str, limits: Limits) -> tuple[Usage, int]:
        """The key's counts in the ledger now (leases counted as used), and
        its places taken."""
        reply = await self._ask({"op": "usage", "key": key, "limits": list(limits.__dict__.values())})
        return Usage(*reply["usage"]), int(reply["in_flight"])

    def settle(self, ticket: int, used_tokens: int | None) -> None:
        """Never waits; on a broken connection the server has already ended
        the reservation (keeping its tokens)."""
        held = self._tickets.pop(ticket, None)
        if held is None:
            return
        if isinstance(held, int):
            self._send({"op": "settle", "r": held, "used": used_tokens})
            return
        lease, reserved = held
        lease.in_flight -= 1
        back = 0 if used_tokens is None or not lease.metered else reserved - used_tokens
        if lease.open:
            lease.places += 1
            lease.tokens += back
        else:
            self._release(lease, 0, back, 1, closed=False)

    def _renew(self, key: str, limits: Limits, demand: _Demand, now: float) -> None:
        """Asks for the next lease while the current one still admits, so a
        busy key does not fall back to a round trip per request meanwhile."""
        want = demand.want()
        if not want:
            return
        message: dict[str, Any] = {"op": "lease", "key": key, "limits": list(limits.__dict__.values()),
                                   "lease": [want, want * demand.tokens]}
        demand.asking = message

        async def renew() -> None:
            try:
                reply = await self._ask(message)
            except ServiceUnavailableError:
                return
            finally:
                if demand.asking is message:
                    demand.asking = None
            if reply.get("lease") is not None:
                self._open(key, demand, reply["lease"], now, reply["_via"])

        task = asyncio.get_running_loop().create_task(renew())
        self._renewing.add(task)
        task.add_done_callback(self._renewing.discard)

    def _ticket(self, held: int | tuple[_Lease, int]) -> int:
        ticket = next(self._tickets_ids)
        self._tickets[ticket] = held
        return ticket

    def _open(self, key: str, demand: _Demand, granted: list[Any], sent: float, via: Any) -> None:
        """Starts admitting from a granted lease: until its slot ends, as
        measured from when it was asked for (never later than the ledger's)."""
        reservation, requests, tokens, places, valid_s, usage = granted
        writer = self._writer
        if writer is None or via is not writer or writer.is_closing():
            return  # its connection ended since: so did the lease
        if demand.lease is not None:
            self._close(key, demand.lease)
        granted_usage = Usage(*usage)
        lease = _Lease(reservation, sent + valid_s, requests, tokens, places, granted_usage,
                       metered=granted_usage.limit_tokens is not None, granted=requests)
        demand.lease = lease
        lease.timer = asyncio.get_running_loop().call_at(lease.deadline, self._close, key, lease)

    def _close(self, key: str, lease: _Lease, send: bool = True) -> None:
        """Stops admitting from ``lease`` and gives back what it did not use."""
        if not lease.open:
            return
        lease.open = False
        if lease.timer is not None:
            lease.timer.cancel()
        demand = self._demand.get(key)
        if demand is not None and demand.lease is lease:
            demand.lease = None
        if send:
            self._release(lease, lease.requests, lease.tokens, lease.places, closed=True)
        lease.requests = lease.tokens = lease.places = 0

    def _release(self, lease: _Lease, requests: int, tokens: int, places: int, closed: bool) -> None:
        """Gives back part of ``lease``; what one turn of the event loop gives
        back of one lease leaves as one message."""
        message = self._releases.get(lease.reservation)
        if message is None or not any(m is message for m in self._outbox):
            message = {"op": "release", "r": lease.reservation, "requests": 0, "tokens": 0, "places": 0}
            self._releases[lease.reservation] = message
            self._send(message)
        message["requests"] += requests
        message["tokens"] += tokens
        message["places"] += places
        message["end"] = lease.in_flight == 0
        if closed:
            message["closed"] = True
        if message["end"]:
            del self._releases[lease.reservation]

    def _send(self, message: dict[str, Any]) -> None:
        """Queues ``message``; what is queued in one turn of the event loop
        leaves in one write (under load, many requests share it)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        self._outbox.append(message)
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(b"".join(json.dumps(m, separators=(",", ":")).encode() + b"\n" for m in messages))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        await self._connection()
        message["id"] = ident = next(self._ids)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = reply
        try:
            self._send(message)
            return await asyncio.wait_for(reply, REPLY_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError):
            raise ServiceUnavailableError(UNAVAILABLE) from None
        finally:
            self._pending.pop(ident, None)

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                address = await self._find()
                if address is None:
                    raise ConnectionError("no limiter address")
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address.host, address.port), CONNECT_TIMEOUT_S
                )
            except (OSError, asyncio.TimeoutError) as exc:
                logger.warning("cannot reach the rate limiter: %s", exc)
                raise ServiceUnavailableError(UNAVAILABLE) from None
            writer.write(json.dumps({"token": address.token}).encode() + b"\n")
            self._writer = writer
            self._reading = asyncio.get_running_loop().create_task(self._read(reader, writer))
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pending = b""
            while data := await reader.read(READ_BYTES):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    reply = json.loads(line)
                    if reply.get("op") == "recall":
                        demand = self._demand.get(reply["key"])
                        if demand is not None and demand.lease is not None:
                            self._close(reply["key"], demand.lease)
                        continue
                    waiting = self._pending.get(reply.get("id"))
                    if waiting is not None and not waiting.done():
                        reply["_via"] = writer  # a lease is good only while this connection lasts
                        waiting.set_result(reply)
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            # The ledger ended this connection's leases: none may be admitted from.
            for key, demand in self._demand.items():
                if demand.lease is not None:
                    self._close(key, demand.lease, send=False)
            for waiting in self._pending.values():
                if not waiting.done():
                    waiting.set_exception(ConnectionError("the rate limiter went away"))
