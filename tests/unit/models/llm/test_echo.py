"""models/llm/echo.py: the echo engine speaks OpenAI's shapes, deterministically."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import sse
from gateway.config import EchoModelConfig
from gateway.errors import ContextLengthExceededError, InvalidRequestError
from gateway.protocol.engine import EngineRequest
from models.llm.echo import EchoEngine
from models.llm.tally import GenerationTally

CONTEXT = 64
PROMPT = "the quick brown fox jumps"
WORDS = PROMPT.split()
KINDS = ["chat", "completion"]


@pytest.fixture
def engine() -> EchoEngine:
    return EchoEngine(EchoModelConfig(name="echo", max_model_len=CONTEXT))


def _request(kind: str, prompt: str = PROMPT, **fields: Any) -> EngineRequest:
    body: dict[str, Any] = {"model": "echo", **fields}
    if kind == "chat":
        body.setdefault("messages", [{"role": "user", "content": prompt}])
        return EngineRequest(endpoint="chat", body=body, request_id="r1")
    body.setdefault("prompt", prompt)
    return EngineRequest(endpoint="completion", body=body, request_id="r1")


async def _json(engine: EchoEngine, request: EngineRequest) -> dict[str, Any]:
    return json.loads(await engine.complete(request, GenerationTally()))


async def _stream(engine: EchoEngine, request: EngineRequest) -> list[Any]:
    frames = await engine.stream(request, GenerationTally())
    return sse.parse(b"".join([frame async for frame in frames]))


def _text(kind: str, choice: dict[str, Any]) -> str:
    return choice["message"]["content"] if kind == "chat" else choice["text"]


def _delta_text(kind: str, choice: dict[str, Any]) -> str:
    return (choice["delta"].get("content") or "") if kind == "chat" else choice["text"]


def _by_choice(chunks: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    grouped: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            grouped.setdefault(choice["index"], []).append(choice)
    return grouped


# --- non-streaming ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "prefix", "obj"),
    [("chat", "chatcmpl-", "chat.completion"), ("completion", "cmpl-", "text_completion")],
)
async def test_response_shape(engine: EchoEngine, kind: str, prefix: str, obj: str) -> None:
    body = await _json(engine, _request(kind))

    assert body["id"] == prefix + "r1"
    assert body["object"] == obj
    assert body["model"] == "echo"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert _text(kind, choice) == PROMPT
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    if kind == "chat":
        assert choice["message"]["role"] == "assistant"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


async def test_chat_echoes_last_user_message_and_counts_all(engine: EchoEngine) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "one"}]},
    ]

    body = await _json(engine, _request("chat", messages=messages))

    assert body["choices"][0]["message"]["content"] == "second one"
    assert body["usage"]["prompt_tokens"] == 8
    assert body["usage"]["completion_tokens"] == 2


async def test_completion_prompt_list_gives_one_choice_per_prompt(engine: EchoEngine) -> None:
    body = await _json(engine, _request("completion", prompt=["a b", "c d e"]))

    assert [c["text"] for c in body["choices"]] == ["a b", "c d e"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


@pytest.mark.parametrize("budget", [{}, {"max_tokens": None}])
async def test_a_completion_without_a_budget_generates_16_tokens_as_vllms_does(
    engine: EchoEngine, budget: dict[str, None]
) -> None:
    body = await _json(engine, _request("completion", prompt=" ".join(["w"] * 40), **budget))
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("kind", "limit"),
    [("chat", "max_tokens"), ("chat", "max_completion_tokens"), ("completion", "max_tokens")],
)
async def test_max_tokens_truncates_with_length(engine: EchoEngine, kind: str, limit: str) -> None:
    body = await _json(engine, _request(kind, **{limit: 2}))

    [choice] = body["choices"]
    assert _text(kind, choice) == "the quick"
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_full_echo_within_budget_stops(engine: EchoEngine, kind: str) -> None:
    body = await _json(engine, _request(kind, max_tokens=len(WORDS) + 1))

    assert _text(kind, body["choices"][0]) == PROMPT
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("kind", KINDS)
async def test_n_gives_n_choices(engine: EchoEngine, kind: str) -> None:
    body = await _json(engine, _request(kind, n=2))

    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [_text(kind, c) for c in body["choices"]] == [PROMPT, PROMPT]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("stop", "expected"),
    [("brown", "the quick"), (["zzz", "fox"], "the quick brown"), ("absent", PROMPT)],
)
async def test_stop_sequences(engine: EchoEngine, kind: str, stop: str | list[str], expected: str) -> None:
    body = await _json(engine, _request(kind, stop=stop))

    [choice] = body["choices"]
    assert _text(kind, choice) == expected
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(expected.split())


async def test_chat_logprobs_shape(engine: EchoEngine) -> None:
    body = await _json(engine, _request("chat", logprobs=True, top_logprobs=1, max_tokens=2))

    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["the", " quick"]
    for entry in content:
        assert entry["logprob"] == 0.0
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["top_logprobs"] == [{"token": entry["token"], "logprob": 0.0, "bytes": entry["bytes"]}]


async def test_chat_logprobs_without_top(engine: EchoEngine) -> None:
    body = await _json(engine, _request("chat", logprobs=True, max_tokens=1))

    assert body["choices"][0]["logprobs"]["content"] == [
        {"token": "the", "logprob": 0.0, "bytes": list(b"the"), "top_logprobs": []}
    ]


async def test_completion_logprobs_shape(engine: EchoEngine) -> None:
    body = await _json(engine, _request("completion", logprobs=1, max_tokens=3))

    assert body["choices"][0]["logprobs"] == {
        "text_offset": [0, 3, 9],
        "token_logprobs": [0.0, 0.0, 0.0],
        "tokens": ["the", " quick", " brown"],
        "top_logprobs": [{"the": 0.0}, {" quick": 0.0}, {" brown": 0.0}],
    }


# --- streaming ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fields", [{}, {"n": 2}, {"max_tokens": 2}, {"stop": "fox"}, {"n": 2, "max_tokens": 1}])
async def test_stream_matches_non_stream(engine: EchoEngine, kind: str, fields: dict[str, Any]) -> None:
    whole = await _json(engine, _request(kind, **fields))
    payloads = await _stream(engine, _request(kind, stream=True, **fields))

    assert payloads[-1] is None
    chunks = payloads[:-1]
    assert None not in chunks
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    assert {(c["id"], c["object"], c["model"]) for c in chunks} == {(whole["id"], obj, "echo")}
    assert all("usage" not in c for c in chunks)

    by_choice = _by_choice(chunks)
    assert sorted(by_choice) == [c["index"] for c in whole["choices"]]
    for expected in whole["choices"]:
        choices = by_choice[expected["index"]]
        if kind == "chat":
            assert choices[0]["delta"]["role"] == "assistant"
            assert all("role" not in c["delta"] for c in choices[1:])
        finished = [c for c in choices if c["finish_reason"] is not None]
        assert finished == [choices[-1]]
        assert finished[0]["finish_reason"] == expected["finish_reason"]
        assert "".join(_delta_text(kind, c) for c in choices) == _text(kind, expected)


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_include_usage_adds_final_usage_chunk(engine: EchoEngine, kind: str) -> None:
    whole = await _json(engine, _request(kind, n=2))
    payloads = await _stream(
        engine, _request(kind, n=2, stream=True, stream_options={"include_usage": True})
    )

    assert payloads[-1] is None
    usage_chunk = payloads[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == whole["usage"]
    assert all("usage" not in c for c in payloads[:-2])


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_logprobs_follow_each_token(engine: EchoEngine, kind: str) -> None:
    fields = {"logprobs": True, "top_logprobs": 1} if kind == "chat" else {"logprobs": 1}
    payloads = await _stream(engine, _request(kind, stream=True, max_tokens=3, **fields))

    choices = [c for chunk in payloads[:-1] for c in chunk["choices"]]
    if kind == "chat":
        choices = choices[1:]  # the role chunk carries no token
        assert [c["logprobs"]["content"][0]["token"] for c in choices] == ["the", " quick", " brown"]
    else:
        assert [c["logprobs"]["tokens"] for c in choices] == [["the"], [" quick"], [" brown"]]
        assert [c["logprobs"]["text_offset"] for c in choices] == [[0], [3], [9]]


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_of_empty_answer_still_finishes(engine: EchoEngine, kind: str) -> None:
    payloads = await _stream(engine, _request(kind, prompt="", stream=True))

    finished = [c for chunk in payloads[:-1] for c in chunk["choices"] if c["finish_reason"]]
    assert finished and finished[0]["finish_reason"] == "stop"
    assert len(finished) == 1


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
async def test_context_overflow_raises_before_any_stream(engine: EchoEngine, kind: str, stream: bool) -> None:
    request = _request(kind, max_tokens=CONTEXT - len(WORDS) + 1, stream=stream)

    with pytest.raises(ContextLengthExceededError) as info:
        await (engine.stream if stream else engine.complete)(request, GenerationTally())

    error = info.value
    assert error.code == "context_length_exceeded"
    assert error.status_code == 400
    assert error.param == ("messages" if kind == "chat" else "prompt")
    assert f"maximum context length is {CONTEXT} tokens" in error.message
    assert engine.num_unfinished_requests() == 0


@pytest.mark.parametrize(
    ("kind", "field"), [("chat", "max_tokens"), ("chat", "max_completion_tokens"), ("completion", "max_tokens")]
)
async def test_a_budget_beyond_the_window_alone_is_refused_naming_its_field(
    engine: EchoEngine, kind: str, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await engine.complete(_request(kind, **{field: CONTEXT + 1}), GenerationTally())

    error = info.value
    assert (error.param, error.code, error.status_code) == (field, "invalid_value", 400)
    assert error.message.startswith(f"{field} is too large: {CONTEXT + 1}. This model supports at most {CONTEXT}")


@pytest.mark.parametrize("kind", KINDS)
async def test_prompt_plus_max_tokens_exactly_at_context_fits(engine: EchoEngine, kind: str) -> None:
    body = await _json(engine, _request(kind, max_tokens=CONTEXT - len(WORDS)))

    assert _text(kind, body["choices"][0]) == PROMPT


@pytest.mark.parametrize("kind", KINDS)
async def test_prompt_longer_than_context_without_max_tokens_raises(engine: EchoEngine, kind: str) -> None:
    # With no max_tokens the whole rest of the window is the budget; a prompt
    # that does not fit at all must fail like vLLM does, not answer "length".
    long_prompt = " ".join(["word"] * (CONTEXT + 1))

    with pytest.raises(ContextLengthExceededError):
        await engine.complete(_request(kind, prompt=long_prompt, max_tokens=None), GenerationTally())


@pytest.mark.parametrize(
    ("kind", "fields", "param", "message"),
    [
        ("chat", {"n": 0}, "n", "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
        ("chat", {"messages": None}, "messages", "Invalid type for 'messages': expected an array, but got null"),
        ("chat", {"messages": []}, "messages",
         "empty array. Expected an array with minimum length 1, but got an empty array"),
        ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role",
         "Invalid value for 'messages[0].role': 'robot'. Supported values are: "),
        ("chat", {"stream": "true"}, "stream", "Invalid type for 'stream': expected a boolean, but got a string"),
        ("chat", {"temperature": 5}, "temperature", "decimal above maximum value. Expected a value <= 2, but got 5 instead."),
        ("completion", {"max_tokens": 0}, "max_tokens", "integer below minimum value. Expected a value >= 1, but got 0"),
        ("completion", {"logprobs": 9}, "logprobs", "integer above maximum value. Expected a value <= 5, but got 9"),
        ("chat", {"logit_bias": {"5": 101}}, "logit_bias.5", "decimal above maximum value. Expected a value <= 100"),
        ("completion", {"logit_bias": {"5": float("nan")}}, "logit_bias.5", "a finite number"),
    ],
)
async def test_invalid_fields_name_the_param(
    engine: EchoEngine, kind: str, fields: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await engine.complete(_request(kind, **fields), GenerationTally())

    assert info.value.param == param
    assert message in info.value.message
    assert info.value.status_code == 400


@pytest.mark.parametrize(("kind", "field"), [("chat", "messages"), ("completion", "prompt")])
async def test_missing_field_is_named(engine: EchoEngine, kind: str, field: str) -> None:
    request = _request(kind)
    del request.body[field]

    with pytest.raises(InvalidRequestError) as info:
        await engine.complete(request, GenerationTally())

    assert info.value.param == field
    assert info.value.message == f"Missing required parameter: '{field}'."


# --- in-flight accounting ----------------------------------------------------------


async def _opened(engine: EchoEngine, kind: str) -> AsyncIterator[bytes]:
    return await engine.stream(_request(kind, stream=True), GenerationTally())


@pytest.mark.parametrize("kind", KINDS)
async def test_unfinished_requests_back_to_zero_after_full_stream(engine: EchoEngine, kind: str) -> None:
    stream = await _opened(engine, kind)

    await anext(stream)
    assert engine.num_unfinished_requests() == 1
    rest = [frame async for frame in stream]

    assert rest[-1] == sse.DONE
    assert engine.num_unfinished_requests() == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_unfinished_requests_back_to_zero_after_early_close(engine: EchoEngine, kind: str) -> None:
    first = await _opened(engine, kind)
    second = await _opened(engine, kind)
    await anext(first)
    await anext(second)
    assert engine.num_unfinished_requests() == 2

    await first.aclose()  # type: ignore[attr-defined]
    assert engine.num_unfinished_requests() == 1
    await second.aclose()  # type: ignore[attr-defined]
    assert engine.num_unfinished_requests() == 0


async def test_non_streaming_requests_leave_nothing_unfinished(engine: EchoEngine) -> None:
    await _json(engine, _request("chat"))

    assert engine.num_unfinished_requests() == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
async def test_tally_equals_the_usage_the_answer_reports(engine: EchoEngine, kind: str, stream: bool) -> None:
    tally = GenerationTally()
    request = _request(kind, max_tokens=3, n=2, stream=stream, stream_options={"include_usage": True} if stream else None)
    if not stream:
        usage = json.loads(await engine.complete(request, tally))["usage"]
    else:
        frames = await engine.stream(request, tally)
        usage = next(c["usage"] for c in sse.parse(b"".join([f async for f in frames])) if c.get("usage"))
    outcome = tally.outcome()
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert outcome.first_token_s is not None and outcome.first_token_s >= 0
    # One inter-token observation for every token after the first.
    assert sum(outcome.inter_token_counts) == usage["completion_tokens"] - 1


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_left_early_counts_the_tokens_it_sent(engine: EchoEngine, kind: str) -> None:
    """A client that leaves is charged what it was sent, not nothing (the key's token limit)."""
    tally = GenerationTally()
    frames = await engine.stream(_request(kind, stream=True), tally)
    received = []
    while sum(bool(_delta_text(kind, choice)) for chunk in received for choice in chunk["choices"]) < 2:
        received += sse.parse(await anext(frames))
    await frames.aclose()  # type: ignore[attr-defined]
    outcome = tally.outcome()
    assert outcome.completion_tokens == 2 < len(WORDS)
    assert outcome.first_token_s is not None and sum(outcome.inter_token_counts) == 1
