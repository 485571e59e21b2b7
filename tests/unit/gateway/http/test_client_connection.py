"""gateway/http/client_connection.py with gateway/http/body.py, under a real
uvicorn (both of its HTTP parsers): a connection that goes on sending a
refused body is closed once the body's time limit has passed, and one that
finished its body and sent the next request is left alone."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.errors import GatewayError
from gateway.http.body import read_body
from gateway.http.client_connection import close_later, uvicorn_cycle
from tests.unit.gateway.http.test_relay import closed_port

LIMIT = 1024
LINGER_S = 0.5


@asynccontextmanager
async def body_server(http: str, cors: bool = False) -> AsyncIterator[int]:
    """A real uvicorn whose route reads the body within LIMIT bytes and
    LINGER_S seconds (behind Starlette's CORS middleware, which wraps ``send``
    in a ``functools.partial``, when ``cors``)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> JSONResponse:
        try:
            body = await read_body(request, LIMIT, LINGER_S)
        except GatewayError as error:
            return JSONResponse({"error": error.code}, status_code=error.status_code)
        return JSONResponse({"read": len(body)})

    middleware = [Middleware(CORSMiddleware, allow_origins=["https://page.example"])] if cors else []
    app = Starlette(routes=[Route("/b", endpoint, methods=["POST"])], middleware=middleware)
    config = uvicorn.Config(app, host="127.0.0.1", port=closed_port(), log_level="error", http=http)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield config.port
    finally:
        server.should_exit = True
        await task


def head(length: int) -> bytes:
    return b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % length


def read_answer(sock: socket.socket) -> bytes:
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def send_endlessly(port: int, seconds: float) -> tuple[bytes, float]:
    """Declares a huge body and sends it for up to ``seconds``; returns the
    answer and how long after it the server closed the connection (inf: never)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(1 << 40))
        sock.setblocking(False)
        answer, answered, start = b"", None, time.monotonic()
        while time.monotonic() - start < seconds:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    return answer, time.monotonic() - (answered or start)
                answer += chunk
                answered = answered or time.monotonic()
            except BlockingIOError:
                pass
            except ConnectionResetError:
                return answer, time.monotonic() - (answered or start)
            try:
                sock.send(b"x" * 4096)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                return answer, time.monotonic() - (answered or start)
        return answer, float("inf")


@pytest.mark.parametrize(("http", "cors"), [("h11", False), ("httptools", False), ("httptools", True)])
async def test_a_refused_body_that_keeps_coming_is_cut_off_after_the_time_limit(http: str, cors: bool) -> None:
    async with body_server(http, cors) as port:
        answer, closed_after = await asyncio.to_thread(send_endlessly, port, 10 * LINGER_S)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"request_too_large" in answer
    assert LINGER_S - 0.2 <= closed_after <= LINGER_S + 1.0


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_a_connection_that_sent_its_next_request_is_not_cut_off(http: str) -> None:
    def talk(port: int) -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head(LIMIT + 1) + b"x" * (LIMIT + 1))
            answers = [read_answer(sock)]
            sock.sendall(head(2) + b"ok")
            answers.append(read_answer(sock))
            time.sleep(2 * LINGER_S)  # past the refused request's limit
            sock.sendall(head(2) + b"ok")
            answers.append(read_answer(sock))
            return answers

    async with body_server(http) as port:
        refused, first, later = await asyncio.to_thread(talk, port)
    assert refused.startswith(b"HTTP/1.1 413 ")
    assert first.startswith(b"HTTP/1.1 200 ") and later.startswith(b"HTTP/1.1 200 "), later[:200]


async def test_without_uvicorn_nothing_is_closed() -> None:
    async def send(message: object) -> None:
        return None

    assert uvicorn_cycle(send) is None
    assert close_later(send, LINGER_S) is False
