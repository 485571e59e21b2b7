"""Aliases over weighted variants, end to end with the OpenAI SDK."""

from __future__ import annotations

import asyncio
import copy
import re
from collections import Counter
from collections.abc import Callable

import httpx
import openai
import pytest
from scipy.stats import chisquare

from gateway import sse
from tests.integration.conftest import ECHO_CONTEXT, TEST_CONFIG, VLLM_MODEL, Gateway

HELLO = [{"role": "user", "content": "Hello there"}]
VARIANT = "x-gateway-variant"


async def test_unkeyed_requests_split_by_weight(async_client: openai.AsyncOpenAI) -> None:
    n = 400
    semaphore = asyncio.Semaphore(16)

    async def one() -> str:
        async with semaphore:
            response = await async_client.chat.completions.create(
                model="chat", messages=HELLO, max_tokens=2
            )
            return response.model

    counts = Counter(await asyncio.gather(*(one() for _ in range(n))))
    assert set(counts) == {"echo", "echo-b"}
    assert chisquare([counts["echo"], counts["echo-b"]], [0.8 * n, 0.2 * n]).pvalue > 0.001


def test_user_field_keeps_a_user_on_one_variant(client: openai.OpenAI) -> None:
    seen: dict[str, set[str]] = {}
    for user in (f"user-{i}" for i in range(20)):
        seen[user] = {
            client.chat.completions.create(model="chat", messages=HELLO, max_tokens=2, user=user).model
            for _ in range(5)
        }
    assert all(len(models) == 1 for models in seen.values())
    assert {m for models in seen.values() for m in models} == {"echo", "echo-b"}


def test_session_header_keeps_a_session_on_one_variant(http: httpx.Client) -> None:
    body = {"model": "chat", "messages": HELLO, "max_tokens": 2}
    for session in (f"s-{i}" for i in range(10)):
        models = {
            http.post("/v1/chat/completions", json=body, headers={"x-session-id": session}).json()["model"]
            for _ in range(5)
        }
        assert len(models) == 1


def test_variant_header_on_answers_streams_and_errors(http: httpx.Client) -> None:
    body = {"model": "chat", "messages": HELLO, "max_tokens": 2, "user": "u-7"}
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.headers[VARIANT] == answer.json()["model"]

    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        raw = b"".join(stream.iter_raw())
        assert stream.headers[VARIANT] == answer.json()["model"]
    chunks = sse.parse(raw)
    assert chunks[-1] is None and {chunk["model"] for chunk in chunks[:-1]} == {answer.json()["model"]}  # each chunk

    too_long = http.post("/v1/chat/completions", json={**body, "max_tokens": ECHO_CONTEXT + 1})
    assert too_long.status_code == 400
    assert too_long.headers[VARIANT] == answer.json()["model"]


def test_concrete_model_names_still_work_and_say_so(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": "echo-b", "prompt": "a b", "max_tokens": 1})
    assert response.headers[VARIANT] == "echo-b"


def test_alias_reaches_the_vllm_engine(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="vllm-alias", messages=HELLO, max_tokens=3)
    assert response.model == VLLM_MODEL
    streamed = client.chat.completions.create(
        model="vllm-alias", messages=HELLO, max_tokens=3, stream=True
    )
    assert {chunk.model for chunk in streamed} == {VLLM_MODEL}


async def test_unknown_alias_is_404(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as session:
        response = await session.post("/v1/chat/completions", json={"model": "chat2", "messages": HELLO})
    assert response.status_code == 404
    assert VARIANT not in response.headers



def replica_processes(model: str) -> frozenset[tuple[int, float]]:
    """(pid, start time) of each of the model's replicas: a restart changes both.

    Ray retitles an actor process while it runs a task (`...:iris.check_health`),
    so the method suffix is optional.
    """
    import psutil

    title = re.compile(rf"Server:{re.escape(model)}(\.\w+)?(\s|$)")
    found = frozenset(
        (proc.info["pid"], proc.info["create_time"])
        for proc in psutil.process_iter(["pid", "cmdline", "create_time"])
        if title.search(" ".join(proc.info["cmdline"] or []))
    )
    assert found, f"no replica process for {model}"
    return found


def replica_process(model: str) -> tuple[int, float]:
    """(pid, start time) of the replica of a model that runs one."""
    (only,) = replica_processes(model)
    return only


async def test_weight_change_applies_live_without_failures_or_restarts(
    gateway: Gateway, async_client: openai.AsyncOpenAI
) -> None:

    changed = copy.deepcopy(TEST_CONFIG)
    changed["routing"]["routes"][0]["variants"] = {"echo": 20, "echo-b": 80}
    replicas_before = {m: replica_processes(m) for m in (VLLM_MODEL, "echo", "echo-b")}

    started = asyncio.Semaphore(0)

    async def long_stream() -> int:
        stream = await async_client.chat.completions.create(
            model="vllm-alias", messages=HELLO, max_tokens=200, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        chunks = []
        async for chunk in stream:
            if not chunks:
                started.release()
            chunks.append(chunk)
        return chunks[-1].usage.completion_tokens

    async def steady_traffic() -> int:
        served = 0
        for _ in range(60):
            await async_client.chat.completions.create(model="chat", messages=HELLO, max_tokens=2)
            served += 1
            if served == 1:
                started.release()
        return served

    try:
        streams = [asyncio.ensure_future(long_stream()) for _ in range(6)]
        traffic = asyncio.ensure_future(steady_traffic())
        for _ in range(len(streams) + 1):  # every stream under way, the traffic flowing
            await asyncio.wait_for(started.acquire(), 60)
        await asyncio.to_thread(gateway.redeploy, changed)
        # Nothing in flight failed: every stream and request completed.
        assert await asyncio.gather(*streams) == [200] * 6
        assert await traffic == 60

        n = 400
        counts: Counter[str] = Counter()
        for _ in range(n):
            response = await async_client.chat.completions.create(model="chat", messages=HELLO, max_tokens=2)
            counts[response.model] += 1
        assert chisquare([counts["echo"], counts["echo-b"]], [0.2 * n, 0.8 * n]).pvalue > 0.001
        alias = await async_client.models.retrieve("chat")
        assert alias.model_extra["variants"] == [{"id": "echo", "weight": 20.0}, {"id": "echo-b", "weight": 80.0}]
        assert {m: replica_processes(m) for m in replicas_before} == replicas_before, "a replica restarted"
    finally:
        await asyncio.to_thread(gateway.redeploy, TEST_CONFIG)


async def test_adding_and_removing_a_variant_restarts_no_other_replica(
    gateway: Gateway, async_client: openai.AsyncOpenAI
) -> None:
    added = copy.deepcopy(TEST_CONFIG)
    added["models"].append({"name": "echo-c", "engine": "echo", "num_cpus": 0.1})
    added["routing"]["routes"][0]["variants"] = {"echo": 1, "echo-b": 0, "echo-c": 1}
    others = (VLLM_MODEL, "echo", "echo-b", "iris", "minilm")
    replicas_before = {m: replica_processes(m) for m in others}
    stop = asyncio.Event()
    served: Counter[str] = Counter()

    async def steady_traffic() -> Counter[str]:
        while not stop.is_set():
            response = await async_client.chat.completions.create(model="chat", messages=HELLO, max_tokens=2)
            served[response.model] += 1
        return Counter(served)

    async def until(condition: Callable[[], bool]) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, dict(served)
            await asyncio.sleep(0.02)

    try:
        traffic = asyncio.ensure_future(steady_traffic())
        await until(lambda: sum(served.values()) > 0)
        await asyncio.to_thread(gateway.redeploy, added)
        await until(lambda: served["echo-c"] > 0)  # the new variant takes traffic
        stop.set()
        before_removal = await traffic  # raises if any request failed
        assert before_removal["echo-c"] > 0, before_removal
        counts = Counter(
            [
                (await async_client.chat.completions.create(model="chat", messages=HELLO, max_tokens=2)).model
                for _ in range(100)
            ]
        )
        assert set(counts) == {"echo", "echo-c"}, counts

        stop.clear()
        served.clear()
        traffic = asyncio.ensure_future(steady_traffic())
        await until(lambda: sum(served.values()) > 0)
        await asyncio.to_thread(gateway.redeploy, TEST_CONFIG)
        stop.set()
        assert sum((await traffic).values()) > 0
        assert "llm-gateway-test:echo-c" not in await asyncio.to_thread(serve_apps)
        listed = {m.id async for m in async_client.models.list()}
        assert "echo-c" not in listed and {"echo", "echo-b"} <= listed
        assert {m: replica_processes(m) for m in others} == replicas_before, "a replica restarted"
    finally:
        stop.set()
        await asyncio.to_thread(gateway.redeploy, TEST_CONFIG)


def serve_apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


# Each API's streaming request and how the last event of its stream begins.
STREAMS = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b c d e"}]}, "data: [DONE]"),
    "responses": ("/v1/responses", {"input": "a b c d e"}, "event: response.completed\n"),
    "messages": (
        "/v1/messages", {"messages": [{"role": "user", "content": "a b c d e"}], "max_tokens": 8}, "event: message_stop\n"
    ),
}


@pytest.mark.parametrize("api", list(STREAMS))
async def test_fallback_serves_what_the_full_variant_cannot(gateway: Gateway, api: str) -> None:
    # echo-narrow takes one request and queues one; the rest would be 503 without fallback.
    path, fields, end = STREAMS[api]
    body = {"model": "fb", "stream": True, **fields}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as session:

        async def one() -> tuple[int, str, str]:
            response = await session.post(path, json=body)
            return response.status_code, response.headers.get(VARIANT, ""), response.text

        results = await asyncio.gather(*(one() for _ in range(6)))
    assert [status for status, _, _ in results] == [200] * 6
    served_by = Counter(variant for _, variant, _ in results)
    assert served_by["echo"] >= 1, served_by  # the overflow went to the next variant
    for _, variant, text in results:
        assert f'"model":"{variant}"' in text and text.strip().split("\n\n")[-1].startswith(end)


async def test_shadow_copies_requests_without_touching_answers(
    gateway: Gateway, async_client: openai.AsyncOpenAI
) -> None:
    def requests() -> int:
        return int(gateway.call("echo-copy", "stats")["requests"])

    before = await asyncio.to_thread(requests)
    answers = [
        await async_client.chat.completions.create(model="mirrored", messages=HELLO, max_tokens=2)
        for _ in range(10)
    ]
    stream = await async_client.chat.completions.create(
        model="mirrored", messages=HELLO, max_tokens=2, stream=True
    )
    streamed = [chunk.model async for chunk in stream]
    assert {a.model for a in answers} == {"echo"} and set(streamed) == {"echo"}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as session:
        for path, fields, _ in (STREAMS["responses"], STREAMS["messages"]):  # whole and streamed
            for stream_it in (False, True):
                answer = await session.post(path, json={"model": "mirrored", "stream": stream_it, **fields})
                assert answer.status_code == 200 and answer.headers[VARIANT] == "echo"
    deadline = asyncio.get_running_loop().time() + 10
    while (copies := await asyncio.to_thread(requests) - before) < 15:
        assert asyncio.get_running_loop().time() < deadline, f"only {copies} shadow copies arrived"
        await asyncio.sleep(0.1)
    assert copies == 15
