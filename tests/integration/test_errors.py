"""Every failure is an OpenAI error envelope with the right status."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import ECHO_CONTEXT, VLLM_CONTEXT, VLLM_MODEL, Gateway

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]
JSON = {"content-type": "application/json"}  # what a body sent as raw bytes is labelled
TEXT = {"type": "text", "text": "Hello"}


def assert_error(response: httpx.Response, status: int, code: str | None, param: str | None = None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and "/work/" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
def test_body_that_is_not_a_json_object_is_400(http: httpx.Client, path: str, raw: bytes) -> None:
    error = assert_error(http.post(path, content=raw, headers=JSON), 400, None)
    assert error["type"] == "invalid_request_error"


def test_a_body_after_a_byte_order_mark_is_served(http: httpx.Client) -> None:
    """As by vLLM's own server: an editor on Windows may save a body's file with one."""
    body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 2}
    response = http.post(CHAT, content=b"\xef\xbb\xbf" + json.dumps(body).encode(), headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion" and response.json()["model"] == VLLM_MODEL


def test_a_body_past_the_limit_is_413_before_it_is_read(http: httpx.Client) -> None:
    huge = b'{"model": "echo", "messages": [{"role": "user", "content": "' + b"x" * (40 * 1024 * 1024) + b'"}]}'
    error = assert_error(http.post(CHAT, content=huge, headers=JSON), 413, "request_too_large")
    assert error["type"] == "invalid_request_error" and "bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no content-length: refused as the bytes pass the limit
        for _ in range(40):
            yield b"x" * (1024 * 1024)

    assert_error(http.post(CHAT, content=chunks(), headers=JSON), 413, "request_too_large")
    assert http.post(CHAT, json={"model": "echo", "messages": HELLO, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        (CHAT, {"model": VLLM_MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
         "Invalid type for 'messages[0].content': expected one of a string or an array, but got an integer instead."),
        (CHAT, {"model": "echo", "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
         "Invalid type for 'messages[0].content': expected "),
        (CHAT, {"model": VLLM_MODEL, "messages": [{"content": "hi"}]}, "messages[0].role",
         "Missing required parameter: 'messages[0].role'."),
        ("/v1/responses", {"model": VLLM_MODEL, "input": [{"role": "user"}]}, "input[0].content",
         "Missing required parameter: 'input[0].content'."),
        (COMPLETIONS, {"model": VLLM_MODEL, "prompt": {"a": 1}}, "prompt",
         "Invalid type for 'prompt': expected one of "),
        (CHAT, {"model": VLLM_MODEL, "messages": None}, "messages",  # vLLM's own validator trips over it
         "Invalid type for 'messages': expected an array, but got null instead."),
        # vLLM's own server drops such a part and answers from the rest.
        (CHAT, {"model": VLLM_MODEL, "messages": [{"role": "user", "content": [TEXT, {"type": "text", "txt": "x"}]}]},
         "messages[0].content[1].text", "Missing required parameter: 'messages[0].content[1].text'."),
        (CHAT, {"model": VLLM_MODEL, "messages": [{"role": "assistant", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text", "Missing required parameter: 'messages[0].content[0].text'."),
        # vLLM's own validator reads the calls whole, and loses where they were.
        (CHAT, {"model": VLLM_MODEL, "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "x"}]}]},
         "messages[0].tool_calls[0].type", "Invalid value for 'messages[0].tool_calls[0].type': 'x'. Supported "),
        # Every message item refuses the role: the role is named, not the string `input` might have been.
        ("/v1/responses", {"model": VLLM_MODEL, "input": [{"type": "message", "role": "wizard", "content": "x"}]},
         "input[0].role", "Invalid value for 'input[0].role': 'wizard'. Supported values are: 'user', "),
    ],
    ids=[
        "chat-content", "echo-content", "chat-role", "responses-content", "completions-prompt", "chat-null",
        "text-part-dropped", "lone-part", "tool-call", "responses-role",
    ],
)
def test_a_field_of_the_wrong_shape_is_named_by_its_path_in_the_json(
    http: httpx.Client, path: str, body: dict[str, object], param: str, message: str
) -> None:
    """As OpenAI names it (`messages[0].content`), never by the names of the
    shapes the field may take (`messages.0.ChatCompletionDeveloperMessageParam`),
    with OpenAI's code for what is wrong."""
    kinds = {"Invalid type": "invalid_type", "Missing": "missing_required_parameter", "Invalid value": "invalid_value"}
    code = next(value for prefix, value in kinds.items() if message.startswith(prefix))
    error = assert_error(http.post(path, json=body), 400, code, param)
    assert error["message"].startswith(message), error["message"]


@pytest.mark.parametrize(
    ("path", "budget", "field"),
    [
        (CHAT, {"max_tokens": 0}, "max_tokens"),
        (CHAT, {"max_completion_tokens": 0, "stream": True}, "max_completion_tokens"),
        (COMPLETIONS, {"max_tokens": 0}, "max_tokens"),
        (COMPLETIONS, {"max_tokens": -1, "echo": True}, "max_tokens"),
        ("/v1/responses", {"max_output_tokens": 0}, "max_output_tokens"),
    ],
    ids=["chat", "chat-max-completion-stream", "completions", "completions-echo", "responses"],
)
def test_an_output_budget_under_one_token_names_the_field_sent(
    http: httpx.Client, path: str, budget: dict[str, object], field: str
) -> None:
    prompts = {"/v1/responses": {"input": "Hi"}, COMPLETIONS: {"prompt": "Hi"}}
    prompt = prompts.get(path, {"messages": HELLO})
    sent = http.post(path, json={"model": VLLM_MODEL, **prompt, **budget})
    error = assert_error(sent, 400, "integer_below_min_value", field)
    value, least = budget[field], 0 if budget.get("echo") else 1  # an echoed prompt may be scored alone
    assert error["message"] == (
        f"Invalid '{field}': integer below minimum value. Expected a value >= {least}, but got {value} instead."
    )


@pytest.mark.parametrize(
    ("path", "body", "field", "message"),
    [
        (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
         "integer above maximum value. Expected a value <= 20, but got 21 instead."),
        (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": -1}, "top_logprobs",
         "-1 asks for every token's logprob; this model returns at most 20 per token."),
        (COMPLETIONS, {"prompt": "Hi", "logprobs": -1, "stream": True}, "logprobs",
         "-1 asks for every token's logprob; this model returns at most 20 per token."),
        ("/v1/responses", {"input": "Hi", "top_logprobs": 25, "include": ["message.output_text.logprobs"]},
         "top_logprobs", "integer above maximum value. Expected a value <= 20, but got 25 instead."),
    ],
    ids=["chat", "chat-every-token", "completions-every-token-stream", "responses"],
)
def test_more_logprobs_than_the_engine_returns_names_the_field_and_value_sent(
    http: httpx.Client, path: str, body: dict[str, object], field: str, message: str
) -> None:
    """vLLM's own server names its internal `logprobs` and, for -1, the vocabulary's size (512)."""
    budget = {"max_output_tokens" if path == "/v1/responses" else "max_tokens": 2}
    code = None if message.startswith("-1") else "integer_above_max_value"
    error = assert_error(http.post(path, json={"model": VLLM_MODEL, **budget, **body}), 400, code, field)
    assert error["message"] == f"Invalid '{field}': {message}"


@pytest.mark.parametrize(
    ("path", "field", "value", "message"),
    [
        (CHAT, "presence_penalty", -3, "decimal below minimum value. Expected a value >= -2, but got -3 instead."),
        (CHAT, "frequency_penalty", 2.5, "decimal above maximum value. Expected a value <= 2, but got 2.5 instead."),
        (CHAT, "temperature", 3, "decimal above maximum value. Expected a value <= 2, but got 3 instead."),
        (COMPLETIONS, "top_p", 0, "decimal below minimum value. Expected a value > 0, but got 0 instead."),
        (COMPLETIONS, "min_p", 1.5, "decimal above maximum value. Expected a value <= 1, but got 1.5 instead."),
        (CHAT, "repetition_penalty", 0, "decimal below minimum value. Expected a value > 0, but got 0 instead."),
        (CHAT, "top_k", -2, "integer below minimum value. Expected a value >= -1, but got -2 instead."),
        (COMPLETIONS, "min_tokens", 3, "integer above maximum value. Expected a value <= 2, but got 3 instead. "
         "It may not exceed the request's output budget."),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_sampling_field_out_of_range_is_named_in_openais_words(
    http: httpx.Client, path: str, field: str, value: float, message: str, stream: bool
) -> None:
    """vLLM's own server names no field for a penalty, min_p, top_k or min_tokens out of range."""
    prompt = {"prompt": "Hi"} if path == COMPLETIONS else {"messages": HELLO}
    body = {"model": VLLM_MODEL, **prompt, "max_tokens": 2, field: value, "stream": stream}
    # OpenAI's code for its words: "decimal below minimum value" is decimal_below_min_value.
    code = message.split(".")[0].replace("minimum", "min").replace("maximum", "max").replace(" ", "_")
    error = assert_error(http.post(path, json=body), 400, code, field)
    assert error["message"] == f"Invalid '{field}': {message}"


@pytest.mark.parametrize(
    ("path", "field", "value", "where"),
    [
        (CHAT, "stop", "", "stop"),
        (COMPLETIONS, "stop", ["\n", ""], "stop[1]"),
        (CHAT, "bad_words", [""], "bad_words[0]"),
    ],
)
def test_an_empty_stop_string_is_refused_naming_the_field(
    http: httpx.Client, path: str, field: str, value: object, where: str
) -> None:
    """vLLM's own server says "stop cannot contain an empty string." with no `param`."""
    prompt = {"prompt": "Hi"} if path == COMPLETIONS else {"messages": HELLO}
    body = {"model": VLLM_MODEL, **prompt, "max_tokens": 2, field: value}
    error = assert_error(http.post(path, json=body), 400, None, where)
    assert error["message"] == (
        f"Invalid '{where}': string too short. Expected a string with minimum length 1, "
        "but got an empty string instead."
    )


@pytest.mark.parametrize("model", [VLLM_MODEL, "echo"])
@pytest.mark.parametrize(
    ("path", "field", "value", "words"),
    [
        (CHAT, "max_tokens", True, "expected an integer, but got a boolean"),
        (CHAT, "temperature", "0.5", "expected a number, but got a string"),
        (CHAT, "logprobs", 1, "expected a boolean, but got an integer"),
        (COMPLETIONS, "n", "2", "expected an integer, but got a string"),
    ],
)
def test_a_scalar_of_another_json_type_is_refused_not_converted(
    http: httpx.Client, model: str, path: str, field: str, value: object, words: str
) -> None:
    """vLLM's own server converts these (`max_tokens: true` generates one token)."""
    prompt = {"prompt": "Hi"} if path == COMPLETIONS else {"messages": HELLO}
    for stream in (False, True):
        body = {"model": model, **prompt, "max_tokens": 2, field: value, "stream": stream}
        error = assert_error(http.post(path, json=body), 400, "invalid_type", field)
        assert error["message"] == f"Invalid type for '{field}': {words} instead."


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_several_choices_at_temperature_zero_are_refused_naming_n(http: httpx.Client, path: str, stream: bool) -> None:
    """vLLM samples greedily at temperature 0 and makes one choice; its own
    server says "n must be 1 when using greedy sampling, got 2." with no `param`."""
    prompt = {"prompt": "Hi"} if path == COMPLETIONS else {"messages": HELLO}
    body = {"model": VLLM_MODEL, **prompt, "max_tokens": 2, "n": 2, "temperature": 0, "stream": stream}
    error = assert_error(http.post(path, json=body), 400, None, "n")
    assert error["message"].startswith("Invalid 'n': 2 choices were asked for at temperature 0,")
    answer = http.post(path, json={**body, "stream": False, "temperature": 0.5}).json()
    assert [choice["index"] for choice in answer["choices"]] == [0, 1]


def test_a_compressed_body_is_served_and_one_it_cannot_decode_is_415(http: httpx.Client) -> None:
    body = json.dumps({"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 3, "temperature": 0}).encode()
    plain = http.post(CHAT, content=body, headers=JSON)
    zipped = http.post(CHAT, content=gzip.compress(body), headers={**JSON, "content-encoding": "gzip"})
    assert plain.status_code == zipped.status_code == 200, zipped.text
    assert zipped.json()["choices"] == plain.json()["choices"]

    refused = http.post(CHAT, content=body, headers={**JSON, "content-encoding": "br"})
    error = assert_error(refused, 415, "unsupported_content_encoding")
    assert error["type"] == "invalid_request_error" and "br" in error["message"]
    assert refused.headers["accept-encoding"] == "gzip, deflate"
    # Sent plain but labelled gzip: said so, not taken as it came.
    error = assert_error(http.post(CHAT, content=body, headers={**JSON, "content-encoding": "gzip"}), 400, None)
    assert "Content-Encoding: gzip" in error["message"]
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 KiB that inflate past the 32 MiB limit
    assert_error(http.post(CHAT, content=bomb, headers={**JSON, "content-encoding": "gzip"}), 413, "request_too_large")


@pytest.mark.parametrize("label", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_labelled_otherwise_is_415_as_vllm_refuses_it(http: httpx.Client, label: str) -> None:
    """curl's ``-d`` labels a form: vLLM's own server refuses it, OpenAI's API does not read it as JSON;
    the gateway says which label to send. A body with no label (tritonclient sends none) is read as JSON."""
    body = json.dumps({"model": "echo", "messages": HELLO, "max_tokens": 2}).encode()
    error = assert_error(http.post(CHAT, content=body, headers={"content-type": label}), 415, "unsupported_media_type")
    assert error["type"] == "invalid_request_error" and "application/json" in error["message"]
    assert label in error["message"]
    assert http.post(CHAT, content=body, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    assert http.post(CHAT, content=body).status_code == 200


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_json_nested_too_deeply_is_400(http: httpx.Client, depth: int) -> None:
    error = assert_error(http.post(CHAT, content=b"[" * depth + b"]" * depth, headers=JSON), 400, None)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("model", [VLLM_MODEL, "echo"])
@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": HELLO}, "model", "missing_required_parameter"),
        ({"model": "{model}", "messages": HELLO, "temperature": "hot"}, "temperature", "invalid_type"),
        ({"model": "{model}", "messages": HELLO, "n": 0}, "n", "integer_below_min_value"),
        ({"model": "{model}", "messages": HELLO, "stream": "yes"}, "stream", "invalid_type"),
        ({"model": "{model}", "messages": "hi"}, "messages", "invalid_type"),
        ({"model": "{model}", "messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options", None),
        ({"model": "{model}", "messages": HELLO, "logit_bias": {"5": 500}}, "logit_bias.5", "decimal_above_max_value"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(
    http: httpx.Client, model: str, body: dict, param: str, code: str | None
) -> None:
    body = {k: (model if v == "{model}" else v) for k, v in body.items()}
    error = assert_error(http.post(CHAT, json=body), 400, code)
    assert param in (error["param"] or "")


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_unknown_model_is_404(http: httpx.Client, path: str) -> None:
    body = {"model": "gpt-17", "messages": HELLO, "prompt": "x"}
    assert_error(http.post(path, json=body), 404, "model_not_found", "model")


@pytest.mark.parametrize("model", [VLLM_MODEL, "echo"])
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_plus_max_tokens_over_context_is_400_before_any_sse_byte(
    http: httpx.Client, model: str, stream: bool
) -> None:
    context = VLLM_CONTEXT if model == VLLM_MODEL else ECHO_CONTEXT
    # The prompt holds at least one token, so asking for the whole window overflows.
    body = {"model": model, "messages": HELLO, "max_tokens": context, "stream": stream}
    error = assert_error(http.post(CHAT, json=body), 400, "context_length_exceeded")
    assert str(context) in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_over_context_is_400(http: httpx.Client, stream: bool) -> None:
    body = {"model": VLLM_MODEL, "prompt": "word " * 300, "max_tokens": 300, "stream": stream}
    assert_error(http.post(COMPLETIONS, json=body), 400, "context_length_exceeded", "prompt")


def test_a_prompt_alone_too_long_is_context_length_exceeded(http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 1}
    for stream in (False, True):
        response = http.post(CHAT, json={"model": VLLM_MODEL, "stream": stream, **body})
        assert_error(response, 400, "context_length_exceeded", "messages")


@pytest.mark.parametrize("model", [VLLM_MODEL, "echo"])
@pytest.mark.parametrize(
    ("path", "field"),
    [(CHAT, "max_tokens"), (CHAT, "max_completion_tokens"), (COMPLETIONS, "max_tokens")],
)
def test_an_output_budget_beyond_the_window_is_too_large_naming_the_field(
    http: httpx.Client, client: openai.OpenAI, model: str, path: str, field: str
) -> None:
    """As OpenAI answers a budget above a model's most: no shorter prompt
    would make it fit, so not `context_length_exceeded` (a client that
    trims its history on that code would trim in vain), and the field the
    client sent, where vLLM's own server names its `max_tokens` for
    `max_completion_tokens` and the gateway named the prompt."""
    context = VLLM_CONTEXT if model == VLLM_MODEL else ECHO_CONTEXT
    prompt = {"messages": HELLO} if path == CHAT else {"prompt": "Hello"}
    for stream in (False, True):
        body = {"model": model, "stream": stream, field: context + 10, **prompt}
        error = assert_error(http.post(path, json=body), 400, "invalid_value", field)
        assert error["message"] == (
            f"{field} is too large: {context + 10}. This model supports at most {context} completion tokens, "
            f"whereas you provided {context + 10}."
        )
    if path == CHAT:
        with pytest.raises(openai.BadRequestError) as caught:  # at the call, also for a stream
            client.chat.completions.create(model=model, messages=HELLO, stream=True, **{field: context + 10})
        assert (caught.value.code, caught.value.param) == ("invalid_value", field)


@pytest.mark.parametrize("stream", [False, True])
def test_a_field_vllm_would_drop_is_400_naming_it(client: openai.OpenAI, stream: bool) -> None:
    # vLLM itself answers these 200 and ignores the field: 2,000 tokens for a misspelt `max_token`.
    ask = {"model": VLLM_MODEL, "messages": HELLO, "stream": stream}
    for extra, code in (({"max_token": 2}, None), ({"guided_json": {"type": "object"}}, "unsupported_parameter"),
                        ({"functions": [{"name": "f", "parameters": {}}]}, "unsupported_parameter"),
                        # A template is code the server would run: not taken from a request.
                        ({"chat_template": "{{ 'x' }}"}, "unsupported_parameter"),
                        ({"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}, "unsupported_parameter")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**ask, max_tokens=2, extra_body=extra)  # type: ignore[call-overload]
        assert (caught.value.param, caught.value.code) == (next(iter(extra)), code)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=VLLM_MODEL, prompt="Hello", max_tokens=2, extra_body={"best_of": 2})
    assert caught.value.param == "best_of"
    # OpenAI's hints that cannot change the answer are taken.
    hinted: dict = {"stream_options": {"include_usage": True, "include_obfuscation": False}} if stream else {}
    answer = client.chat.completions.create(
        **ask, max_tokens=2, metadata={"team": "a"}, prompt_cache_key="k", store=False,  # type: ignore[call-overload]
        **hinted,
    )
    if stream:
        assert [c.choices[0].finish_reason for c in answer if c.choices][-1] in ("length", "stop")
    else:
        assert answer.usage is not None and 1 <= answer.usage.completion_tokens <= 2


@pytest.mark.parametrize("model", [VLLM_MODEL, "echo"])
def test_a_message_key_no_message_has_or_a_user_turn_without_content_is_400_naming_it(
    http: httpx.Client, client: openai.OpenAI, model: str
) -> None:
    # vLLM's catch-all message shape took both: the prompt's text vanished and the answer was 200.
    for messages, param, code in (
        ([{"role": "user", "contnet": "Hello"}], "messages[0].contnet", None),
        ([*HELLO, {"role": "assistant", "content": "Hi"}, {"role": "user"}], "messages[2].content",
         "missing_required_parameter"),
    ):
        error = assert_error(http.post(CHAT, json={"model": model, "messages": messages, "max_tokens": 2}), 400, code)
        assert error["param"] == param
    # An answer's message, as the SDK gives it back, continues the conversation.
    answer = client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    turn = answer.choices[0].message.model_dump()
    again = http.post(CHAT, json={"model": model, "messages": [*HELLO, turn, *HELLO], "max_tokens": 2})
    assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f", "paramters": {}}}]},
         "tools[0].function.paramters"),
        (CHAT, {"messages": HELLO, "structured_outputs": {"json": {"type": "object"}, "regex": "a+"}},
         "structured_outputs"),
        (CHAT, {"messages": HELLO, "structured_outputs": {"choice": ["a"], "disable_any_whitespac": True}},
         "structured_outputs.disable_any_whitespac"),
    ],
    ids=["misspelt-tool-parameters", "two-constraints", "misspelt-setting"],
)
def test_a_key_vllm_would_drop_inside_an_object_is_400_naming_its_path(
    http: httpx.Client, path: str, body: dict, param: str
) -> None:
    # vLLM answered the first 200 with a tool of no parameters, the last ignoring the setting.
    error = assert_error(http.post(path, json={"model": VLLM_MODEL, "max_tokens": 2, **body}), 400, None, param)
    assert "_backend" not in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        (COMPLETIONS, {"prompt": "Hello", "logprobs": 50}, "logprobs"),
        (CHAT, {"messages": HELLO, "structured_outputs": {"regex": "[a-"}}, None),
        (CHAT, {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "no-such-type"}}}}, None),
    ],
    ids=["top-logprobs-past-the-engines-most", "completion-logprobs", "regex-that-is-no-grammar",
         "schema-that-is-no-grammar"],
)
def test_a_stream_the_engine_refuses_before_generating_is_an_http_400(
    http: httpx.Client, client: openai.OpenAI, path: str, body: dict, param: str | None
) -> None:
    """vLLM's own server answers these 200 with an error frame; OpenAI, and
    the gateway, with a 400 before the stream starts."""
    request = {"model": VLLM_MODEL, "max_tokens": 3, "stream": True, **body}
    code = "integer_above_max_value" if param is not None else None  # more logprobs than the engine returns
    error = assert_error(http.post(path, json=request), 400, code, param)
    assert error["type"] == "invalid_request_error"
    if path == CHAT:
        with pytest.raises(openai.BadRequestError):  # at the call, not while iterating
            extra = {"structured_outputs": request.pop("structured_outputs")} if "structured_outputs" in request else None
            client.chat.completions.create(**request, extra_body=extra)
    # The same model streams on.
    fine = {"model": VLLM_MODEL, "max_tokens": 2, "stream": True, "messages": HELLO, "prompt": "Hello"}
    fine.pop("prompt" if path == CHAT else "messages")
    response = http.post(path, json=fine)
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n"), response.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_thinking_budget_asked_of_a_model_without_a_reasoning_parser_names_the_field_not_a_flag(
    http: httpx.Client, path: str, stream: bool
) -> None:
    """vLLM refused it in its command line's words (``Please set --reasoning-parser``)."""
    prompt = {"messages": HELLO} if path == CHAT else {"prompt": "Hello"}
    request = {"model": VLLM_MODEL, **prompt, "max_tokens": 3, "stream": stream, "thinking_token_budget": 2}
    error = assert_error(http.post(path, json=request), 400, "unsupported_parameter", "thinking_token_budget")
    assert error["message"] == (
        f"Unsupported parameter: 'thinking_token_budget': the model `{VLLM_MODEL}` is not set up to keep a "
        "thinking budget (no `reasoning-parser` in its `engine_args` in the gateway's configuration)."
    )


def test_sdk_raises_bad_request_without_retrying(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=HELLO, max_tokens=ECHO_CONTEXT)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=HELLO, max_tokens=ECHO_CONTEXT, stream=True)
    assert caught.value.code == "context_length_exceeded"


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    nothing = http.get("/v2/nothing")  # the Open Inference Protocol's error shape under /v2
    assert nothing.status_code == 404 and nothing.json() == {"error": "Unknown route: GET /v2/nothing"}
    assert_error(http.get(CHAT), 405, "method_not_allowed")
    # An open gateway has no key to describe.
    assert_error(http.get("/v1/key"), 404, "keys_not_configured")


async def test_full_queue_is_503_with_retry_after(gateway: Gateway) -> None:
    body = {"model": "echo-narrow", "messages": [{"role": "user", "content": "a b c d e"}], "stream": True}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as session:

        async def one() -> tuple[int, dict, str]:
            response = await session.post(CHAT, json=body)
            return response.status_code, dict(response.headers), response.text

        results = await asyncio.gather(*(one() for _ in range(6)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) >= 1
    rejected = [(h, text) for status, h, text in results if status == 503]
    assert rejected, f"no request was refused: {statuses}"
    for headers, text in rejected:
        assert int(headers["retry-after"]) >= 1
        assert json.loads(text)["error"]["code"] == "overloaded"
    for status, _, text in results:
        if status == 200:
            assert text.endswith("data: [DONE]\n\n")


async def test_bad_requests_do_not_disturb_streams_in_flight(
    gateway: Gateway, async_client: openai.AsyncOpenAI
) -> None:
    async def good() -> int:
        stream = await async_client.chat.completions.create(
            model=VLLM_MODEL, messages=HELLO, max_tokens=40, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        return chunks[-1].usage.completion_tokens

    async def bad(session: httpx.AsyncClient, i: int) -> int:
        bodies = [b"{oops", json.dumps({"model": VLLM_MODEL, "messages": HELLO, "max_tokens": -1}).encode(),
                  json.dumps({"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 10_000, "stream": True}).encode()]
        response = await session.post(CHAT, content=bodies[i % len(bodies)], headers=JSON)
        return response.status_code

    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        results = await asyncio.gather(*[good() for _ in range(4)], *[bad(session, i) for i in range(12)])
    assert results[:4] == [40] * 4
    assert set(results[4:]) == {400}


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        (CHAT, {"messages": []}, "empty_array", "messages"),
        (CHAT, {"messages": [], "stream": True}, "empty_array", "messages"),
        (COMPLETIONS, {"prompt": []}, "empty_array", "prompt"),
        (COMPLETIONS, {"prompt": [[1, 2], [999_999]]}, None, "prompt[1][0]"),
        (COMPLETIONS, {"prompt": [5, -1], "stream": True}, "integer_below_min_value", "prompt[1]"),  # by its schema
        ("/tokenize", {"messages": []}, "empty_array", "messages"),
        ("/v1/responses", {"input": []}, "empty_array", "input"),
    ],
    ids=["chat", "chat-stream", "completion", "batch-past-the-vocabulary", "negative-id-stream", "tokenize", "responses"],
)
def test_a_prompt_vllm_refuses_naming_no_field_is_refused_naming_it(
    http: httpx.Client, path: str, body: dict[str, object], code: str | None, param: str
) -> None:
    """vLLM named no field for these ("Cannot apply chat template to an empty
    conversation", "Token id 999999 is out of vocabulary")."""
    budget = {"/tokenize": {}, "/v1/responses": {"max_output_tokens": 2}}.get(path, {"max_tokens": 2})
    assert_error(http.post(path, json={"model": VLLM_MODEL, **budget, **body}), 400, code, param)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [CHAT, "/v1/responses"])
def test_metadata_beyond_openais_bounds_is_refused_not_passed_on(http: httpx.Client, path: str, stream: bool) -> None:
    """vLLM's own server takes any metadata (its schema's types aside); OpenAI's bounds it."""
    prompt = {"input": "Hi", "max_output_tokens": 2} if path != CHAT else {"messages": HELLO, "max_tokens": 2}
    ask = {"model": VLLM_MODEL, **prompt, "stream": stream}
    many = {f"tag{i}": "v" for i in range(17)}
    assert_error(http.post(path, json={**ask, "metadata": many}), 400, "object_above_max_properties", "metadata")
    long = {"team": "v" * 513}
    assert_error(http.post(path, json={**ask, "metadata": long}), 400, "string_above_max_length", "metadata.team")
    served = http.post(path, json={**ask, "metadata": {"team": "a" * 512}})
    assert served.status_code == 200, served.text


@pytest.mark.parametrize(
    ("path", "tools", "param"),
    [
        (CHAT, [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
         "tools[0].function.parameters"),
        ("/v1/responses", [{"type": "function", "name": "f", "parameters": {"type": "objekt"}}], "tools[0].parameters"),
    ],
    ids=["chat-array", "responses-no-such-type"],
)
def test_tool_parameters_that_are_no_object_schema_are_refused_before_the_engine(
    http: httpx.Client, path: str, tools: list[dict[str, object]], param: str
) -> None:
    """vLLM's own server takes them (and fails making a grammar of one when a call is forced)."""
    prompt = {"input": "Hi", "max_output_tokens": 2} if path != CHAT else {"messages": HELLO, "max_tokens": 2}
    error = assert_error(
        http.post(path, json={"model": VLLM_MODEL, **prompt, "tools": tools}), 400, "invalid_function_parameters", param
    )
    assert error["message"].startswith("Invalid schema for function 'f': ")


def test_a_json_schema_format_without_its_schema_names_the_field(http: httpx.Client) -> None:
    """vLLM's own server refused the chat one in its internals' words ('_backend': None ...)."""
    body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}
    param = "response_format.json_schema.schema"
    error = assert_error(http.post(CHAT, json=body), 400, "missing_required_parameter", param)
    assert "_backend" not in error["message"]


def test_a_named_tool_choice_without_that_tool_names_it(http: httpx.Client) -> None:
    """vLLM's own words name the type: "Tool choice 'function' not found in 'tools' parameter."."""
    body = {"model": VLLM_MODEL, "input": "Hi", "max_output_tokens": 2,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
            "tool_choice": {"type": "function", "name": "weather"}}
    error = assert_error(http.post("/v1/responses", json=body), 400, None, "tool_choice.name")
    assert error["message"] == "Tool choice 'weather' not found in 'tools' parameter."
