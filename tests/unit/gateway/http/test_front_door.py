"""gateway/http/front_door.py: the ingress replicas' own listeners, under a
real uvicorn on loopback. Heads that are malformed, too large, too slow or
carry a non-UTF-8 request id are refused in OpenAI's shape before the app
sees them; replicas share one port; a stopping one lets its requests finish;
a client that takes nothing of an answer is cut off."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway.http.front_door import FrontDoor

TIMEOUT_S = 0.5  # read_timeout_s: heads within it, idle clients within twice it


class App:
    """Answers ``/`` at once, ``/held`` once ``release`` is set, ``/flood``
    with an endless stream; counts the requests that reached it."""

    def __init__(self) -> None:
        self.seen = 0
        self.release = asyncio.Event()
        self.flood_ended = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.seen += 1
        path = scope["path"]
        if path == "/held":
            await self.release.wait()
        body = b"ok " + path.encode()
        length = [] if path == "/flood" else [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"), *length]})
        if path == "/flood":
            gone = asyncio.ensure_future(disconnected(receive))
            chunk = b"x" * 65536
            while not gone.done():  # uvicorn's send waits while the client's window is full
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(0)
            self.flood_ended.set()
            return
        await send({"type": "http.response.body", "body": body})


async def disconnected(receive: Any) -> None:
    """Returns once uvicorn says the connection is lost."""
    while (await receive())["type"] != "http.disconnect":
        pass


@asynccontextmanager
async def front_door(app: App, port: int = 0) -> AsyncIterator[FrontDoor]:
    door = FrontDoor(app, "127.0.0.1", port, read_timeout_s=TIMEOUT_S)
    await door.start()
    try:
        yield door
    finally:
        await door.stop(1)


async def exchange(port: int, data: bytes, wait_close: bool = True) -> bytes:
    """Sends ``data`` and reads until the server closes (or a first answer, when not ``wait_close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        if wait_close:
            return await asyncio.wait_for(reader.read(), 10)
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def error_of(answer: bytes, status: int) -> dict[str, Any]:
    got, headers, body = split(answer)
    assert got == status, answer
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_a_request_reaches_the_app_with_uvicorns_headers() -> None:
    app = App()
    async with front_door(app) as door:
        answer = await exchange(door.port, b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    status, headers, body = split(answer)
    assert (status, body) == (200, b"ok /hello")
    assert "date" in headers and headers["server"] == "uvicorn"
    assert app.seen == 1


@pytest.mark.parametrize(
    ("head", "status", "code", "param"),
    [
        (b"GARBAGE\r\n\r\n", 400, "invalid_http_request", None),
        (b"GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n", 400, "invalid_http_request", None),
        (b"GET / HTTP/1.1\r\nx-request-id: \xff\xfe\r\n\r\n", 400, None, "x-request-id"),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"x-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431, "headers_too_large", None),
        (b"GET / HTTP/1.1\r\nx-big: " + b"y" * 17000 + b"\r\n\r\n", 431, "headers_too_large", None),
        (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long", None),
    ],
    ids=["not-http", "bad-header-line", "request-id-not-utf8", "too-many-headers", "headers-too-large", "url-too-long"],
)
async def test_heads_it_cannot_take_are_refused_in_openai_shape(
    head: bytes, status: int, code: str | None, param: str | None
) -> None:
    app = App()
    async with front_door(app) as door:
        error = error_of(await exchange(door.port, head), status)
        # The connection is closed, and others are served as before.
        answer = await exchange(door.port, b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert split(answer)[0] == 200
    assert app.seen == 1  # only the good request reached the app


async def test_a_header_line_that_never_ends_is_refused_once_past_the_bound() -> None:
    # The parser hands a header to the protocol only once its line ends: one
    # that never ends was held (and copied at each read) without a bound.
    app = App()
    async with front_door(app) as door:
        started = time.monotonic()
        error = error_of(await exchange(door.port, b"GET / HTTP/1.1\r\nx-big: " + b"y" * 20000), 431)
    assert error["code"] == "headers_too_large"
    assert time.monotonic() - started < TIMEOUT_S  # at once, not at the head's timeout
    assert app.seen == 0


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /v1/messages HTTP/1.1\r\nx-request-id: \xff\r\n\r\n", 400),
        (b"POST /v1/messages?beta=true HTTP/1.1\r\nx-big: " + b"y" * 17000 + b"\r\n\r\n", 431),
        (b"POST /v1/messages/" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n", 414),
    ],
    ids=["request-id-not-utf8", "headers-too-large", "url-too-long"],
)
async def test_a_refusal_on_anthropics_routes_is_in_anthropics_envelope(head: bytes, status: int) -> None:
    async with front_door(App()) as door:
        got, _, body = split(await exchange(door.port, head))
    answer = json.loads(body)
    assert (got, answer["type"], answer["error"]["type"]) == (status, "error", "invalid_request_error")


async def test_a_head_at_the_limits_is_taken() -> None:
    app = App()
    async with front_door(app) as door:
        head = b"GET / HTTP/1.1\r\n" + b"".join(b"x-%d: y\r\n" % i for i in range(100)) + b"\r\n"
        answer = await exchange(door.port, head, wait_close=False)
    assert split(answer)[0] == 200


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nhost: x\r\n"], ids=["nothing", "half-a-head"])
async def test_a_head_that_does_not_arrive_in_time_gets_408(sent: bytes) -> None:
    app = App()
    async with front_door(app) as door:
        started = time.monotonic()
        error = error_of(await exchange(door.port, sent), 408)
        waited = time.monotonic() - started
    assert error["code"] == "request_read_timeout"
    assert TIMEOUT_S * 0.9 <= waited < TIMEOUT_S + 2
    assert app.seen == 0


async def test_the_head_timer_starts_again_for_each_request_on_a_connection() -> None:
    async with front_door(App()) as door:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        for _ in range(3):  # each answered within its own timer, which ends with the head
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"ok /"), 5)).startswith(b"HTTP/1.1 200")
        # Then idle: closed by the keep-alive bound (twice the read timeout), with no answer.
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert time.monotonic() - started >= 0.9
        writer.close()


async def test_line_ends_between_requests_leave_the_idle_connection_bounded() -> None:
    # A read stops uvicorn's idle bound, and line ends (tolerated between
    # requests) begin no head: the connection stayed open with no timer at all.
    async with front_door(App()) as door:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"ok /"), 5)).startswith(b"HTTP/1.1 200")
        writer.write(b"\r\n")
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, with no answer
        assert time.monotonic() - started < 4 * TIMEOUT_S
        writer.close()


async def test_a_pipelined_head_refused_while_an_answer_runs_is_answered_after_it() -> None:
    # Written at once, the refusal landed inside the answer before it (a stream cut mid-body).
    app = App()
    async with front_door(app) as door:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nx-big: " + b"y" * 40_000 + b"\r\n\r\n")
        while not app.seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # (the refused head is read meanwhile)
        app.release.set()
        answers = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    first, _, refused = answers.partition(b"ok /held")
    assert first.startswith(b"HTTP/1.1 200")
    assert error_of(refused, 431)["code"] == "headers_too_large"
    assert app.seen == 1


async def test_a_head_begun_while_an_answer_runs_is_bounded_too() -> None:
    app = App()
    async with front_door(app) as door:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nx-slow: ")
        while not app.seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(TIMEOUT_S * 1.5)  # the head timer fires while /held is answered
        app.release.set()
        assert (await asyncio.wait_for(reader.readuntil(b"ok /held"), 5)).startswith(b"HTTP/1.1 200")
        started, rest = time.monotonic(), asyncio.ensure_future(reader.read())
        while not rest.done() and time.monotonic() - started < 8 * TIMEOUT_S:
            writer.write(b"y")  # a byte at a time, each under the keep-alive bound
            await asyncio.sleep(TIMEOUT_S / 5)
        writer.close()
    assert error_of(await rest, 408)["code"] == "request_read_timeout"
    assert time.monotonic() - started < 4 * TIMEOUT_S
    assert app.seen == 1


async def test_replicas_share_the_port_and_a_stopping_one_finishes_its_requests() -> None:
    first, second = App(), App()
    async with front_door(first) as door:
        async with front_door(second, door.port):
            pass  # bound beside the first, then stopped: the first serves on
        held = asyncio.ensure_future(exchange(door.port, b"GET /held HTTP/1.1\r\nconnection: close\r\n\r\n"))
        while not first.seen:
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(door.stop(5))
        await asyncio.sleep(0.2)
        assert not stopping.done()  # waits for the request in flight
        with pytest.raises(OSError):  # and takes no new connections
            socket.create_connection(("127.0.0.1", door.port), timeout=1).close()
        first.release.set()
        status, _, body = split(await held)
        assert (status, body) == (200, b"ok /held")
        await stopping


async def test_a_client_that_takes_nothing_is_cut_off() -> None:
    app = App()
    async with front_door(app) as door:
        sock = socket.create_connection(("127.0.0.1", door.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /flood HTTP/1.1\r\nhost: x\r\n\r\n")
        # Never read: the window fills, and the writer gives up twice the read timeout later.
        await asyncio.wait_for(app.flood_ended.wait(), 20)
        sock.close()


@pytest.mark.parametrize("rest", [b"", b"}"], ids=["never-sent", "sent-later"])
async def test_a_connection_answered_before_its_body_arrived_is_still_bounded(rest: bytes) -> None:
    """The app answers without reading the body (a 401, a 404): a body that
    then stops coming, or ends and leaves the connection idle, is closed
    within the bounds of an idle client."""
    async with front_door(App()) as door:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"ok /"), 5)).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        writer.write(b"{")
        if rest:
            await asyncio.sleep(TIMEOUT_S / 5)
            writer.write(rest)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, with nothing more said
        assert 0.9 <= time.monotonic() - started < 4 * TIMEOUT_S
        writer.close()


async def test_a_chunked_bodys_trailers_are_neither_refused_nor_taken_for_headers() -> None:
    """Trailers come after the head (here after the answer too): one that
    would break the head's rules gets no second response, and the
    connection serves the next request."""
    app = App()
    async with front_door(app) as door:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        trailers = b"".join(b"x-t%d: v\r\n" % i for i in range(120)) + b"x-request-id: \xff\r\n"
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + trailers + b"\r\n")
        writer.write(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"ok /"), 5)
        second = await asyncio.wait_for(reader.readuntil(b"ok /next"), 5)
        writer.close()
    assert first.startswith(b"HTTP/1.1 200") and second.count(b"HTTP/1.1 ") == 1
    assert second.startswith(b"HTTP/1.1 200") and app.seen == 2


async def test_requests_past_max_ongoing_requests_wait_their_turn_but_probes_do_not() -> None:
    # Serve holds an ingress replica's requests to max_ongoing_requests; its own front door ignored the setting.
    app = App()
    door = FrontDoor(app, "127.0.0.1", 0, read_timeout_s=5, max_ongoing_requests=2)
    await door.start()
    try:
        held = []
        for _ in range(3):
            held.append(asyncio.ensure_future(exchange(door.port, b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n", False)))
            while app.seen < min(len(held), 2):
                await asyncio.sleep(0.01)
        probe = await exchange(door.port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", wait_close=False)
        assert split(probe)[2] == b"ok /health"
        assert app.seen == 3  # two held, and the probe; the third waits for a place
        app.release.set()
        answers = await asyncio.gather(*held)
        assert [split(answer)[2] for answer in answers] == [b"ok /held"] * 3
        assert app.seen == 4
    finally:
        await door.stop(1)
