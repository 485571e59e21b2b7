"""A model's request_timeout_s: past it the engine request stops and the client is told.

`echo-narrow` in the test config answers a token every 100 ms and allows 3 s
per request; it takes one request at a time, so a request that was not
stopped would hold up the next one for seconds.
"""

from __future__ import annotations

import json
import time

import httpx

from gateway import sse
from tests.integration.conftest import ACCESS_LOG

CHAT = "/v1/chat/completions"
LIMIT_S = 3.0
SLOW = {"model": "echo-narrow", "messages": [{"role": "user", "content": " ".join(["w"] * 60)}]}  # 6 s
QUICK = {"model": "echo-narrow", "messages": [{"role": "user", "content": "a"}]}


def assert_freed_at_once(http: httpx.Client) -> None:
    """The model's one place is free: the stopped request is not still generating."""
    started = time.monotonic()
    assert http.post(CHAT, json=QUICK).status_code == 200
    assert time.monotonic() - started < 1.5


def access_line(request_id: str) -> dict[str, object]:
    for _ in range(60):  # the access log is flushed in batches
        for line in ACCESS_LOG.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if entry.get("request_id") == request_id and entry.get("log") == "access":
                return entry
        time.sleep(0.25)
    raise AssertionError(f"no access line for {request_id}")


def test_a_whole_answer_past_the_limit_is_a_504_and_stops_the_engine(http: httpx.Client) -> None:
    started = time.monotonic()
    answer = http.post(CHAT, json=SLOW)
    elapsed = time.monotonic() - started
    assert answer.status_code == 504
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "request_timeout")
    assert "3 s" in error["message"]
    assert answer.headers["x-gateway-variant"] == "echo-narrow"
    assert LIMIT_S - 0.1 <= elapsed < LIMIT_S + 2
    assert_freed_at_once(http)
    line = access_line(answer.headers["x-request-id"])
    assert (line["status"], line["error"]) == (504, "request_timeout")


def test_a_stream_past_the_limit_ends_with_an_error_frame_and_done(http: httpx.Client) -> None:
    started = time.monotonic()
    with http.stream("POST", CHAT, json={**SLOW, "stream": True}) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        raw = b"".join(response.iter_raw())
    elapsed = time.monotonic() - started
    payloads = sse.parse(raw)
    assert payloads[-1] is None  # [DONE]
    errors = [p["error"] for p in payloads[:-1] if "error" in p]
    assert [(e["type"], e["code"]) for e in errors] == [("server_error", "request_timeout")]
    assert "error" in payloads[-2]  # nothing after the error frame but [DONE]
    words = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1] if p.get("choices")).split()
    assert 10 <= len(words) < 60  # what came in time was sent as it came
    assert LIMIT_S - 0.1 <= elapsed < LIMIT_S + 2
    assert_freed_at_once(http)
    line = access_line(request_id)
    assert (line["status"], line["error"]) == (504, "request_timeout")


def test_requests_within_the_limit_are_untouched(http: httpx.Client) -> None:
    body = {"model": "echo-narrow", "messages": [{"role": "user", "content": "a b c d e f g h"}]}  # 0.8 s
    assert http.post(CHAT, json=body).json()["choices"][0]["message"]["content"] == "a b c d e f g h"
