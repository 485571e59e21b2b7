"""The HTTP response of a relayed stream: its head and end through ASGI, its
bytes straight to the client's socket where the server allows it
(``gateway.http.relay_stream``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.responses import Response

from gateway import sse
from gateway.http.client_connection import disconnected, uvicorn_cycle
from gateway.http.relay_stream import ClientSink

logger = logging.getLogger(__name__)

# Past this many bytes unsent to a slow client, the relay stops reading from the replica.
CLIENT_HIGH_WATER = 256 * 1024

# Sends a stream's bytes to the client (``Answers.streamed``).
Delivery = Callable[[ClientSink], Awaitable[None]]


class SocketSink:
    """The client's socket under uvicorn with chunked encoding (Serve's HAProxy
    front door): each write is one HTTP chunk, past the ASGI stack."""

    immediate = True

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self.last = self.before = b""
        self.whole = False

    def write(self, data: bytes) -> bool:
        if self._cycle.disconnected or self._transport.is_closing():
            return False
        self.before, self.last = self.last[-sse.TAIL_BYTES :], data
        self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    def congested(self) -> bool:
        return bool(self._transport.get_write_buffer_size() > CLIENT_HIGH_WATER)

    async def drain(self) -> None:
        await self._cycle.flow.drain()

    async def send(self, data: bytes) -> None:
        if self.write(data) and self.congested():
            await self.drain()

    def socket_fd(self) -> int | None:
        transport = self._transport
        if self._cycle.disconnected or transport.is_closing() or transport.get_write_buffer_size():
            return None
        sock = transport.get_extra_info("socket")
        return sock.fileno() if sock is not None else None

    def ended_elsewhere(self) -> None:
        # uvicorn then completes the response writing nothing: its body is
        # unchunked with no length left (its next request may already be in).
        self._cycle.chunked_encoding = False
        self.whole = True

    def last_on_connection(self) -> None:
        self._cycle.keep_alive = False  # uvicorn closes the connection once the response is complete


class AsgiSink:
    """The response body as ASGI messages, one per write (Serve's own proxy, tests)."""

    immediate = False

    def __init__(self, send: Any) -> None:
        self._send = send
        self.last = self.before = b""
        self.whole = False

    def write(self, data: bytes) -> bool:
        raise RuntimeError("an ASGI body is sent, not written")

    def congested(self) -> bool:
        return False

    async def drain(self) -> None:
        return None

    async def send(self, data: bytes) -> None:
        self.before, self.last = self.last[-sse.TAIL_BYTES :], data
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    def socket_fd(self) -> int | None:
        return None

    def ended_elsewhere(self) -> None:
        return None  # (never: an ASGI body has no socket to hand over)

    def last_on_connection(self) -> None:
        return None


class RelayResponse(Response):
    """An SSE response whose body goes from the replica's socket to the client's.

    The head and the end travel through ASGI (so middleware sees the status,
    headers and completion). In between, ``deliver`` sends the stream's bytes
    to a ``ClientSink``: under uvicorn with chunked encoding the client's
    socket itself (``SocketSink``), else one ASGI message per read.
    """

    media_type = sse.MEDIA_TYPE

    def __init__(
        self,
        deliver: Delivery,
        headers: dict[str, str],
        closed: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(headers=headers, media_type=sse.MEDIA_TYPE)
        self._deliver = deliver
        self._closed = closed  # runs once the response is over, even one never started

    def render(self, content: Any) -> bytes | memoryview:
        return memoryview(b"")  # never sent: the body is relayed

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        # No content-length: the body's length is unknown until the stream ends.
        self.raw_headers = [(b"content-type", sse.MEDIA_TYPE.encode())]
        self.raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self._respond(receive, send)
        finally:
            if self._closed is not None:
                self._closed()

    async def _respond(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        cycle = _uvicorn_cycle(send)
        sink: ClientSink = SocketSink(cycle) if cycle is not None else AsgiSink(send)
        relay_task = asyncio.ensure_future(self._deliver(sink))
        hang_up = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait({relay_task, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
            if not relay_task.done():
                relay_task.cancel()  # the client left: cancelling the delivery closes the relay
                await asyncio.gather(relay_task, return_exceptions=True)
        if not relay_task.cancelled() and relay_task.exception() is not None:
            # A bug: the client gets a cut-off stream (no final chunk), the log the cause.
            logger.error("relaying a stream failed", exc_info=relay_task.exception())
            return
        if relay_task.cancelled() or (hang_up.done() and not sink.whole):
            return
        # The end, written here unless the replica wrote it (``sink.whole``: the
        # response completes all the same, even where its client has left since,
        # having had every byte).
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _uvicorn_cycle(send: Any) -> Any:
    """uvicorn's request-response cycle behind ``send`` when it writes a chunked body; None otherwise."""
    owner = uvicorn_cycle(send)
    chunked = getattr(owner, "chunked_encoding", None) is True
    return owner if chunked and hasattr(owner, "flow") else None

