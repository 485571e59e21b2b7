"""One relayed answer on a connection to an LLM replica: the stream's bytes
written to the client as they arrive (from the connection's own callback
where the client's socket can be written at once), its outcome read after
them, and the connection kept for the next request (``ConnectionPool``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from gateway.http.background import in_background
from gateway.protocol import relay
from gateway.protocol.engine import Outcome

READ_BYTES = 64 * 1024
# Connections to a replica are kept for its next request once an answer has
# been read to its end: at most KEEP_PER_REPLICA idle ones, none used again
# after KEEP_IDLE_S idle (the replica closes its own later:
# models.llm.relay.IDLE_S).
KEEP_PER_REPLICA = 64
KEEP_IDLE_S = 20.0

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


async def connect(address: relay.RelayAddress) -> Connection:
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


async def outcome_after(
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


def abandon(
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
    in_background(outcome_after(reader, writer, then, wait_s))


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes | None]:
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


async def outcome_line(reader: asyncio.StreamReader, read: bytes) -> tuple[bytes, bool]:
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
                line, self._reusable = await outcome_line(reader, data[end + 1 :])
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
            line, self._reusable = await outcome_line(reader, forward.rest)
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
            abandon(self._reader, self._writer, ended, self.outcome_wait_s)
            return
        if self._reusable and self._keep is not None:
            self._keep(self._reader, self._writer)
        else:
            self._writer.close()
        if ended is not None:
            ended(self.outcome)
