"""gateway/haproxy_wrapper.py: HAProxy's timeouts, as the wrapper sets them,
against the real HAProxy: slow and silent clients are dropped, clients
waiting for their answer are not."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

from gateway import haproxy_wrapper as wrapping
from gateway import local_cluster
from tests.unit.gateway.test_haproxy_wrapper import ray_like_config


# How long the stream to a client that reads nothing lasted (``_backend``).
_FLOODED: list[float] = []


async def _backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """As the ingress answers: slowly, as a stream with pauses, as a stream
    faster than its client reads (until it is cut off), or 408 at once (with
    `Connection: close`) to a body it gives up on."""
    head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"GET /flood "):
        start = time.monotonic()
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                await asyncio.wait_for(writer.drain(), 10)
        except (OSError, TimeoutError):
            _FLOODED.append(time.monotonic() - start)
        writer.close()
        return
    if head.startswith(b"GET /slow "):
        await asyncio.sleep(2.5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    elif head.startswith(b"GET /stream "):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(2):
            await writer.drain()
            await asyncio.sleep(1.5)
            writer.write(b"2\r\nok\r\n")
        writer.write(b"0\r\n\r\n")
    else:
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


def _not_reading(port: int, wait_s: float = 4) -> None:
    """Asks for a stream, reads none of it for ``wait_s``, then leaves."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(wait_s)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _until_closed(port: int, request: bytes, wait_s: float = 10) -> tuple[bytes, float]:
    """Sends ``request`` and reads until the connection closes: what came, and when."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        start = time.monotonic()
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, time.monotonic() - start


async def test_haproxy_drops_a_client_silent_past_twice_the_read_timeout_but_not_one_awaiting_its_answer(
    tmp_path: Path,
) -> None:
    """The real HAProxy, through the wrapper, with a 0.5 s read timeout: a
    client that stalled in its body after the server's 408, and one that stopped
    reading its stream, are dropped about a second later (Ray's template: an
    hour), while a client waiting 2.5 s for its answer, or 1.5 s between a
    stream's chunks, is not."""
    _FLOODED.clear()
    server = await asyncio.start_server(_backend, "127.0.0.1", 0)
    back = server.sockets[0].getsockname()[1]
    front = local_cluster.free_port()
    wrapper = wrapping.haproxy_wrapper(tmp_path, read_timeout_s=0.5)
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_like_config(front, back))
    haproxy = subprocess.Popen([str(wrapper), "-db", "-f", str(config)], stderr=subprocess.DEVNULL)
    try:
        async with server:
            while not _listening(front):
                assert haproxy.poll() is None
                await asyncio.sleep(0.05)
            slow, stream, stalled, _ = await asyncio.gather(
                asyncio.to_thread(_until_closed, front, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                asyncio.to_thread(_until_closed, front, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                asyncio.to_thread(_until_closed, front, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 100\r\n\r\n{"),
                asyncio.to_thread(_not_reading, front),
            )
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)
    assert slow[0].startswith(b"HTTP/1.1 200 ") and slow[0].endswith(b"\r\n\r\nok") and slow[1] >= 2.5
    assert stream[0].startswith(b"HTTP/1.1 200 ") and stream[0].count(b"\r\nok\r\n") == 2 and stream[1] >= 3
    answer, took = stalled
    assert answer.startswith(b"HTTP/1.1 408 ") and b"\r\nconnection: close\r\n" in answer.lower()
    assert took < 3
    # A client that stopped reading a stream is cut off (the ingress then
    # aborts its engine request) about a second later, not after an hour.
    assert len(_FLOODED) == 1 and _FLOODED[0] < 3


async def _ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()
    writer.close()


async def test_the_front_doors_head_rules_count_lines_and_check_every_request_id(tmp_path: Path) -> None:
    """The real HAProxy through the wrapper: a long comma-separated field is
    one field, not a hundred; a request id not UTF-8 is refused wherever it
    stands among several (Serve decodes the last)."""
    server = await asyncio.start_server(_ok, "127.0.0.1", 0)
    front = local_cluster.free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_like_config(front, server.sockets[0].getsockname()[1]))
    haproxy = subprocess.Popen([str(wrapping.haproxy_wrapper(tmp_path)), "-db", "-f", str(config)],
                               stderr=subprocess.DEVNULL)

    def status(fields: bytes) -> bytes:
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields + b"\r\n"
        return _until_closed(front, head)[0].split(b"\r\n", 1)[0]

    try:
        async with server:
            while not _listening(front):
                assert haproxy.poll() is None
                await asyncio.sleep(0.05)
            baggage = b"baggage: " + b",".join(b"k%d=v" % i for i in range(120)) + b"\r\n"
            many = b"".join(b"x-f%d: v\r\n" % i for i in range(120))
            answers = await asyncio.gather(*(asyncio.to_thread(status, fields) for fields in (
                baggage, many, b"x-request-id: ok\r\nx-request-id: \xff\xfe\r\n",
                b"x-request-id: \xff\xfe\r\nx-request-id: ok\r\n", b"x-request-id: ok\r\nx-request-id: ok-2\r\n",
            )))  # fmt: skip
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)
    assert [a.split(b" ")[1] for a in answers] == [b"200", b"431", b"400", b"400", b"200"]


def test_a_path_no_application_serves_is_an_openai_shaped_404(tmp_path: Path) -> None:
    """Ray's template answers it in plain text (a route prefix elsewhere, or
    none while the gateway stops); the OpenAI SDK then raised with no message."""
    tmp_path = tmp_path / "a&b"  # a temporary directory's name is not the wrapper's to choose
    tmp_path.mkdir()
    front = local_cluster.free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend http_frontend\n    bind 127.0.0.1:{front}\n    default_backend default_backend\n"
        "backend default_backend\n    http-request return status 404 content-type text/plain lf-string "
        "\"Path '%[path]' not found. Ping http://.../-/routes for available routes.\"\n"
    )
    haproxy = subprocess.Popen([str(wrapping.haproxy_wrapper(tmp_path)), "-db", "-f", str(config)],
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _listening(front):
            assert haproxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        answer, _ = _until_closed(front, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 404 ") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "not_found"


async def _echo_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(head) + head)
    await writer.drain()
    writer.close()


async def test_serves_own_control_headers_never_reach_it_from_a_client(tmp_path: Path) -> None:
    # One would let a client turn off Serve's watch for its leaving, or its timeout; one not
    # UTF-8 drew a plain-text 500.
    server = await asyncio.start_server(_echo_head, "127.0.0.1", 0)
    front = local_cluster.free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_like_config(front, server.sockets[0].getsockname()[1]))
    haproxy = subprocess.Popen([str(wrapping.haproxy_wrapper(tmp_path)), "-db", "-f", str(config)],
                               stderr=subprocess.DEVNULL)
    head = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-request-disconnect-disabled: ?1\r\n"
            b"x-request-timeout-seconds: \xff\r\nserve_multiplexed_model_id: m\r\nServe-Multiplexed-Model-Id: m\xff\r\n"
            b"x_llm_gateway_serve_session: \xff\r\nx-kept: yes\r\n\r\n")
    try:
        async with server:
            while not _listening(front):
                assert haproxy.poll() is None
                await asyncio.sleep(0.05)
            answer, _ = await asyncio.to_thread(_until_closed, front, head)
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)
    seen = answer.split(b"\r\n\r\n", 1)[1].lower()
    assert answer.startswith(b"HTTP/1.1 200 ") and b"x-kept: yes" in seen
    for name in (b"x-request-disconnect-disabled", b"x-request-timeout-seconds", b"serve_multiplexed_model_id",
                 b"serve-multiplexed-model-id", b"x_llm_gateway_serve_session"):
        assert name not in seen
