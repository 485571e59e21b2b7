"""Streams (and whole answers) from LLM replicas, relayed byte for byte
(``gateway.protocol.relay``).

The ingress learns each model's replica addresses from Serve's router
(``choose_replica`` without a reservation: no call to any replica), keeps its
own count of the streams it has open on each, and opens each stream on the
least busy. The tokens then come straight from the replica's own port: one
read, one write to the client, however many tokens a read holds; nothing is
parsed per token, and where the client's socket can be written at once
(``ClientSink.immediate``) each read is written from the connection's own
callback, with no task woken and nothing awaited per read. The replica itself
holds streams to its ``max_ongoing_requests`` and ``max_queued_requests``
(``models.llm.relay``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from gateway.errors import GatewayError, OverloadedError, ResponseNotFoundError, ServiceUnavailableError
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply

logger = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
# Replicas tried before a stream is answered 503: one that has just died may
# still be listed until Serve's routers learn it is gone.
ATTEMPTS = 3
# Serve's router names one replica per sample (two random ones, ranked), so a
# refresh samples several times per replica known; refreshes run in the
# background while streams are opened, at most every REFRESH_S.
SAMPLES_PER_REPLICA, SAMPLES_EXTRA = 4, 8
REFRESH_S = 2.0
MAX_MISSES = 3
# A replica not known here is looked for at most this often (a stored
# response's id names it; ids of replicas long gone must not cost a look-up each).
HOLDER_REFRESH_S = 0.5
# Connections to a replica are kept for its next request once an answer has
# been read to its end: at most KEEP_PER_REPLICA idle ones, none used again
# after KEEP_IDLE_S idle (the replica closes its own later:
# models.llm.relay.IDLE_S).
KEEP_PER_REPLICA = 64
KEEP_IDLE_S = 20.0
_UNAVAILABLE = "The model is temporarily unavailable; please retry shortly."
_OVERLOADED = "The model is receiving too many requests; please retry shortly."
_REPLICA_GONE = (
    "The stored response this request names is gone: the model replica that kept it has stopped."
)
_NOT_RUNNING = "No replica of the model is running (it is starting or restarting); please retry shortly."


def _retrieved(task: asyncio.Future[None]) -> None:
    """Marks a shared look-up's exception as seen when no request is left to await it."""
    if not task.cancelled():
        task.exception()


class BoundedLookUp:
    """A look-up for a running replica of one model, shared by the requests
    that need it, each waiting at most ``wait_s`` from when it began.

    Serve's router waits for a running replica however long it takes. Past
    ``wait_s`` a request is answered 503 ``service_unavailable`` with
    ``Retry-After``; the look-up goes on in the background, so while the
    model stays down (restarting, not yet up) later requests are answered
    at once, and the first after it is back starts a fresh one.
    """

    def __init__(
        self, look: Callable[[], Awaitable[None]], wait_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._look = look
        self.wait_s = wait_s
        self._clock = clock
        self._since = 0.0
        self._task: asyncio.Future[None] | None = None

    async def wait(self, within: float | None = None) -> None:
        """Returns once the look-up has ended (raising what it raised), or
        raises ServiceUnavailableError (503) when it takes too long (or
        longer than ``within`` seconds from now)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._look())
            self._task.add_done_callback(_retrieved)
            self._since = self._clock()
        left = self.wait_s - (self._clock() - self._since)
        if within is not None:
            left = min(left, within)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), max(left, 0.0))
        except TimeoutError:
            raise ServiceUnavailableError(_NOT_RUNNING) from None


class RunningReplica:
    """Bounds the wait for a running replica of a model called through
    Serve's handle (classical models): before a call, unless a replica was
    seen running within ``FRESH_S`` (or a call was just answered), one is
    looked for with Serve's router, without reserving it; see BoundedLookUp.
    A call already with Serve's router (which also waits, and moves a call
    whose replica died to the next one it starts) is checked each ``wait_s``
    it goes unanswered: with no replica running it is given up (``stalled``)."""

    FRESH_S = 2.0
    CHECK_S = 0.5  # how long a running replica may take to be named in a check

    def __init__(self, handle: Any, wait_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._handle = handle
        self._clock = clock
        self._seen_at = -self.FRESH_S
        self._look_up = BoundedLookUp(self._look, wait_s, clock)

    @property
    def wait_s(self) -> float:
        return self._look_up.wait_s

    def fresh(self) -> bool:
        """Whether a call may go now without a look-up (the hot path's check)."""
        return self._clock() - self._seen_at < self.FRESH_S

    async def ready(self) -> None:
        """Returns when the model has a running replica; raises
        ServiceUnavailableError (503) after at most ``wait_s``."""
        if not self.fresh():
            await self._look_up.wait()

    def stalled(self) -> asyncio.Future[None]:
        """For one call: a future that fails with ServiceUnavailableError
        (503) once the call has gone ``wait_s`` unanswered while the model has
        no running replica; it never ends otherwise. Cancel it when the call
        ends (costing nothing more than a timer until then)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._arm(loop, future)
        return future

    def _arm(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        timer = loop.call_later(self.wait_s, self._check, loop, future)
        future.add_done_callback(lambda _: timer.cancel())

    def _check(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        async def check() -> None:
            try:
                await self._look_up.wait(within=self.CHECK_S)
            except ServiceUnavailableError as error:
                self.lost()
                if not future.done():
                    future.set_exception(error)
                return
            except Exception as exc:  # noqa: BLE001 - the router failed to answer: keep waiting
                logger.info("could not check a model's replicas: %s", exc)
            if not future.done():
                self._arm(loop, future)  # a replica is running: the call is only slow

        if not future.done():
            _in_background(check())

    def seen(self) -> None:
        """A call was answered: a replica is running."""
        self._seen_at = self._clock()

    def lost(self) -> None:
        """A call found its replica gone: look before the next one."""
        self._seen_at = -self.FRESH_S

    async def _look(self) -> None:
        async with self._handle.choose_replica(_reserve=False):
            pass
        self._seen_at = self._clock()


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class ClientSink(Protocol):
    """Where a relayed stream's bytes go: the client's response body."""

    # Whether ``write`` may be called for each read (no wait); else ``send``.
    immediate: bool
    # The latest bytes written (a Responses error event is numbered after them).
    last: bytes

    def write(self, data: bytes) -> bool:
        """Writes ``data`` to the client at once; False when the client is gone."""

    def congested(self) -> bool:
        """Whether the client is this far behind: reading from the replica waits for ``drain``."""

    async def drain(self) -> None:
        """Returns once the client has taken most of what was written."""

    async def send(self, data: bytes) -> None:
        """Writes ``data`` to the client, waiting as its server has it wait."""


class _RelayReader(asyncio.StreamReader):
    def take_held(self) -> bytes:
        """The bytes read from the socket and not yet from this reader, taken
        from it without waiting (which StreamReader has no public way to do)."""
        held = bytes(self._buffer)  # type: ignore[attr-defined]
        self._buffer.clear()  # type: ignore[attr-defined]
        self._maybe_resume_transport()  # type: ignore[attr-defined]
        return held


class _RelayProtocol(asyncio.StreamReaderProtocol):
    """A relay connection's protocol: one kept idle that the replica closes is
    closed here too; while ``forward`` is set, what arrives goes to it instead
    of the reader."""

    idle = False
    forward: _Forward | None = None

    def data_received(self, data: bytes) -> None:
        forward = self.forward
        if forward is None:
            super().data_received(data)
        else:
            forward.feed(data)

    def eof_received(self) -> bool:
        if self.forward is not None:
            self.forward.cut("the replica closed the stream before its end")
        keep_open = super().eof_received()
        return bool(keep_open) and not self.idle

    def connection_lost(self, exc: Exception | None) -> None:
        if self.forward is not None:
            self.forward.cut(str(exc) if exc is not None else "the replica's connection was lost")
        super().connection_lost(exc)


_ENDED, _STALLED, _GONE = "ended", "stalled", "gone"


class _Forward:
    """Writes each read of a relay connection to the client from the
    connection's callback, up to the stream's ``END`` (what follows, the
    outcome, goes to the reader again). Wakes its waiter only when the stream
    ends, breaks off, the client falls behind (reading then pauses) or leaves."""

    def __init__(self, sink: ClientSink, protocol: _RelayProtocol, transport: asyncio.BaseTransport) -> None:
        self._sink = sink
        self._protocol = protocol
        self._transport: Any = transport
        self._woken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.rest = b""  # what followed END in its read
        self.stalled = False
        self._cut: str | None = None

    def feed(self, data: bytes) -> None:
        end = data.find(relay.END)
        if end < 0:
            if not self._sink.write(data):
                self._wake(_GONE)
            elif self._sink.congested():
                self._transport.pause_reading()
                self.stalled = True
                self._wake(_STALLED)
            return
        if end and not self._sink.write(data[:end]):
            self._wake(_GONE)
            return
        self.rest = data[end + 1 :]
        self._wake(_ENDED)

    def cut(self, why: str) -> None:
        self._cut = why
        self._protocol.forward = None
        if not self._woken.done():
            self._woken.set_exception(StreamCutError(why))

    async def woken(self) -> str:
        """How the forwarding stopped: ended, stalled or gone; raises
        StreamCutError when the replica's stream broke off."""
        return await self._woken

    def resume(self) -> None:
        """Reads again after a stall; raises StreamCutError when the stream broke off meanwhile."""
        if self._cut is not None:
            raise StreamCutError(self._cut)
        self._woken = asyncio.get_running_loop().create_future()
        self.stalled = False
        self._transport.resume_reading()

    def _wake(self, state: str) -> None:
        if state != _STALLED:
            self._protocol.forward = None  # anything further goes to the reader
        if not self._woken.done():
            self._woken.set_result(state)


async def _connect(address: relay.RelayAddress) -> Connection:
    """A new connection to the replica at ``address`` (``asyncio.open_connection``'s, with ``_RelayProtocol``)."""
    loop = asyncio.get_running_loop()
    reader = _RelayReader(loop=loop)
    protocol = _RelayProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, address.host, address.port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


# A kept connection: since when it is idle, its reader, writer and protocol
# (its transport forgets the protocol once closed).
_Kept = tuple[float, asyncio.StreamReader, asyncio.StreamWriter, _RelayProtocol]


class ConnectionPool:
    """Idle connections to one model's replicas, the most recently used first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._idle: dict[relay.RelayAddress, list[_Kept]] = {}

    def take(self, address: relay.RelayAddress) -> Connection | None:
        """A kept connection to ``address`` still open, if there is one."""
        kept = self._idle.get(address)
        now = self._clock()
        while kept:
            since, reader, writer, protocol = kept.pop()
            protocol.idle = False
            if now - since < KEEP_IDLE_S and not writer.transport.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    def give(self, address: relay.RelayAddress, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Keeps a connection whose answer has been read to its end (or closes it)."""
        kept = self._idle.setdefault(address, [])
        protocol = writer.transport.get_protocol()
        if (
            not isinstance(protocol, _RelayProtocol)
            or len(kept) >= KEEP_PER_REPLICA
            or writer.transport.is_closing()
            or reader.at_eof()
        ):
            writer.close()
            return
        protocol.idle = True
        kept.append((self._clock(), reader, writer, protocol))

    def idle(self, address: relay.RelayAddress) -> int:
        """How many connections to ``address`` are kept (open or not yet seen closed)."""
        return len(self._idle.get(address, ()))

    def drop(self, address: relay.RelayAddress | None = None) -> None:
        """Closes the kept connections to ``address`` (None: to every replica)."""
        for key in [address] if address is not None else list(self._idle):
            for _, _, writer, _ in self._idle.pop(key, ()):
                writer.close()


class StreamCutError(ConnectionError):
    """The replica's stream ended without its end mark: the replica failed mid-stream."""


# How long an abandoned request's replica gets to report what it generated;
# a background response's, what it generates until it ends.
ABANDONED_OUTCOME_S = 5.0
BACKGROUND_OUTCOME_S = 3600.0
_background: set[asyncio.Task[None]] = set()


def _in_background(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)  # keep a reference until it is done
    task.add_done_callback(_background.discard)


async def _outcome_after(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    then: Callable[[Outcome | None], None],
    wait_s: float = ABANDONED_OUTCOME_S,
    read: bytes | None = None,
) -> None:
    """Reads what is left of an answer, up to its outcome (after ``read``, the
    bytes past its ``END`` already read, if it was); ``then`` gets it (None:
    the replica did not say within ``wait_s``)."""
    outcome = None
    try:
        data = await asyncio.wait_for(reader.read(), wait_s)
        if read is not None:
            outcome = relay.decode_outcome(read + data)
        elif (end := data.find(relay.END)) >= 0:
            outcome = relay.decode_outcome(data[end + 1 :])
    except (OSError, asyncio.TimeoutError, ValueError):
        pass
    finally:
        writer.close()
        then(outcome)


def _abandon(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    then: Callable[[Outcome | None], None],
    wait_s: float = ABANDONED_OUTCOME_S,
) -> None:
    """Tells the replica the caller left (half-closing the connection: the
    engine request is aborted, unless it runs in the background) and hands
    ``then`` what it generated."""
    try:
        writer.write_eof()
    except OSError:
        writer.close()
        then(None)
        return
    _in_background(_outcome_after(reader, writer, then, wait_s))


async def _read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes | None]:
    """A whole answer's body, and what followed its ``END`` so far (None:
    the connection closed before ``END``)."""
    parts: list[bytes] = []
    while data := await reader.read(READ_BYTES):
        end = data.find(relay.END)
        if end >= 0:
            parts.append(data[:end])
            return b"".join(parts), data[end + 1 :]
        parts.append(data)
    return b"".join(parts), None


async def _outcome_line(reader: asyncio.StreamReader, read: bytes) -> tuple[bytes, bool]:
    """The outcome that follows ``END`` (``read``: its bytes read so far), and
    whether the connection may carry another request: the outcome's line
    ended with its newline and nothing followed."""
    while (newline := read.find(b"\n")) < 0:
        data = await reader.read(READ_BYTES)
        if not data:
            return read, False  # the replica closed after it
        read += data
    return read[:newline], newline == len(read) - 1


class RelayedStream:
    """One stream being relayed; ``chunks()`` once, then ``outcome`` is set.

    ``ended`` (set with ``when_ended``) gets the stream's outcome once it is
    over: the outcome that followed its last byte, or, for a stream closed
    before its end (the client left), what the replica generated until it
    stopped; None when that cannot be known (the replica broke off)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        done: Callable[[], None],
        keep: Callable[[asyncio.StreamReader, asyncio.StreamWriter], None] | None = None,
    ) -> None:
        self._reader, self._writer, self._done = reader, writer, done
        self._keep = keep  # takes the connection back once the stream has ended cleanly
        self._reusable = False
        self.outcome: Outcome | None = None
        self._closed = False
        self._cut = False
        self._ended: Callable[[Outcome | None], None] | None = None
        # How long the outcome of a stream left early is waited for.
        self.outcome_wait_s = ABANDONED_OUTCOME_S

    def when_ended(self, ended: Callable[[Outcome | None], None]) -> None:
        self._ended = ended

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yields the stream's bytes as they arrive; raises ``StreamCutError``
        when the replica's stream breaks off. Leaving early closes the
        connection, which aborts the engine request."""
        reader = self._reader
        try:
            while data := await reader.read(READ_BYTES):
                end = data.find(relay.END)
                if end < 0:
                    yield data
                    continue
                if end:
                    yield data[:end]
                line, self._reusable = await _outcome_line(reader, data[end + 1 :])
                self.outcome = relay.decode_outcome(line)
                return
            self._cut = True
            raise StreamCutError("the replica closed the stream before its end")
        except OSError as exc:
            self._cut = True
            raise StreamCutError(str(exc)) from exc
        finally:
            self.close()

    async def pipe(self, sink: ClientSink) -> bool:
        """Sends the stream's bytes to ``sink`` as they arrive, up to its end
        (``outcome`` is then set). Returns False when the client left first.
        Raises ``StreamCutError`` when the replica's stream breaks off. Either
        way the stream is closed when this returns or raises (leaving early
        aborts the engine request)."""
        try:
            protocol = self._writer.transport.get_protocol()
            if sink.immediate and isinstance(protocol, _RelayProtocol) and isinstance(self._reader, _RelayReader):
                return await self._forward(sink, protocol, self._reader)
            async for chunk in self.chunks():
                await sink.send(chunk)
            return True
        finally:
            self.close()

    async def _forward(self, sink: ClientSink, protocol: _RelayProtocol, reader: _RelayReader) -> bool:
        transport = self._writer.transport
        forward = _Forward(sink, protocol, transport)
        held = reader.take_held()
        protocol.forward = forward  # from here, reads go to the client as they arrive
        try:
            if held:
                forward.feed(held)
            if protocol.forward is forward and (reader.exception() is not None or reader.at_eof()):
                forward.cut("the replica closed the stream before its end")
            while (state := await forward.woken()) == _STALLED:
                await sink.drain()
                forward.resume()
            if state == _GONE:
                return False
            line, self._reusable = await _outcome_line(reader, forward.rest)
        except StreamCutError:
            self._cut = True
            raise
        except OSError as exc:
            self._cut = True
            raise StreamCutError(str(exc)) from exc
        finally:
            protocol.forward = None
            if forward.stalled:
                transport.resume_reading()  # type: ignore[attr-defined]
        self.outcome = relay.decode_outcome(line)
        return True

    def close(self) -> None:
        """Closes the connection, which aborts the engine request if the stream
        had not ended. Never awaits: it runs where the client's hang-up
        cancels every await."""
        if self._closed:
            return
        self._closed = True
        self._done()
        ended, self._ended = self._ended, None
        if ended is not None and self.outcome is None and not self._cut:
            # Left early: half-close, so the replica still says what it generated.
            _abandon(self._reader, self._writer, ended, self.outcome_wait_s)
            return
        if self._reusable and self._keep is not None:
            self._keep(self._reader, self._writer)
        else:
            self._writer.close()
        if ended is not None:
            ended(self.outcome)


class ReplicaRelay:
    """Opens streams of one LLM model on its replicas (and asks them for whole
    answers), balanced by this ingress's own counts."""

    def __init__(
        self, handle: Any, clock: Callable[[], float] = time.monotonic, wait_s: float = 5.0
    ) -> None:
        self._handle = handle
        self._clock = clock
        # A request waits at most ``wait_s`` for the model to have a running replica.
        self._look_up = BoundedLookUp(lambda: self._discover(samples=1), wait_s, clock)
        # Requests one replica takes at once, running and queued (None: no
        # bound). When this ingress alone has that many open on every replica
        # it refuses at once, sparing the replica's CPU, which on a CPU host
        # is the engine's; below it, the replica's own count decides.
        self.capacity: int | None = None
        self._open: dict[relay.RelayAddress, int] = {}  # known replicas: streams open from here
        self._misses: dict[relay.RelayAddress, int] = {}
        self._refreshed_at = -REFRESH_S
        self._refresh: asyncio.Task[None] | None = None
        self._turn = 0
        self._pool = ConnectionPool(clock)

    async def open(self, call: EngineRequest) -> RelayedStream:
        """Connects to a replica and waits for its answer to start.

        Raises ``GatewayError`` for errors known before the first byte (the
        replica's own, or 503 when no replica could be reached) and Serve's
        errors when the model has no running replica (DeploymentUnavailableError).
        """
        for _ in range(ATTEMPTS):
            address = self._admit(await self._pick(call))
            self._open[address] = self._open.get(address, 0) + 1  # before awaiting: others see it
            try:
                return await self._start(call, address)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self._gone(call, address)
        raise ServiceUnavailableError(_UNAVAILABLE)

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
        for _ in range(ATTEMPTS):
            address = self._admit(await self._pick(call))
            self._open[address] = self._open.get(address, 0) + 1
            try:
                reader, writer, _ = await self._request(call, address, abandoned=abandoned)
                handed_off = False
                try:
                    body, rest = await _read_answer(reader)
                    if rest is not None and later is not None:
                        _in_background(_outcome_after(reader, writer, later, BACKGROUND_OUTCOME_S, rest))
                        handed_off = True
                        return Reply(body, Outcome())
                    if rest is not None:
                        rest, reusable = await _outcome_line(reader, rest)
                        if reusable:
                            self._pool.give(address, reader, writer)
                            handed_off = True
                except asyncio.CancelledError:
                    if abandoned is not None:
                        _abandon(reader, writer, abandoned)  # it closes the connection
                        handed_off = True
                    raise
                finally:
                    if not handed_off:
                        writer.close()
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self._gone(call, address)  # another may answer
                continue
            finally:
                self._done(address)
            if rest is None:
                raise ServiceUnavailableError("The model stopped while serving the request.")
            return Reply(body, relay.decode_outcome(rest))
        raise ServiceUnavailableError(_UNAVAILABLE)

    async def most_tokens(self, call: EngineRequest) -> int:
        """The most tokens ``call`` may use (its prompt's, as the model counts
        them, plus its output budget), from one of the model's replicas.
        Raises as ``call`` does (the request's own error when it is invalid)."""
        for _ in range(ATTEMPTS):
            address = await self._pick(call)
            try:
                reader, writer, length = await self._request(call, address, relay.COUNT)
                try:
                    data = await reader.read() if length is None else await reader.readexactly(length)
                except BaseException:
                    writer.close()
                    raise
                self._pool.give(address, reader, writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self._gone(call, address)
                continue
            return int(json.loads(data)["tokens"])
        raise ServiceUnavailableError(_UNAVAILABLE)

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
            await asyncio.shield(self._refresh)
        return self._holder(replica) is not None

    def knows(self, replica: str) -> bool:
        """Whether ``replica`` is among this model's replicas known here (no look-up)."""
        return self._holder(replica) is not None

    def _holder(self, replica: str) -> relay.RelayAddress | None:
        return next((address for address in self._open if address.replica == replica), None)

    async def _pick(self, call: EngineRequest) -> relay.RelayAddress:
        """The replica for ``call``: the one it names (``call.replica``), else the least busy."""
        if call.replica is not None:
            address = self._holder(call.replica)
            if address is None and await self.holds(call.replica):
                address = self._holder(call.replica)
            if address is None:  # it stopped, and with it what it stored
                raise ResponseNotFoundError(_REPLICA_GONE)
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
        return min(ordered, key=self._open.__getitem__)

    def _admit(self, address: relay.RelayAddress) -> relay.RelayAddress:
        """``address`` (the least busy replica), unless this ingress already has
        a full replica's worth of requests open on it: then 503 ``overloaded``."""
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
            self._open.setdefault(address, 0)
            self._misses[address] = 0
        for address in set(self._open) - seen:
            self._misses[address] = self._misses.get(address, 0) + 1
            if self._misses[address] >= MAX_MISSES and not self._open[address]:
                self._forget(address)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refresh = None
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not refresh a model's replicas: %s", task.exception())

    def _gone(self, call: EngineRequest, address: relay.RelayAddress) -> None:
        """``address`` could not be reached: that replica is gone. A call only
        it could answer (``call.replica``) is answered 404."""
        self._forget(address)
        if call.replica is not None:
            raise ResponseNotFoundError(_REPLICA_GONE)

    def _forget(self, address: relay.RelayAddress) -> None:
        self._pool.drop(address)
        self._open.pop(address, None)
        self._misses.pop(address, None)

    def _done(self, address: relay.RelayAddress) -> None:
        if address in self._open:
            self._open[address] -= 1

    async def _start(self, call: EngineRequest, address: relay.RelayAddress) -> RelayedStream:
        try:
            reader, writer, _ = await self._request(call, address)
        except BaseException:
            self._done(address)
            raise
        return RelayedStream(
            reader, writer, lambda: self._done(address), lambda r, w: self._pool.give(address, r, w)
        )

    async def _request(
        self,
        call: EngineRequest,
        address: relay.RelayAddress,
        op: str | None = None,
        abandoned: Callable[[Outcome | None], None] | None = None,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int | None]:
        """Sends ``call`` to the replica at ``address`` (on a kept connection
        if there is one) and reads the response head.

        Returns the connection, the body still to read, and the body's length
        if the head gave it, when the answer starts (200); raises the
        replica's ``GatewayError`` otherwise, and OSError (or an incomplete
        read) when the replica cannot be reached. The connection is closed
        (or kept, after a whole error body) whenever this raises; when the
        caller is cancelled while the replica works, ``abandoned`` (if given)
        gets what it generated.
        """
        kept = self._pool.take(address)
        reader, writer = kept if kept is not None else await _connect(address)
        try:
            writer.write(relay.encode_request(call, address.token, op))
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError) as exc:
                if kept is None or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise
                # The replica closed the kept connection before reading the
                # request (it had been idle too long, or it is stopping): once
                # more on a new one.
                writer.close()
                reader, writer = await _connect(address)
                writer.write(relay.encode_request(call, address.token, op))
                head = await reader.readuntil(b"\r\n\r\n")
            status, length = relay.status_of(head)
            if status != 200:
                error = GatewayError.from_wire(json.loads(await reader.readexactly(length or 0)))
                self._pool.give(address, reader, writer)
                raise error
        except GatewayError:
            raise
        except asyncio.CancelledError:
            if abandoned is None:
                writer.close()
            else:
                _abandon(reader, writer, abandoned)
            raise
        except BaseException:
            writer.close()
            raise
        return reader, writer, length
