"""A vLLM model's LoRA adapter served as a model of its own, by the base
model's replicas, on the real vLLM engine with the official SDK."""

from __future__ import annotations

import asyncio
import collections
import copy
import shutil
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai

from gateway.deploy import LIVE
from tests.integration.conftest import LORA, MODELS, TEST_CONFIG, VLLM_CONTEXT, VLLM_MODEL, Gateway, replica_pids

PROMPT = "Tell me about the harbour"


def test_the_adapter_is_listed_as_vllm_lists_it(client: openai.OpenAI, http: httpx.Client) -> None:
    card = http.get(f"/v1/models/{LORA}").json()
    assert (card["id"], card["parent"], card["root"]) == (LORA, VLLM_MODEL, str(MODELS / "tiny-chat-v1-lora"))
    assert (card["kind"], card["max_model_len"]) == ("llm", VLLM_CONTEXT)
    assert http.get(f"/v1/models/{VLLM_MODEL}").json()["parent"] is None
    assert LORA in [model.id for model in client.models.list()]


def test_the_adapter_changes_what_the_model_says(client: openai.OpenAI) -> None:
    said = {}
    for model in (VLLM_MODEL, LORA):
        raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        completion = raw.parse()
        assert (completion.model, raw.headers["x-gateway-variant"]) == (model, model)
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        said[model] = completion.choices[0].text
    assert said[VLLM_MODEL] != said[LORA]
    again = client.completions.create(model=LORA, prompt=PROMPT, max_tokens=12, temperature=0)
    assert again.choices[0].text == said[LORA]  # the same adapter each time, not a mix of the two


def test_the_adapter_streams_chat_and_answers_the_responses_api(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    stream = client.chat.completions.create(
        model=LORA, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {LORA}
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    first = client.responses.create(model=LORA, input=PROMPT, max_output_tokens=4)
    follow_up = client.responses.create(model=LORA, input="And?", previous_response_id=first.id, max_output_tokens=4)
    assert (first.model, follow_up.model) == (LORA, LORA)


def test_an_alias_splits_between_the_model_and_its_adapter(client: openai.OpenAI) -> None:
    seen = collections.Counter()
    for user in range(24):
        completion = client.completions.create(model="lora-ab", prompt=PROMPT, max_tokens=1, user=f"user-{user}")
        seen[completion.model] += 1
    assert set(seen) == {VLLM_MODEL, LORA}, seen


def test_a_conversation_through_an_alias_stays_on_the_adapter_that_began_it(client: openai.OpenAI) -> None:
    """The model and its adapter share replicas: a follow-up pinned to the
    replica that keeps the conversation goes on with the adapter's weights,
    whatever variant the follow-up's own user would get."""
    begun = {}
    for user in range(24):
        response = client.responses.create(model="lora-ab", input=PROMPT, max_output_tokens=2, user=f"user-{user}")
        begun.setdefault(response.model, (response, f"user-{user}"))
        if len(begun) == 2:
            break
    first, _ = begun[LORA]
    _, base_user = begun[VLLM_MODEL]
    follow_up = client.responses.create(
        model="lora-ab", input="And?", previous_response_id=first.id, max_output_tokens=2, user=base_user
    )
    assert follow_up.model == LORA
    retrieved = client.responses.with_raw_response.retrieve(first.id)
    assert retrieved.headers["x-gateway-variant"] == LORA and retrieved.parse().model == LORA


def test_the_adapter_answers_the_messages_api_and_counts_as_its_model(gateway: Gateway, http: httpx.Client) -> None:
    with anthropic.Anthropic(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60) as claude:
        message = claude.messages.create(model=LORA, max_tokens=4, messages=[{"role": "user", "content": PROMPT}])
    assert message.model == LORA and message.usage.output_tokens > 0
    counts = {}
    for model in (VLLM_MODEL, LORA):
        counts[model] = http.post("/tokenize", json={"model": model, "prompt": PROMPT}).json()["count"]
    assert counts[LORA] == counts[VLLM_MODEL] > 0  # the model's tokenizer


RENAMED = "tiny-lora-renamed"


def renamed_config() -> dict[str, Any]:
    """The test config with its adapter served under another name: the same
    rank limit and adapter slots, so a live change."""
    config = copy.deepcopy(TEST_CONFIG)
    model = next(m for m in config["models"] if m["name"] == VLLM_MODEL)
    model["lora_adapters"] = {RENAMED: model["lora_adapters"][LORA]}
    next(r for r in config["routing"]["routes"] if r["name"] == "lora-ab")["variants"] = {VLLM_MODEL: 1, RENAMED: 1}
    return config


async def test_adapters_change_on_the_running_replicas_and_no_request_fails(gateway: Gateway) -> None:
    replicas = replica_pids(VLLM_MODEL)
    stop = asyncio.Event()
    answers: list[tuple[str, int, str]] = []  # model asked, status, error code

    async def ask(session: httpx.AsyncClient, model: str) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        return await session.post("/v1/completions", json=body)

    async def traffic(session: httpx.AsyncClient, model: str) -> None:
        while not stop.is_set():
            response = await ask(session, model)
            answers.append((model, response.status_code, response.json().get("error", {}).get("code", "")))

    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        said = (await ask(session, LORA)).json()["choices"][0]["text"]
        clients = [asyncio.ensure_future(traffic(session, model)) for model in (VLLM_MODEL, LORA, VLLM_MODEL)]
        try:
            assert await asyncio.to_thread(gateway.redeploy, renamed_config()) == {VLLM_MODEL: LIVE}
            renamed, gone = await ask(session, RENAMED), await ask(session, LORA)
            card = (await session.get(f"/v1/models/{RENAMED}")).json()
        finally:
            stop.set()
            await asyncio.gather(*clients)
            restored = await asyncio.to_thread(gateway.redeploy, TEST_CONFIG)
        back = await ask(session, LORA)
    assert restored == {VLLM_MODEL: LIVE}  # and no other model said changed
    assert replica_pids(VLLM_MODEL) == replicas  # loaded and unloaded in the running engine, twice
    assert renamed.json()["model"] == RENAMED and renamed.json()["choices"][0]["text"] == said  # the same weights
    assert card["parent"] == VLLM_MODEL
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "model_not_found")
    assert back.json()["choices"][0]["text"] == said
    base = collections.Counter(status for model, status, _ in answers if model == VLLM_MODEL)
    leaving = collections.Counter((status, code) for model, status, code in answers if model == LORA)
    assert set(base) == {200} and base[200] >= 4, base  # the model's own requests never noticed
    # (503: refused by the replica while vLLM unloads it; 404 once the ingress routes by the new table)
    allowed = {(200, ""), (503, "service_unavailable"), (404, "model_not_found")}
    assert set(leaving) <= allowed and leaving[(200, "")] > 0, leaving


async def test_an_adapter_vllm_cannot_load_is_answered_503_and_the_rest_keep_serving(
    gateway: Gateway, tmp_path: Path
) -> None:
    broken = tmp_path / "no-weights"
    broken.mkdir()
    shutil.copy(MODELS / "tiny-chat-v1-lora" / "adapter_config.json", broken)  # a config, but no weights
    config = renamed_config()
    next(m for m in config["models"] if m["name"] == VLLM_MODEL)["lora_adapters"] = {RENAMED: str(broken)}
    replicas = replica_pids(VLLM_MODEL)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        try:
            await asyncio.to_thread(gateway.redeploy, config)
            body = {"prompt": PROMPT, "max_tokens": 2}
            refused = await session.post("/v1/completions", json={"model": RENAMED, **body})
            served = await session.post("/v1/completions", json={"model": VLLM_MODEL, **body})
        finally:
            await asyncio.to_thread(gateway.redeploy, TEST_CONFIG)
        back = await session.post("/v1/completions", json={"model": LORA, **body})
    assert replica_pids(VLLM_MODEL) == replicas
    error = refused.json()["error"]
    assert (refused.status_code, error["type"]) == (503, "service_unavailable"), refused.text
    assert f"could not load the LoRA adapter '{RENAMED}' from '{broken}'" in error["message"]
    assert served.status_code == back.status_code == 200
