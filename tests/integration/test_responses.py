"""OpenAI's Responses API (``POST /v1/responses``) on the real vLLM engine, with the official SDK."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from tests.integration.conftest import ACCESS_LOG, VLLM_CONTEXT, VLLM_MODEL, Gateway
from tests.integration.test_chat import CITY
from tests.integration.test_streaming import settled_generated_tokens, tokens_after_leaving, wait_idle

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
    # resp_, the id of the replica that keeps it (12 hex digits), the request's id.
    assert re.fullmatch(r"resp_[0-9a-f]{12}" + re.escape(raw.headers["x-request-id"]), response.id)
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
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    # As OpenAI ends a stream cut short by its budget (vLLM's server says response.completed).
    assert kinds[-1] == ("response.incomplete" if final.status == "incomplete" else "response.completed")
    assert final.model == VLLM_MODEL
    assert_finished(final, 12)
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == final.output_text
    assert final.usage is not None and 1 <= final.usage.output_tokens <= 12


def test_sdk_stream_helper_and_the_access_log_count_the_tokens(client: openai.OpenAI) -> None:
    with client.responses.stream(model=VLLM_MODEL, input=PROMPT, max_output_tokens=6) as stream:
        events = list(stream)
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    # Cut short by its budget, it ends with response.incomplete, as OpenAI's does (for which the
    # helper's get_final_response() raises, wanting response.completed): the last event has it.
    assert events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response
    assert "".join(deltas) == final.output_text
    request_id = final.id.removeprefix("resp_")[12:]
    assert final.usage is not None
    for _ in range(40):
        lines = [json.loads(line) for line in ACCESS_LOG.read_text().splitlines() if line.strip()]
        line = next((entry for entry in lines if entry.get("request_id") == request_id), None)
        if line is not None:
            break
        time.sleep(0.25)  # each ingress replica writes its line once the stream has ended
    assert line is not None, "the request has an access-log line"
    assert (line["status"], line["model"], line["stream"]) == (200, VLLM_MODEL, True)
    assert line["handoff"] is False  # Responses API streams are relayed by the ingress
    assert (line["prompt_tokens"], line["completion_tokens"]) == (final.usage.input_tokens, final.usage.output_tokens)


def test_an_alias_routes_a_response_to_its_variant(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="vllm-alias", input=PROMPT, max_output_tokens=2)
    assert raw.headers["x-gateway-variant"] == VLLM_MODEL
    assert raw.parse().model == VLLM_MODEL


def test_truncation_auto_drops_the_oldest_items_until_the_conversation_fits(client: openai.OpenAI) -> None:
    """As OpenAI's: whole items from the conversation's beginning, not the
    prompt's oldest tokens (vLLM's own server cut into the first message and
    lowered the output budget)."""

    def count(items: list[dict[str, str]]) -> int:
        return client.responses.input_tokens.count(model=VLLM_MODEL, input=items).input_tokens  # type: ignore[arg-type]

    words = 4
    while count([{"role": "user", "content": "harbour " * words}]) < VLLM_CONTEXT * 2 // 5:
        words += 4
    long = {"role": "user", "content": "harbour " * words}
    items = [long, {"role": "assistant", "content": "Aye."}, long, {"role": "user", "content": "And?"}]
    budget = VLLM_CONTEXT - count(items) + 8  # eight tokens too many for the whole conversation
    assert budget > 8 and count(items[1:]) + budget <= VLLM_CONTEXT
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.responses.create(model=VLLM_MODEL, input=items, max_output_tokens=budget)  # type: ignore[arg-type]
    answer = client.responses.create(
        model=VLLM_MODEL, input=items, max_output_tokens=budget, truncation="auto"  # type: ignore[arg-type]
    )
    # Cut where a user turn begins what is left (not at the assistant's "Aye.").
    assert answer.usage is not None and answer.usage.input_tokens == count(items[2:])
    assert answer.truncation == "auto" and answer.max_output_tokens == budget
    # A follow-up drops the stored conversation first, and its answer with it.
    first = client.responses.create(model=VLLM_MODEL, input=[long], max_output_tokens=4)  # type: ignore[arg-type]
    said = {"role": "assistant", "content": first.output_text}
    budget = VLLM_CONTEXT - count([long, said, long]) + 8
    follow_up = client.responses.create(
        model=VLLM_MODEL, input=[long], previous_response_id=first.id,  # type: ignore[arg-type]
        max_output_tokens=budget, truncation="auto",
    )
    assert follow_up.usage is not None and follow_up.usage.input_tokens == count([long])
    # Beyond the window by itself, with a budget of one token: measured whole,
    # not as the prompt vLLM's own truncation would have cut to the window.
    beyond = [long, long, long, {"role": "user", "content": "And?"}]
    one = client.responses.create(
        model=VLLM_MODEL, input=beyond, max_output_tokens=1, truncation="auto"  # type: ignore[arg-type]
    )
    assert one.usage is not None and one.usage.input_tokens == count(beyond[1:])


def test_a_follow_up_on_a_tool_call_carries_the_call(client: openai.OpenAI) -> None:
    """OpenAI's function calling loop: the call's output follows the response
    that made the call (vLLM carried only its messages: the model saw an
    output with no call before it)."""
    schema = {"type": "object", "properties": {"u": {"type": "string", "enum": ["c", "f"]}}, "required": ["u"],
              "additionalProperties": False}
    tool = {"type": "function", "name": "weather", "strict": True, "parameters": schema}
    asked = "What's the weather in Paris?"
    first = client.responses.create(
        model=VLLM_MODEL, input=asked, tools=[tool], tool_choice="required",  # type: ignore[list-item]
        max_output_tokens=200, temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls, first.output
    call = calls[0]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22C"}
    follow_up = client.responses.create(
        model=VLLM_MODEL, input=[result], previous_response_id=first.id, tools=[tool],  # type: ignore[list-item]
        max_output_tokens=2,
    )
    explicit = [{"role": "user", "content": asked},
                {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                result]
    counted = client.responses.input_tokens.count(
        model=VLLM_MODEL, input=explicit, tools=[tool]  # type: ignore[arg-type,list-item]
    )
    assert follow_up.usage is not None and follow_up.usage.input_tokens == counted.input_tokens
    # An output no call before it asked for is refused, as OpenAI refuses it (vLLM rendered it).
    stray = {**result, "call_id": "call_nobody_made"}
    with pytest.raises(openai.BadRequestError, match="call_nobody_made") as refused:
        client.responses.create(
            model=VLLM_MODEL, input=[stray], previous_response_id=first.id,  # type: ignore[list-item]
            max_output_tokens=2,
        )
    assert refused.value.body["param"] == "input"  # type: ignore[index]


def test_mistakes_are_openai_shaped_4xx(http: httpx.Client) -> None:
    def error(body: dict[str, object]) -> tuple[int, dict[str, object]]:
        answer = http.post("/v1/responses", json=body)
        return answer.status_code, answer.json()["error"]

    status, body = error({"model": VLLM_MODEL, "input": PROMPT, "max_output_tokens": VLLM_CONTEXT})
    assert (status, body["code"], body["param"]) == (400, "context_length_exceeded", "input")
    status, body = error({"model": VLLM_MODEL, "input": PROMPT, "max_output_tokens": VLLM_CONTEXT, "stream": True})
    assert (status, body["code"]) == (400, "context_length_exceeded")  # before the stream starts
    for stream in (False, True):  # no input is short enough for it
        ask = {"model": VLLM_MODEL, "input": PROMPT, "max_output_tokens": VLLM_CONTEXT * 2, "stream": stream}
        status, body = error(ask)
        assert (status, body["code"], body["param"]) == (400, "invalid_value", "max_output_tokens")
    status, body = error({"model": "iris", "input": PROMPT})
    assert (status, body["code"], body["param"]) == (404, "model_not_supported", "model")
    status, body = error({"model": "minilm", "input": PROMPT})
    assert (status, body["code"]) == (404, "model_not_supported")
    status, body = error({"model": "no-such-model", "input": PROMPT})
    assert (status, body["code"]) == (404, "model_not_found")
    status, body = error({"model": VLLM_MODEL, "input": PROMPT, "stream": "yes"})
    assert (status, body["param"]) == (400, "stream")
    status, body = error({"model": VLLM_MODEL})
    assert status == 400 and "input" in str(body["message"])
    # More logprobs than the engine returns: the field sent, named before vLLM sees it.
    refused = {"model": VLLM_MODEL, "input": PROMPT, "top_logprobs": 50, "include": ["message.output_text.logprobs"]}
    for stream in (False, True):
        status, body = error({**refused, "stream": stream, "max_output_tokens": 4})
        assert (status, body["type"], body["param"]) == (400, "invalid_request_error", "top_logprobs")
    # Refused by the engine itself, before generating (a schema that makes no
    # grammar): vLLM's own server has already sent response.created and
    # response.in_progress by then.
    for stream in (False, True):
        status, body = error({"model": VLLM_MODEL, "input": PROMPT, **REFUSED, "stream": stream})
        assert (status, body["type"]) == (400, "invalid_request_error"), body
    # An unknown field in the Responses API's words; a built-in tool the engine does not run, not ignored.
    status, body = error({"model": VLLM_MODEL, "input": PROMPT, "temprature": 0})
    assert (status, body["code"], body["param"], body["message"]) == (
        400, "unknown_parameter", "temprature", "Unknown parameter: 'temprature'."
    )
    status, body = error({"model": VLLM_MODEL, "input": PROMPT, "tools": [{"type": "web_search"}]})
    assert (status, body["code"], body["param"]) == (400, "unsupported_parameter", "tools[0].type")


async def test_leaving_a_streamed_response_aborts_its_engine_request(gateway: Gateway) -> None:
    body = {"model": VLLM_MODEL, "input": PROMPT, "max_output_tokens": 480, "ignore_eos": True, "stream": True}
    generated = await tokens_after_leaving(gateway, "/v1/responses", body, "event: response.output_text.delta")
    assert 3 <= generated < 480 // 4, generated


def test_a_conversation_continues_on_the_replica_that_keeps_it(client: openai.OpenAI) -> None:
    """Three turns with previous_response_id on vLLM: each turn is prompted with the
    earlier ones (vLLM's own store, on the replica that made them), and each
    response can be retrieved."""
    first = client.responses.create(model=VLLM_MODEL, input="Name a harbour.", max_output_tokens=4)
    second = client.responses.create(
        model=VLLM_MODEL, input="And a ship?", previous_response_id=first.id, max_output_tokens=4, stream=True
    )
    final = [event for event in second if event.type in ("response.completed", "response.incomplete")][0].response
    third = client.responses.create(model=VLLM_MODEL, input="Why?", previous_response_id=final.id, max_output_tokens=4)
    assert first.usage is not None and final.usage is not None and third.usage is not None
    # Each prompt holds the conversation so far: earlier inputs and answers.
    assert final.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert third.usage.input_tokens > final.usage.input_tokens + final.usage.output_tokens
    assert (final.previous_response_id, third.previous_response_id) == (first.id, final.id)
    for response in (first, final, third):
        kept = client.responses.retrieve(response.id)
        assert (kept.id, kept.output_text, kept.usage) == (response.id, response.output_text, response.usage)


def test_unknown_or_unstored_responses_are_a_clear_404(client: openai.OpenAI, http: httpx.Client) -> None:
    unstored = client.responses.create(model=VLLM_MODEL, input=PROMPT, max_output_tokens=2, store=False)
    replica = unstored.id[5:17]
    for response_id in (unstored.id, f"resp_{replica}{'0' * 32}", "resp_ffffffffffff" + "0" * 32, "resp_nonsense"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.retrieve(response_id)
        assert caught.value.body["code"] == "response_not_found"  # type: ignore[index]
        follow_up = {"model": VLLM_MODEL, "input": "and?", "previous_response_id": response_id}
        answer = http.post("/v1/responses", json=follow_up)
        error = answer.json()["error"]
        assert (answer.status_code, error["code"], error["param"]) == (
            400, "previous_response_not_found", "previous_response_id"
        )  # as OpenAI answers it
    # Only background responses can be cancelled, and only until they finish.
    kept = client.responses.create(model=VLLM_MODEL, input=PROMPT, max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="answered at once"):
        client.responses.cancel(kept.id)
    background = client.responses.create(model=VLLM_MODEL, input=PROMPT, max_output_tokens=2, background=True)
    ended = finished(client, background.id)
    with pytest.raises(openai.BadRequestError, match=f"still queued or in progress .* this one is {ended.status}"):
        client.responses.cancel(ended.id)
    assert http.get(f"/v1/responses/{kept.id}", params={"stream": "maybe"}).status_code == 400
    # Only one streamed in the background keeps events to stream again: a plain 400, not 200 and an error event.
    for response_id in (kept.id, ended.id):
        again = http.get(f"/v1/responses/{response_id}", params={"stream": "true"})
        error = again.json()["error"]
        assert (again.status_code, error["param"]) == (400, "stream") and "without `stream`" in error["message"]


async def test_three_turn_conversations_through_an_alias_stay_on_their_variant_and_replica(
    gateway: Gateway, async_client: openai.AsyncOpenAI
) -> None:
    """`chat` splits 80/20 over two echo variants of two replicas each, behind two
    ingress replicas: every follow-up must reach the one replica (of the one
    variant) that keeps the response it continues, or it would be a 404."""
    turns = ["the harbour at dawn", "and the boats", "then the gulls came"]

    async def conversation(n: int) -> tuple[str, set[tuple[str, str]], list[int]]:
        previous, holders, prompts = None, set(), []
        for turn in turns:
            raw = await async_client.responses.with_raw_response.create(
                model="chat", input=f"{turn} {n}", previous_response_id=previous,
                extra_headers={"x-session-id": f"talk-{n}"} if n % 2 else None,
            )
            response = raw.parse()
            assert response.output_text == f"{turn} {n}"  # the echo answers the last input
            assert raw.headers["x-gateway-variant"] == response.model
            assert response.usage is not None
            previous = response.id
            holders.add((response.model, response.id[5:17]))  # variant, replica id
            prompts.append(response.usage.input_tokens)
        return previous or "", holders, prompts

    results = await asyncio.gather(*(conversation(n) for n in range(24)))
    replicas: dict[str, set[str]] = {"echo": set(), "echo-b": set()}
    for _, holders, prompts in results:
        assert len(holders) == 1  # a conversation never changes variant or replica
        ((variant, replica),) = holders
        replicas[variant].add(replica)
        # Every earlier input and answer is in the prompt: 5, then 5+5+4, then 14+4+5 words.
        assert prompts == [5, 14, 23]
    # Conversations spread over the replicas (~19 of 24 go to echo: both its replicas).
    assert len(replicas["echo"]) == 2 and replicas["echo-b"], replicas
    last = await async_client.responses.retrieve(results[0][0])
    assert last.output_text == f"{turns[-1]} 0"


def test_langchain_chat_openai_on_the_responses_api_invokes_and_streams(gateway: Gateway) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="vllm-alias", base_url=gateway.v1, api_key="unused", use_responses_api=True,
        max_tokens=8, max_retries=0, timeout=60,
    )
    answer = llm.invoke("Tell me about the harbour")
    assert answer.text
    assert answer.usage_metadata is not None and 1 <= answer.usage_metadata["output_tokens"] <= 8
    assert answer.response_metadata["model_name"] == VLLM_MODEL
    chunks = list(llm.stream("Tell me about the harbour"))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert streamed.text and len(chunks) > 2
    assert streamed.usage_metadata is not None and 1 <= streamed.usage_metadata["output_tokens"] <= 8


def test_text_format_json_schema_is_enforced(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=VLLM_MODEL, input="Give a city as JSON", max_output_tokens=200, temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
    )
    answer = json.loads(response.output_text)
    assert set(answer) == {"city", "rank"} and answer["city"] in ("Paris", "Rome", "Lima")


@pytest.mark.parametrize(
    "tool_choice", [{"type": "function", "name": "get_weather"}, "required"], ids=["named", "required"]
)
def test_a_forced_tool_call_comes_back_as_a_function_call_item(client: openai.OpenAI, tool_choice: object) -> None:
    weather = {
        "type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
        "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"], "additionalProperties": False,
        },
    }
    response = client.responses.create(
        model=VLLM_MODEL, input="Weather in Paris?", tools=[weather],  # type: ignore[list-item]
        tool_choice=tool_choice, max_output_tokens=200, temperature=0,  # type: ignore[arg-type]
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    arguments = json.loads(calls[0].arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)


def test_a_response_names_its_fields_as_openai_does_made_kept_or_streamed(http: httpx.Client) -> None:
    """OpenAI's own names on the wire, not the SDK's Python ones (a tool's
    `async`, not `async_`): a client's field comes back as it sent it."""
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    body = {"model": VLLM_MODEL, "input": "Hi", "tools": [tool], "max_output_tokens": 2}
    made = http.post("/v1/responses", json=body)
    assert made.status_code == 200, made.text
    kept = http.get(f"/v1/responses/{made.json()['id']}")
    assert kept.status_code == 200, kept.text
    streamed = http.post("/v1/responses", json={**body, "stream": True})
    created = next(json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: "))
    for answer in (made.json(), kept.json(), created["response"]):
        [echoed] = answer["tools"]
        assert "async" in echoed and "async_" not in echoed, echoed
        assert {key: echoed[key] for key in tool} == tool


def finished(client: openai.OpenAI, response_id: str, within_s: float = 60) -> openai.types.responses.Response:
    deadline = time.monotonic() + within_s
    while (kept := client.responses.retrieve(response_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, f"{response_id} still {kept.status}"
        time.sleep(0.1)
    return kept


def test_a_background_response_is_answered_at_once_and_generated_on(client: openai.OpenAI) -> None:
    queued = client.responses.create(
        model="vllm-alias", input=PROMPT, background=True, max_output_tokens=64, extra_body={"ignore_eos": True}
    )
    assert queued.status in ("queued", "in_progress") and queued.background
    done = finished(client, queued.id)
    assert (done.status, done.model) == ("incomplete", VLLM_MODEL)  # all 64 tokens: ignore_eos
    assert done.usage is not None and done.usage.output_tokens == 64 and done.output_text
    follow_up = client.responses.create(model="vllm-alias", input="And?", previous_response_id=done.id, max_output_tokens=2)
    assert follow_up.usage is not None and follow_up.usage.input_tokens > done.usage.total_tokens


async def test_cancelling_a_background_response_stops_its_engine_request(client: openai.OpenAI, gateway: Gateway) -> None:
    before = await settled_generated_tokens(gateway)
    queued = await asyncio.to_thread(
        client.responses.create, model=VLLM_MODEL, input=PROMPT, background=True, max_output_tokens=480,
        extra_body={"ignore_eos": True},
    )
    # Answered queued, as OpenAI's; polled while it generates, in_progress (vLLM's said queued till its end).
    assert queued.status == "queued"
    assert (await asyncio.to_thread(client.responses.retrieve, queued.id)).status == "in_progress"
    # A follow-up while it generates is refused: vLLM would prompt it without the answer to come.
    with pytest.raises(openai.BadRequestError) as refused:
        await asyncio.to_thread(
            client.responses.create, model=VLLM_MODEL, input="And?", previous_response_id=queued.id, max_output_tokens=2
        )
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert f"'{queued.id}' is still" in refused.value.message
    cancelled = await asyncio.to_thread(client.responses.cancel, queued.id)
    assert cancelled.status == "cancelled"
    assert await wait_idle(gateway, 30) == 0
    assert (await asyncio.to_thread(client.responses.retrieve, queued.id)).status == "cancelled"
    assert await settled_generated_tokens(gateway) - before < 480 // 2
    # Cancelling again answers the cancelled response, as OpenAI's does.
    again = await asyncio.to_thread(client.responses.cancel, queued.id)
    assert (again.id, again.status) == (queued.id, "cancelled")


def test_a_deleted_response_is_gone_for_good(client: openai.OpenAI, http: httpx.Client) -> None:
    """As OpenAI deletes a stored response: its id is unknown from then on, to
    retrieving, to a follow-up and to a second deletion; the rest of the
    conversation stays."""
    first = client.responses.create(model=VLLM_MODEL, input="Name a harbour.", max_output_tokens=4)
    second = client.responses.create(model=VLLM_MODEL, input="Why?", previous_response_id=first.id, max_output_tokens=4)
    deleted = http.delete(f"/v1/responses/{first.id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": first.id, "object": "response", "deleted": True}
    assert deleted.headers["x-gateway-variant"] == VLLM_MODEL
    for gone in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError) as caught:
            gone()
        assert (caught.value.body["code"], caught.value.body["param"]) == ("response_not_found", "response_id")  # type: ignore[index]
    follow_up = http.post("/v1/responses", json={"model": VLLM_MODEL, "input": "and?", "previous_response_id": first.id})
    assert (follow_up.status_code, follow_up.json()["error"]["param"]) == (400, "previous_response_id")
    assert client.responses.retrieve(second.id).output_text == second.output_text
    client.responses.delete(second.id)  # the SDK's own call
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    unstored = client.responses.create(model=VLLM_MODEL, input=PROMPT, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(unstored.id)


def test_a_responses_input_items_are_listed_as_openai_lists_them(client: openai.OpenAI, http: httpx.Client) -> None:
    given = [
        {"role": "developer", "content": "Answer as a sailor would."},
        {"role": "user", "content": [{"type": "input_text", "text": "Name a harbour."}]},
        {"role": "assistant", "content": "Portsmouth."},
        {"role": "user", "content": "Why?"},
    ]
    first = client.responses.create(model=VLLM_MODEL, input=given, max_output_tokens=4)  # type: ignore[arg-type]
    newest_first = list(client.responses.input_items.list(first.id))
    assert [(item.type, getattr(item, "role")) for item in newest_first] == [
        ("message", "user"), ("message", "assistant"), ("message", "user"), ("message", "developer")
    ]
    texts = [getattr(item, "content")[0].text for item in newest_first]
    assert texts == ["Why?", "Portsmouth.", "Name a harbour.", "Answer as a sailor would."]
    assert len({item.id for item in newest_first}) == 4
    # One item a page: the SDK follows `after` through all of them, in order.
    paged = list(client.responses.input_items.list(first.id, limit=1, order="asc"))
    assert [item.id for item in paged] == [item.id for item in reversed(newest_first)]
    # A follow-up's items are its own input; the earlier ones stay the first response's.
    second = client.responses.create(model=VLLM_MODEL, input="And then?", previous_response_id=first.id, max_output_tokens=2)
    [item] = client.responses.input_items.list(second.id)
    assert getattr(item, "content")[0].text == "And then?"
    for query, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "msg_nope"}, "after")):
        refused = http.get(f"/v1/responses/{first.id}/input_items", params=query)
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, param), refused.text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(first.id)


def test_an_empty_input_is_answered_only_after_instructions_or_a_previous_response(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=VLLM_MODEL, input=[], max_output_tokens=2)
    assert (caught.value.param, caught.value.code) == ("input", "empty_array")
    instructed = client.responses.create(model=VLLM_MODEL, input=[], instructions="Name a harbour.", max_output_tokens=2)
    continued = client.responses.create(model=VLLM_MODEL, input=[], previous_response_id=instructed.id, max_output_tokens=2)
    # Served: prompted with the earlier answer (instructions are not carried over, as with OpenAI).
    assert continued.previous_response_id == instructed.id
    assert continued.usage is not None and continued.usage.input_tokens > 0 and continued.usage.output_tokens > 0


def test_a_response_the_engine_refuses_is_not_kept(client: openai.OpenAI, gateway: Gateway) -> None:
    """Nor its input: a prompt refused as too long may be far larger than the window."""
    before = gateway.call(VLLM_MODEL, "stats")["stored_responses"]
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model=VLLM_MODEL, input="harbour " * 4 * VLLM_CONTEXT, max_output_tokens=2)
    assert gateway.call(VLLM_MODEL, "stats")["stored_responses"] == before
    kept = client.responses.create(model=VLLM_MODEL, input=PROMPT, max_output_tokens=2)
    assert gateway.call(VLLM_MODEL, "stats")["stored_responses"] == before + 1
    client.responses.delete(kept.id)


async def test_deleting_a_background_response_stops_its_engine_request(client: openai.OpenAI, gateway: Gateway) -> None:
    before = await settled_generated_tokens(gateway)
    queued = await asyncio.to_thread(
        client.responses.create, model=VLLM_MODEL, input=PROMPT, background=True, max_output_tokens=480,
        extra_body={"ignore_eos": True},
    )
    await asyncio.to_thread(client.responses.delete, queued.id)
    assert await wait_idle(gateway, 30) == 0
    with pytest.raises(openai.NotFoundError):
        await asyncio.to_thread(client.responses.retrieve, queued.id)
    assert await settled_generated_tokens(gateway) - before < 480 // 2


def test_a_background_stream_left_early_generates_to_its_end_and_can_be_read_again(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    stream = client.responses.create(
        model=VLLM_MODEL, input=PROMPT, background=True, stream=True, max_output_tokens=40,
        extra_body={"ignore_eos": True},
    )
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break  # the client leaves; the response goes on
    stream.close()
    assert seen[0].type == "response.created", seen[0]
    response_id = seen[0].response.id
    done = finished(client, response_id)
    assert done.usage is not None and done.usage.output_tokens == 40
    again = list(client.responses.retrieve(response_id, stream=True, starting_after=len(seen) - 1))
    assert again[0].sequence_number == len(seen) and again[-1].type in ("response.completed", "response.incomplete")
    first_delta = [event.delta for event in seen if event.type == "response.output_text.delta"]
    rest = [event.delta for event in again if event.type == "response.output_text.delta"]
    assert "".join(first_delta + rest) == done.output_text
    # Past its last event there is nothing to send: no chat-style `[DONE]`, which a Responses stream never has.
    after = {"stream": "true", "starting_after": again[-1].sequence_number}
    past = http.get(f"/v1/responses/{response_id}", params=after)
    assert (past.status_code, past.headers["content-type"].split(";")[0], past.content) == (
        200, "text/event-stream", b""
    )


# A schema that makes no grammar: the engine refuses it before generating.
REFUSED = {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "no-such-type"}}}}


def test_a_background_response_the_engine_refuses_ends_failed_not_queued_for_ever(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    queued = client.responses.create(model=VLLM_MODEL, input=PROMPT, background=True, max_output_tokens=4, **REFUSED)  # type: ignore[arg-type]
    failed = finished(client, queued.id, within_s=30)
    assert failed.status == "failed"
    # It says why, as OpenAI's failed responses do.
    assert failed.error is not None and failed.error.code == "invalid_prompt", failed.error
    assert "no-such-type" in failed.error.message, failed.error
    # Streamed: the refusal comes as an error event, and the stream ends.
    with http.stream("POST", "/v1/responses", json={
        "model": VLLM_MODEL, "input": PROMPT, "background": True, "stream": True, "max_output_tokens": 4, **REFUSED,
    }, timeout=30) as answer:
        events = [json.loads(line[len("data: "):]) for line in answer.iter_lines() if line.startswith("data: ")]
    assert [event["type"] for event in events] == ["response.created", "response.in_progress", "error"]
    assert "no-such-type" in events[-1]["message"] and events[-1]["sequence_number"] == 2
    response_id = events[0]["response"]["id"]
    assert finished(client, response_id, within_s=30).status == "failed"
    # Read again once it has failed: what was generated, then the same error event (its end).
    again = http.get(f"/v1/responses/{response_id}", params={"stream": "true"}, timeout=30)
    replayed = [json.loads(line[len("data: "):]) for line in again.text.splitlines() if line.startswith("data: ")]
    assert again.status_code == 200 and [event["type"] for event in replayed] == [event["type"] for event in events]
    assert replayed[-1]["sequence_number"] == 2 and "no-such-type" in replayed[-1]["message"]


def test_cancelling_a_background_stream_ends_the_stream_being_read(client: openai.OpenAI, http: httpx.Client) -> None:
    """vLLM's own reader of a background stream waits for a ``response.completed``
    that a cancelled response never sends: the stream hung until the client gave up."""
    body = {"model": VLLM_MODEL, "input": PROMPT, "background": True, "stream": True, "max_output_tokens": 480,
            "ignore_eos": True}
    events: list[dict] = []
    with http.stream("POST", "/v1/responses", json=body, timeout=30) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if events[-1]["type"] == "response.output_text.delta" and "cancelled" not in events:
                    assert client.responses.cancel(events[0]["response"]["id"]).status == "cancelled"
                    events.append("cancelled")  # type: ignore[arg-type]
    deltas = [event for event in events if event != "cancelled" and event["type"] == "response.output_text.delta"]
    assert "cancelled" in events and len(deltas) < 480  # and the stream ended: the loop is left
    assert not any(event != "cancelled" and event["type"] == "response.completed" for event in events)
    assert client.responses.retrieve(events[0]["response"]["id"]).status == "cancelled"


def test_a_setting_the_engine_would_ignore_is_refused_and_its_default_served(client: openai.OpenAI) -> None:
    # vLLM takes `text.verbosity` and `reasoning.summary` and never reads them.
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=VLLM_MODEL, input="Hi", max_output_tokens=2, text={"verbosity": "low"})
    assert refused.value.body["param"] == "text.verbosity"  # type: ignore[index]
    served = client.responses.create(model=VLLM_MODEL, input="Hi", max_output_tokens=2, text={"verbosity": "medium"})
    assert served.status in ("completed", "incomplete")
