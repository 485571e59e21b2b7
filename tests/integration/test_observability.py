"""Metrics, request ids and access logs, through two ingress replicas.

A known mix of requests (answers, errors, streams of each LLM API, a
hang-up, batched predicts, alias assignments) goes through the gateway; one scrape of
/metrics must then show exactly that mix, summed over both ingress replicas.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ACCESS_LOG, INGRESS_REPLICAS, VLLM_MODEL, Gateway

CHAT = "/v1/chat/completions"
PREDICT = "/v1/models/{model}:predict"
HELLO = [{"role": "user", "content": "Say hello"}]
SECRET = "zebra-quartz-7781"  # a prompt word that must never reach a log

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base_url: str) -> tuple[str, Samples]:
    response = httpx.get(base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over the series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def settle_on(base_url: str, expected: Callable[[Samples], dict[str, tuple[float, float]]]) -> Samples:
    """Scrapes until every (got, want) pair agrees; the other replica reports twice a second."""
    deadline = time.monotonic() + 15
    while True:
        _, samples = scrape(base_url)
        pairs = expected(samples)
        if all(got == want for got, want in pairs.values()) or time.monotonic() > deadline:
            assert {k: got for k, (got, _) in pairs.items()} == {k: want for k, (_, want) in pairs.items()}
            return samples
        time.sleep(0.25)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def access_lines() -> list[dict[str, Any]]:
    return [json.loads(line) for line in ACCESS_LOG.read_text().splitlines()]


def wait_for_log(request_ids: set[str], kind: str = "access") -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in access_lines() if line["log"] == kind and line["request_id"] in request_ids]
        if {line["request_id"] for line in lines} >= request_ids or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


async def quiet_page(base_url: str) -> Samples:
    """A scrape once the request counters stand still: two scrapes 0.75 s
    apart agree (each replica reports twice a second)."""
    _, samples = await asyncio.to_thread(scrape, base_url)
    for _ in range(40):
        await asyncio.sleep(0.75)
        _, again = await asyncio.to_thread(scrape, base_url)
        if total(again, "llm_gateway_requests_total") == total(samples, "llm_gateway_requests_total"):
            return again
        samples = again
    raise AssertionError("the request counters never stood still")


async def test_one_scrape_shows_exactly_the_mix_sent_through_both_replicas(
    gateway: Gateway, async_client: openai.AsyncOpenAI
) -> None:
    before = await quiet_page(gateway.base_url)  # both replicas reported what earlier tests did
    usages: list[Any] = []

    for _ in range(3):
        answer = await async_client.chat.completions.create(model=VLLM_MODEL, messages=HELLO, max_tokens=4)
        usages.append(answer.usage)
    for _ in range(2):
        stream = await async_client.chat.completions.create(
            model=VLLM_MODEL, messages=HELLO, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
        usages += [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert len(usages) == 5
    # A streamed response and a streamed message count the same way.
    events = await async_client.responses.create(model=VLLM_MODEL, input="Hello there", max_output_tokens=5, stream=True)
    finals = [e.response.usage async for e in events if e.type in ("response.completed", "response.incomplete")]
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key="unused", max_retries=0) as claude:
        async with claude.messages.stream(model=VLLM_MODEL, messages=HELLO, max_tokens=5) as message_stream:
            message = await message_stream.get_final_message()
    other_prompt = finals[0].input_tokens + message.usage.input_tokens
    other_completion = finals[0].output_tokens + message.usage.output_tokens

    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
        too_long = {"model": "echo", "messages": HELLO, "max_tokens": 10_000}
        assert (await http.post(CHAT, json=too_long)).status_code == 400
        assert (await http.post(CHAT, json={"model": "no-such-model", "messages": HELLO})).status_code == 404
        # A hang-up: the stream starts, the client leaves after its first bytes.
        slow = {"model": "echo-narrow", "messages": [{"role": "user", "content": "a b c d e f"}], "stream": True}
        async with http.stream("POST", CHAT, json=slow) as hung:
            assert hung.status_code == 200
            await anext(hung.aiter_raw())
        # Batched predicts: one burst of 12.
        rows = [{"instances": [[5.1, 3.5, 1.4, 0.2]]}] * 12
        answers = await asyncio.gather(*(http.post("/v1/models/iris:predict", json=r) for r in rows))
        assert {a.status_code for a in answers} == {200}
        # Alias assignments.
        routed = [
            await http.post(CHAT, json={"model": "chat", "messages": HELLO, "max_tokens": 1}) for _ in range(6)
        ]
    variants = Counter(r.json()["model"] for r in routed)

    prompt = sum(u.prompt_tokens for u in usages) + other_prompt
    completion = sum(u.completion_tokens for u in usages) + other_completion
    vllm = {"model": VLLM_MODEL, "variant": VLLM_MODEL}

    def expected(now: Samples) -> dict[str, tuple[float, float]]:
        d = lambda name, **labels: delta(now, before, name, **labels)  # noqa: E731
        pairs = {
            "vllm answers": (d("llm_gateway_requests_total", route=CHAT, status="200", **vllm), 5),
            "echo 400": (d("llm_gateway_requests_total", route=CHAT, model="echo", variant="echo", status="400"), 1),
            "unknown 404": (d("llm_gateway_requests_total", route=CHAT, model="", variant="", status="404"), 1),
            "hang-up 499": (d("llm_gateway_requests_total", route=CHAT, model="echo-narrow", status="499"), 1),
            "predicts": (d("llm_gateway_requests_total", route=PREDICT, model="iris", status="200"), 12),
            "alias": (d("llm_gateway_requests_total", route=CHAT, model="chat", status="200"), 6),
            "prompt tokens": (d("llm_gateway_tokens_total", kind="prompt", **vllm), prompt),
            "completion tokens": (d("llm_gateway_tokens_total", kind="completion", **vllm), completion),
            "other apis": (
                d("llm_gateway_requests_total", route="/v1/responses", status="200", **vllm)
                + d("llm_gateway_requests_total", route="/v1/messages", status="200", **vllm),
                2,
            ),
            "ttft": (d("llm_gateway_time_to_first_token_seconds_count", **vllm), 7),
            "itl": (d("llm_gateway_inter_token_latency_seconds_count", **vllm), completion - 7),
            "durations": (d("llm_gateway_request_duration_seconds_count", route=CHAT, **vllm), 5),
            "batched requests": (d("llm_gateway_batch_size_sum", model="iris"), 12),
            "in flight": (total(now, "llm_gateway_in_flight_requests"), 0),
        }
        for variant in ("echo", "echo-b"):
            pairs[f"assigned {variant}"] = (
                d("llm_gateway_ab_assignments_total", route="chat", variant=variant),
                variants[variant],
            )
            pairs[f"alias tokens {variant}"] = (
                d("llm_gateway_tokens_total", model="chat", variant=variant, kind="completion"),
                variants[variant],
            )
        return pairs

    after = settle_on(gateway.base_url, expected)
    assert delta(after, before, "llm_gateway_batch_size_count", model="iris") >= 1
    assert delta(after, before, "llm_gateway_batch_size_count", model="iris") < 12, "no predict was batched"
    # Every request whose response started has its overhead observed.
    assert delta(after, before, "llm_gateway_overhead_seconds_count", route=CHAT) == 5 + 1 + 1 + 1 + 6
    # The mix went through both ingress replicas, and one scrape counted it all.
    replicas = {line["replica"] for line in access_lines()[-40:]}
    assert len(replicas) == INGRESS_REPLICAS


def test_scrape_has_every_family_and_bounded_labels(gateway: Gateway) -> None:
    from gateway.metrics.families import FAMILIES

    text, samples = scrape(gateway.base_url)
    for family in FAMILIES:
        assert f"# TYPE {family.name} {family.kind}" in text
    labels = {key for _, ls in samples for key, _ in ls}
    assert not labels & {"user", "session", "path", "prompt", "request_id"}
    routes = {v for _, ls in samples for k, v in ls if k == "route"}
    aliases = {"chat", "vllm-alias", "fb", "mirrored", "iris-ab", "embed", "lora-ab", "vllm-fb"}
    assert all(route.startswith("/") or route in {"unmatched", *aliases} for route in routes)
    assert not any("iris:predict" in route for route in routes), "raw paths leaked into labels"


def test_vllm_engine_metrics_are_on_the_same_page_per_replica(gateway: Gateway, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=VLLM_MODEL, messages=HELLO, max_tokens=2)
    deadline = time.monotonic() + 15
    while True:
        _, samples = scrape(gateway.base_url)
        engine = {ls for name, ls in samples if name.startswith("vllm:")}
        if engine or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert engine, "no vllm:* series on /metrics"
    assert all(dict(ls).get("replica") for ls in engine)
    assert total(samples, "vllm:generation_tokens_total", model_name=VLLM_MODEL) > 0
    # Every series the Grafana dashboard reads is on the page.
    from tests.unit.test_packaging import dashboard_metric_names

    assert dashboard_metric_names() <= {name for name, _ in samples}


@pytest.mark.parametrize("stream", [False, True])
def test_request_ids_are_kept_or_made_and_logged(gateway: Gateway, http: httpx.Client, stream: bool) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": f"hi {SECRET}"}], "max_tokens": 2, "stream": stream}
    client_id = f"client-id.42:{stream}"
    given = http.post(CHAT, json=body, headers={"x-request-id": client_id})
    assert given.headers.get_list("x-request-id") == [client_id]
    made = http.post(CHAT, json=body)
    assert len(made.headers.get_list("x-request-id")) == 1
    # An id unfit for logs is not used: the gateway makes its own and returns it
    # beside the client's (which Serve echoes).
    insane_id = "no spaces or quotes \" allowed"
    insane = http.post(CHAT, json=body, headers={"x-request-id": insane_id})
    (used,) = set(insane.headers.get_list("x-request-id")) - {insane_id}
    assert len(used) == 32 and used != made.headers["x-request-id"]
    if not stream:
        # The chunk and completion ids carry the request id too.
        assert given.json()["id"] == f"chatcmpl-{client_id}"
        assert float(given.headers["x-gateway-overhead-ms"]) > 0
    else:
        assert "x-gateway-overhead-ms" not in given.headers

    ids = {given.headers["x-request-id"], made.headers["x-request-id"], used}
    lines = wait_for_log(ids)
    assert {line["request_id"] for line in lines} == ids
    for line in lines:
        assert (line["route"], line["model"], line["variant"], line["status"]) == (CHAT, "echo", "echo", 200)
        assert line["stream"] is stream and line["completion_tokens"] == 2 and line["duration_ms"] > 0
        # The default front door on one host hands each chat stream's socket to the model replica.
        assert line.get("handoff") is (True if stream else None)
    assert SECRET not in ACCESS_LOG.read_text()


@pytest.mark.parametrize("stream", [False, True])
def test_a_body_request_id_is_the_requests_own_or_refused(http: httpx.Client, stream: bool) -> None:
    # vLLM lets a body's `request_id` name the request; the gateway keeps one
    # id per request, so the body's must be the x-request-id, never replace it.
    body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 2, "stream": stream}
    client_id = f"mine-{stream}"
    same = http.post(CHAT, json={**body, "request_id": client_id}, headers={"x-request-id": client_id})
    assert same.status_code == 200
    ids = {json.loads(line[6:])["id"] for line in same.text.splitlines() if line.startswith("data: {")} if stream else {same.json()["id"]}
    assert ids == {f"chatcmpl-{client_id}"}
    other = http.post(CHAT, json={**body, "request_id": "someone-else"}, headers={"x-request-id": client_id})
    assert other.status_code == 400
    error = other.json()["error"]
    assert (error["param"], error["type"]) == ("request_id", "invalid_request_error")
    assert "x-request-id" in error["message"]


async def test_server_errors_are_logged_under_the_id_the_client_got(gateway: Gateway) -> None:
    body = {"model": "echo-narrow", "messages": [{"role": "user", "content": " ".join(["w"] * 8)}], "stream": True}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
        responses = await asyncio.gather(*(http.post(CHAT, json=body) for _ in range(6)))
    failed = {r.headers["x-request-id"] for r in responses if r.status_code == 503}
    assert failed, "echo-narrow should refuse some of 6 concurrent streams"
    errors = wait_for_log(failed, kind="error")
    assert {line["request_id"] for line in errors} == failed
    assert {(line["status"], line["error"]) for line in errors} == {(503, "overloaded")}
    logged = {line["request_id"]: line for line in wait_for_log(failed)}
    assert {line["status"] for line in logged.values()} == {503}


def test_the_replicas_own_log_lines_reach_their_stderr(gateway: Gateway) -> None:
    """A line the gateway's code logs at INFO inside a replica (the vLLM
    model ready, with the port its streams use; the ingress's routing table)
    is in the replica's stderr, which Ray keeps in the worker's ``.err`` file
    and ``llm-gateway serve`` prints; before, such lines went nowhere."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path(), "logs")  # type: ignore[attr-defined]
    wanted = {
        "model": re.compile(rf"^INFO .* models\.llm\.server: {re.escape(VLLM_MODEL)} ready \(streams on [\d.]+:\d+\)$"),
        "ingress": re.compile(r"^INFO .* gateway\.http\.state: serving \d+ models, \d+ routes, \d+ API keys$"),
    }
    found = {
        name
        for err in logs.glob("worker-*.err")
        for line in err.read_text(errors="replace").splitlines()
        for name, pattern in wanted.items()
        if pattern.match(line)
    }
    assert found == set(wanted)
