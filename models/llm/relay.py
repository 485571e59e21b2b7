"""The replica's own HTTP port for streams and bodies (``gateway.protocol.relay``).

An ingress connects, sends one request and reads the stream's bytes as the
engine produces them (or the whole body of a non-streaming answer): no Serve
handle, no per-token message, no hold. The
first frame is awaited before the response starts, so errors known before the
first byte are plain HTTP errors (and a route's fallback can still try the
next variant). The stream's outcome follows its last byte. A connection that
closes early aborts the engine request at once, even between tokens.
An ingress on this host may instead hand over its client's socket: the
stream is then written there, each frame one HTTP chunk
(``models.llm.handoff``), and only the outcome comes back on the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from gateway import sse
from gateway.errors import (
    REPLICA_STOPPING,
    GatewayError,
    InternalServerError,
    InvalidRequestError,
    OverloadedError,
    ServiceUnavailableError,
)
from gateway.http.relay_connection import watch_peer
from gateway.leaving import CallerLeft, unless_caller_leaves
from gateway.protocol import port_proof, relay
from gateway.protocol.engine import EngineRequest, Outcome
from gateway.protocol.peer import PeerWriter
from models.llm.handoff import ClientSocket, HandoffPort
from models.llm.relay_answers import Answerer, Counter, answer_whole, count, stop_watching, write_error

logger = logging.getLogger(__name__)

# Opens a stream: its SSE frames, and what it will report once they have ended.
# Raises GatewayError for errors known before the first frame.
StreamOpener = Callable[[EngineRequest], Awaitable[tuple[AsyncIterator[bytes], Callable[[], Outcome]]]]

# The read of a stream's next frame, begun before the stream's decision (None: the frames ended).
_Next = asyncio.Future[bytes | None]


class _Frames(NamedTuple):
    """A stream's frames still to write: the one being read, then the rest."""

    rest: AsyncIterator[bytes]
    pending: _Next | None = None


# The frames a replica offering a handoff sends with the head, at most.
READY_BYTES = 64 * 1024

# Where a stream's bytes go: the relay connection, or the client's socket handed over.
_Out = asyncio.StreamWriter | ClientSocket

# Past this many unsent bytes (a slow client), the engine stream waits.
HIGH_WATER = 256 * 1024
HEAD_TIMEOUT_S = 10.0
# A connection idle this long between requests is closed (an ingress stops
# using its own sooner: gateway.http.relay_connection.KEEP_IDLE_S).
IDLE_S = 60.0
OVERLOADED = "The model is receiving too many requests; please retry shortly."


class StreamServer:
    """Serves ``open_stream`` on ``host`` (an ephemeral port) to callers that know the token.

    At most ``max_ongoing`` streams run at once; up to ``max_queued`` more
    (-1: any number) wait for a place, and any beyond are refused at once
    with 503 ``overloaded`` and ``Retry-After`` (as Serve refuses handle
    calls beyond a deployment's limits). A connection carries one request
    after another; one idle for ``idle_s`` is closed. With ``handoff``, an
    ingress on this host may hand over its client's socket for a stream
    (``models.llm.handoff``).
    """

    def __init__(
        self,
        open_stream: StreamOpener,
        host: str,
        max_ongoing: int = 256,
        max_queued: int = -1,
        answer: Answerer | None = None,
        count: Counter | None = None,
        replica: str = "",
        idle_s: float = IDLE_S,
        handoff: bool = True,
    ) -> None:
        self._open = open_stream
        self._handoff = HandoffPort() if handoff else None
        self._replica = replica
        self._answer_body = answer
        self._count = count
        self._host = host
        self._token = secrets.token_urlsafe(32)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._idle: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}  # connections between requests
        self._stopping = False
        self._stopped = asyncio.Event()  # set with ``_stopping``: queued requests are turned away
        self._idle_s = idle_s
        self._places = asyncio.Semaphore(max_ongoing)
        self._max_queued = max_queued
        self._queued = 0
        self._running = 0
        self.accepted = 0  # connections taken so far

    @property
    def ongoing(self) -> int:
        """Requests relayed to this replica now: running, and waiting for a place."""
        return self._running + self._queued

    async def start(self) -> relay.RelayAddress:
        """Listens; returns the address and token the replica publishes."""
        self._server = await asyncio.start_server(self._connection, self._host, 0, backlog=relay.BACKLOG)
        port = self._server.sockets[0].getsockname()[1]
        handoff = self._handoff.start() if self._handoff is not None else ""
        return relay.RelayAddress(self._host, int(port), self._token, self._replica, handoff)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Takes no new connections nor requests (an ingress then tries another
        replica); requests in flight may finish for up to ``grace_s``, then
        are cut off. Requests waiting for a place are answered 503 at once (the
        ingress sends them to another replica), not left waiting out the grace."""
        self._stopping = True
        self._stopped.set()
        if self._server is not None:
            self._server.close()
        idle = list(self._idle.items())
        for writer, _ in idle:
            writer.close()  # its wait for a next request ends
        if idle:
            await asyncio.wait([task for _, task in idle], timeout=1.0)
        if self._connections and grace_s > 0:
            await asyncio.wait(list(self._connections), timeout=grace_s)
        for task in list(self._connections):
            task.cancel()
        if self._handoff is not None:
            self._handoff.stop()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer = PeerWriter.over(reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.accepted += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # An ingress whose host vanished (no FIN, no RST): a request queued
            # here would wait for it forever, and then generate in full.
            watch_peer(sock, unacknowledged=False)
        try:
            if not await port_proof.prove(reader, writer, self._token, HEAD_TIMEOUT_S):
                return
            kept = False
            while not self._stopping:
                first = b""
                if kept:
                    # Between requests: closing now (or staying idle too long) is no error.
                    self._idle[writer] = task
                    try:
                        first = await asyncio.wait_for(reader.read(1), self._idle_s)
                    except asyncio.TimeoutError:
                        return
                    finally:
                        self._idle.pop(writer, None)
                    if not first:
                        return
                kept = await self._serve_one(reader, writer, first)
                if not kept:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the ingress went away; nothing is left to tell it
        finally:
            self._connections.discard(task)
            self._idle.pop(writer, None)
            writer.close()

    def _give_back_place(self, taken: bool) -> None:
        """A place taken for a request whose ingress left in the same turn."""
        if taken:
            self._places.release()

    async def _place_or_stop(self) -> bool:
        """Waits for a place: True once taken, False when the replica began
        stopping first (none taken)."""
        acquire = asyncio.ensure_future(self._places.acquire())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # (the ingress left): a place taken meanwhile goes back
            stopped.cancel()
            if acquire.done() and not acquire.cancelled():
                self._places.release()
            acquire.cancel()
            raise
        stopped.cancel()
        if acquire.done():
            return True
        acquire.cancel()  # (the semaphore hands a place woken for it on)
        return False

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> bool:
        """Answers one request (``first``: its first byte, when already read);
        returns whether the connection may carry another."""
        read = await self._read_request(reader, writer, first)
        if read is None:
            return False
        request, op, keep, offered = read
        if op == relay.COUNT:
            return await count(self._count, request, reader, writer, keep)
        if request.endpoint in relay.STORED_ONLY:  # nothing to generate: no place, no queue
            return await self._answered(request, reader, writer, keep, offered)
        if self._places.locked() and 0 <= self._max_queued <= self._queued:
            await write_error(writer, OverloadedError(OVERLOADED, retry_after_s=1), keep)
            return keep
        if self._places.locked():  # queued: until a place frees, the ingress leaves, or the replica stops
            self._queued += 1
            try:
                placed = unless_caller_leaves(self._place_or_stop(), reader.read(1), self._give_back_place)
                if not await placed:
                    await write_error(writer, ServiceUnavailableError(REPLICA_STOPPING, retry_after_s=1), False)
                    return False
            except CallerLeft:
                # Nothing was generated: said, so a key's reservation settles at
                # nothing (a caller that only half-closed is still reading).
                with contextlib.suppress(OSError):
                    writer.write(relay.END + relay.encode_outcome(Outcome()))
                    await writer.drain()
                return False
            finally:
                self._queued -= 1
        else:
            await self._places.acquire()  # at once
        self._running += 1
        try:
            return await self._answered(request, reader, writer, keep, offered)
        finally:
            self._running -= 1
            self._places.release()

    async def _answered(
        self,
        request: EngineRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
        offered: bool,
    ) -> bool:
        if request.stream or self._answer_body is None:
            return await self._answer(request, reader, writer, keep, offered)
        return await answer_whole(self._answer_body, request, reader, writer, keep)

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes = b""
    ) -> tuple[EngineRequest, str, bool, bool] | None:
        """The request, its op, whether the caller keeps the connection and
        whether it offers a handoff, or None after answering a malformed or
        unauthorised one."""
        arrived = time.time()  # (its wait for a place here is part of its time to first token)
        try:
            raw = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            head = relay.parse_head(raw)
            length = head.content_length()
        except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            await write_error(writer, InvalidRequestError("Malformed relay request."))
            return None
        token = head.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            await write_error(writer, InvalidRequestError("Invalid relay token.", status=401))
            return None
        endpoint = head.endpoint
        if head.method != "POST" or endpoint is None:
            await write_error(writer, InvalidRequestError(f"No relay route {head.path}.", status=404))
            return None
        try:
            body = json.loads(await reader.readexactly(length))
        except ValueError:  # (not the ingress's JSON: it sends an object, ASCII-escaped)
            body = None
        if not isinstance(body, dict):
            await write_error(writer, InvalidRequestError("Malformed relay request body."))
            return None
        request_id = head.headers.get(relay.REQUEST_ID_HEADER, "")
        model = head.headers.get(relay.MODEL_HEADER, "")
        owner = head.headers.get(relay.OWNER_HEADER, "")
        request = EngineRequest(endpoint, body, request_id, model, owner=owner, arrived=arrived)
        keep = head.keep_alive and not self._stopping
        return request, head.headers.get(relay.OP_HEADER, ""), keep, head.offers_handoff

    async def _answer(
        self,
        request: EngineRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
        offered: bool = False,
    ) -> bool:
        try:
            # Up to the first frame (the first token, after any queue and the
            # prompt's prefill): an ingress whose client left stops it there.
            frames, outcome, first = await unless_caller_leaves(self._opened(request), reader.read(1))
        except CallerLeft:
            return False
        except GatewayError as error:
            await write_error(writer, error, keep)
            return keep
        except Exception:
            logger.exception("request %s: stream failed before its first byte", request.request_id)
            await write_error(writer, InternalServerError("The model failed while serving the request."), keep)
            return keep
        out: _Out = writer
        pending: _Next | None = None
        if offered and self._handoff is not None:
            try:
                first, pending = await _ready(frames, first)
                taken = await self._hand_over(writer, reader, keep, first)
            except BaseException:
                await _close(frames, pending)
                raise
            if taken is False:  # the ingress left before the stream started
                await _close(frames, pending)
                writer.write(relay.END + relay.encode_outcome(dataclasses.replace(outcome(), stopped=True)))
                await writer.drain()
                return False
            if taken is not True:
                out = ClientSocket(taken)
        else:
            try:
                writer.write(relay.response_head(200, sse.MEDIA_TYPE, keep=keep) + first)
            except ConnectionError:  # the ingress left as the first frame came
                await _close(frames)
                raise
        return await self._relay(request, _Frames(frames, pending), outcome, out, reader, writer, keep)

    async def _opened(self, request: EngineRequest) -> tuple[AsyncIterator[bytes], Callable[[], Outcome], bytes]:
        """The stream, its outcome and its first frame."""
        frames, outcome = await self._open(request)
        # A stream with no frame at all: chat's `[DONE]`; a Responses stream read again past its
        # last event has nothing to send (its events never end with `[DONE]`).
        empty = b"" if request.endpoint.startswith("responses") else sse.DONE
        try:
            first = await anext(frames, empty)
        except BaseException:
            await _close(frames)  # cancelled (the ingress left) or failed: the engine request ends
            raise
        return frames, outcome, first

    async def _hand_over(
        self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader, keep: bool, first: bytes
    ) -> socket.socket | bool:
        """Offers the ingress a handoff, after the ``first`` bytes of the
        stream, and waits for its answer (``HandoffPort.decision``)."""
        assert self._handoff is not None
        ticket, waiter = self._handoff.ticket()
        head = relay.response_head(200, sse.MEDIA_TYPE, keep=keep, ticket=ticket, first=len(first))
        writer.write(head + first)
        return await self._handoff.decision(ticket, waiter, reader)

    async def _relay(
        self,
        request: EngineRequest,
        frames: _Frames,
        outcome: Callable[[], Outcome],
        out: _Out,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> bool:
        """Writes the stream to ``out`` (the relay connection, or the client's
        socket handed over), then ``END`` and the outcome on the relay connection."""
        handed = isinstance(out, ClientSocket)
        pump = asyncio.create_task(_pump(frames, out, request))
        hang_up = asyncio.create_task(reader.read(1))  # relay.LEFT, or b"" when the ingress closes
        orphaned = False
        try:
            await asyncio.wait({pump, hang_up}, return_when=asyncio.FIRST_COMPLETED)
            if handed and not pump.done() and _ingress_gone(hang_up):
                # Its client is still there: the stream goes on to the socket only this process holds now.
                orphaned = True
                await asyncio.wait({pump})
        finally:
            hung_up = await stop_watching(hang_up)
            if not pump.done():
                # The ingress left (its client hung up): stop the engine now.
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            if handed:
                out.close()  # before END: the ingress may write to the client once it has it
        if orphaned:
            return False  # nobody is left to tell
        ended = None if pump.cancelled() else pump.result()
        if ended is False and not handed:
            return False  # the connection broke: nobody is left to tell
        # Also after a hang-up: an ingress that only half-closed its side still
        # reads what the aborted request generated (what its key is charged).
        final = outcome()
        if isinstance(ended, GatewayError) and final.error is None:  # raised, not sent by the engine
            final = dataclasses.replace(final, error=ended.code, error_status=ended.status_code)
        if ended is None:  # stopped as its ingress left, before the stream's last byte
            final = dataclasses.replace(final, stopped=True)
        elif ended is False:  # the client's socket broke: the client left
            final = dataclasses.replace(final, client_left=True)
        elif handed:  # _pump ended the body on the client's socket
            final = dataclasses.replace(final, body_ended=True)
        writer.write(relay.END + relay.encode_outcome(final))
        await writer.drain()
        return keep and not hung_up


def _ingress_gone(hang_up: asyncio.Task[bytes]) -> bool:
    """Whether the relay connection ended without the ingress saying its client left."""
    if not hang_up.done() or hang_up.cancelled():
        return False
    return hang_up.exception() is not None or hang_up.result() != relay.LEFT


async def _pump(frames: _Frames, out: _Out, request: EngineRequest) -> GatewayError | bool:
    """Writes the frames as they come; an error mid-stream ends the stream
    the endpoint's way (``gateway.sse.stream_error``) and is returned. False
    when ``out`` broke, True when the stream ended well and every byte is
    written. On the client's socket (handed over) either end also ends the
    chunked body, with the last frame."""
    failed: GatewayError
    buffered = out.transport.get_write_buffer_size if isinstance(out, asyncio.StreamWriter) else out.get_write_buffer_size
    try:
        if frames.pending is not None and (frame := await frames.pending) is not None:
            out.write(frame)
        async for frame in frames.rest:
            out.write(frame)
            if buffered() > HIGH_WATER:
                await out.drain()
        if isinstance(out, ClientSocket):
            out.end()
        await out.drain()
        return True
    except GatewayError as error:
        failed = error
    except ConnectionError:
        return False
    except Exception:
        logger.exception("request %s: stream failed after its first byte", request.request_id)
        failed = InternalServerError("The model failed while serving the request.")
    finally:
        await _close(frames.rest, frames.pending)  # aborts the engine request if it had not ended
    try:
        out.write(sse.stream_error(request.endpoint, failed))
        if isinstance(out, ClientSocket):
            out.end()
        await out.drain()
    except ConnectionError:
        return False
    return failed


async def _next(frames: AsyncIterator[bytes]) -> bytes | None:
    return await anext(frames, None)


async def _ready(frames: AsyncIterator[bytes], first: bytes) -> tuple[bytes, _Next | None]:
    """``first`` and the frames that follow it at once (a chat stream's role
    and first token come from one engine step), up to ``READY_BYTES``, and
    the read of the next frame, still waiting (None: none started, or the
    frames ended)."""
    ready = [first]
    size = len(first)
    while size < READY_BYTES:
        upcoming = asyncio.ensure_future(_next(frames))
        try:
            await asyncio.sleep(0)  # one turn of the loop: enough for a frame that is there
        except BaseException:
            await _close(frames, upcoming)
            raise
        if not upcoming.done() or upcoming.cancelled() or upcoming.exception() is not None:
            return b"".join(ready), upcoming
        frame = upcoming.result()
        if frame is None:
            break
        ready.append(frame)
        size += len(frame)
    return b"".join(ready), None


async def _close(frames: AsyncIterator[bytes], pending: _Next | None = None) -> None:
    if pending is not None and not pending.done():
        pending.cancel()
        await asyncio.wait({pending})
    aclose: Any = getattr(frames, "aclose", None)
    if aclose is not None:
        await aclose()
