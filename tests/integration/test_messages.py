"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``)
on the real vLLM engine, with the official ``anthropic`` SDK pointed at the gateway."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.integration.conftest import ACCESS_LOG, VLLM_CONTEXT, VLLM_MODEL, Gateway
from tests.integration.test_streaming import tokens_after_leaving

ASK = [{"role": "user", "content": "Tell me about the harbour"}]
GREEDY = {"temperature": 0}  # the SDK types no `temperature` argument


@pytest.fixture(scope="module")
def claude(gateway: Gateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


def access_line(request_id: str) -> dict[str, object]:
    for _ in range(40):
        lines = [json.loads(line) for line in ACCESS_LOG.read_text().splitlines() if line.strip()]
        line = next((entry for entry in lines if entry.get("request_id") == request_id), None)
        if line is not None:
            return line
        time.sleep(0.25)  # each ingress replica writes its line once the answer has ended
    raise AssertionError(f"no access-log line for {request_id}")


def test_a_message_is_answered_in_anthropics_shape_with_usage(claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(model=VLLM_MODEL, messages=ASK, max_tokens=8)
    message = raw.parse()
    assert (message.type, message.role, message.model) == ("message", "assistant", VLLM_MODEL)
    assert raw.headers["x-gateway-variant"] == VLLM_MODEL
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= 8 and message.usage.input_tokens > 5
    assert message.content[0].type == "text" and message.content[0].text
    assert message._request_id == raw.headers["x-request-id"]  # Anthropic's `request-id` header
    assert message.id == "msg_" + raw.headers["x-request-id"]
    assert raw.http_response.json()["stop_sequence"] is None  # always there, as in Anthropic's answers
    line = access_line(raw.headers["x-request-id"])
    assert (line["status"], line["model"], line["completion_tokens"]) == (200, VLLM_MODEL, message.usage.output_tokens)
    # A system prompt is part of the prompt.
    instructed = claude.messages.create(model=VLLM_MODEL, system="Answer as a sailor would.", messages=ASK, max_tokens=2)
    assert instructed.usage.input_tokens > message.usage.input_tokens


def test_a_prefill_is_continued_as_anthropic_continues_it(claude: anthropic.Anthropic, client: openai.OpenAI) -> None:
    # The answer goes on from the assistant's text (a prefilled "{" makes JSON), as a chat request
    # continuing its final message does, not in a new assistant turn.
    turns = [*ASK, {"role": "assistant", "content": "Sure, the"}]
    message = claude.messages.create(model=VLLM_MODEL, messages=turns, max_tokens=6, extra_body=GREEDY)
    continued = client.chat.completions.create(
        model=VLLM_MODEL, messages=turns, max_tokens=6, temperature=0,  # type: ignore[arg-type]
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == continued.choices[0].message.content
    assert continued.usage is not None and message.usage.input_tokens == continued.usage.prompt_tokens
    counted = claude.messages.count_tokens(model=VLLM_MODEL, messages=turns)  # type: ignore[arg-type]
    assert counted.input_tokens == message.usage.input_tokens
    with claude.messages.stream(model=VLLM_MODEL, messages=turns, max_tokens=6, extra_body=GREEDY) as stream:
        assert stream.get_final_text() == message.content[0].text
    with pytest.raises(anthropic.BadRequestError) as caught:
        spaced = [*ASK, {"role": "assistant", "content": "Sure, "}]
        claude.messages.create(model=VLLM_MODEL, messages=spaced, max_tokens=2)  # type: ignore[arg-type]
    assert "trailing whitespace" in caught.value.message
    with pytest.raises(anthropic.BadRequestError) as caught:  # counted as it would be generated: not at all
        claude.messages.count_tokens(model=VLLM_MODEL, messages=spaced)  # type: ignore[arg-type]
    assert "trailing whitespace" in caught.value.message


def test_a_streamed_message_sends_anthropics_events_and_the_text_adds_up(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=VLLM_MODEL, messages=ASK, max_tokens=12) as stream:
        kinds = []
        text = ""
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and "message_stop" in kinds
    assert "content_block_delta" in kinds and "message_delta" in kinds
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.model == VLLM_MODEL and 1 <= final.usage.output_tokens <= 12


def test_count_tokens_is_the_prompt_a_message_is_charged(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=VLLM_MODEL, messages=ASK, system="Be brief.")
    message = claude.messages.create(model=VLLM_MODEL, messages=ASK, system="Be brief.", max_tokens=1)
    assert counted.input_tokens == message.usage.input_tokens
    assert claude.messages.count_tokens(model="echo", messages=ASK).input_tokens == 5  # the echo counts words


def test_count_tokens_counts_a_prompt_that_fills_the_whole_window(claude: anthropic.Anthropic) -> None:
    # Whether a prompt fits is what a count asks: one filling the window was refused as leaving none to generate.
    one = claude.messages.count_tokens(model=VLLM_MODEL, messages=[{"role": "user", "content": "a"}]).input_tokens
    full = [{"role": "user", "content": "a" + " a" * (VLLM_CONTEXT - one)}]  # (" a": one token each)
    counted = claude.messages.count_tokens(model=VLLM_MODEL, messages=full)  # type: ignore[arg-type]
    assert counted.input_tokens == VLLM_CONTEXT
    with pytest.raises(anthropic.BadRequestError, match="maximum context length"):  # (generating, it leaves none)
        claude.messages.create(model=VLLM_MODEL, max_tokens=1, messages=full)  # type: ignore[arg-type]


def test_keys_vllm_would_drop_inside_a_request_are_refused_and_caching_hints_pass(claude: anthropic.Anthropic) -> None:
    # A message's `name` (some agent frameworks send one) reached the model as if never sent.
    named_turn = {**ASK[0], "name": "Init"}
    with pytest.raises(anthropic.BadRequestError) as named:
        claude.messages.create(model=VLLM_MODEL, max_tokens=2, messages=[named_turn])  # type: ignore[list-item]
    assert named.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "messages.0.name: Extra inputs are not permitted"},
    }
    tool = {"name": "f", "input_schema": {"type": "object"}, "input_examples": [{}]}
    with pytest.raises(anthropic.BadRequestError) as examples:  # counting tokens too
        claude.messages.count_tokens(model=VLLM_MODEL, messages=ASK, tools=[tool])  # type: ignore[list-item]
    assert examples.value.body["error"]["message"] == (  # type: ignore[index]
        "tools.0.custom.input_examples: this model does not serve tool input examples"
    )
    # Prompt caching's breakpoints ask for nothing vLLM does not do by itself: the prompt is the same.
    hint = {"cache_control": {"type": "ephemeral"}}
    cached = [{"role": "user", "content": [{"type": "text", "text": ASK[0]["content"], **hint}]}]
    system = [{"type": "text", "text": "Be brief.", **hint}]
    plain = claude.messages.count_tokens(model=VLLM_MODEL, messages=ASK, system="Be brief.")
    hinted = claude.messages.count_tokens(model=VLLM_MODEL, messages=cached, system=system)  # type: ignore[arg-type]
    assert hinted.input_tokens == plain.input_tokens
    message = claude.messages.create(
        model=VLLM_MODEL, messages=cached, system=system, max_tokens=2  # type: ignore[arg-type]
    )
    assert message.usage.input_tokens == plain.input_tokens and message.usage.output_tokens >= 1


def test_an_empty_last_user_turn_is_refused_not_taken_for_a_prefill_of_the_answer_before(
    claude: anthropic.Anthropic,
) -> None:
    # vLLM dropped the empty turn, and the assistant's turn before it, last then, was continued.
    turns = [*ASK, {"role": "assistant", "content": "The harbour is"}]
    for empty in ("", [], [{"type": "text", "text": ""}]):
        with pytest.raises(anthropic.BadRequestError) as refused:
            last = {"role": "user", "content": empty}
            claude.messages.create(model=VLLM_MODEL, max_tokens=2, messages=[*turns, last])  # type: ignore[list-item]
        assert refused.value.body["error"]["message"].startswith("messages.2")  # type: ignore[index]
    # A final assistant turn may be empty: there is nothing to continue.
    nothing = {"role": "assistant", "content": ""}
    answer = claude.messages.create(model=VLLM_MODEL, max_tokens=2, messages=[*ASK, nothing])  # type: ignore[list-item]
    assert answer.usage.output_tokens >= 1


def test_thinking_with_a_budget_asked_of_a_model_without_a_reasoning_parser_names_thinking(
    claude: anthropic.Anthropic,
) -> None:
    # vLLM refused it naming its own `thinking_token_budget`, in its command line's words.
    with pytest.raises(anthropic.BadRequestError) as refused:
        thinking = {"type": "enabled", "budget_tokens": 1024}  # the least, and under max_tokens
        claude.messages.create(
            model=VLLM_MODEL, messages=ASK, max_tokens=1025, thinking=thinking  # type: ignore[arg-type]
        )
    message = refused.value.body["error"]["message"]  # type: ignore[index]
    assert message.startswith(f"Unsupported parameter: 'thinking': the model `{VLLM_MODEL}` is not set up to keep")
    # Thinking the model chooses, or none, asks for no budget.
    for chosen in ({"type": "adaptive"}, {"type": "disabled"}):
        answer = claude.messages.create(
            model=VLLM_MODEL, messages=ASK, max_tokens=2, thinking=chosen  # type: ignore[arg-type]
        )
        assert answer.usage.output_tokens >= 1


def test_mistakes_are_anthropic_shaped_4xx(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", messages=ASK, max_tokens=4)
    assert missing.value.body == {
        "type": "error", "error": {"type": "not_found_error", "message": "The model `no-such-model` does not exist."}
    }
    with pytest.raises(anthropic.BadRequestError) as too_long:
        claude.messages.create(model=VLLM_MODEL, messages=ASK, max_tokens=VLLM_CONTEXT - 2, stream=True)
    assert too_long.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "maximum context length" in too_long.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as too_large:  # no shorter prompt would make it fit
        claude.messages.create(model=VLLM_MODEL, messages=ASK, max_tokens=VLLM_CONTEXT + 1)
    assert too_large.value.body["error"]["message"].startswith(  # type: ignore[index]
        f"max_tokens is too large: {VLLM_CONTEXT + 1}. This model supports at most {VLLM_CONTEXT} completion tokens"
    )
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="minilm", messages=ASK, max_tokens=4)
    for body in ({"model": VLLM_MODEL, "messages": ASK}, {"model": VLLM_MODEL, "max_tokens": 4, "stream": "yes"}, [1]):
        answer = http.post("/v1/messages", json=body)
        assert answer.status_code == 400
        assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "invalid_request_error"
    # A field vLLM's schema would drop (its answer unchanged, the client none the wiser) is refused.
    with pytest.raises(anthropic.BadRequestError) as dropped:
        claude.messages.create(model=VLLM_MODEL, messages=ASK, max_tokens=4, extra_body={"max_token": 2})
    assert dropped.value.body == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "max_token: Extra inputs are not permitted"}
    }
    # A text block without its text, which vLLM's schema would let through and drop.
    with pytest.raises(anthropic.BadRequestError) as blank:
        claude.messages.create(
            model=VLLM_MODEL, max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text"}]}],  # type: ignore[typeddict-item]
        )
    assert blank.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Missing required parameter: 'messages[0].content[1].text'."},
    }
    with pytest.raises(anthropic.BadRequestError) as empty:  # vLLM's own words named no field
        claude.messages.create(model=VLLM_MODEL, max_tokens=4, messages=[])
    assert empty.value.body["error"]["message"].startswith("Invalid 'messages': empty array.")  # type: ignore[index]
    unknown = http.post("/v1/messages/batches", json={})
    assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "not_found_error")
    # The gateway's own errors carry Anthropic's request-id too, where its SDK reads it.
    assert missing.value.request_id is not None and unknown.headers["request-id"] == unknown.headers["x-request-id"]
    # Anthropic's bound, not OpenAI's: vLLM's own server takes a temperature up to 2.
    with pytest.raises(anthropic.BadRequestError, match="Expected a value <= 1"):
        claude.messages.create(model=VLLM_MODEL, messages=ASK, max_tokens=4, extra_body={"temperature": 1.5})
    # A system turn in `messages` is Anthropic's too (the SDK's SystemMessageParam), and is served.
    turns = [{"role": "system", "content": "Be brief."}, *ASK]
    told = claude.messages.create(model=VLLM_MODEL, max_tokens=2, messages=turns)  # type: ignore[arg-type]
    assert told.usage.input_tokens > claude.messages.count_tokens(model=VLLM_MODEL, messages=ASK).input_tokens
    # Tools as Anthropic checks them: a result answering no tool_use of the message before, twin names.
    weather = {"name": "weather", "input_schema": {"type": "object", "properties": {}}}
    stray = [*ASK, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "22C"}]}]
    with pytest.raises(anthropic.BadRequestError, match="unexpected `tool_use_id`"):
        claude.messages.create(
            model=VLLM_MODEL, max_tokens=2, messages=stray, tools=[weather]  # type: ignore[arg-type,list-item]
        )
    with pytest.raises(anthropic.BadRequestError, match="Tool names must be unique"):
        twins = [weather, weather]
        claude.messages.count_tokens(model=VLLM_MODEL, messages=ASK, tools=twins)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError, match="no `tools`"):
        claude.messages.create(model=VLLM_MODEL, max_tokens=2, messages=ASK, tool_choice={"type": "any"})
    # Results come first in their turn, and the turn after calls answers each: vLLM moved the
    # result before the text sent ahead of it, and let a call go unanswered.
    asked = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}]}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "22C"}
    late = [*ASK, asked, {"role": "user", "content": [{"type": "text", "text": "Here"}, result]}]
    with pytest.raises(anthropic.BadRequestError, match="must come first in a user turn"):
        claude.messages.create(
            model=VLLM_MODEL, max_tokens=2, messages=late, tools=[weather]  # type: ignore[arg-type,list-item]
        )
    unanswered = [*ASK, asked, {"role": "user", "content": "Thanks"}]
    with pytest.raises(anthropic.BadRequestError, match="immediately after: toolu_1"):
        claude.messages.create(
            model=VLLM_MODEL, max_tokens=2, messages=unanswered, tools=[weather]  # type: ignore[arg-type,list-item]
        )
    # A system prompt holds text only: vLLM dropped an image from it unseen.
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    with pytest.raises(anthropic.BadRequestError, match="expected tags: 'text'"):
        claude.messages.create(model=VLLM_MODEL, max_tokens=2, messages=ASK, system=[image])  # type: ignore[list-item]
    # A JSON schema format without its schema: vLLM's own server answered unconstrained text.
    unformed = {"output_config": {"format": {"type": "json_schema"}}}
    with pytest.raises(anthropic.BadRequestError, match="output_config.format.schema"):
        claude.messages.create(model=VLLM_MODEL, max_tokens=2, messages=ASK, extra_body=unformed)


def test_an_alias_routes_by_metadata_user_id_and_sticks(claude: anthropic.Anthropic) -> None:
    def variant(user: str) -> str:
        raw = claude.messages.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "one two"}], max_tokens=4, metadata={"user_id": user}
        )
        assert raw.parse().model == raw.headers["x-gateway-variant"]
        assert raw.parse().content[0].text == "one two"  # type: ignore[union-attr]
        return raw.headers["x-gateway-variant"]

    chosen = {user: variant(user) for user in (f"user-{n}" for n in range(24))}
    assert set(chosen.values()) == {"echo", "echo-b"}
    assert all(variant(user) == first for user, first in list(chosen.items())[:8])  # the same user, the same variant


async def test_leaving_a_streamed_message_aborts_its_engine_request(gateway: Gateway) -> None:
    body = {"model": VLLM_MODEL, "messages": ASK, "max_tokens": 480, "stream": True}
    generated = await tokens_after_leaving(gateway, "/v1/messages", body, "event: content_block_delta")
    assert 3 <= generated < 480 // 4, generated
