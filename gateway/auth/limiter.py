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
(``gateway.auth.local.LocalLimiter``).

Reservations belong to the connection that made them: when an ingress
replica goes away unsettled reservations end there, keeping the tokens they
reserved (the conservative count), so nothing is left in flight forever.
When the ledger goes away instead, each replica books what it still has in
flight, and what ended within the minute, with the next one it reaches
(``gateway.auth.tickets``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.auth.lease import Demand, Lease
from gateway.auth.ledger import WINDOW_S, Decision, Limits, Usage
from gateway.auth.limiter_wire import (
    CONNECT_TIMEOUT_S,
    READ_BYTES,
    REPLY_TIMEOUT_S,
    LimiterAddress,
    decode_decision,
    given_back,
)
from gateway.auth.places import waits_for_place
from gateway.auth.tickets import Ticket, Tickets
from gateway.errors import ServiceUnavailableError
from gateway.protocol import port_proof
from gateway.protocol.peer import PeerWriter
from gateway.http.replica_lookup import BoundedLookUp

logger = logging.getLogger(__name__)

RESTORE_RETRY_S = 0.2  # between tries to reach a new ledger, while requests it must learn are running
UNAVAILABLE = "Rate limits cannot be checked right now; please retry shortly."


# Where the place of a request whose client left went (``LimiterClient.leave``).
_BACK_TO_LEASE = "lease"  # into its open lease, to admit the key's next request from
_IN_LEDGER = "ledger"  # the ledger counts it no more against the limit; freed when the request settles


class LimiterClient:
    """One ingress replica's connection to the shared ledger.

    A key that this replica admits often gets leases (blocks of requests,
    tokens and places booked in the ledger for one slot), and admits from
    them without a round trip; the rest of the block goes back when the
    slot ends or the ledger recalls it. While a lease is being asked for,
    the key's further requests wait for it (one round trip, as their own
    would be) and go to the ledger only if it does not fit them. Otherwise
    each request is one reservation (what one event-loop turn asks leaves
    in one write).

    ``find`` returns the server's address (Serve replica metadata); while
    the hub's replica is being restarted it waits, and a request waits for it
    at most ``wait_s`` (then, while it stays down, not at all; see
    ``BoundedLookUp``). Calls raise ``ServiceUnavailableError`` (503) when
    the ledger cannot be reached: a limited key is never let through unchecked.
    """

    def __init__(self, find: Callable[[], Awaitable[LimiterAddress | None]], wait_s: float = 5.0) -> None:
        self._find = find
        self._found: LimiterAddress | None = None
        self._look_up = BoundedLookUp(self._look, wait_s, message=UNAVAILABLE)
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._unwaited: dict[int, dict[str, Any]] = {}  # asked, then no longer waited for: given back when answered
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()
        self._outbox: list[dict[str, Any]] = []
        self._demand: dict[str, Demand] = {}
        self._tickets = Tickets()
        self._connections = itertools.count(1)
        self._live: int | None = None  # the connection open now
        self._restoring: asyncio.Task[None] | None = None
        self._closed = False
        self._ledger: str | None = None  # the token of the ledger last reached: another is a new one
        self._renewing: set[asyncio.Task[None]] = set()
        self._releases: dict[int, dict[str, Any]] = {}  # per lease, the release not yet sent
        self._over: dict[str, float] = {}  # per key refused by its request limit, until when that stood

    async def reserve(self, key: str, limits: Limits, tokens: int) -> Decision:
        demand = self._demand.get(key)
        if demand is None:
            demand = self._demand[key] = Demand()
        now = asyncio.get_running_loop().time()
        demand.note(now, tokens)
        admitted = self._from_lease(key, limits, demand, tokens, now)
        if admitted is not None:
            return admitted
        want = 0 if demand.at_limit else demand.want()
        asking, answered = demand.asking, demand.answered
        if asking is not None and answered is not None and not demand.at_limit:
            # A lease is on its way: this request waits for it rather than
            # making a round trip of its own (a busy key whose lease ran out
            # while its successor was asked for would send a whole wave).
            if self._unsent(asking):
                asking["lease"] = [want, want * demand.tokens]  # not sent yet: ask for this one's share too
            await asyncio.wait({answered}, timeout=CONNECT_TIMEOUT_S + REPLY_TIMEOUT_S)
            now = asyncio.get_running_loop().time()
            admitted = self._from_lease(key, limits, demand, tokens, now)
            if admitted is not None:
                return admitted
        message: dict[str, Any] = {"op": "reserve", "key": key, "limits": list(limits.__dict__.values()),
                                   "tokens": tokens}
        if want and demand.asking is None:
            message["lease"] = [want, want * demand.tokens]
        reply = await self._ask_for_lease(key, demand, message, now)
        decision = decode_decision(reply)
        demand.at_limit = waits_for_place(decision)
        if decision.reservation is None:
            self._note_over(key, decision, now)
            return decision
        held = Ticket(key, tokens, reply["_on"], now, reservation=decision.reservation)
        if held.connection != self._live:  # its connection ended since: so did the reservation
            held.connection = held.reservation = None
            self._restore_soon()
        return Decision(self._tickets.add(held), decision.usage)

    async def check(self, key: str, limits: Limits) -> Decision | None:
        """The refusal of ``key``'s next request by its request limit, while
        its last one may still stand (None: not refused by it, or not
        known): a key over its limit is refused before its request's tokens
        are counted. Asks the ledger only while that refusal may stand."""
        until = self._over.get(key)
        if until is None:
            return None
        now = asyncio.get_running_loop().time()
        if now >= until:
            del self._over[key]
            return None
        reply = await self._ask({"op": "check", "key": key, "limits": list(limits.__dict__.values())})
        if reply.get("refusal") is None:
            self._over.pop(key, None)
            return None
        decision = decode_decision(reply)
        self._note_over(key, decision, now)
        return decision

    def _note_over(self, key: str, decision: Decision, now: float) -> None:
        refusal = decision.refusal
        if refusal is not None and refusal.limit == "requests":
            self._over[key] = now + (refusal.retry_after_s if refusal.retry_after_s is not None else WINDOW_S)

    async def usage(self, key: str, limits: Limits) -> tuple[Usage, int]:
        """The key's counts in the ledger now (leases counted as used), and
        its places taken."""
        reply = await self._ask({"op": "usage", "key": key, "limits": list(limits.__dict__.values())})
        return Usage(*reply["usage"]), int(reply["in_flight"])

    def settle(self, ticket: int, used_tokens: int | None) -> None:
        """Never waits; on a broken connection the server has already ended
        the reservation (keeping its tokens)."""
        held = self._tickets.pop(ticket)
        if held is None:
            return
        self._tickets.ended(held, used_tokens)
        left = self._tickets.left.pop(ticket, None)
        lease = held.lease
        if lease is None:
            if held.connection is not None:  # (else no ledger knows it now: nothing to settle)
                self._send({"op": "settle", **held.address(ticket), "used": used_tokens})
            return
        lease.in_flight -= 1
        back = 0 if used_tokens is None or not lease.metered else held.tokens - used_tokens
        place = 0 if left == _BACK_TO_LEASE else 1  # a place its lease took back is not freed again
        if lease.open:
            lease.places += place
            lease.tokens += back
        else:
            self._release(lease, 0, back, place, closed=False, left=int(left == _IN_LEDGER))

    def leave(self, ticket: int) -> None:
        """The client of an admitted request left: its place is free for the
        key's next request now, before the request settles (what it generated
        is known only once the replica has stopped it)."""
        held = self._tickets.get(ticket)
        left = self._tickets.left
        if held is None or ticket in left:
            return
        lease = held.lease
        if lease is None:
            left[ticket] = _IN_LEDGER
            if held.connection is not None:  # (else the ledger that learns it is told it left: ``Tickets.restore``)
                self._send({"op": "leave", **held.address(ticket)})
            return
        if lease.open:
            left[ticket] = _BACK_TO_LEASE
            lease.places += 1
        else:
            left[ticket] = _IN_LEDGER
            self._send({"op": "leave", "r": lease.reservation})

    def _renew(self, key: str, limits: Limits, demand: Demand, now: float) -> None:
        """Asks for the next lease while the current one still admits, so a
        busy key does not fall back to a round trip per request meanwhile."""
        want = demand.want()
        if not want:
            return
        message: dict[str, Any] = {"op": "lease", "key": key, "limits": list(limits.__dict__.values()),
                                   "lease": [want, want * demand.tokens]}
        asked = self._ask_for_lease(key, demand, message, now)  # from now on the key's requests wait for it

        async def renew() -> None:
            with contextlib.suppress(ServiceUnavailableError):
                await asked

        task = asyncio.get_running_loop().create_task(renew())
        self._renewing.add(task)
        task.add_done_callback(self._renewing.discard)

    def _from_lease(self, key: str, limits: Limits, demand: Demand, tokens: int, now: float) -> Decision | None:
        """Admits the request from the key's lease when it fits (asking for
        the next one when this one runs low); else gives back what is left
        of the lease, before the request is decided elsewhere, and says None."""
        lease = demand.lease
        if lease is None:
            return None
        if not lease.fits(tokens, now):
            self._close(key, lease)
            return None
        lease.requests -= 1
        lease.places -= 1
        lease.tokens -= tokens
        lease.in_flight += 1
        if demand.asking is None and lease.running_low(tokens, now):
            self._renew(key, limits, demand, now)
        return Decision(self._tickets.add(Ticket(key, tokens, self._live, now, lease=lease)), lease.remaining())

    def _ask_for_lease(
        self, key: str, demand: Demand, message: dict[str, Any], sent: float
    ) -> Awaitable[dict[str, Any]]:
        """Sends ``message``; when it asks for a lease, the key's requests
        wait for its reply from now on (``Demand.answered``), which opens the
        lease granted."""
        if "lease" not in message:
            return self._ask(message)
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        demand.asking, demand.answered = message, answered
        return self._leased(key, demand, message, sent, answered)

    async def _leased(
        self, key: str, demand: Demand, message: dict[str, Any], sent: float, answered: asyncio.Future[None]
    ) -> dict[str, Any]:
        try:
            reply = await self._ask(message)
            if reply.get("lease") is not None:
                self._open(key, demand, reply["lease"], sent, reply["_via"])
            return reply
        finally:
            if demand.asking is message:
                demand.asking = demand.answered = None
            answered.set_result(None)

    def _unsent(self, message: dict[str, Any]) -> bool:
        """Whether ``message`` has yet to leave (it gets its id once connected, then waits in the outbox)."""
        return "id" not in message or any(m is message for m in self._outbox)

    def _open(self, key: str, demand: Demand, granted: list[Any], sent: float, via: Any) -> None:
        """Starts admitting from a granted lease: until its slot ends, as
        measured from when it was asked for (never later than the ledger's)."""
        reservation, requests, tokens, places, valid_s, usage = granted
        writer = self._writer
        if writer is None or via is not writer or writer.is_closing():
            return  # its connection ended since: so did the lease
        if demand.lease is not None:
            self._close(key, demand.lease)
        granted_usage = Usage(*usage)
        lease = Lease(reservation, sent + valid_s, requests, tokens, places, granted_usage,
                       metered=granted_usage.limit_tokens is not None, granted=requests)
        demand.lease = lease
        lease.timer = asyncio.get_running_loop().call_at(lease.deadline, self._close, key, lease)

    def _close(self, key: str, lease: Lease, send: bool = True) -> None:
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

    def _release(
        self, lease: Lease, requests: int, tokens: int, places: int, closed: bool, left: int = 0
    ) -> None:
        """Gives back part of ``lease`` (``left``: of its ``places``, those the
        ledger was told their clients left); what one turn of the event loop
        gives back of one lease leaves as one message."""
        message = self._releases.get(lease.reservation)
        if message is None or not any(m is message for m in self._outbox):
            message = {"op": "release", "r": lease.reservation, "requests": 0, "tokens": 0, "places": 0, "left": 0}
            self._releases[lease.reservation] = message
            self._send(message)
        message["requests"] += requests
        message["tokens"] += tokens
        message["places"] += places
        message["left"] += left
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

    def _restore_soon(self) -> None:
        """Books what this replica has in flight with the ledger, once one is
        reached again (its requests are running whether one is or not)."""
        if self._restoring is None and not self._closed:
            self._restoring = asyncio.get_running_loop().create_task(self._restore())

    async def _restore(self) -> None:
        try:
            while not self._closed:
                try:
                    await self._connection()  # a new connection books them first
                except Exception as exc:  # noqa: BLE001 - the hub may be starting or moving: tried again
                    if not isinstance(exc, ServiceUnavailableError):
                        logger.warning("cannot reach the rate limiter: %s", exc)
                    await self._look_up.ended(RESTORE_RETRY_S)  # (at once when the new ledger is found)
                    continue
                if self._live is not None:
                    message = self._tickets.restore(self._live)  # (lost after it was made)
                    if message is not None:
                        self._send(message)
                    return
        finally:
            self._restoring = None

    async def warm(self) -> None:
        """Reaches the ledger now, as a limited key's first request would (the
        hub's look-up included); ServiceUnavailableError as that request's."""
        await self._connection()

    async def close(self) -> None:
        self._closed = True
        if self._restoring is not None:
            self._restoring.cancel()
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
        taken = False
        try:
            self._send(message)
            answer = await asyncio.wait_for(reply, REPLY_TIMEOUT_S)
            taken = True
            return answer
        except (ConnectionError, asyncio.TimeoutError):
            raise ServiceUnavailableError(UNAVAILABLE) from None
        finally:
            self._pending.pop(ident, None)
            if not taken and message["op"] in ("reserve", "lease"):
                self._give_back(ident, message, reply)

    def _give_back(self, ident: int, message: dict[str, Any], reply: asyncio.Future[dict[str, Any]]) -> None:
        """What the ledger grants a request no longer waited for goes back:
        when its reply comes, or at once where it came as the request was
        cancelled (Python 3.12's ``wait_for`` then drops the reply it holds)."""
        if reply.cancelled():
            self._unwaited[ident] = message
        elif reply.done() and reply.exception() is None and reply.result().get("_via") is self._writer:
            for back in given_back(message, reply.result()):
                self._send(back)

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                await self._look_up.wait()
                address = self._found
                if address is None:
                    raise ConnectionError("no limiter address")
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address.host, address.port), CONNECT_TIMEOUT_S
                )
                writer = PeerWriter.over(reader, writer)
                try:  # nothing is sent to a port that cannot prove it is the ledger's
                    await port_proof.check(reader, writer, address.token, CONNECT_TIMEOUT_S)
                    connection = next(self._connections)
                    self._hello(writer, address.token, connection)
                except BaseException:
                    writer.close()
                    raise
            except (OSError, asyncio.TimeoutError) as exc:
                logger.warning("cannot reach the rate limiter: %s", exc)
                raise ServiceUnavailableError(UNAVAILABLE) from None
            self._ledger = address.token
            self._writer, self._live = writer, connection
            self._reading = asyncio.get_running_loop().create_task(self._read(reader, writer, connection))
            return writer

    def _hello(self, writer: asyncio.StreamWriter, token: str, connection: int) -> None:
        """Opens ``connection`` to the ledger holding ``token``: a ledger that
        hears of an earlier connection may be replacing one (``LimiterServer``),
        and one that restarted learns first what this replica has in flight.
        A connection lost before that is sent leaves those requests to the next."""
        new = self._ledger is not None and token != self._ledger
        restore = self._tickets.restore(connection, asyncio.get_running_loop().time() if new else None)
        lines = [{"token": token, "again": connection > 1}, *([restore] if restore is not None else [])]
        try:
            writer.write(b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines))
        except ConnectionError:
            self._tickets.lost(connection)
            raise

    async def _look(self) -> None:
        self._found = await self._find()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: int) -> None:
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
                    unwaited = self._unwaited.pop(reply.get("id"), None)
                    if unwaited is not None and writer is self._writer:
                        for message in given_back(unwaited, reply):
                            self._send(message)
                    waiting = self._pending.get(reply.get("id"))
                    if waiting is not None and not waiting.done():
                        reply["_via"] = writer  # a lease is good only while this connection lasts
                        reply["_on"] = connection
                        waiting.set_result(reply)
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = self._live = None
                self._outbox.clear()  # (nothing of it may reach the next ledger)
                self._unwaited.clear()  # (the ledger ends what this connection had booked)
                self._releases.clear()
            if self._tickets.lost(connection):
                self._restore_soon()
            # The ledger ended this connection's leases: none may be admitted from.
            for key, demand in self._demand.items():
                if demand.lease is not None:
                    self._close(key, demand.lease, send=False)
            for waiting in self._pending.values():
                if not waiting.done():
                    waiting.set_exception(ConnectionError("the rate limiter went away"))
