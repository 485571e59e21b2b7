"""Streams (and whole answers) from LLM replicas, relayed byte for byte
(``gateway.protocol.relay``).

The ingress learns each model's replica addresses from Serve's router
(``choose_replica`` without a reservation: no call to any replica), keeps its
own count of the streams it has open on each, and opens each stream on the
least busy. The tokens then come straight from the replica's own port: one
read, one write to the client, however many tokens a read holds; nothing is
parsed per token, and where the client's socket can be written at once
(``ClientSink.immediate``) each read is written from the connection's own
callback, with no task woken and nothing awaited per read. Where the
replica runs on this host, a stream of chat, completions or messages is
not relayed at all: its replica is handed the client's socket and writes
the stream there itself, to the body's last chunk (``gateway.http.handoff``);
the ingress writes the head and counts the outcome. The replica itself
holds streams to its ``max_ongoing_requests`` and ``max_queued_requests``
(``models.llm.relay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from gateway.errors import (
    ENGINE_DEAD,
    ENGINE_DIED,
    REPLICA_STOPPING,
    GatewayError,
    OverloadedError,
    ResponseNotFoundError,
    ServiceUnavailableError,
)
from gateway.http.background import in_background
from gateway.http import handoff
from gateway.http.handoff import ENDPOINTS as HANDOFF_ENDPOINTS
from gateway.http.replica_lookup import BoundedLookUp
from gateway.http.relay_connection import ConnectionPool, connect
from gateway.http.relay_outcome import (
    BACKGROUND_OUTCOME_S,
    OutcomeLine,
    abandon,
    outcome_after,
    read_answer,
    readable_outcome,
)
from gateway.http.relay_stream import RelayedStream
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply

logger = logging.getLogger(__name__)

# Replicas tried before a stream is answered 503: one that has just died may
# still be listed until Serve's routers learn it is gone.
ATTEMPTS = 3
# Serve's router names one replica per sample (two random ones, ranked), so a
# refresh samples several times per replica known; refreshes run in the
# background while streams are opened, at most every REFRESH_S.
SAMPLES_PER_REPLICA, SAMPLES_EXTRA = 4, 8
REFRESH_S = 2.0
MAX_MISSES = 3
# A replica Serve's router has not named in this many refreshes in a row is
# likely stopping (Serve stops routing to it at once; its relay port takes
# requests until its drain starts): picked after those with room, as one
# that could not be reached. (One missed refresh is chance, with many replicas.)
UNLISTED_MISSES = 2
# A replica that could not be reached, listed again by Serve's routers (which
# learn of it only from the controller), is picked after those with room for
# this long, or until it answers: a host gone silent costs each request sent
# to it the whole connect timeout.
FAILED_S = 30.0
# A replica not known here is looked for at most this often (a stored
# response's id names it; ids of replicas long gone must not cost a look-up each).
HOLDER_REFRESH_S = 0.5
_T = TypeVar("_T")
_UNAVAILABLE = "The model is temporarily unavailable; please retry shortly."
_OVERLOADED = "The model is receiving too many requests; please retry shortly."
_REPLICA_GONE = (
    "The stored response this request names is gone: the model replica that kept it has stopped."
)


def _replica_gone(call: EngineRequest) -> ResponseNotFoundError:
    """The error for ``call``, which names a stored response whose replica has
    stopped: the one a look-up that no longer lists that replica gives (400
    ``previous_response_not_found`` for a follow-up, a clue to send the turns
    again; 404 naming ``response_id`` for a retrieval)."""
    for param in ("previous_response_id", "response_id"):
        named = call.body.get(param)
        if isinstance(named, str):
            return ResponseNotFoundError.for_id(named, param)
    return ResponseNotFoundError(_REPLICA_GONE)


class ReplicaRelay:
    """Opens streams of one LLM model on its replicas (and asks them for whole
    answers), balanced by this ingress's own counts."""

    def __init__(
        self,
        handle: Any,
        clock: Callable[[], float] = time.monotonic,
        wait_s: float = 5.0,
        handoff: bool = True,
    ) -> None:
        self._handle = handle
        self._handoff = handoff  # streams may be offered to replicas on this host
        self._clock = clock
        # A request waits at most ``wait_s`` for the model to have a running replica.
        self._look_up = BoundedLookUp(lambda: self._discover(samples=1), wait_s, clock)
        # Requests one replica takes at once, running and queued (None: no
        # bound). When this ingress alone has that many open on every replica
        # it refuses at once, sparing the replica's CPU, which on a CPU host
        # is the engine's; below it, the replica's own count decides.
        self.capacity: int | None = None
        self.places: int | None = None  # requests one replica runs at once (None: not said)
        self._open: dict[relay.RelayAddress, int] = {}  # known replicas: streams open from here
        # Replicas forgotten (unreachable once) with streams from here still open: counted again if found again.
        self._unseen: dict[relay.RelayAddress, int] = {}
        self._misses: dict[relay.RelayAddress, int] = {}
        self._failed: dict[relay.RelayAddress, float] = {}  # could not be reached, and when
        self._refreshed_at = -REFRESH_S
        self._refresh: asyncio.Task[None] | None = None
        self._turn = 0
        self._pool = ConnectionPool(clock)
        self._local: dict[relay.RelayAddress, bool] = {}  # replicas that take clients' sockets from here

    async def open(self, call: EngineRequest, unsent: Callable[[Outcome | None], None] | None = None) -> RelayedStream:
        """Connects to a replica and waits for its answer to start.

        Raises ``GatewayError`` for errors known before the first byte (the
        replica's own, or 503 when no replica could be reached) and Serve's
        errors when the model has no running replica (DeploymentUnavailableError).
        Cancelled before the stream starts, ``unsent`` (if given) is told
        what was generated: nothing before a replica was found, else what
        that replica says (None where it does not say in time; nothing is
        told once the stream has started).
        """
        refused: dict[relay.RelayAddress, ServiceUnavailableError] = {}
        for _ in range(ATTEMPTS):
            address = self._admit(await _unsent(self._pick(call, refused), unsent), call)
            self._open[address] = self._open.get(address, 0) + 1  # before awaiting: others see it
            try:
                return await self._start(call, address, unsent)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self._gone(call, address)
            except ServiceUnavailableError as error:
                refused[address] = await _unsent(self._refused(call, address, error), unsent)
        raise _last(refused)

    async def warm(self) -> None:
        """Finds a running replica now, as a first request would (the first
        contact of Serve's router with its controller included), so that
        none has to; raises as ``open`` does when the model has none within
        the look-up's bound."""
        if not self._open:
            await self._look_up.wait()
            self._refreshed_at = -REFRESH_S  # as for a first request: the others are found with the next one

    async def call(
        self,
        call: EngineRequest,
        abandoned: Callable[[Outcome | None], None] | None = None,
        later: Callable[[Outcome | None], None] | None = None,
    ) -> Reply:
        """A non-streaming answer: the body and its outcome.

        Raises as ``open`` does. Cancelling it aborts the engine request;
        ``abandoned`` then gets what the request generated (None: unknown).
        With ``later`` (a background response: generated after its answer),
        the body comes back as soon as it is there, with an empty outcome, and
        ``later`` gets the outcome once the replica has finished.
        """
        refused: dict[relay.RelayAddress, ServiceUnavailableError] = {}
        for _ in range(ATTEMPTS):
            address = self._admit(await _unsent(self._pick(call, refused), abandoned), call)
            self._open[address] = self._open.get(address, 0) + 1
            address_held = False  # (by a background answer, until its replica has finished it)
            try:
                reader, writer, _ = await self._request(call, address, abandoned=abandoned)
                handed_off = False
                past_end: OutcomeLine | None = None
                try:
                    body, rest = await read_answer(reader)
                    if rest is not None and later is not None:
                        # Its replica generates on: counted on it until then.
                        in_background(
                            outcome_after(reader, writer, self._done_then(address, later), BACKGROUND_OUTCOME_S, rest)
                        )
                        handed_off = address_held = True
                        return Reply(body, Outcome())
                    if rest is not None:
                        past_end = OutcomeLine(rest)
                        rest, reusable = await past_end.line(reader)
                        if reusable:
                            self._pool.give(address, reader, writer)
                            handed_off = True
                except asyncio.CancelledError:
                    if abandoned is not None:
                        # It closes the connection; an outcome half read is read on.
                        abandon(reader, writer, abandoned, read=None if past_end is None else past_end.read)
                        handed_off = True
                    raise
                finally:
                    if not handed_off:
                        writer.close()
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self._gone(call, address)  # another may answer
                continue
            except ServiceUnavailableError as error:
                refused[address] = await _unsent(self._refused(call, address, error), abandoned)
                continue
            finally:
                if not address_held:
                    self._done(address)
            outcome = None if rest is None else readable_outcome(rest)
            if outcome is None:  # it closed before END, or inside the outcome's line
                raise ServiceUnavailableError("The model stopped while serving the request.")
            return Reply(body, outcome)
        raise _last(refused)

    def _done_then(
        self, address: relay.RelayAddress, then: Callable[[Outcome | None], None]
    ) -> Callable[[Outcome | None], None]:
        """``then``, once ``address`` counts the request no more."""

        def finished(outcome: Outcome | None) -> None:
            self._done(address)
            then(outcome)

        return finished

    async def most_tokens(self, call: EngineRequest) -> int:
        """The most tokens ``call`` may use (its prompt's, as the model counts
        them, plus its output budget), from one of the model's replicas.
        Raises as ``call`` does (the request's own error when it is invalid)."""
        refused: dict[relay.RelayAddress, ServiceUnavailableError] = {}
        for _ in range(ATTEMPTS):
            address = await self._pick(call, refused)
            try:
                reader, writer, answer = await self._request(call, address, relay.COUNT)
                try:
                    length = answer.length
                    data = await reader.read() if length is None else await reader.readexactly(length)
                except BaseException:
                    writer.close()
                    raise
                self._pool.give(address, reader, writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self._gone(call, address)
                continue
            except ServiceUnavailableError as error:
                refused[address] = await self._refused(call, address, error)
                continue
            return int(json.loads(data)["tokens"])
        raise _last(refused)

    async def holds(self, replica: str) -> bool:
        """Whether ``replica`` (a replica's id) is one of this model's
        running replicas: looked up among those known, else asked of Serve's
        router. Raises ServiceUnavailableError (503) when the model has no
        running replica within the bounded wait."""
        if self._holder(replica) is not None:
            return True
        if not self._open:
            await self._look_up.wait()  # the model has a running replica (or 503)
            self._refreshed_at = -REFRESH_S  # one is known, not all
        if self._refresh is not None or self._clock() - self._refreshed_at > HOLDER_REFRESH_S:
            if self._refresh is None:  # one look-up at a time, shared
                self._refresh = asyncio.get_running_loop().create_task(self._discover())
                self._refresh.add_done_callback(self._refreshed)
            try:  # Serve's router waits as long as no replica runs: bounded as a first look-up is
                await asyncio.wait_for(asyncio.shield(self._refresh), self._look_up.wait_s)
            except TimeoutError:
                raise ServiceUnavailableError(_UNAVAILABLE) from None
        return self._holder(replica) is not None

    def knows(self, replica: str) -> bool:
        """Whether ``replica`` is among this model's replicas known here (no look-up)."""
        return self._holder(replica) is not None

    def _holder(self, replica: str) -> relay.RelayAddress | None:
        return next((address for address in self._open if address.replica == replica), None)

    async def _pick(
        self, call: EngineRequest, refused: Mapping[relay.RelayAddress, object] = MappingProxyType({})
    ) -> relay.RelayAddress:
        """The replica for ``call``: the one it names (``call.replica``), else
        the least busy, of those that have not ``refused`` it where another is known."""
        if call.replica is not None:
            address = self._holder(call.replica)
            if address is None and await self.holds(call.replica):
                address = self._holder(call.replica)
            if address is None:  # it stopped, and with it what it stored
                raise _replica_gone(call)
            return address
        if not self._open:
            # One replica is enough to start; concurrent requests share the
            # look-up, and the rest of the replicas are found in the background.
            await self._look_up.wait()
            self._refreshed_at = -REFRESH_S
        if self._clock() - self._refreshed_at > REFRESH_S and self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._discover())
            self._refresh.add_done_callback(self._refreshed)
        if not self._open:
            raise ServiceUnavailableError(_UNAVAILABLE)
        known = list(self._open)
        self._turn = (self._turn + 1) % len(known)  # rotate, so ties spread
        ordered = known[self._turn :] + known[: self._turn]
        best = min(ordered, key=self._open.__getitem__)
        if (self._failed and best in self._failed) or self._misses.get(best, 0) >= UNLISTED_MISSES:
            now = self._clock()
            self._failed = {address: at for address, at in self._failed.items() if now - at < FAILED_S}
            cap, misses = self.capacity, self._misses
            room = [
                a for a in ordered
                if a not in self._failed and misses.get(a, 0) < UNLISTED_MISSES and (cap is None or self._open[a] < cap)
            ]
            best = min(room, key=self._open.__getitem__) if room else best
        if best in refused:
            others = [address for address in ordered if address not in refused]
            best = min(others, key=self._open.__getitem__) if others else best
        return best

    def half_full(self) -> bool:
        """Whether this ingress has half a replica's worth of requests or more
        open on every known replica of the model: of its ``capacity``, or of
        its ``places`` where its queue is unbounded."""
        whole = self.capacity if self.capacity is not None else self.places
        if whole is None or not self._open:
            return False
        return min(self._open.values()) >= max(1, whole // 2)

    def _admit(self, address: relay.RelayAddress, call: EngineRequest) -> relay.RelayAddress:
        """``address`` (the least busy replica), unless this ingress already has
        a full replica's worth of requests open on it: then 503 ``overloaded``.
        A call on a stored response generates nothing, and its replica takes it
        past its limits: cancelling works however busy the replica is."""
        if call.endpoint in relay.STORED_ONLY:
            return address
        if self.capacity is not None and self._open.get(address, 0) >= self.capacity:
            raise OverloadedError(_OVERLOADED, retry_after_s=1)
        return address

    async def _discover(self, samples: int | None = None) -> None:
        """Samples Serve's router for the model's replicas (``samples`` times;
        by default enough to see each known one several times); one missing
        from ``MAX_MISSES`` samplings in a row (or unreachable) leaves the
        rotation."""
        seen: set[relay.RelayAddress] = set()
        if samples is None:
            samples = SAMPLES_PER_REPLICA * max(len(self._open), 1) + SAMPLES_EXTRA
        for _ in range(samples):
            async with self._handle.choose_replica(_reserve=False) as selection:
                address = relay.RelayAddress.from_metadata(selection.replica_metadata)
            if address is not None:
                seen.add(address)
        self._refreshed_at = self._clock()
        for address in seen:
            if address not in self._open:
                self._open[address] = self._unseen.pop(address, 0)
            self._misses[address] = 0
        for address in set(self._open) - seen:
            self._misses[address] = self._misses.get(address, 0) + 1
            if self._misses[address] >= MAX_MISSES and not self._open[address]:
                self._forget(address)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refresh = None
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not refresh a model's replicas: %s", task.exception())

    async def _refused(
        self, call: EngineRequest, address: relay.RelayAddress, error: ServiceUnavailableError
    ) -> ServiceUnavailableError:
        """The replica at ``address`` answered 503 before generating (its engine
        died, an adapter did not load there, its queue is full, it is
        stopping): ``error`` is returned for another replica to try the call;
        raised where no other could answer (one named, or none other known).
        One whose engine died or that is stopping is passed over for a while
        too: answering at once, it would otherwise be the least busy, and take
        every request (an adapter's or a full queue's 503 says nothing of the
        replica's other requests). A stopping replica known alone is likely
        being replaced: its successor is looked for first (bounded). A call
        whose engine stopped while it was served is tried nowhere else: it
        may be what stopped it, and would stop the next one too."""
        if error.message in (ENGINE_DEAD, ENGINE_DIED, REPLICA_STOPPING):
            self._failed[address] = self._clock()
        if error.message == ENGINE_DIED:
            raise error
        if call.replica is None and len(self._open) < 2 and error.message == REPLICA_STOPPING:
            if self._refresh is None:  # one look-up at a time, shared
                self._refresh = asyncio.get_running_loop().create_task(self._discover())
                self._refresh.add_done_callback(self._refreshed)
            with contextlib.suppress(Exception):  # (none found in time: its own 503 below)
                await asyncio.wait_for(asyncio.shield(self._refresh), self._look_up.wait_s)
        if call.replica is not None or len(self._open) < 2:
            raise error
        return error

    def _gone(self, call: EngineRequest, address: relay.RelayAddress) -> None:
        """``address`` could not be reached: that replica is gone. A call only
        it could answer (``call.replica``) is answered 404."""
        self._forget(address)
        self._failed[address] = self._clock()
        if call.replica is not None:
            raise _replica_gone(call)

    def _forget(self, address: relay.RelayAddress) -> None:
        self._local.pop(address, None)
        self._pool.drop(address)
        if open_ := self._open.pop(address, 0):
            self._unseen[address] = open_
        self._misses.pop(address, None)

    def _done(self, address: relay.RelayAddress) -> None:
        if self._open.get(address, 0) > 0:
            self._open[address] -= 1
        elif (unseen := self._unseen.get(address, 0)) > 1:
            self._unseen[address] = unseen - 1
        else:
            self._unseen.pop(address, None)

    async def _start(
        self, call: EngineRequest, address: relay.RelayAddress, left: Callable[[Outcome | None], None] | None
    ) -> RelayedStream:
        """The stream of ``call`` from the replica at ``address``; cancelled
        before it starts, ``left`` gets what the replica generated."""
        offer = call.endpoint in HANDOFF_ENDPOINTS and self._takes_sockets(address)
        try:
            reader, writer, answer = await self._request(call, address, abandoned=left, offer=offer)
        except BaseException:
            self._done(address)
            raise
        try:
            first = await reader.readexactly(answer.first) if answer.first else b""
        except BaseException:
            writer.close()
            self._done(address)
            raise
        return RelayedStream(
            reader,
            writer,
            lambda: self._done(address),
            lambda r, w: self._pool.give(address, r, w),
            answer.ticket,
            address,
            first,
        )

    def _takes_sockets(self, address: relay.RelayAddress) -> bool:
        """Whether the replica at ``address`` may be handed clients' sockets (it runs on this host)."""
        if not self._handoff:
            return False
        local = self._local.get(address)
        if local is None:
            local = self._local[address] = handoff.reachable(address)
        return local

    async def _request(
        self,
        call: EngineRequest,
        address: relay.RelayAddress,
        op: str | None = None,
        abandoned: Callable[[Outcome | None], None] | None = None,
        offer: bool = False,
        pooled: bool = True,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, relay.ResponseStatus]:
        """Sends ``call`` to the replica at ``address`` (on a kept connection
        if there is one and ``pooled``) and reads the response head.

        Returns the connection, the body still to read, and the head's status,
        body length and handoff ticket, when the answer starts (200); raises the
        replica's ``GatewayError`` otherwise, and OSError (or an incomplete
        read) when the replica cannot be reached. The connection is closed
        (or kept, after a whole error body) whenever this raises; when the
        caller is cancelled while the replica works, ``abandoned`` (if given)
        gets what it generated.
        """
        kept = self._pool.take(address) if pooled else None
        reader, writer = kept if kept is not None else await _unsent(connect(address), abandoned)
        try:
            writer.write(relay.encode_request(call, address.token, op, offer))
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError) as exc:
                if kept is None or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise
                head = b""  # the replica closed the kept connection before reading the request
            if head:
                answer = relay.status_of(head)
                if self._failed:
                    self._failed.pop(address, None)  # it answers again
                if answer.status != 200:
                    error = GatewayError.from_wire(json.loads(await reader.readexactly(answer.length or 0)))
                    self._pool.give(address, reader, writer)
                    raise error
        except GatewayError:
            raise
        except asyncio.CancelledError:
            if abandoned is None:
                writer.close()
            else:
                abandon(reader, writer, abandoned)
            raise
        except BaseException:
            writer.close()
            raise
        if not head:
            # (It had been idle too long, or it is stopping.) Once more, on a new
            # connection: out of the handling above, which would abandon this one.
            writer.close()
            return await self._request(call, address, op, abandoned, offer, pooled=False)
        return reader, writer, answer


def _last(refused: Mapping[relay.RelayAddress, ServiceUnavailableError]) -> ServiceUnavailableError:
    """The last replica's own 503, where one refused; else no replica could be reached."""
    return list(refused.values())[-1] if refused else ServiceUnavailableError(_UNAVAILABLE)


async def _unsent(step: Awaitable[_T], abandoned: Callable[[Outcome | None], None] | None) -> _T:
    """``step`` of a call before its request reaches a replica: cancelled
    there, the call generated nothing, which ``abandoned`` is told (a key's
    reservation then settles at once, with no tokens used)."""
    try:
        return await step
    except asyncio.CancelledError:
        if abandoned is not None:
            abandoned(Outcome())
        raise
