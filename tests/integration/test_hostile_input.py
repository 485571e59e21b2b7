"""Hostile input is answered 4xx in OpenAI's shape, never 5xx, and costs others nothing.

Invalid UTF-8 and unpaired surrogates in any field, request ids that are
not UTF-8, and clients that send their body too slowly
(``ingress.read_timeout_s``, 5 s in the test config) get the gateway's
OpenAI-shaped 4xx, and a client that goes on sending a body refused 413 is
disconnected within that time; heads that cannot be parsed, or are too large
or too slow, are refused by the front door (the ingress replicas' own
listeners) in OpenAI's shape too, before the app sees them.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import VLLM_MODEL, Gateway
from tests.integration.test_errors import JSON, assert_error

CHAT = "/v1/chat/completions"
HELLO = '[{"role": "user", "content": "Hello"}]'
READ_TIMEOUT_S = 5


def _chat(model: str, extra: str = "", messages: str = HELLO) -> bytes:
    return f'{{"model": "{model}", "messages": {messages}, "max_tokens": 2{extra}}}'.encode()


SURROGATES = [
    (CHAT, _chat(VLLM_MODEL, messages='[{"role": "user", "content": "Hi \\ud800"}]'), "messages[0].content"),
    (CHAT, _chat("echo", messages='[{"role": "user", "content": "Hi \\udfff there"}]'), "messages[0].content"),
    (CHAT, _chat(VLLM_MODEL, ', "stream": true', '[{"role": "user", "content": "\\uDC00"}]'), "messages[0].content"),
    (CHAT, _chat(VLLM_MODEL, messages='[{"role": "user\\ud800", "content": "Hi"}]'), "messages[0].role"),
    (CHAT, _chat(VLLM_MODEL + "\\udc00"), "model"),
    (CHAT, _chat("chat", ', "user": "\\ud800"'), "user"),
    (CHAT, _chat(VLLM_MODEL, ', "stop": ["a", "\\ud800"]'), "stop[1]"),
    (CHAT, _chat(VLLM_MODEL, ', "metadata": {"\\ud800": "x"}'), "metadata"),
    (
        CHAT,
        _chat(VLLM_MODEL, ', "tools": [{"type": "function", "function": {"name": "f\\ud800", "parameters": {}}}]'),
        "tools[0].function.name",
    ),
    ("/v1/completions", b'{"model": "tiny-chat-v1", "prompt": ["ok", "\\ud800"], "max_tokens": 2}', "prompt[1]"),
    ("/v1/embeddings", b'{"model": "all-minilm-l6-v2", "input": "Hi \\ud800"}', "input"),
    ("/v1/models/iris:predict", b'{"instances": [["\\ud800", 1, 2, 3]]}', "instances[0][0]"),
]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATES)
def test_an_unpaired_surrogate_in_any_field_is_400_naming_it(
    http: httpx.Client, path: str, raw: bytes, param: str
) -> None:
    error = assert_error(http.post(path, content=raw, headers=JSON), 400, None, param)
    assert "unpaired surrogate" in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        (CHAT, b'{"model": "tiny-chat-v1", "messages": [{"role": "user", "content": "Hi \xff"}], "max_tokens": 2}'),
        (CHAT, b'{"model": "ec\xc3\x28ho", "messages": [{"role": "user", "content": "Hi"}]}'),
        (CHAT, b'{"model": "chat", "user": "\xed\xa0\x80", "messages": [{"role": "user", "content": "Hi"}]}'),
        ("/v1/embeddings", b'{"model": "all-minilm-l6-v2", "input": ["ok", "\xf8\x88\x80\x80\x80"]}'),
        ("/v1/models/iris:predict", b'{"instances": [[1, 2, 3, 4]], "\xfe": 1}'),
    ],
)
def test_invalid_utf8_in_any_field_is_400(http: httpx.Client, path: str, raw: bytes) -> None:
    with pytest.raises(UnicodeDecodeError):
        raw.decode()
    error = assert_error(http.post(path, content=raw, headers=JSON), 400, None)
    assert "valid JSON" in error["message"]


def test_escaped_surrogate_pairs_are_ordinary_text(http: httpx.Client) -> None:
    """JSON writers that escape all non-ASCII send emoji as a pair of escapes."""
    raw = _chat("echo", messages='[{"role": "user", "content": "smile \\ud83d\\ude00"}]')
    response = http.post(CHAT, content=raw, headers=JSON)
    assert response.status_code == 200, response.text
    assert "\N{GRINNING FACE}" in response.json()["choices"][0]["message"]["content"]


def _raw(gateway: Gateway, parts: list[bytes], pause_s: float = 0.0, timeout_s: float = 30) -> tuple[bytes, float]:
    """Sends ``parts`` on one connection, pausing between them, while reading
    the answer; returns it and the seconds from the first byte sent until it
    was complete."""
    address = urlsplit(gateway.base_url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout_s) as sock:
        done = threading.Event()

        def send() -> None:
            for part in parts:
                if done.is_set():
                    return
                try:
                    sock.sendall(part)
                except OSError:
                    return  # answered and closed before the client finished
                done.wait(pause_s)

        sender = threading.Thread(target=send)
        start = time.monotonic()
        sender.start()
        answer = b""
        try:  # until the whole answer is in: the connection may stay open for a body still coming
            while not _complete(answer) and (chunk := sock.recv(65536)):
                answer += chunk
        except ConnectionResetError:
            pass
        took = time.monotonic() - start
        done.set()
        sender.join()
        return answer, took


def _complete(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(found) and bool(lengths) and len(body) >= int(lengths[0])


def _error(answer: bytes, status: int, code: str | None) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == str(status).encode(), answer[:300]
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def _head(extra: bytes = b"", length: int | None = None) -> bytes:
    size = b"" if length is None else b"Content-Length: %d\r\n" % length
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n" + size + extra + b"Connection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("extra", "path", "status", "code"),
    [
        (b"X-Big: " + b"a" * 20_000 + b"\r\n", b"/v1/chat/completions", 431, "headers_too_large"),
        (b"".join(b"X-Many-%d: %s\r\n" % (i, b"v" * 10) for i in range(120)), b"/v1/chat/completions", 431,
         "headers_too_large"),
        (b"", b"/v1/chat/completions?q=" + b"u" * 17_000, 414, "uri_too_long"),
    ],
    ids=["one-big-header", "many-headers", "long-url"],
)
def test_a_head_past_the_limits_is_refused_in_openai_shape_and_costs_others_nothing(
    gateway: Gateway, http: httpx.Client, extra: bytes, path: bytes, status: int, code: str
) -> None:
    """URL and headers at most 16 KiB together, at most 100 headers: the front door answers beyond."""
    body = _chat("echo")
    head = _head(extra, len(body)).replace(b"/v1/chat/completions", path, 1)
    answer, _ = _raw(gateway, [head + body])
    assert "16 KiB" in _error(answer, status, code)["message"]
    assert http.post(CHAT, content=body, headers=JSON).status_code == 200


def test_a_head_just_within_the_limits_is_served(gateway: Gateway) -> None:
    body = _chat("echo")
    within = b"X-Big: " + b"a" * 14_500 + b"\r\n" + b"".join(b"X-Many-%d: v\r\n" % i for i in range(90))
    answer, _ = _raw(gateway, [_head(within, len(body)) + body])
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_a_head_of_any_size_or_shape_is_answered_in_openai_shape(gateway: Gateway, http: httpx.Client) -> None:
    """Behind HAProxy 2.8 a head past its 64 KiB buffer, or one it could not
    parse, got its own short HTML; the gateway's own front door answers both
    in JSON (and stops reading a head once it is over the limit)."""
    body = _chat("echo")
    answer, _ = _raw(gateway, [_head(b"X-Big: " + b"a" * 70_000 + b"\r\n", len(body)) + body])
    assert "16 KiB" in _error(answer, 431, "headers_too_large")["message"]
    answer, _ = _raw(gateway, [b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nno colon here\r\n\r\n"])
    assert _error(answer, 400, "invalid_http_request")["type"] == "invalid_request_error"
    assert http.post(CHAT, content=body, headers=JSON).status_code == 200


def test_a_request_id_that_is_not_utf8_is_400_and_a_session_id_is_kept(gateway: Gateway) -> None:
    body = _chat("chat")
    answer, _ = _raw(gateway, [_head(b"X-Request-Id: \xff\xfe\r\n", len(body)) + body])
    assert _error(answer, 400, None)["param"] == "x-request-id"
    for session in (b"\xff\xfe", "caf\N{LATIN SMALL LETTER E WITH ACUTE}".encode()):
        answer, _ = _raw(gateway, [_head(b"X-Session-Id: " + session + b"\r\n", len(body)) + body])
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    answer, _ = _raw(gateway, [_head("X-Request-Id: req-caf\N{LATIN SMALL LETTER E WITH ACUTE}\r\n".encode(), len(body)) + body])
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def _until_closed(gateway: Gateway, parts: Iterable[bytes], pause_s: float, wait_s: float) -> tuple[bytes, float, float]:
    """Sends ``parts`` on one keep-alive connection, pausing between them,
    and goes on sending after the answer; returns the answer, the seconds
    until it was complete and until the gateway closed the connection
    (``inf``: still open after ``wait_s``)."""
    address = urlsplit(gateway.base_url)
    with socket.create_connection((address.hostname, address.port), timeout=wait_s) as sock:
        done = threading.Event()

        def send() -> None:
            for part in parts:
                try:
                    sock.sendall(part)
                except OSError:
                    return
                if done.wait(pause_s):
                    return

        sender = threading.Thread(target=send)
        start = time.monotonic()
        sender.start()
        answer, answered, closed = b"", float("inf"), float("inf")
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if _complete(answer) and answered == float("inf"):
                    answered = time.monotonic() - start
            closed = time.monotonic() - start
        except ConnectionResetError:
            closed = time.monotonic() - start
        except TimeoutError:
            pass
        done.set()
        sender.join()
        return answer, answered, closed


def test_a_body_that_stalls_is_408_after_the_read_timeout_and_its_connection_closed(
    gateway: Gateway, http: httpx.Client
) -> None:
    """Slow-loris: a client trickling its body one byte a second, and one that
    stops after its first byte, on keep-alive connections. Both are answered
    408 with `Connection: close`; the trickling one's connection closes with
    the answer (it used to stay open as long as bytes kept coming), the silent
    one's once it has neither sent nor read for twice the read timeout (it
    used to stay open for an hour)."""
    body = _chat("echo")
    head = _head(length=len(body)).replace(b"Connection: close\r\n", b"")
    wait_s = 4 * READ_TIMEOUT_S
    results: dict[str, tuple[bytes, float, float]] = {}
    trickle = threading.Thread(target=lambda: results.setdefault("trickle", _until_closed(
        gateway, [head] + [body[i : i + 1] for i in range(len(body))], 1.0, wait_s)))
    trickle.start()
    results["silent"] = _until_closed(gateway, [head + body[:1]], wait_s, wait_s)
    trickle.join()
    for name, (answer, answered, closed) in results.items():
        error = _error(answer, 408, "request_read_timeout")
        assert error["type"] == "invalid_request_error" and f"{READ_TIMEOUT_S} seconds" in error["message"]
        assert b"\r\nconnection: close\r\n" in answer.partition(b"\r\n\r\n")[0].lower() + b"\r\n", name
        assert READ_TIMEOUT_S - 0.5 <= answered <= READ_TIMEOUT_S + 3, name
    assert results["trickle"][2] - results["trickle"][1] <= 2.5
    assert results["silent"][2] - results["silent"][1] <= 2 * READ_TIMEOUT_S + 2.5
    assert http.post(CHAT, content=body, headers=JSON).status_code == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_refused_body_that_keeps_coming_is_cut_off_after_the_read_timeout(
    gateway: Gateway, http: httpx.Client, framing: str
) -> None:
    """A body past `ingress.max_body_bytes` is answered 413 at once and the
    rest of it is read and dropped, so that a client still sending gets its
    answer; a client that goes on sending (here about 25 MB/s, without end) is
    disconnected the read timeout after the answer. It used to be read for as
    long as it came (24 GB in 20 s, HAProxy and the ingress busy throughout)."""
    block = b"x" * (512 * 1024)
    if framing == "chunked":  # refused once 32 MiB have passed
        head, piece = _head(b"Transfer-Encoding: chunked\r\n"), b"%x\r\n%b\r\n" % (len(block), block)
    else:  # refused before any of it is read
        head, piece = _head(length=1 << 40), block
    head = head.replace(b"Connection: close\r\n", b"")
    parts = itertools.chain([head], itertools.repeat(piece))
    answer, answered, closed = _until_closed(gateway, parts, 0.02, 4 * READ_TIMEOUT_S)
    error = _error(answer, 413, "request_too_large")
    assert error["type"] == "invalid_request_error"
    assert answered < READ_TIMEOUT_S
    assert READ_TIMEOUT_S - 0.5 <= closed - answered <= READ_TIMEOUT_S + 2.5
    assert http.post(CHAT, content=_chat("echo"), headers=JSON).status_code == 200


def test_a_head_that_stalls_is_408_after_the_read_timeout(gateway: Gateway, http: httpx.Client) -> None:
    """Answered by the front door (HAProxy's ``timeout http-request`` gave its own short HTML)."""
    parts = [b"POST /v1/chat/completions HTTP/1.1\r\n", b"Host: gw\r\n"] + [b"X-Slow: 1\r\n"] * 30
    answer, took = _raw(gateway, parts, pause_s=0.5)
    assert _error(answer, 408, "request_read_timeout")["type"] == "invalid_request_error"
    assert READ_TIMEOUT_S - 0.5 <= took <= READ_TIMEOUT_S + 3
    assert http.post(CHAT, content=_chat("echo"), headers=JSON).status_code == 200
