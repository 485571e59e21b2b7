"""The replica's own HTTP port for streams and bodies (``gateway.protocol.relay``).

An ingress connects, sends one request and reads the stream's bytes as the
engine produces them (or the whole body of a non-streaming answer): no Serve
handle, no per-token message, no hold. The
first frame is awaited before the response starts, so errors known before the
first byte are plain HTTP errors (and a route's fallback can still try the
next variant). The stream's outcome follows its last byte. A connection that
closes early aborts the engine request at once, even between tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from gateway import sse
from gateway.errors import GatewayError, InternalServerError, InvalidRequestError, OverloadedError
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from models.llm.tally import GenerationTally

logger = logging.getLogger(__name__)

# Opens a stream: its SSE frames, and what it will report once they have ended.
# Raises GatewayError for errors known before the first frame.
StreamOpener = Callable[[EngineRequest], Awaitable[tuple[AsyncIterator[bytes], Callable[[], Outcome]]]]

# Answers a non-streaming request, counting into the tally it is given;
# raises GatewayError as handle calls do.
Answerer = Callable[[EngineRequest, GenerationTally], Coroutine[Any, Any, Reply]]

# Counts a request's most tokens (``relay.COUNT``); raises GatewayError.
Counter = Callable[[EngineRequest], Awaitable[int]]

# Past this many unsent bytes (a slow client), the engine stream waits.
HIGH_WATER = 256 * 1024
HEAD_TIMEOUT_S = 10.0
# A connection idle this long between requests is closed (an ingress stops
# using its own sooner: gateway.http.relay_stream.KEEP_IDLE_S).
IDLE_S = 60.0
OVERLOADED = "The model is receiving too many requests; please retry shortly."


class StreamServer:
    """Serves ``open_stream`` on ``host`` (an ephemeral port) to callers that know the token.

    At most ``max_ongoing`` streams run at once; up to ``max_queued`` more
    (-1: any number) wait for a place, and any beyond are refused at once
    with 503 ``overloaded`` and ``Retry-After`` (as Serve refuses handle
    calls beyond a deployment's limits). A connection carries one request
    after another; one idle for ``idle_s`` is closed.
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
    ) -> None:
        self._open = open_stream
        self._replica = replica
        self._answer_body = answer
        self._count = count
        self._host = host
        self._token = secrets.token_urlsafe(32)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._idle: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}  # connections between requests
        self._stopping = False
        self._idle_s = idle_s
        self._places = asyncio.Semaphore(max_ongoing)
        self._max_queued = max_queued
        self._queued = 0
        self.accepted = 0  # connections taken so far

    async def start(self) -> relay.RelayAddress:
        """Listens; returns the address and token the replica publishes."""
        self._server = await asyncio.start_server(self._connection, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return relay.RelayAddress(self._host, int(port), self._token, self._replica)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Takes no new connections nor requests (an ingress then tries another
        replica); requests in flight may finish for up to ``grace_s``, then
        are cut off."""
        self._stopping = True
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

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.accepted += 1
        try:
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

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> bool:
        """Answers one request (``first``: its first byte, when already read);
        returns whether the connection may carry another."""
        read = await self._read_request(reader, writer, first)
        if read is None:
            return False
        request, op, keep = read
        if op == relay.COUNT:
            await _count(self._count, request, writer, keep)
            return keep
        if self._places.locked() and 0 <= self._max_queued <= self._queued:
            await _error(writer, OverloadedError(OVERLOADED, retry_after_s=1), keep)
            return keep
        self._queued += 1
        try:
            await self._places.acquire()
        finally:
            self._queued -= 1
        try:
            if request.stream or self._answer_body is None:
                return await self._answer(request, reader, writer, keep)
            return await _answer_whole(self._answer_body, request, reader, writer, keep)
        finally:
            self._places.release()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes = b""
    ) -> tuple[EngineRequest, str, bool] | None:
        """The request, its op and whether the caller keeps the connection, or
        None after answering a malformed or unauthorised one."""
        try:
            raw = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            head = relay.parse_head(raw)
            length = head.content_length()
        except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            await _error(writer, InvalidRequestError("Malformed relay request."))
            return None
        token = head.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            await _error(writer, InvalidRequestError("Invalid relay token.", status=401))
            return None
        endpoint = head.endpoint
        if head.method != "POST" or endpoint is None:
            await _error(writer, InvalidRequestError(f"No relay route {head.path}.", status=404))
            return None
        body = json.loads(await reader.readexactly(length))
        request_id = head.headers.get(relay.REQUEST_ID_HEADER, "")
        model = head.headers.get(relay.MODEL_HEADER, "")
        owner = head.headers.get(relay.OWNER_HEADER, "")
        request = EngineRequest(endpoint, body, request_id, model, owner=owner)
        return request, head.headers.get(relay.OP_HEADER, ""), head.keep_alive and not self._stopping

    async def _answer(
        self, request: EngineRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: bool
    ) -> bool:
        try:
            frames, outcome = await self._open(request)
            first = await anext(frames, sse.DONE)
        except GatewayError as error:
            await _error(writer, error, keep)
            return keep
        except Exception:
            logger.exception("request %s: stream failed before its first byte", request.request_id)
            await _error(writer, InternalServerError("The model failed while serving the request."), keep)
            return keep
        writer.write(relay.response_head(200, sse.MEDIA_TYPE, keep=keep) + first)
        pump = asyncio.create_task(_pump(frames, writer, request))
        hang_up = asyncio.create_task(reader.read(1))  # b"" when the ingress closes
        try:
            await asyncio.wait({pump, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hung_up = await _stop_watching(hang_up)
            if not pump.done():
                # The ingress left (its client hung up): stop the engine now.
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        ended = None if pump.cancelled() else pump.result()
        if ended is False:
            return False  # the connection broke: nobody is left to tell
        # Also after a hang-up: an ingress that only half-closed its side still
        # reads what the aborted request generated (what its key is charged).
        final = outcome()
        if isinstance(ended, GatewayError) and final.error is None:  # raised, not sent by the engine
            final = dataclasses.replace(final, error=ended.code, error_status=ended.status_code)
        writer.write(relay.END + relay.encode_outcome(final))
        await writer.drain()
        return keep and not hung_up


async def _answer_whole(
    answer: Answerer,
    request: EngineRequest,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    keep: bool = False,
) -> bool:
    """A non-streaming request: the body, then ``END`` and the outcome; a connection
    that closes first cancels the work (and so aborts the engine request), and
    gets ``END`` and what was generated until then, if it still reads.
    Returns whether the connection may carry another request."""
    tally = GenerationTally()
    work = asyncio.create_task(answer(request, tally))
    hang_up = asyncio.create_task(reader.read(1))
    try:
        await asyncio.wait({work, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hung_up = await _stop_watching(hang_up)
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        writer.write(relay.END + relay.encode_outcome(tally.outcome()))
        await writer.drain()
        return False
    keep = keep and not hung_up
    try:
        reply = work.result()
    except GatewayError as error:
        await _error(writer, error, keep)
        return keep
    except Exception:
        logger.exception("request %s: failed", request.request_id)
        await _error(writer, InternalServerError("The model failed while serving the request."), keep)
        return keep
    if tally.continues is None:
        head = relay.response_head(200, "application/json", keep=keep)
        writer.write(head + reply.body + relay.END + relay.encode_outcome(reply.outcome))
        await writer.drain()
        return keep
    # Answered, generating on (a background response): the outcome once done,
    # then the connection closes.
    writer.write(relay.response_head(200, "application/json") + reply.body + relay.END)
    await writer.drain()
    await asyncio.gather(asyncio.shield(tally.continues), return_exceptions=True)
    writer.write(relay.encode_outcome(tally.outcome()))
    await writer.drain()
    return False


async def _count(
    count: Counter | None, request: EngineRequest, writer: asyncio.StreamWriter, keep: bool = False
) -> None:
    if count is None:
        await _error(writer, InvalidRequestError("This replica does not count tokens.", status=404), keep)
        return
    try:
        tokens = await count(request)
    except GatewayError as error:
        await _error(writer, error, keep)
        return
    except Exception:
        logger.exception("request %s: counting its tokens failed", request.request_id)
        await _error(writer, InternalServerError("The model failed while serving the request."), keep)
        return
    body = json.dumps({"tokens": tokens}).encode()
    writer.write(relay.response_head(200, "application/json", len(body), keep) + body)
    await writer.drain()


async def _stop_watching(hang_up: asyncio.Task[bytes]) -> bool:
    """Stops waiting for the caller to close its side while its request runs
    (the connection's reader is free again once this returns); whether it had
    (or sent bytes, which it never does mid-request)."""
    hang_up.cancel()
    await asyncio.wait({hang_up})
    return not hang_up.cancelled()


async def _pump(
    frames: AsyncIterator[bytes], writer: asyncio.StreamWriter, request: EngineRequest
) -> GatewayError | bool:
    """Writes the frames as they come; an error mid-stream ends the stream the
    endpoint's way (``gateway.sse.stream_error``) and is returned. False when
    the connection broke, True when the stream ended well."""
    transport = writer.transport
    failed: GatewayError
    try:
        async for frame in frames:
            writer.write(frame)
            if transport.get_write_buffer_size() > HIGH_WATER:
                await writer.drain()
        return True
    except GatewayError as error:
        failed = error
    except ConnectionError:
        return False
    except Exception:
        logger.exception("request %s: stream failed after its first byte", request.request_id)
        failed = InternalServerError("The model failed while serving the request.")
    finally:
        aclose: Any = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()  # aborts the engine request if it had not ended
    writer.write(sse.stream_error(request.endpoint, failed))
    return failed


async def _error(writer: asyncio.StreamWriter, error: GatewayError, keep: bool = False) -> None:
    body = json.dumps(error.to_wire(), separators=(",", ":")).encode()
    writer.write(relay.response_head(error.status_code, "application/json", len(body), keep) + body)
    await writer.drain()
