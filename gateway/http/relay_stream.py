"""One relayed answer on a connection to an LLM replica: the stream's bytes
written to the client as they arrive (from the connection's own callback
where the client's socket can be written at once), or the client's socket
handed to the replica, which writes them itself; its outcome read after
them, and the connection kept for the next request (``ConnectionPool``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from gateway import sse
from gateway.http.handoff import hand_over
from gateway.http.relay_connection import READ_BYTES, RelayProtocol, RelayReader, StreamCutError
from gateway.http.relay_outcome import (
    ABANDONED_OUTCOME_S,
    BACKGROUND_OUTCOME_S,
    OutcomeLine,
    abandon,
    readable_outcome,
)
from gateway.protocol import relay
from gateway.protocol.engine import Outcome

class ClientSink(Protocol):
    """Where a relayed stream's bytes go: the client's response body."""

    # Whether ``write`` may be called for each read (no wait); else ``send``.
    immediate: bool
    # The latest bytes written, and the end of those written before them (at
    # most ``sse.TAIL_BYTES``): a Responses error event is numbered after them.
    last: bytes
    before: bytes
    # The client has the whole body, and may have left since: the response
    # completes all the same (its end written here, unless the process the
    # socket was handed to wrote it: ``ended_elsewhere``).
    whole: bool

    def write(self, data: bytes) -> bool:
        """Writes ``data`` to the client at once; False when the client is gone."""

    def congested(self) -> bool:
        """Whether the client is this far behind: reading from the replica waits for ``drain``."""

    async def drain(self) -> None:
        """Returns once the client has taken most of what was written."""

    async def send(self, data: bytes) -> None:
        """Writes ``data`` to the client, waiting as its server has it wait."""

    def socket_fd(self) -> int | None:
        """The client's socket, when another process may write the rest of
        the body to it now (all written so far is sent); else None."""

    def ended_elsewhere(self) -> None:
        """The process the socket was handed to ended the body: the response
        ends without another last chunk."""

    def last_on_connection(self) -> None:
        """The connection closes after this response (the process the socket
        was handed to stopped without saying how far it wrote)."""


_ENDED, _STALLED, _GONE = "ended", "stalled", "gone"

# How long a relayed stream whose client left (or whose deadline passed)
# waits for its replica to say whether it had written every byte: a
# replica too busy to say leaves it taken for a hang-up, or its error sent.
RELAYED_WORD_S = 1.0


class _Forward:
    """Writes each read of a relay connection to the client from the
    connection's callback, up to the stream's ``END`` (what follows, the
    outcome, goes to the reader again). Wakes its waiter only when the stream
    ends, breaks off, the client falls behind (reading then pauses) or leaves."""

    def __init__(
        self, sink: ClientSink, protocol: RelayProtocol, transport: asyncio.BaseTransport, events: sse.WholeEvents
    ) -> None:
        self._sink = sink
        self._events = events
        self._protocol = protocol
        self._transport: Any = transport
        self._woken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.past_end: OutcomeLine | None = None  # once END is read: what followed it in its read
        self.after_end: bytes | None = None  # ... also when the client had left by then
        self.stalled = False
        self.lost = False  # a read could not be written: the client was gone
        self._cut: str | None = None

    def feed(self, data: bytes) -> None:
        end = data.find(relay.END)
        if end < 0:
            if not (whole := self._events.take(data)):
                return  # (the start of an event: held until its end is read)
            if not self._sink.write(whole):
                self.lost = True
                self._wake(_GONE)
            elif self._sink.congested():
                self._transport.pause_reading()
                self.stalled = True
                self._wake(_STALLED)
            return
        self.after_end = data[end + 1 :]
        last = self._events.rest() + data[:end]
        if last and not self._sink.write(last):
            self.lost = True
            self._wake(_GONE)
            return
        self.past_end = OutcomeLine(self.after_end)
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


class RelayedStream:
    """One stream being relayed; ``chunks()`` once, then ``outcome`` is set.

    ``ended`` (set with ``when_ended``) gets the stream's outcome once it is
    over: the outcome that followed its last byte, or, for a stream closed
    before its end (the client left), what the replica generated until it
    stopped; None when that cannot be known (the replica broke off).

    With a ``ticket`` the replica (at ``address``) offers to write the stream
    to the client's socket itself, after its ``first`` bytes (sent with the
    head): ``pipe`` writes those and hands the socket over where the sink
    allows; otherwise the stream is relayed (``RELAY_OWN``)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        done: Callable[[], None],
        keep: Callable[[asyncio.StreamReader, asyncio.StreamWriter], None] | None = None,
        ticket: bytes = b"",
        address: relay.RelayAddress | None = None,
        first: bytes = b"",
    ) -> None:
        self._reader, self._writer, self._done = reader, writer, done
        self._ticket, self._address, self._first = ticket, address, first
        self.handed_off = False  # the replica writes to the client's socket
        self.body_ended = False  # ... and it ended the body there (Outcome.body_ended)
        self._released: asyncio.Future[None] | None = None
        self._keep = keep  # takes the connection back once the stream has ended cleanly
        self._reusable = False
        self._past_end: OutcomeLine | None = None  # once the stream's END is read and passed on
        self._after_end: bytes | None = None  # what followed END, read as the client left
        self._lost = False  # bytes read from the replica were not passed on (the client left)
        self._events = sse.WholeEvents()  # holds back the start of an event not yet read whole
        self._whole_before_end = False  # the client left after every byte, before END was read
        self._generates_on = False  # its client leaving does not stop it (``generates_on``)
        self.outcome: Outcome | None = None
        self._closed = False
        self._cut = False
        self._ended: Callable[[Outcome | None], None] | None = None
        self._left: Callable[[], None] | None = None
        # How long the outcome of a stream left early is waited for.
        self.outcome_wait_s = ABANDONED_OUTCOME_S

    @property
    def generating_on(self) -> bool:
        """Whether its replica generates it to its end, read or not (``generates_on``)."""
        return self._generates_on

    def generates_on(self) -> None:
        """Its replica generates on when its client leaves (a background
        response): nothing waits for how it ends, which may be an hour away."""
        self._generates_on = True
        self.outcome_wait_s = BACKGROUND_OUTCOME_S

    def when_ended(self, ended: Callable[[Outcome | None], None], left: Callable[[], None] | None = None) -> None:
        """``ended`` gets the outcome once the stream is over; ``left`` is
        called at once when it is closed before its end (its client left),
        while the replica is still being told to stop."""
        self._ended, self._left = ended, left

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yields the stream's bytes as they arrive; raises ``StreamCutError``
        when the replica's stream breaks off. Leaving early closes the
        connection, which aborts the engine request."""
        reader = self._reader
        self._relay_own()
        first, self._first = self._first, b""
        # Each chunk counts as passed on once the caller asks for the next.
        events = self._events
        try:
            if whole := events.take(first):
                self._lost = True
                yield whole
                self._lost = False
            while data := await reader.read(READ_BYTES):
                end = data.find(relay.END)
                if end < 0:
                    if whole := events.take(data):
                        self._lost = True
                        yield whole
                        self._lost = False
                    continue
                if last := events.rest() + data[:end]:
                    self._after_end = data[end + 1 :]  # (the caller may stop at this yield)
                    self._lost = True
                    yield last
                    self._lost = False
                line, self._reusable = await self._outcome_line(reader, data[end + 1 :])
                self.outcome = self._decoded(line)
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
            if self._ticket and sink.immediate and self._address is not None:
                first, self._first = self._first, b""
                if first and not sink.write(first):
                    self._lost = True
                    return False  # the client left
                fd = sink.socket_fd()
                if fd is not None and await self._hand_over(fd):
                    return await self._handed_over(sink)
            self._relay_own()
            protocol = self._writer.transport.get_protocol()
            if sink.immediate and isinstance(protocol, RelayProtocol) and isinstance(self._reader, RelayReader):
                return await self._forward(sink, protocol, self._reader)
            async for chunk in self.chunks():
                await sink.send(chunk)
            return True
        finally:
            self.close()

    async def _forward(self, sink: ClientSink, protocol: RelayProtocol, reader: RelayReader) -> bool:
        transport = self._writer.transport
        forward = _Forward(sink, protocol, transport, self._events)
        held = self._first + reader.take_held()
        self._first = b""
        protocol.forward = forward  # from here, reads go to the client as they arrive
        try:
            with self._marking_cut():
                if held:
                    forward.feed(held)
                if protocol.forward is forward and (reader.exception() is not None or reader.at_eof()):
                    forward.cut("the replica closed the stream before its end")
                while (state := await forward.woken()) == _STALLED:
                    await sink.drain()
                    forward.resume()
                if state == _GONE:
                    return False
                assert forward.past_end is not None
                self._past_end = forward.past_end
                line, self._reusable = await forward.past_end.line(reader)
        finally:
            self._past_end = forward.past_end  # also when END was read, and the wait cut short before this turn
            self._after_end = forward.after_end
            # (Left while the client was behind: what it had not taken is lost.)
            self._lost = self._lost or forward.lost or forward.stalled
            protocol.forward = None
            if forward.stalled:
                transport.resume_reading()  # type: ignore[attr-defined]
        self.outcome = self._decoded(line)
        return True

    def _decoded(self, line: bytes) -> Outcome:
        """The outcome on ``line``; a line cut short (the replica stopped
        after the stream's last byte) or unreadable cuts the stream short
        after its end: the client has it whole, how it ended is not known."""
        outcome = readable_outcome(line)
        if outcome is None:
            self._cut = True
            raise StreamCutError("the replica's outcome cannot be read")
        return outcome

    async def _outcome_line(self, reader: asyncio.StreamReader, read: bytes) -> tuple[bytes, bool]:
        self._past_end = OutcomeLine(read)
        return await self._past_end.line(reader)

    def _relay_own(self) -> None:
        """Tells a replica that offered a handoff to send the stream here."""
        if self._ticket:
            self._ticket = b""
            with contextlib.suppress(ConnectionError):  # lost: the read that follows finds the stream cut
                self._writer.write(relay.RELAY_OWN)

    async def _hand_over(self, fd: int) -> bool:
        """Hands the client's socket to the replica; False when its port is gone."""
        assert self._address is not None
        ticket, self._ticket = self._ticket, b""
        try:
            await hand_over(self._address, ticket, fd)
        except OSError:
            self._ticket = ticket
            return False
        self.handed_off = True
        return True

    async def _handed_over(self, sink: ClientSink) -> bool:
        """Waits for the end of a stream the replica writes to the client;
        False when the client left."""
        with self._marking_cut():
            data = await self._reader.read(READ_BYTES)
            if not data.startswith(relay.END):  # b"": closed; else not a handed-over stream's answer
                sink.last_on_connection()  # it may have ended the body before it stopped
                raise StreamCutError("the replica's stream ended without its end mark")
            # Nothing told it to stop: it ended the body (the outcome's
            # body_ended), unless the client was gone. Either way nothing
            # more is written to the client, whatever comes now.
            self.body_ended = True
            sink.ended_elsewhere()
            line, self._reusable = await self._outcome_line(self._reader, data[1:])
        self.outcome = self._decoded(line)
        if self.outcome.client_left:
            sink.last_on_connection()  # a broken connection, not one to keep
        return not self.outcome.client_left

    @contextlib.contextmanager
    def _marking_cut(self) -> Iterator[None]:
        """A connection that breaks marks the stream cut short (StreamCutError)."""
        try:
            yield
        except StreamCutError:
            self._cut = True
            raise
        except OSError as exc:
            self._cut = True
            raise StreamCutError(str(exc)) from exc

    @property
    def delivered(self) -> bool:
        """Whether the client has been given the whole stream: the replica
        ended its body (handed over), or every byte of it up to its ``END``
        has been passed on here (an outcome still on its way may be awaited
        with ``released``; so may the word that a stream closed before its
        ``END`` had been whole)."""
        if self.handed_off:
            return self.body_ended
        return self._past_end is not None or self._whole_before_end

    async def released(self) -> None:
        """Returns once the replica writes no more to the client's socket (a
        stream handed over and left early) and the outcome of a stream
        relayed and left is in: once the replica has said what it generated,
        or given up waiting for that; for a relayed stream (whose replica
        writes nothing to the client) at most ``RELAYED_WORD_S``."""
        if self._released is None:
            return
        if self.handed_off:
            await asyncio.shield(self._released)
        else:
            await asyncio.wait({self._released}, timeout=RELAYED_WORD_S)

    def _done_then(self, ended: Callable[[Outcome | None], None] | None) -> Callable[[Outcome | None], None]:
        def finished(outcome: Outcome | None) -> None:
            self._done()
            if ended is not None:
                ended(outcome)

        return finished

    def _was_whole(self, outcome: Outcome) -> bool:
        """Whether a stream closed before its outcome was read had been
        given whole to its client, by ``outcome``."""
        if self.handed_off:
            return outcome.body_ended
        return self._past_end is not None or not (outcome.stopped or self._lost)

    def _read_past_end(self) -> bytes | None:
        """The bytes after the stream's ``END`` read so far (None: ``END`` was not read)."""
        return self._after_end if self._past_end is None else self._past_end.read

    def close(self) -> None:
        """Closes the connection, which aborts the engine request if the stream
        had not ended. Never awaits: it runs where the client's hang-up
        cancels every await."""
        if self._closed:
            return
        self._closed = True
        ended, self._ended = self._ended, None
        left, self._left = self._left, None
        if self._generates_on and self.outcome is None and not self._cut:
            ended = self._done_then(ended)  # its replica generates on: counted on it until then
        else:
            self._done()
        if left is not None and self.outcome is None and not self._cut:
            left()
        waits = self.handed_off or self._past_end is not None or not self._generates_on
        if self.outcome is None and not self._cut and waits:
            # The replica writes to the client until it has stopped the stream
            # (handed over), or had sent all of it and its outcome is on its
            # way, or says whether it had, where every byte read was passed on.
            released = self._released = asyncio.get_running_loop().create_future()

            def stopped(outcome: Outcome | None) -> None:
                if outcome is not None and self._was_whole(outcome):
                    # It ended as it was stopped, or before: the client has the whole answer.
                    self.outcome, self.body_ended = outcome, self.body_ended or outcome.body_ended
                    self._whole_before_end = not self.handed_off and self._past_end is None
                released.set_result(None)
                if ended is not None:
                    ended(outcome)

            abandon(self._reader, self._writer, stopped, self.outcome_wait_s, self._read_past_end())
            return
        if ended is not None and self.outcome is None and not self._cut:
            # Left early: half-close, so the replica still says what it generated.
            abandon(self._reader, self._writer, ended, self.outcome_wait_s, self._read_past_end())
            return
        if self._reusable and self._keep is not None:
            self._keep(self._reader, self._writer)
        else:
            self._writer.close()
        if ended is not None:
            ended(self.outcome)
