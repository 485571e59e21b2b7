"""API keys and their limits, end to end: two ingress replicas, one shared ledger.

The keys are deployed live onto the session's gateway (as `llm-gateway
deploy` does) and removed again afterwards, so the other tests see the open
gateway they expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import pytest

from gateway.auth.keys import hash_secret, new_secret
from tests.integration.conftest import ACCESS_LOG, TEST_CONFIG, VLLM_MODEL, Gateway

CHAT = "/v1/chat/completions"
WORDS = [{"role": "user", "content": "one two three four"}]  # 4 prompt tokens on the echo engine
T = TypeVar("T")
KEYS = ("full", "scoped", "rpm", "tpm", "quota", "cancel", "vllm", "vllm-left", "embed", "one-place", "revoked")


@pytest.fixture(scope="module")
def secrets(gateway: Gateway) -> Iterator[dict[str, str]]:
    made = {name: new_secret() for name in KEYS}
    entries: dict[str, dict[str, Any]] = {
        "full": {},
        "scoped": {"models": ["chat", "iris*"]},
        "rpm": {"rpm": 40},
        "tpm": {"tpm": 9 * 7},  # 9 requests of 4 + 3 tokens
        "quota": {"rpm": 10, "tpm": 1_000},
        "cancel": {"tpm": 100_000, "max_concurrent": 64},
        "vllm": {"tpm": 2_000},
        "vllm-left": {"tpm": 10_000},
        "embed": {"tpm": 1_000},
        "one-place": {"max_concurrent": 1},
        "revoked": {},
    }
    keyed = copy.deepcopy(TEST_CONFIG)
    keyed["keys"] = [{"id": n, "hash": hash_secret(made[n]), **entries[n]} for n in KEYS]
    made["ops"] = new_secret()  # for health, readiness and metrics
    keyed["keys"].append({"id": "ops", "hash": hash_secret(made["ops"]), "ops": True})
    gateway.redeploy(keyed)
    try:
        yield made
    finally:
        gateway.redeploy(TEST_CONFIG)


class Leave(Exception):
    """A client hanging up."""


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def chat(max_tokens: int = 3, **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": WORDS, "max_tokens": max_tokens, **extra}


async def settled(http: httpx.AsyncClient, deadline_s: float = 15) -> dict[str, Any]:
    """The key's ``GET /v1/key`` once nothing of it is in flight: every
    request settled and every block booked ahead by an ingress replica given
    back (settlements are one-way messages to the ledger)."""
    deadline = time.monotonic() + deadline_s
    while True:
        answer = await http.get("/v1/key")
        assert answer.status_code == 200, answer.text
        info: dict[str, Any] = answer.json()
        if info["usage"]["in_flight"] == 0:
            return info
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)


def test_requests_without_a_valid_key_are_refused_and_probes_want_the_operations_key(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
        for headers in ({}, bearer("sk-gw-wrong"), {"authorization": secrets["full"]}):
            refused = http.post(CHAT, json=chat(), headers=headers)
            assert refused.status_code == 401
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
            assert secrets["full"] not in refused.text
        assert http.get("/v1/models").status_code == 401
        assert http.post("/v1/models/iris:predict", json={"instances": [[1, 2, 3, 4]]}).status_code == 401
        assert http.get("/v1/models", headers=bearer(secrets["ops"])).status_code == 401
        # vLLM's tokenizer routes are outside /v1, and behind the same check.
        tokens = {"model": VLLM_MODEL, "tokens": [1, 2]}
        assert http.post("/tokenize", json={"model": VLLM_MODEL, "prompt": "Hello"}).status_code == 401
        assert http.post("/detokenize", json=tokens).status_code == 401
        assert http.post("/detokenize", json=tokens, headers=bearer(secrets["scoped"])).status_code == 404  # not its model
        assert http.post("/detokenize", json=tokens, headers=bearer(secrets["full"])).status_code == 200
        # Health, readiness and metrics want the operations key, and only that.
        for path in ("/health", "/ready", "/metrics"):
            for headers in ({}, bearer(secrets["full"])):
                refused = http.get(path, headers=headers)
                assert refused.status_code == 401, path
                assert refused.json()["error"]["code"] == "invalid_api_key"
            assert http.get(path, headers=bearer(secrets["ops"])).status_code == 200, path
        assert http.get("/docs").status_code == 200
    with openai.OpenAI(base_url=gateway.v1, api_key="sk-gw-wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            sdk.chat.completions.create(model="echo", messages=WORDS, max_tokens=2)
    with openai.OpenAI(base_url=gateway.v1, api_key=secrets["full"], max_retries=0) as good:
        assert good.chat.completions.create(model="echo", messages=WORDS, max_tokens=2).choices


def test_a_key_sees_and_reaches_only_its_models(gateway: Gateway, secrets: dict[str, str]) -> None:
    with openai.OpenAI(base_url=gateway.v1, api_key=secrets["scoped"], max_retries=0) as sdk:
        assert sorted(m.id for m in sdk.models.list().data) == ["chat", "iris", "iris-ab", "iris-tree"]
        assert sdk.chat.completions.create(model="chat", messages=WORDS, max_tokens=2).model in ("echo", "echo-b")
    with httpx.Client(base_url=gateway.base_url, timeout=30, headers=bearer(secrets["scoped"])) as http:
        hidden = http.post(CHAT, json=chat())  # a variant of `chat`, named directly
        missing = http.post(CHAT, json={**chat(), "model": "no-such-model"})
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"] == {
            **missing.json()["error"], "message": missing.json()["error"]["message"].replace("no-such-model", "echo")
        }
        assert http.get("/v1/models/echo").status_code == 404


async def test_concurrent_requests_never_pass_the_request_limit(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers=bearer(secrets["rpm"])) as http:
        answers = await asyncio.gather(*(http.post(CHAT, json=chat()) for _ in range(64)))
    statuses = sorted(a.status_code for a in answers)
    # Exactly the limit is admitted: no overshoot, and none under it refused.
    assert statuses == [200] * 40 + [429] * 24
    ok = next(a for a in answers if a.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "40"
    remaining = [int(a.headers["x-ratelimit-remaining-requests"]) for a in answers if a.status_code == 200]
    # Each replica's count of what is left (a busy key's replicas admit from leases of it).
    assert all(0 <= r < 40 for r in remaining)
    refused = next(a for a in answers if a.status_code == 429)
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "requests per min (RPM): Limit 40, Used 40, Requested 1" in error["message"]
    assert "Please try again in " in error["message"]
    assert int(refused.headers["retry-after"]) >= 1 and int(refused.headers["retry-after-ms"]) > 0
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


async def test_concurrent_requests_never_pass_the_token_limit(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers=bearer(secrets["tpm"])) as http:
        answers = await asyncio.gather(*(http.post(CHAT, json=chat(3)) for _ in range(64)))
    admitted = [a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200]
    assert admitted == [7] * 9  # 63 tokens: exactly what fits, nothing more
    refused = next(a for a in answers if a.status_code == 429)
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert "tokens per min (TPM): Limit 63, Used 63, Requested 7" in error["message"]


async def test_after_random_hang_ups_the_quota_is_exactly_what_was_used(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    rng = random.Random(11)
    headers = bearer(secrets["cancel"])
    used = 0

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal used
        # At most 4 tokens: the echo answers the prompt's 4 words, so it uses all it reserves.
        body = chat(rng.randint(1, 4), stream=True, stream_options={"include_usage": True})
        try:
            async with http.stream("POST", CHAT, json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if i % 2 and rng.random() < 0.5:
                        raise Leave  # the client leaves mid-stream
                    if line.startswith("data: {") and '"usage"' in line:
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            used += usage["total_tokens"]
                            return
        except Leave:
            used += 4 + body["max_tokens"]  # what it reserved, and kept

    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers=headers) as http:
        await asyncio.gather(*(one(http, i) for i in range(48)))
        info = await settled(http)
        probe = await http.post(CHAT, json=chat(1))
    assert info["usage"]["remaining_tokens"] == 100_000 - used
    assert probe.status_code == 200
    # Nothing is left reserved: the remaining quota is the limit less what was used.
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) == 100_000 - used - 5


async def test_vllm_token_limit_reserves_the_models_own_prompt_count(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    messages = [{"role": "user", "content": "Tell me something about the sea"}]
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=secrets["vllm"], max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model=VLLM_MODEL, messages=messages, max_tokens=5)
        answer = raw.parse()
        reserved = 2_000 - int(raw.headers["x-ratelimit-remaining-tokens"])
        # The reservation was the prompt, as vLLM counts it, plus max_tokens.
        assert reserved == answer.usage.prompt_tokens + 5
        after = await sdk.chat.completions.with_raw_response.create(model=VLLM_MODEL, messages=messages, max_tokens=5)
    settled = 2_000 - int(after.headers["x-ratelimit-remaining-tokens"]) - reserved
    assert settled == answer.usage.total_tokens


async def test_an_embedding_text_reserves_at_most_the_models_window(gateway: Gateway, secrets: dict[str, str]) -> None:
    # 3,020 bytes, 22 of MiniLM's tokens (WordPiece reads a word past 100 characters as one):
    # reserved as bytes, the key's 1,000 tokens a minute refused it for good.
    text = " ".join(["x" * 150] * 20)
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=secrets["embed"], max_retries=0) as sdk:
        raw = await sdk.embeddings.with_raw_response.create(model="minilm", input=text)
    assert 1_000 - int(raw.headers["x-ratelimit-remaining-tokens"]) == 256  # MiniLM's window
    assert raw.parse().usage.prompt_tokens == 22


async def test_a_beam_search_is_charged_its_answers_usage(gateway: Gateway, secrets: dict[str, str]) -> None:
    # vLLM runs one engine request per beam and step, each with its prompt so far:
    # their sum was charged (thousands of prompt tokens for a short prompt).
    messages = [{"role": "user", "content": "Tell me something about the sea"}]
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=secrets["vllm"], max_retries=0) as sdk:

        async def ask() -> tuple[Any, Any]:
            raw = await sdk.chat.completions.with_raw_response.create(
                model=VLLM_MODEL, messages=messages, max_tokens=8, n=2, extra_body={"use_beam_search": True}
            )
            return raw.parse(), raw.headers

        _, spent, answer = await charged(gateway, secrets["vllm"], ask)
    assert spent == answer.usage.total_tokens


async def test_a_streamed_beam_search_is_charged_its_answers_usage(gateway: Gateway, secrets: dict[str, str]) -> None:
    # vLLM runs a streamed search as the stream is read: its tokens went
    # uncounted, and the whole reservation was given back to the key.
    messages = [{"role": "user", "content": "Tell me something about the sea"}]
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=secrets["vllm"], max_retries=0) as sdk:

        async def ask() -> tuple[Any, Any]:
            raw = await sdk.chat.completions.with_raw_response.create(
                model=VLLM_MODEL, messages=messages, max_tokens=8, n=2, stream=True,
                stream_options={"include_usage": True}, extra_body={"use_beam_search": True},
            )
            chunks = [chunk async for chunk in raw.parse()]
            return chunks[-1].usage, raw.headers

        _, spent, usage = await charged(gateway, secrets["vllm"], ask)
    assert usage.completion_tokens > 0 and spent == usage.total_tokens


async def charged(gateway: Gateway, secret: str, ask: Callable[[], Awaitable[tuple[T, Any]]]) -> tuple[int, int, T]:
    """Sends a request with the key ``secret`` once none of its requests is in
    flight (``ask``: the answer and its headers); returns the tokens reserved
    for it, the tokens charged once it was settled, and the answer."""
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers=bearer(secret)) as http:
        start = (await settled(http))["usage"]["remaining_tokens"]
        answer, headers = await ask()
        after = (await settled(http))["usage"]["remaining_tokens"]
    return start - int(headers["x-ratelimit-remaining-tokens"]), start - after, answer


async def test_a_response_reserves_the_models_own_prompt_count_and_settles_its_usage(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=secrets["vllm"], max_retries=0) as sdk:

        async def ask() -> tuple[Any, Any]:
            raw = await sdk.responses.with_raw_response.create(model=VLLM_MODEL, input="Hello there", max_output_tokens=5)
            return raw.parse(), raw.headers

        reserved, spent, answer = await charged(gateway, secrets["vllm"], ask)
    # The reservation was the input, as vLLM renders and counts it, plus
    # max_output_tokens; the charge, what was used.
    assert (reserved, spent) == (answer.usage.input_tokens + 5, answer.usage.total_tokens)


async def test_a_follow_up_reserves_the_whole_conversation_on_the_replica_that_keeps_it(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=secrets["vllm"], max_retries=0) as sdk:
        first = await sdk.responses.create(model=VLLM_MODEL, input="Hello there", max_output_tokens=3)

        async def ask() -> tuple[Any, Any]:
            raw = await sdk.responses.with_raw_response.create(
                model=VLLM_MODEL, input="And then?", previous_response_id=first.id, max_output_tokens=3
            )
            return raw.parse(), raw.headers

        reserved, spent, follow_up = await charged(gateway, secrets["vllm"], ask)
    assert first.usage is not None
    assert follow_up.usage.input_tokens > first.usage.total_tokens  # the earlier turn is in the prompt
    # Reserved: the prompt as the keeping replica renders it, earlier turn included, plus the budget.
    assert (reserved, spent) == (follow_up.usage.input_tokens + 3, follow_up.usage.total_tokens)


async def test_a_background_response_is_charged_what_it_generated_after_its_answer(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=secrets["vllm"], max_retries=0) as sdk:

        async def ask() -> tuple[Any, Any]:
            raw = await sdk.responses.with_raw_response.create(
                model=VLLM_MODEL, input="Hello there", background=True, max_output_tokens=20,
                extra_body={"ignore_eos": True},
            )
            return raw.parse(), raw.headers

        _, spent, queued = await charged(gateway, secrets["vllm"], ask)  # in flight until generated
        done = await sdk.responses.retrieve(queued.id)
    assert queued.status in ("queued", "in_progress")
    assert done.status == "incomplete" and done.usage is not None and done.usage.output_tokens == 20
    assert spent == done.usage.total_tokens


def test_a_stored_response_is_reached_only_with_the_key_that_made_it(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    with openai.OpenAI(base_url=gateway.v1, api_key=secrets["full"], max_retries=0) as mine, openai.OpenAI(
        base_url=gateway.v1, api_key=secrets["scoped"], max_retries=0
    ) as theirs:
        made = mine.responses.create(model="chat", input="one two three")
        assert mine.responses.retrieve(made.id).output_text == "one two three"
        with pytest.raises(openai.NotFoundError):
            theirs.responses.retrieve(made.id)  # `chat` is theirs too, the response is not
        with pytest.raises(openai.BadRequestError) as unknown:  # as for an id that never existed
            theirs.responses.create(model="chat", input="four", previous_response_id=made.id)
        assert unknown.value.code == "previous_response_not_found"
        follow_up = mine.responses.create(model="chat", input="four", previous_response_id=made.id)
        assert follow_up.output_text == "four" and follow_up.usage is not None
        # Another model does not keep the conversation: its key is told which does, any other key nothing.
        with pytest.raises(openai.BadRequestError) as elsewhere:
            mine.responses.create(model=VLLM_MODEL, input="four", previous_response_id=made.id)
        assert elsewhere.value.body["param"] == "model"  # type: ignore[index]
        assert f"`{made.model}`" in elsewhere.value.message
        with openai.OpenAI(base_url=gateway.v1, api_key=secrets["one-place"], max_retries=0) as another:
            with pytest.raises(openai.BadRequestError) as unknown:
                another.responses.create(model=VLLM_MODEL, input="four", previous_response_id=made.id)
            assert unknown.value.code == "previous_response_not_found"
        with pytest.raises(openai.BadRequestError) as unknown:  # nor count with it
            theirs.responses.input_tokens.count(model="chat", input="four", previous_response_id=made.id)
        assert unknown.value.code == "previous_response_not_found"
        counted = mine.responses.input_tokens.count(model="chat", input="four", previous_response_id=made.id)
        assert counted.input_tokens == follow_up.usage.input_tokens
        with pytest.raises(openai.NotFoundError):
            theirs.responses.input_items.list(made.id)  # nor list its input
        assert [getattr(item, "content")[0].text for item in mine.responses.input_items.list(made.id)] == ["one two three"]
        with pytest.raises(openai.NotFoundError):
            theirs.responses.delete(made.id)  # nor may they delete it
        assert mine.responses.retrieve(made.id).output_text == "one two three"
        mine.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            mine.responses.retrieve(made.id)
        # A key allowed the alias alone reaches what it made through it.
        own = theirs.responses.create(model="chat", input="five six")
        assert theirs.responses.retrieve(own.id).output_text == "five six"
        theirs.responses.delete(own.id)


def test_a_key_whose_background_response_holds_its_only_place_still_reads_and_cancels_it(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    with openai.OpenAI(base_url=gateway.v1, api_key=secrets["one-place"], max_retries=0) as sdk:
        queued = sdk.responses.create(
            model=VLLM_MODEL, input="Hello there", background=True, max_output_tokens=480,
            extra_body={"ignore_eos": True},
        )
        # It generates on, in the key's one place: reading, listing and cancelling it take none.
        assert sdk.responses.retrieve(queued.id).status in ("queued", "in_progress")
        assert [item.type for item in sdk.responses.input_items.list(queued.id)] == ["message"]
        assert sdk.responses.cancel(queued.id).status == "cancelled"
        sdk.responses.delete(queued.id)


async def test_a_message_reserves_the_models_own_prompt_count_and_settles_its_usage(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    ask_for = [{"role": "user", "content": "Hello there"}]
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=secrets["vllm"], max_retries=0) as claude:

        async def ask() -> tuple[Any, Any]:
            raw = await claude.messages.with_raw_response.create(model=VLLM_MODEL, messages=ask_for, max_tokens=5)
            return await raw.parse(), raw.headers

        reserved, spent, message = await charged(gateway, secrets["vllm"], ask)
    # Reserved: the prompt as vLLM renders Anthropic's messages, plus max_tokens; charged: what was used.
    usage = message.usage
    assert (reserved, spent) == (usage.input_tokens + 5, usage.input_tokens + usage.output_tokens)


def test_anthropics_clients_send_their_key_as_x_api_key(gateway: Gateway, secrets: dict[str, str]) -> None:
    with anthropic.Anthropic(base_url=gateway.base_url, api_key=secrets["full"], max_retries=0) as claude:
        message = claude.messages.create(model="chat", messages=WORDS, max_tokens=2)
        assert message.content[0].text == "one two"  # type: ignore[union-attr]
    with anthropic.Anthropic(base_url=gateway.base_url, api_key="sk-gw-not-a-key", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            stranger.messages.create(model="chat", messages=WORDS, max_tokens=2)
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


async def test_a_stream_left_early_is_charged_what_was_generated(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    messages = [{"role": "user", "content": "Tell me a long story about the sea"}]
    probe = {"model": VLLM_MODEL, "messages": messages, "max_tokens": 1}
    long = {**probe, "max_tokens": 450, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers=bearer(secrets["vllm-left"])) as http:
        prompt = (await http.post(CHAT, json=probe)).json()["usage"]["prompt_tokens"]
        # The ledger's own counts, every request settled: the headers of
        # requests admitted from different ingress replicas' blocks are estimates.
        start = (await settled(http))["usage"]["remaining_tokens"]
        seen = 0
        async with http.stream("POST", CHAT, json=long) as response:
            async for line in response.aiter_lines():
                seen += line.startswith("data: {")
                if seen == 4:
                    break  # the client leaves with 450 tokens reserved
        after = (await settled(http))["usage"]["remaining_tokens"]  # the replica has said what it generated
    generated = start - after - prompt  # the stream's charge, less its prompt
    # Charged what the engine generated before it was stopped: not the 450 reserved.
    assert 3 <= generated < 450


async def test_a_whole_answer_left_early_is_charged_what_the_engine_used(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    # vLLM shows a non-streaming request's tokens only at its end: the replica
    # asks the engine what it had used before it stops the request.
    messages = [{"role": "user", "content": "Tell me a long story about the sea"}]
    probe = {"model": VLLM_MODEL, "messages": messages, "max_tokens": 1}
    long = {**probe, "max_tokens": 480, "ignore_eos": True}  # (about 0.8 s of this engine on 2 vCPUs)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers=bearer(secrets["vllm-left"])) as http:
        usage = (await http.post(CHAT, json=probe)).json()["usage"]
        start = (await settled(http))["usage"]["remaining_tokens"]  # (the ledger's counts, as above)
        with contextlib.suppress(httpx.ReadTimeout):  # the client gives up on its answer
            await http.post(CHAT, json=long, timeout=httpx.Timeout(60, read=0.25))
        after = (await settled(http))["usage"]["remaining_tokens"]  # the replica has said what the engine used
    charged = start - after  # the whole answer's charge
    # Its prompt and what was generated until it stopped: not nothing.
    assert usage["prompt_tokens"] <= charged <= usage["prompt_tokens"] + 480


def test_a_client_that_stops_an_answer_and_asks_again_at_once_is_served(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    # A chat page's "stop" then "regenerate" with a key of one place: the SDK closes the stream (or gives up
    # on a whole answer) and sends the next request on another kept connection at once, before the gateway
    # has seen the first one go. It is admitted; a request beside one still running is refused.
    messages = [{"role": "user", "content": "Tell me a long story about the sea"}]
    long: dict[str, Any] = {"model": VLLM_MODEL, "messages": messages, "max_tokens": 400,
                            "extra_body": {"ignore_eos": True}}
    with openai.OpenAI(base_url=gateway.v1, api_key=secrets["one-place"], max_retries=0) as sdk:
        for attempt in range(6):
            if attempt % 3 == 2:
                with pytest.raises(openai.APITimeoutError):
                    sdk.with_options(timeout=0.2).chat.completions.create(**long)
            else:
                stream = sdk.chat.completions.create(**long, stream=True)
                next(iter(stream))
                stream.close()
            again = sdk.chat.completions.create(model=VLLM_MODEL, messages=messages, max_tokens=2)
            assert again.choices[0].finish_reason == "length"
        with sdk.chat.completions.create(**long, stream=True) as running:
            next(iter(running))
            with pytest.raises(openai.RateLimitError) as refused:
                sdk.chat.completions.create(model=VLLM_MODEL, messages=messages, max_tokens=2)
            assert "concurrent requests: Limit 1, Used 1" in refused.value.message
            assert refused.value.response.headers["retry-after-ms"] == "1000"
            assert sum(1 for _ in running) > 300  # the running answer goes on to its end


async def test_a_key_reads_its_own_limits_and_what_is_left_without_spending_any(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers=bearer(secrets["quota"])) as http:
        fresh = await settled(http)
        assert fresh == {
            "object": "api_key", "id": "quota", "models": ["*"], "expires_at": None,
            "limits": {"requests_per_minute": 10, "tokens_per_minute": 1_000, "max_concurrent": None},
            "usage": {"remaining_requests": 10, "reset_requests_s": 0.0, "remaining_tokens": 1_000,
                      "reset_tokens_s": 0.0, "in_flight": 0},
        }
        answer = await http.post(CHAT, json=chat(3))
        assert answer.status_code == 200
        first = await settled(http)
        again = [(await http.get("/v1/key")).json()["usage"] for _ in range(12)]  # more reads than the rpm
    usage = first["usage"]
    assert (usage["remaining_requests"], usage["remaining_tokens"]) == (9, 1_000 - answer.json()["usage"]["total_tokens"])
    assert 0 < usage["reset_requests_s"] <= 60.5 and 0 < usage["reset_tokens_s"] <= 60.5
    assert {(u["remaining_requests"], u["remaining_tokens"]) for u in again} == {(9, usage["remaining_tokens"])}
    with httpx.Client(base_url=gateway.base_url, timeout=30) as http:
        assert http.get("/v1/key").status_code == 401  # no key, no answer
        scoped = http.get("/v1/key", headers=bearer(secrets["scoped"])).json()
    assert (scoped["models"], scoped["usage"]) == (["chat", "iris*"], None)
    assert secrets["scoped"] not in json.dumps(scoped)


async def test_usage_is_labelled_with_the_key_id(gateway: Gateway, secrets: dict[str, str]) -> None:
    with httpx.Client(base_url=gateway.base_url, timeout=30, headers=bearer(secrets["full"])) as http:
        assert http.post(CHAT, json=chat(2)).status_code == 200
        page = ""
        for _ in range(40):  # replicas report to the hub every half second
            page = http.get("/metrics", headers=bearer(secrets["ops"])).text
            if 'key="full"' in page:
                break
            time.sleep(0.25)
    assert any(line.startswith("llm_gateway_requests_total{") and 'key="full"' in line for line in page.splitlines())
    assert any(line.startswith("llm_gateway_tokens_total{") and 'key="full"' in line for line in page.splitlines())
    assert secrets["full"] not in page
    for _ in range(40):
        lines = [json.loads(line) for line in ACCESS_LOG.read_text().splitlines() if line.strip()]
        if any(line.get("key") == "full" for line in lines):
            break
        time.sleep(0.25)
    assert any(line.get("key") == "full" and line.get("status") == 200 for line in lines)
    assert secrets["full"] not in ACCESS_LOG.read_text()


def test_a_revoked_key_is_refused_on_every_replica_within_two_seconds(
    gateway: Gateway, secrets: dict[str, str]
) -> None:
    with httpx.Client(base_url=gateway.base_url, timeout=30, headers=bearer(secrets["revoked"])) as http:
        assert http.post(CHAT, json=chat(1)).status_code == 200
        revoked = copy.deepcopy(gateway.config)
        revoked["keys"] = [k for k in revoked["keys"] if k["id"] != "revoked"]
        gateway.redeploy(revoked)
        deadline = time.monotonic() + 2
        while True:
            # Enough requests to reach both ingress replicas through the front door.
            statuses = {http.post(CHAT, json=chat(1)).status_code for _ in range(8)}
            if statuses == {401}:
                break
            assert time.monotonic() < deadline, f"still served: {statuses}"


def prefix_cache_hits(http: httpx.Client, ops: str) -> float:
    """The tokens vLLM's engine found cached, from its own metrics page."""
    page = http.get("/metrics", headers=bearer(ops)).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total{") and f'model_name="{VLLM_MODEL}"' in line
    )  # fmt: skip


def test_no_key_shares_the_engines_cached_prefixes_with_another(gateway: Gateway, secrets: dict[str, str]) -> None:
    # Else a key could time its own requests to learn how another key's prompts begin.
    prompt = [random.randrange(100, 500) for _ in range(300)]  # new to the cache: whole blocks of it
    ask = {"model": VLLM_MODEL, "prompt": prompt, "max_tokens": 1}
    with httpx.Client(base_url=gateway.base_url, timeout=60) as http:
        def sent(key: str) -> float:
            assert http.post("/v1/completions", json=ask, headers=bearer(secrets[key])).status_code == 200
            return prefix_cache_hits(http, secrets["ops"])

        before = prefix_cache_hits(http, secrets["ops"])
        cached_before = gateway_cached(http, secrets["ops"])
        first = sent("full")
        again = sent("full")
        other = sent("cancel")
    assert first == before  # a prompt new to the cache
    assert again - first >= 128  # the same key's prompt again: its prefix came from the cache
    assert other == again  # another key's: none of it did
    # The gateway's own count of cached prompt tokens, per key, is vLLM's.
    with httpx.Client(base_url=gateway.base_url, timeout=60) as http:
        deadline = time.monotonic() + 15
        while (counted := gateway_cached(http, secrets["ops"])).get("full", 0) - cached_before.get("full", 0) < 128:
            assert time.monotonic() < deadline, counted
            time.sleep(0.2)
    assert counted["full"] - cached_before.get("full", 0) == again - first
    assert counted.get("cancel", 0) == cached_before.get("cancel", 0)


def gateway_cached(http: httpx.Client, ops: str) -> dict[str, float]:
    """``llm_gateway_tokens_total{kind="cached"}`` of the vLLM model, by key id."""
    page = http.get("/metrics", headers=bearer(ops)).text
    counted: dict[str, float] = {}
    for line in page.splitlines():
        if line.startswith("llm_gateway_tokens_total{") and 'kind="cached"' in line and f'model="{VLLM_MODEL}"' in line:
            key = line.split('key="', 1)[1].split('"', 1)[0]
            counted[key] = counted.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counted
