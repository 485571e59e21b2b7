"""SSE on the wire: framing, concurrency, and clients that hang up."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import sse
from tests.integration.conftest import BROWSER_PAGE, VLLM_MODEL, Gateway
from tests.integration.test_observability import wait_for_log

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello there, tell me about the harbour"}]


@pytest.mark.parametrize("model", [VLLM_MODEL, "echo"])
@pytest.mark.parametrize("n", [1, 2])
def test_sse_framing_matches_openai(http: httpx.Client, model: str, n: int) -> None:
    body = {
        "model": model, "messages": HELLO, "max_tokens": 6, "n": n, "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        raw = b"".join(response.iter_raw())
    assert raw.endswith(b"\n\n" + sse.DONE)
    payloads = sse.parse(raw)  # raises on anything that is not a `data:` frame
    assert payloads[-1] is None and None not in payloads[:-1]
    chunks = payloads[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == model for c in chunks)
    first_per_choice = {}
    finishes: dict[int, int] = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            first_per_choice.setdefault(choice["index"], choice)
            if choice["finish_reason"] is not None:
                finishes[choice["index"]] = finishes.get(choice["index"], 0) + 1
    assert set(first_per_choice) == set(range(n))
    assert all(c["delta"].get("role") == "assistant" for c in first_per_choice.values())
    assert finishes == {i: 1 for i in range(n)}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] > 0


def test_a_browser_page_of_a_named_origin_streams_and_reads_the_answer(http: httpx.Client) -> None:
    # The OpenAI JS SDK in a page: a preflight, then the stream, both through the front door and the relay.
    asked = {"origin": BROWSER_PAGE, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization,content-type,x-stainless-os"}
    preflight = http.options(CHAT, headers=asked)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == BROWSER_PAGE
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
    body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with http.stream("POST", CHAT, json=body, headers={"origin": BROWSER_PAGE}) as response:
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == BROWSER_PAGE
        assert "x-request-id" in response.headers["access-control-expose-headers"]
        raw = b"".join(response.iter_raw())
    assert raw.endswith(b"\n\n" + sse.DONE)
    elsewhere = http.options(CHAT, headers={**asked, "origin": "https://other.example.net"})
    assert elsewhere.status_code == 400 and "access-control-allow-origin" not in elsewhere.headers
    # Nor may that page have the model generate without asking (a "simple" request: text/plain, no preflight).
    simple = json.dumps({**body, "stream": False}).encode()
    page = {"origin": "https://other.example.net", "content-type": "text/plain"}
    unasked = http.post(CHAT, content=simple, headers=page)
    assert unasked.status_code == 403 and unasked.json()["error"]["code"] == "origin_not_allowed"
    assert "usage" not in unasked.json()


def test_curl_no_buffer_stream(gateway: Gateway) -> None:
    out = subprocess.run(
        ["curl", "-sN", gateway.base_url + CHAT, "-H", "content-type: application/json", "-d",
         '{"model":"echo","stream":true,"messages":[{"role":"user","content":"one two three"}]}'],
        capture_output=True, timeout=30, check=True,
    ).stdout
    texts = [c["choices"][0]["delta"].get("content", "") for c in sse.parse(out)[:-1] if c["choices"]]
    assert "".join(texts) == "one two three"


async def test_32_concurrent_streams_all_complete(async_client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> tuple[int, str]:
        stream = await async_client.chat.completions.create(
            model=VLLM_MODEL, messages=[{"role": "user", "content": f"Story number {i}"}],
            max_tokens=32, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return chunks[-1].usage.completion_tokens, finish[0]

    results = await asyncio.gather(*(one(i) for i in range(32)))
    assert results == [(32, "length")] * 32


# Each hung-up request would generate LONG tokens without an abort; with one
# it stops within a few. vLLM's own generation_tokens counter tells which.
HANG_UPS = 16
LONG = 480
AFTER_HANG_UP = LONG // 4  # tokens one request may still make while its abort travels
IDLE_WAIT_S = 30.0


async def wait_idle(gateway: Gateway, deadline_s: float) -> int:
    deadline = time.monotonic() + deadline_s
    while (busy := await gateway.unfinished_requests(VLLM_MODEL)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return busy


def generated_tokens(gateway: Gateway) -> float:
    """vLLM's ``vllm:generation_tokens_total`` for the test model, from /metrics."""
    page = httpx.get(gateway.base_url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "vllm:generation_tokens_total" and sample.labels.get("model_name") == VLLM_MODEL
    )


async def tokens_after_leaving(gateway: Gateway, path: str, body: dict[str, object], marker: str, after: int = 3) -> float:
    """Streams ``body`` to ``path`` and hangs up after ``after`` lines that
    start with ``marker`` (each one token's event); returns how many tokens
    the engine generated for it, once idle again."""
    before = await settled_generated_tokens(gateway)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
        async with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith(marker)
                if seen == after:
                    break  # the client leaves
    assert await wait_idle(gateway, 30) == 0
    return await settled_generated_tokens(gateway) - before


async def settled_generated_tokens(gateway: Gateway) -> float:
    """The counter once the engine is idle and has recorded everything (vLLM
    records a step's stats after its outputs): two readings 1.5 s apart that
    agree."""
    await wait_idle(gateway, IDLE_WAIT_S)
    before = await asyncio.to_thread(generated_tokens, gateway)
    while True:
        await asyncio.sleep(1.5)
        now = await asyncio.to_thread(generated_tokens, gateway)
        if now == before:
            return now
        before = now


async def test_hang_ups_abort_engine_requests(gateway: Gateway, client: openai.OpenAI) -> None:
    body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": LONG, "stream": True, "ignore_eos": True}

    async def hang_up(session: httpx.AsyncClient, request_id: str) -> None:
        async with session.stream("POST", CHAT, json=body, headers={"x-request-id": request_id}) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                break  # first bytes arrived: leave mid-stream

    before = await settled_generated_tokens(gateway)
    ids = {f"hang-up-{i}" for i in range(HANG_UPS)}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as session:
        await asyncio.gather(*(hang_up(session, request_id) for request_id in ids))
    generated = await settled_generated_tokens(gateway) - before
    # Without aborts: HANG_UPS x LONG = 7,680 tokens.
    assert generated <= HANG_UPS * AFTER_HANG_UP, f"{generated:.0f} tokens generated for clients that left"
    # Each logged as a client that closed its request (nginx's 499), its stream handed to the replica.
    lines = wait_for_log(ids)
    assert sorted((line["request_id"], line["status"], line["handoff"]) for line in lines) == [
        (request_id, 499, True) for request_id in sorted(ids)
    ]

    started = time.monotonic()
    answer = client.chat.completions.create(model=VLLM_MODEL, messages=HELLO, max_tokens=8)
    assert answer.choices[0].message.content
    assert time.monotonic() - started < 5


def ingress_replica_url() -> str:
    """An ingress replica's own HTTP address (with the default front door, the gateway's port)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if "GatewayIngress" not in " ".join(proc.info["cmdline"] or []):
            continue
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                return f"http://127.0.0.1:{conn.laddr.port}"
    raise AssertionError("no listening ingress replica found")


async def test_non_streaming_hang_ups_abort_engine_requests(gateway: Gateway) -> None:
    """A client that leaves before its answer stops the engine work for it.

    Sent to the ingress replica itself: Ray's HAProxy front door, where it is
    used, does not pass a client's hang-up on before the response starts
    (README: "The front door").
    """
    body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": LONG, "ignore_eos": True}

    async def hang_up(session: httpx.AsyncClient) -> None:
        with pytest.raises(httpx.ReadTimeout):
            await session.post(CHAT, json=body)

    before = await settled_generated_tokens(gateway)
    # The client waits half a second for its answer; connecting may take longer on a busy host.
    waits = httpx.Timeout(10, read=0.5)
    async with httpx.AsyncClient(base_url=ingress_replica_url(), timeout=waits) as session:
        await asyncio.gather(*(hang_up(session) for _ in range(HANG_UPS // 2)))
    generated = await settled_generated_tokens(gateway) - before
    # Each client waited 0.5 s for its answer, then left; without aborts: 8 x LONG = 3,840 tokens.
    assert generated < 0.75 * HANG_UPS // 2 * LONG, f"{generated:.0f} tokens generated for clients that left"


@pytest.mark.parametrize("model", [VLLM_MODEL, "minilm"])
def test_a_replica_keeps_its_start_up_objects_out_of_full_collections(gateway: Gateway, model: str) -> None:
    """Frozen once the replica is up (``gateway.heap_freeze``): a full collection
    walked them all, stopping every stream on an LLM replica for half a second."""
    assert gateway.call(model, "stats")["frozen_objects"] > 50_000
