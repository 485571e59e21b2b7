"""The gateway's own front door (``runtime.http_proxy: gateway``): each
ingress replica accepts clients itself on the address ``llm-gateway serve``
was given, every replica on one port (``SO_REUSEPORT``: the kernel spreads
new connections over them), with no proxy process between the client and
the ingress; where the process that started the cluster keeps a socket on
the port, each replica accepts from that one too, and the port takes
connections while no replica is up (``gateway.http.front_door_socket``).
A stream handed to a model replica then crosses one socket, from the
engine's process to the client, as behind ``vllm serve``.

What a proxy in front did is done here, in uvicorn's own protocol, and
answered in the route's error shape (OpenAI's; Anthropic's on its routes)
instead of a proxy's HTML:

- a head (request line and headers) must arrive within ``read_timeout_s``
  of its first byte, or of the connection's opening: 408;
- a head over ``HEAD_BYTES`` (414 when most of it is the URL) or with more
  than ``HEAD_FIELDS`` headers: 431;
- an ``x-request-id`` that is not UTF-8, or a head that is not HTTP/1.x: 400;
- a connection idle between requests, a client that takes nothing of an
  answer, or one still sending a body after its answer (a 401 before the
  body was read), for twice ``read_timeout_s``: closed.

Each refusal is answered with ``Connection: close``; none reaches the app, so none
is counted in the gateway's metrics or access log. The body's own read
timeout and size limit are the app's (``gateway.http.body``), as behind the
other front doors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config.front_door import HEAD_BYTES, HEAD_FIELDS, HEAD_LIMITS
from gateway.errors import GatewayError, InvalidRequestError, RequestReadTimeoutError
from gateway.http.auth import OPERATIONS
from gateway.http.front_door_socket import BACKLOG, kept_socket, tcp_socket
from gateway.http.handlers import envelope

logger = logging.getLogger(__name__)


def refusal(error: GatewayError, path: str = "") -> bytes:
    """The whole answer to a head refused before the app: status, JSON body
    in the envelope of the route at ``path`` (as far as it arrived), ``Connection: close``."""
    body = json.dumps(envelope(error, path), separators=(",", ":")).encode()
    return b"".join(
        (
            f"HTTP/1.1 {error.status_code} {HTTPStatus(error.status_code).phrase}\r\n".encode(),
            b"date: " + formatdate(usegmt=True).encode() + b"\r\n",
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        )
    )


# What a head's raw bytes hold beyond what its bounds count (the request
# line's method and version, line ends, a pipelined body's tail).
_HEAD_FRAMING = 1024


class _Refused(Exception):
    pass


def _headers_too_large() -> GatewayError:
    return InvalidRequestError(f"The request's headers are too large: {HEAD_LIMITS}", code="headers_too_large", status=431)


class FrontDoorProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a bounded head (time, bytes, fields),
    a bounded wait on a client that stops reading, and refusals in OpenAI's
    shape."""

    head_timeout_s = 30.0
    client_timeout_s = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._url_bytes = self._head_bytes = self._fields = 0
        self._refused: GatewayError | None = None
        # Bytes fed to the parser since the last head ended (or the
        # connection opened), while the next has not: a header line is handed
        # to on_header only once it ends, so a line that never ends is bounded here.
        self._head_fed = 0
        self._reading_head = True
        self._head_begun = False  # its first byte in, its end not yet
        self._drain_timer: asyncio.TimerHandle | None = None  # a body still coming after its answer
        self._heads = 0  # heads begun on this connection
        self._held: bytes | None = None  # a refusal that waits for the answers before it

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Whoever writes to this socket (the ingress, or a model replica
            # it was handed to) gives up on a client that has taken nothing
            # for this long, a full window unread included: the kernel aborts
            # the connection and the writer's next send fails.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.client_timeout_s * 1000))
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._disarm_drain_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            self._head_fed += len(data)
        heads = self._heads
        super().data_received(data)
        if self._reading_head and self._head_fed > HEAD_BYTES + _HEAD_FRAMING:
            self._refuse(self._too_large())  # a head still unended past its bound
        elif not self._reading_head and self._drain_timer is None and self._answered():
            # Answered before its body was all in (a 401, a 404): the rest is
            # read and dropped, for as long as a client that takes nothing has.
            self._drain_timer = self.loop.call_later(self.client_timeout_s, self._drain_timed_out)
        elif self._heads == heads and self._idle_unbounded():
            # Line ends between requests (RFC 9112, 2.2: tolerated) begin no
            # head, and uvicorn's read stopped its idle bound: bounded again.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _idle_unbounded(self) -> bool:
        """Whether the connection waits for a next head with no bound running."""
        return (
            self._reading_head and not self._head_begun and self._head_timer is None
            and self.timeout_keep_alive_task is None and not self._answering() and not self.transport.is_closing()
        )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._held is not None and not self._answering() and not self.transport.is_closing():
            self.transport.write(self._held)  # (the answers before it are all sent)
            self.transport.close()

    def on_message_begin(self) -> None:
        self._unset_keepalive_if_required()  # (armed below for a request parsed in the same read)
        super().on_message_begin()
        self._heads += 1
        self._url_bytes = self._head_bytes = self._fields = 0
        self._head_begun = True
        if self._head_timer is None:
            self._arm_head_timer()

    def on_message_complete(self) -> None:
        self._reading_head, self._head_fed = True, 0
        self._disarm_drain_timer()
        super().on_message_complete()
        if self._answered() and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Its body ended after its answer: idle from here, bounded as
            # after any answer (uvicorn arms that bound only as an answer ends).
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_url(self, url: bytes) -> None:
        super().on_url(url)  # (kept first: a refusal answers in its route's shape)
        self._url_bytes += len(url)
        self._count(len(url), 0)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._reading_head:
            # A trailer of a chunked body: after the head, and perhaps after
            # the answer, so neither counted against the head nor refused (a
            # second response); not merged into the head's headers, which the
            # app has read already (RFC 9110, 6.5.1).
            return
        self._count(len(name) + len(value) + 4, 1)
        if name.lower() == b"x-request-id":
            try:
                value.decode()
            except UnicodeDecodeError:
                self._refuse_head(
                    InvalidRequestError("The x-request-id header is not valid UTF-8.", param="x-request-id")
                )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._reading_head = self._head_begun = False
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a head the parser refused (any parser error,
        # this class's bounds included), in plain text; ours in OpenAI's shape.
        self._refuse(
            self._refused
            or InvalidRequestError("The request could not be parsed as HTTP/1.1.", code="invalid_http_request")
        )

    def _count(self, size: int, fields: int) -> None:
        self._head_bytes += size
        self._fields += fields
        if self._head_bytes > HEAD_BYTES:
            self._refuse_head(self._too_large())
        if self._fields > HEAD_FIELDS:
            self._refuse_head(_headers_too_large())

    def _too_large(self) -> GatewayError:
        """A head over ``HEAD_BYTES``: 414 when most of it is the URL."""
        if self._url_bytes > HEAD_BYTES // 2:
            return InvalidRequestError(f"The request's URL is too long: {HEAD_LIMITS}", code="uri_too_long", status=414)
        return _headers_too_large()

    def _refuse_head(self, error: GatewayError) -> None:
        self._refused = error
        raise _Refused  # ends the parse: uvicorn then calls send_400_response

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _answered(self) -> bool:
        return self.cycle is not None and self.cycle.response_complete

    def _disarm_drain_timer(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        self.transport.close()  # its answer is sent: nothing more to say

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A request is being answered; a next head begun meanwhile is
            # bounded still (no byte of it starts a timer again).
            self._arm_head_timer()
            return
        if self.timeout_keep_alive_task is not None and not self._head_begun:
            return  # idle between requests: uvicorn's keep-alive bound applies
        self._refuse(
            RequestReadTimeoutError(f"The request's headers did not arrive within {self.head_timeout_s:g} s.")
        )

    def _answering(self) -> bool:
        """Whether an answer is on its way, or a pipelined request waits for one."""
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def _refuse(self, error: GatewayError) -> None:
        if self.transport.is_closing() or self._held is not None:
            return
        url = getattr(self, "url", b"")  # uvicorn's, as far as the head arrived
        answer = refusal(error, url.partition(b"?")[0].decode("latin-1"))
        if self._answering():
            # A pipelined head refused while earlier requests are answered: its
            # refusal follows their answers (written now, it would land inside
            # one), and nothing more is read.
            self._held = answer
            self.flow.pause_reading()
            return
        self.transport.write(answer)
        self.transport.close()


class Places:
    """At most ``limit`` requests in ``app`` at once (``ingress.max_ongoing_requests``),
    as Serve holds those that come to an ingress replica through its proxy;
    the rest wait their turn, as Serve queues them. Operations routes
    (``/health``, ``/metrics``...) pass: they answer at once, and a probe
    must not wait behind the streams."""

    def __init__(self, app: Any, limit: int) -> None:
        self._app = app
        self._places = asyncio.Semaphore(limit)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPERATIONS:
            await self._app(scope, receive, send)
            return
        async with self._places:
            await self._app(scope, receive, send)


class FrontDoor:
    """One ingress replica's listener on the shared front-door port."""

    def __init__(
        self, app: Any, host: str, port: int, *, read_timeout_s: float, max_ongoing_requests: int | None = None
    ) -> None:
        protocol = type(
            "GatewayFrontDoorProtocol",
            (FrontDoorProtocol,),
            {"head_timeout_s": read_timeout_s, "client_timeout_s": 2 * read_timeout_s},
        )
        self._config = uvicorn.Config(
            app if max_ongoing_requests is None else Places(app, max_ongoing_requests),
            host=host,
            port=port,
            http=protocol,
            lifespan="off",
            access_log=False,
            log_config=None,
            # An idle connection between requests, as HAProxy's `timeout client`.
            timeout_keep_alive=int(max(1, 2 * read_timeout_s)),
            backlog=BACKLOG,
        )
        self._server = uvicorn.Server(self._config)
        self._host, self._port = host, port
        self._sockets: list[socket.socket] = []
        self._tick: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the kernel picked, for port 0)."""
        assert self._sockets, "not started"
        return int(self._sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Binds and listens, and accepts from the socket this machine's keeper
        holds on the port too, where one does (``gateway.http.front_door_socket``);
        OSError when the port is taken by another program."""
        self._sockets = [listening_socket(self._host, self._port)]
        try:
            kept = await asyncio.to_thread(kept_socket, self.port)
        except OSError as exc:
            logger.warning("listening without the front door's kept socket: %s", exc)
            kept = None
        self._sockets += [kept] if kept is not None else []
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup(sockets=self._sockets)
        self._refresh_date()

    async def stop(self, grace_s: float) -> None:
        """Stops accepting; requests in flight (streams included) may run on
        for ``grace_s``, then are cancelled."""
        if self._tick is not None:
            self._tick.cancel()
        # A float, not whole seconds: the replica's requests end just before it (ingress.py).
        self._config.timeout_graceful_shutdown = max(1.0, grace_s)  # type: ignore[assignment]
        await self._server.shutdown()

    def _refresh_date(self) -> None:
        # uvicorn's main loop does this (ten wake-ups a second); once a second is enough.
        self._server.server_state.default_headers = [
            (b"date", formatdate(usegmt=True).encode()),
            *self._config.encoded_headers,
        ]
        self._tick = asyncio.get_running_loop().call_later(1.0, self._refresh_date)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other ingress replicas of this
    user may bind too (``SO_REUSEPORT``; Linux lets only the same user join)."""
    sock = tcp_socket(host)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def own_front_door(app_name: str) -> tuple[str, int] | None:
    """The address this ingress replica is to listen on: Serve's HTTP host and
    port where Serve runs no proxies (``proxy_location: Disabled``, as
    ``llm-gateway serve`` starts it with ``http_proxy: gateway``) and its
    application ``app_name`` is at route prefix ``/``; None where Serve's
    proxies (or HAProxy) are the front door, or for an application at another
    prefix (with no proxy to route by prefix, it is not reachable over HTTP:
    it must not take a share of the port's connections)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve.config import ProxyLocation

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    location: Any
    http: Any
    endpoints: dict[Any, dict[str, Any]]
    location, http, endpoints = await asyncio.gather(
        controller.get_proxy_location.remote(),
        controller.get_http_config.remote(),
        controller.get_all_endpoints.remote(),
    )
    if location != ProxyLocation.Disabled:
        return None
    routes = [info.get("route") for endpoint, info in endpoints.items() if endpoint.app_name == app_name]
    if routes != ["/"]:
        logger.warning(
            "application %s is at route prefix %s: with no HTTP proxy only an application at / "
            "takes clients, so it does not listen", app_name, routes,
        )
        return None
    return http.host, http.port
