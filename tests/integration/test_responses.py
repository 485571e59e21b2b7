"""OpenAI's Responses API (``POST /v1/responses``) on the real vLLM engine, with the official SDK."""

from __future__ import annotations

import json
import time

import httpx
import openai

from tests.integration.conftest import ACCESS_LOG, VLLM_CONTEXT, VLLM_MODEL, Gateway
from tests.integration.test_streaming import settled_generated_tokens, wait_idle

PROMPT = "Tell me about the harbour"


def assert_finished(response: object, budget: int) -> None:
    """Completed, or (as OpenAI says it) incomplete for having used the whole budget."""
    status, usage = getattr(response, "status"), getattr(response, "usage")
    if status == "incomplete":
        assert getattr(response, "incomplete_details").reason == "max_output_tokens"
        assert usage.output_tokens == budget
    else:
        assert status == "completed" and usage.output_tokens <= budget


def test_a_response_is_answered_in_openais_shape_with_usage(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model=VLLM_MODEL, input=PROMPT, max_output_tokens=8)
    response = raw.parse()
    assert response.id == "resp_" + raw.headers["x-request-id"]
    assert (response.object, response.model) == ("response", VLLM_MODEL)
    assert_finished(response, 8)
    assert raw.headers["x-gateway-variant"] == VLLM_MODEL
    assert response.output_text
    assert response.usage is not None and 1 <= response.usage.output_tokens <= 8
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    # Instructions are a system message before the input: the prompt grows.
    instructed = client.responses.create(
        model=VLLM_MODEL, input=PROMPT, instructions="Answer as a sailor would.", max_output_tokens=2
    )
    assert instructed.usage is not None and instructed.usage.input_tokens > response.usage.input_tokens


def test_a_streamed_response_sends_openais_events_and_the_text_adds_up(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=VLLM_MODEL, input=PROMPT, max_output_tokens=12, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    assert final.model == VLLM_MODEL
    assert_finished(final, 12)
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == final.output_text
    assert final.usage is not None and 1 <= final.usage.output_tokens <= 12


def test_sdk_stream_helper_and_the_access_log_count_the_tokens(client: openai.OpenAI) -> None:
    with client.responses.stream(model=VLLM_MODEL, input=PROMPT, max_output_tokens=6) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text
    request_id = final.id.removeprefix("resp_")
    assert final.usage is not None
    for _ in range(40):
        lines = [json.loads(line) for line in ACCESS_LOG.read_text().splitlines() if line.strip()]
        line = next((entry for entry in lines if entry.get("request_id") == request_id), None)
        if line is not None:
            break
        time.sleep(0.25)  # each ingress replica writes its line once the stream has ended
    assert line is not None, "the request has an access-log line"
    assert (line["status"], line["model"], line["stream"]) == (200, VLLM_MODEL, True)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (final.usage.input_tokens, final.usage.output_tokens)


def test_an_alias_routes_a_response_to_its_variant(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="vllm-alias", input=PROMPT, max_output_tokens=2)
    assert raw.headers["x-gateway-variant"] == VLLM_MODEL
    assert raw.parse().model == VLLM_MODEL


def test_mistakes_are_openai_shaped_4xx(http: httpx.Client) -> None:
    def error(body: dict[str, object]) -> tuple[int, dict[str, object]]:
        answer = http.post("/v1/responses", json=body)
        return answer.status_code, answer.json()["error"]

    status, body = error({"model": VLLM_MODEL, "input": PROMPT, "max_output_tokens": VLLM_CONTEXT * 2})
    assert (status, body["code"], body["param"]) == (400, "context_length_exceeded", "input")
    status, body = error({"model": VLLM_MODEL, "input": PROMPT, "max_output_tokens": VLLM_CONTEXT * 2, "stream": True})
    assert (status, body["code"]) == (400, "context_length_exceeded")  # before the stream starts
    status, body = error({"model": "echo", "input": PROMPT})
    assert (status, body["code"], body["param"]) == (404, "model_not_supported", "model")
    status, body = error({"model": "minilm", "input": PROMPT})
    assert (status, body["code"]) == (404, "model_not_supported")
    status, body = error({"model": "no-such-model", "input": PROMPT})
    assert (status, body["code"]) == (404, "model_not_found")
    status, body = error({"model": VLLM_MODEL, "input": PROMPT, "stream": "yes"})
    assert (status, body["param"]) == (400, "stream")
    status, body = error({"model": VLLM_MODEL})
    assert status == 400 and "input" in str(body["message"])


async def test_leaving_a_streamed_response_aborts_its_engine_request(gateway: Gateway) -> None:
    body = {"model": VLLM_MODEL, "input": PROMPT, "max_output_tokens": 480, "ignore_eos": True, "stream": True}
    before = await settled_generated_tokens(gateway)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
        async with http.stream("POST", "/v1/responses", json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("event: response.output_text.delta")
                if seen == 3:
                    break  # the client leaves
    assert await wait_idle(gateway, 30) == 0
    generated = await settled_generated_tokens(gateway) - before
    assert 3 <= generated < 480 // 4, generated
