"""vLLM's tokenizer routes (``POST /tokenize``, ``POST /detokenize``) and OpenAI's
``POST /v1/responses/input_tokens`` through the gateway, on the real vLLM
engine: the counts a client makes before it sends are the ones the engine
then bills."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import VLLM_CONTEXT, VLLM_MODEL

PROMPT = "Tell me about the harbour at dawn"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]


def test_a_prompt_is_counted_as_a_completion_bills_it(http: httpx.Client, client: openai.OpenAI) -> None:
    answer = http.post("/tokenize", json={"model": VLLM_MODEL, "prompt": PROMPT, "return_token_strs": True})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-variant"] == VLLM_MODEL and answer.headers["x-request-id"]
    counted = answer.json()
    assert counted["count"] == len(counted["tokens"]) == len(counted["token_strs"]) > 0
    assert counted["max_model_len"] == VLLM_CONTEXT
    completion = client.completions.create(model=VLLM_MODEL, prompt=PROMPT, max_tokens=1)
    assert completion.usage is not None and completion.usage.prompt_tokens == counted["count"]
    text = http.post("/detokenize", json={"model": VLLM_MODEL, "tokens": counted["tokens"]})
    assert text.status_code == 200, text.text
    assert text.json()["prompt"].strip() == PROMPT


def test_counting_for_a_user_of_an_alias_counts_with_the_variant_that_user_gets(http: httpx.Client) -> None:
    # `user` picks the variant, as for chat: it was refused as a field vLLM's tokenizer routes lack.
    for user in ("u1", "u2", "u3", "u4"):
        chat = http.post("/v1/chat/completions", json={
            "model": "lora-ab", "messages": MESSAGES, "max_tokens": 1, "user": user,
        })
        counted = http.post("/tokenize", json={"model": "lora-ab", "messages": MESSAGES, "user": user})
        assert counted.status_code == 200, counted.text
        assert counted.headers["x-gateway-variant"] == chat.headers["x-gateway-variant"]
        text = http.post("/detokenize", json={"model": "lora-ab", "tokens": counted.json()["tokens"], "user": user})
        assert text.status_code == 200 and text.headers["x-gateway-variant"] == chat.headers["x-gateway-variant"]


def test_messages_are_counted_through_the_chat_template_as_chat_bills_them(
    http: httpx.Client, client: openai.OpenAI
) -> None:
    answer = http.post("/tokenize", json={"model": "vllm-alias", "messages": MESSAGES})  # an alias routes it
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-variant"] == VLLM_MODEL
    chat = client.chat.completions.create(model=VLLM_MODEL, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
    assert chat.usage is not None and chat.usage.prompt_tokens == answer.json()["count"]
    plain = http.post("/tokenize", json={"model": VLLM_MODEL, "prompt": PROMPT}).json()
    assert answer.json()["count"] > plain["count"]  # the template's own tokens


def test_a_responses_input_is_counted_as_the_response_bills_it(client: openai.OpenAI) -> None:
    raw = client.responses.input_tokens.with_raw_response.count(model="vllm-alias", input=PROMPT, instructions="Be brief.")
    assert raw.headers["x-gateway-variant"] == VLLM_MODEL
    counted = raw.parse()
    assert counted.object == "response.input_tokens"
    first = client.responses.create(model=VLLM_MODEL, input=PROMPT, instructions="Be brief.", max_output_tokens=3)
    assert first.usage is not None and first.usage.input_tokens == counted.input_tokens
    # A follow-up is counted with the conversation it continues, by the replica that keeps it.
    more = client.responses.input_tokens.count(model=VLLM_MODEL, input="And at dusk?", previous_response_id=first.id)
    follow_up = client.responses.create(
        model=VLLM_MODEL, input="And at dusk?", previous_response_id=first.id, max_output_tokens=3
    )
    assert follow_up.usage is not None and follow_up.usage.input_tokens == more.input_tokens
    assert more.input_tokens > first.usage.input_tokens + first.usage.output_tokens


COUNT = "/v1/responses/input_tokens"


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"model": VLLM_MODEL, "prompt": PROMPT, "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {"model": VLLM_MODEL, "prompt": PROMPT, "max_tokens": 3}, 400, "max_tokens"),
        ("/tokenize", {"model": VLLM_MODEL, "prompt": 3}, 400, "prompt"),
        ("/tokenize", {"model": VLLM_MODEL, "messages": MESSAGES, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
        (
            "/tokenize",
            {"model": VLLM_MODEL, "messages": MESSAGES, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}},
            400,
            "chat_template_kwargs",
        ),
        ("/tokenize", {"prompt": PROMPT}, 400, "model"),
        ("/tokenize", {"model": "nope", "prompt": PROMPT}, 404, "model"),
        ("/tokenize", {"model": "echo", "prompt": PROMPT}, 404, "model"),
        ("/tokenize", {"model": "minilm", "prompt": PROMPT}, 404, "model"),
        ("/detokenize", {"model": VLLM_MODEL, "tokens": [-1]}, 400, "tokens[0]"),
        # vLLM's own server decodes an id past the vocabulary as nothing: an empty text.
        ("/detokenize", {"model": VLLM_MODEL, "tokens": [10, 999_999]}, 400, "tokens[1]"),
        ("/detokenize", {"model": VLLM_MODEL, "tokens": [2**62]}, 400, "tokens[0]"),
        ("/detokenize", {"model": VLLM_MODEL, "tokens": "abc"}, 400, "tokens"),
        (COUNT, {"model": VLLM_MODEL, "input": PROMPT, "max_output_tokens": 3}, 400, "max_output_tokens"),
        (COUNT, {"model": VLLM_MODEL, "input": PROMPT, "stream": True}, 400, "stream"),
        (COUNT, {"model": VLLM_MODEL, "input": PROMPT, "conversation": "conv_1"}, 400, "conversation"),
        (COUNT, {"model": VLLM_MODEL, "input": []}, 400, "input"),
        (COUNT, {"input": PROMPT}, 400, "model"),
        (COUNT, {"model": VLLM_MODEL, "input": PROMPT, "previous_response_id": "resp_nonsense"}, 400, "previous_response_id"),
        (COUNT, {"model": "minilm", "input": PROMPT}, 404, "model"),
    ],
    ids=[
        "both", "unknown-field", "prompt-type", "request-template", "template-in-kwargs", "no-model", "unknown-model",
        "echo", "embedding",
        "negative-token", "past-the-vocabulary", "past-64-bits", "tokens-type",
        "count-answer-field", "count-stream", "count-conversation", "count-empty", "count-no-model",
        "count-unknown-previous", "count-embedding",
    ],
)
def test_bad_tokenizer_requests_are_refused_naming_the_field(
    http: httpx.Client, path: str, body: dict[str, object], status: int, param: str
) -> None:
    answer = http.post(path, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param, error
