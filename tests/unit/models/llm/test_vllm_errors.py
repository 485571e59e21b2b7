"""models/llm/vllm_errors.py: vLLM's errors as the gateway's, by table."""

from __future__ import annotations

from typing import Any

import pytest
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from gateway import errors
from models.llm import vllm_errors


@pytest.mark.parametrize(
    ("error", "cls", "status", "param"),
    [
        ({"code": 400, "message": "bad top_p", "param": "top_p"}, errors.InvalidRequestError, 400, "top_p"),
        # vLLM's refusal of a prompt longer than the window names its own parameters.
        (
            {"code": 400, "message": "This model's maximum context length is 512", "param": "input_tokens"},
            errors.ContextLengthExceededError,
            400,
            "messages",
        ),
        (
            {"code": 400, "message": "The prompt has 9000 characters", "param": "input_text"},
            errors.ContextLengthExceededError,
            400,
            "messages",
        ),
        # The words of a message decide nothing.
        ({"code": 400, "message": "not a context length error", "param": None}, errors.InvalidRequestError, 400, None),
        ({"code": 422, "message": "image not found", "param": "url"}, errors.InvalidRequestError, 422, "url"),
        ({"code": 404, "message": "The model `x` does not exist.", "param": "model"}, errors.ModelNotFoundError, 404, "model"),
        (
            {"code": 404, "message": "Response with id 'resp_1' not found.", "param": "response_id"},
            errors.ResponseNotFoundError,
            404,
            "response_id",
        ),
        # A feature the model lacks is the client's to change: 400, never retried or fallen back from.
        ({"code": 501, "message": "not supported"}, errors.NotImplementedFeatureError, 400, None),
        ({"code": 503, "message": "busy"}, errors.ServiceUnavailableError, 503, None),
        ({"code": 500, "message": "Traceback ..."}, errors.InternalServerError, 500, None),
    ],
)
def test_vllm_error_objects_map_by_table(
    error: dict[str, object], cls: type[errors.GatewayError], status: int, param: str | None
) -> None:
    translated = vllm_errors.map_error({"error": error}, "messages")
    assert type(translated) is cls and translated.status_code == status and translated.param == param
    assert "Traceback" not in translated.message


@pytest.mark.parametrize(
    ("exc", "cls", "status"),
    [
        (VLLMValidationError("too long", parameter="input_tokens", value=600), errors.ContextLengthExceededError, 400),
        (VLLMValidationError("top_k must be an integer", parameter="top_k"), errors.InvalidRequestError, 400),
        (VLLMNotFoundError("The model `x` does not exist."), errors.ModelNotFoundError, 404),
        (NotImplementedError("no beam search here"), errors.NotImplementedFeatureError, 400),
        (ValueError("bad value"), errors.InvalidRequestError, 400),
        (EngineDeadError(), errors.ServiceUnavailableError, 503),
        (RuntimeError("/secret/path.py line 3"), errors.InternalServerError, 500),
    ],
)
def test_vllm_exceptions_map_by_type(exc: Exception, cls: type[errors.GatewayError], status: int) -> None:
    translated = vllm_errors.map_exception(exc, "prompt")
    assert type(translated) is cls and translated.status_code == status
    assert "/secret" not in translated.message
    if cls is errors.ContextLengthExceededError:
        assert translated.param == "prompt"  # OpenAI's name for the prompt, not vLLM's


def test_a_vllm_validation_error_says_what_is_wrong_without_its_debugging_suffix() -> None:
    # str() of vLLM's error appends "(parameter=logprobs, value=x)": the
    # parameter is the error's `param`, and the value (however large) is the client's own.
    exc = VLLMValidationError("`logprobs` must be an integer.", parameter="logprobs", value="x" * 10_000)
    translated = vllm_errors.map_exception(exc)
    assert (translated.message, translated.param) == ("`logprobs` must be an integer.", "logprobs")
    # The same error as vLLM's serving code answers it, already an error object.
    answered = vllm_errors.map_error({"error": {"code": 400, "message": str(exc), "param": "logprobs"}})
    assert (answered.message, answered.param) == ("`logprobs` must be an integer.", "logprobs")
    # A message that merely ends in parentheses keeps them.
    kept = vllm_errors.map_error({"error": {"code": 400, "message": "bad (see docs)", "param": "logprobs"}})
    assert kept.message == "bad (see docs)"


def test_the_gateways_own_errors_pass_through() -> None:
    own = errors.ContextLengthExceededError("too long", param="input")
    assert vllm_errors.map_exception(own) is own


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequestError("top_logprobs must be at most 20", param="top_logprobs"), "invalid_prompt"),
        (errors.ContextLengthExceededError("too long", param="input"), "context_length_exceeded"),
        (errors.ServiceUnavailableError("The model's engine stopped."), "server_error"),
        (errors.InternalServerError("The model failed while serving the request."), "server_error"),
    ],
)
def test_a_failed_response_says_why_in_openais_shape(error: errors.GatewayError, code: str) -> None:
    assert vllm_errors.response_error(error) == {"code": code, "message": error.message}


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"messages": None}, "messages", "Invalid type for 'messages': expected an array, but got null instead."),
        ({"messages": 5}, "messages", "Invalid type for 'messages': expected an array, but got an integer instead."),
        ({"structured_outputs": 5}, "structured_outputs",
         "Invalid type for 'structured_outputs': expected an object, but got an integer instead."),
        # vLLM's tool_choice validator reads each tool's function name first (a KeyError, once a 500).
        ({"tools": [{"type": "function"}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tools[0].function", "Missing required parameter: 'tools[0].function'."),
        ({"tools": [{"type": "function", "function": {}}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tools[0].function.name", "Missing required parameter: 'tools[0].function.name'."),
    ],
)
def test_a_field_vllms_own_validators_trip_over_is_named_as_pydantic_would(
    fields: dict[str, object], param: str, message: str
) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(ChatCompletionRequest, body)
    assert (caught.value.param, caught.value.message) == (param, message)
    assert vllm_errors.validated(ChatCompletionRequest, {"model": "m", "messages": []}).messages == []


@pytest.mark.parametrize("role", ["user", "assistant", "system"])
def test_a_bad_content_part_is_named_by_its_path_before_vllm_renders_the_prompt(role: str) -> None:
    """vLLM's schema leaves such a part to be checked while the prompt is
    rendered, where it was named `[0].text`."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    fine = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    bad = {"role": role, "content": [{"type": "text", "txt": "typo"}]}
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(ChatCompletionRequest, {"model": "m", "messages": [fine, bad]})
    assert caught.value.param == "messages[1].content[0].text"
    assert caught.value.message == "Missing required parameter: 'messages[1].content[0].text'."
    # Parts checked here are kept for vLLM to read.
    good = {"role": role, "content": [{"type": "text", "text": "ok"}]}
    parsed = vllm_errors.validated(ChatCompletionRequest, {"model": "m", "messages": [fine, good]})
    assert [message["content"] for message in parsed.messages] == [fine["content"], good["content"]]


@pytest.mark.parametrize(
    ("call", "param", "message"),
    [
        ({"id": "c1", "type": "function"}, "messages[0].tool_calls[1].function",
         "Missing required parameter: 'messages[0].tool_calls[1].function'."),
        ({"id": "c1", "type": "function", "function": {"name": "f"}}, "messages[0].tool_calls[1].function.arguments",
         "Missing required parameter: 'messages[0].tool_calls[1].function.arguments'."),
        ({"id": "c1", "type": "funktion", "function": {"name": "f", "arguments": "{}"}},
         "messages[0].tool_calls[1].type", "Invalid value for 'messages[0].tool_calls[1].type': 'funktion'. "),
    ],
)
def test_a_bad_tool_call_of_an_assistant_message_is_named_by_its_path(
    call: dict[str, Any], param: str, message: str
) -> None:
    """vLLM's schema leaves an assistant message's tool calls to be checked
    while the prompt is rendered, where one was named `[0].function`."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    fine = {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [{"role": "assistant", "tool_calls": [fine, call]}, {"role": "user", "content": "hi"}]
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(ChatCompletionRequest, {"model": "m", "messages": turns})
    assert caught.value.param == param
    assert caught.value.message.startswith(message), caught.value.message
    # Calls checked here are kept for vLLM to read.
    turns[0]["tool_calls"] = [fine, fine]
    parsed = vllm_errors.validated(ChatCompletionRequest, {"model": "m", "messages": turns})
    assert list(parsed.messages[0]["tool_calls"]) == [fine, fine]


@pytest.mark.parametrize("role", ["assistant", "user"])
@pytest.mark.parametrize(("calls", "got"), [("x", "a string"), ({"id": "c1"}, "an object"), (5, "an integer")])
def test_tool_calls_that_are_not_an_array_are_named_so(role: str, calls: object, got: str) -> None:
    # Read as the array of their characters (or keys), they were "tool_calls[0]: expected an object"
    # (a user message's dropped unsaid); a number failed in Python's words ("'int' object is not iterable").
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    turns = [{"role": role, "content": "a", "tool_calls": calls}, {"role": "user", "content": "hi"}]
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(ChatCompletionRequest, {"model": "m", "messages": turns})
    assert (caught.value.param, caught.value.code) == ("messages[0].tool_calls", "invalid_type")
    expected = f"Invalid type for 'messages[0].tool_calls': expected an array, but got {got} instead."
    assert caught.value.message == expected


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ({"type": "text", "txt": "typo"}, "Missing required parameter: 'messages[0].content[1].text'."),
        ({"type": "text", "text": 5},
         "Invalid type for 'messages[0].content[1].text': expected a string, but got an integer instead."),
    ],
)
def test_a_text_part_without_its_text_is_refused_not_dropped(part: dict[str, object], message: str) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    content = [{"type": "text", "text": "ok"}, part]
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": content}]})
    assert (caught.value.param, caught.value.message) == ("messages[0].content[1].text", message)


@pytest.mark.parametrize(
    ("role", "part", "supported"),
    [
        ("user", {"type": "zzz"}, "'text', 'image_url', 'input_audio'"),
        ("user", {"type": "file"}, "'text', 'image_url', 'input_audio'"),
        ("assistant", {"type": "zzz"}, "'text', 'refusal'"),
    ],
)
def test_an_unknown_content_part_type_is_offered_only_the_types_vllm_reads(
    role: str, part: dict[str, object], supported: str
) -> None:
    # vLLM's chat parser refuses a 'file' part ("Unsupported chat content part type"), so none is offered.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": role, "content": [part]}]}
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(ChatCompletionRequest, body)
    assert caught.value.param == "messages[0].content[0].type"
    assert caught.value.message == (
        f"Invalid value for 'messages[0].content[0].type': {part['type']!r}. Supported values are: {supported}."
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
         "messages[0].content[1].text"),
        ({"system": [{"type": "text"}]}, "system[0].text"),
    ],
)
def test_an_anthropic_text_block_without_its_text_is_refused_not_dropped(fields: dict[str, object], param: str) -> None:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(AnthropicMessagesRequest, body)
    assert (caught.value.param, caught.value.message) == (param, f"Missing required parameter: '{param}'.")
    text = {"type": "text", "text": "fine"}
    fine = {**body, "system": [text], "messages": [{"role": "user", "content": [text]}]}
    assert vllm_errors.validated(AnthropicMessagesRequest, fine).system[0].text == "fine"


def chat_answer(*arguments: str) -> Any:
    """vLLM's whole chat answer with a call of tool ``f`` for each of ``arguments``."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
    )
    from vllm.entrypoints.generate.base.protocol import FunctionCall, ToolCall
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    calls = [ToolCall(function=FunctionCall(name="f", arguments=text)) for text in arguments]
    message = ChatMessage(role="assistant", content="", tool_calls=calls)
    choice = ChatCompletionResponseChoice(index=0, message=message, finish_reason="tool_calls")
    return ChatCompletionResponse(model="m", choices=[choice], usage=UsageInfo(prompt_tokens=1, completion_tokens=2))


def test_a_messages_answer_gives_each_tool_call_its_arguments_as_input() -> None:
    def convert(answer: Any) -> list[str]:
        return [call.function.arguments for call in answer.choices[0].message.tool_calls]

    checked = vllm_errors.tool_inputs_checked(convert)
    assert checked(chat_answer('{"a": "x"}', "{}")) == ['{"a": "x"}', "{}"]


@pytest.mark.parametrize("arguments", ["false", "[1]", '"text"', '{"a": "x"', ""])
def test_tool_arguments_that_are_not_a_json_object_are_the_models_failure_not_the_clients(arguments: str) -> None:
    # A tool_use block's input must be an object; vLLM's own conversion raises
    # pydantic's error about `input` (or JSON's), read as the client's 400.
    def convert(answer: Any) -> Any:
        raise AssertionError("converted an answer it cannot represent")

    with pytest.raises(errors.InternalServerError) as raised:
        vllm_errors.tool_inputs_checked(convert)(chat_answer("{}", arguments))
    assert raised.value.status_code == 500
    assert "tool 'f'" in raised.value.message and "not a JSON object" in raised.value.message


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
@pytest.mark.parametrize(
    ("bias", "says"),
    [
        (500.0, "Invalid 'logit_bias.7': decimal above maximum value. Expected a value <= 100, but got 500 instead."),
        (-100.5, "Invalid 'logit_bias.7': decimal below minimum value. Expected a value >= -100, but got -100.5 instead."),
        (float("nan"), "Invalid value for 'logit_bias.7': Input should be a finite number"),
        (float("-inf"), "Invalid value for 'logit_bias.7': Input should be a finite number"),
        # vLLM's lax schema read these as 1.0 and 3.0.
        (True, "Invalid type for 'logit_bias.7': expected a number, but got a boolean instead."),
        ("3", "Invalid type for 'logit_bias.7': expected a number, but got a string instead."),
    ],
)
def test_a_logit_bias_outside_openais_range_is_refused_not_clamped(endpoint: str, bias: float, says: str) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    schema, prompt = (
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]})
        if endpoint == "chat" else (CompletionRequest, {"prompt": "hi"})
    )
    body = {"model": "m", **prompt, "logit_bias": {"5": 1.0, "7": bias}}
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(schema, body)
    assert (caught.value.param, caught.value.message) == ("logit_bias.7", says)


@pytest.mark.parametrize("key", ["050", " 50", "+50", "5_0", "\u0665\u0660", "x", "1" * 20])
def test_a_logit_bias_key_that_is_no_token_id_as_openai_writes_one_is_refused_not_read_as_one(key: str) -> None:
    # vLLM's int() read each of the first five as id 50: beside "50", one of the two biases was dropped.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50": 100, key: -100}}
    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(ChatCompletionRequest, body)
    assert caught.value.param == f"logit_bias.{key}"
    assert "decimal integer, without sign, spaces or leading zeros" in caught.value.message


@pytest.mark.parametrize("bias", [-100, 0, 2.5, 100])
def test_a_logit_bias_within_openais_range_is_the_engines_as_sent(bias: float) -> None:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    parsed = vllm_errors.validated(CompletionRequest, {"model": "m", "prompt": "hi", "logit_bias": {"5": bias, "0": 1}})
    assert parsed.logit_bias == {"5": bias, "0": 1}


@pytest.mark.parametrize(
    ("prompt", "param"), [([True, 2], "prompt[0]"), ([[3, 4], [5, False]], "prompt[1][1]")]
)
def test_a_boolean_among_token_ids_is_refused_not_read_as_an_id(prompt: list[Any], param: str) -> None:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    with pytest.raises(errors.InvalidRequestError) as caught:
        vllm_errors.validated(CompletionRequest, {"model": "m", "prompt": prompt})
    assert (caught.value.param, caught.value.code) == (param, "invalid_type")
    assert caught.value.message == f"Invalid type for '{param}': expected an integer, but got a boolean instead."
    assert vllm_errors.validated(CompletionRequest, {"model": "m", "prompt": [[3, 4], [5, 6]]}).prompt == [[3, 4], [5, 6]]


def test_an_engine_failure_vllm_cannot_turn_into_a_responses_event_is_the_engines_500() -> None:
    # vLLM's Responses stream, on a generation error mid-stream, validates
    # {"error": ...} as a stream event: that ValidationError is not the client's.
    from pydantic import TypeAdapter
    from vllm.entrypoints.openai.responses.protocol import StreamingResponsesResponse
    from vllm.exceptions import GenerationError

    try:
        try:
            raise GenerationError("Internal server error")
        except GenerationError:
            TypeAdapter(StreamingResponsesResponse).validate_json('{"error": {"message": "x", "code": 500}}')
    except Exception as exc:  # noqa: BLE001 - as vllm_streams.events catches it
        translated = vllm_errors.map_exception(exc, "input")
    assert translated.status_code == 500 and translated.param != "response"


def test_an_engine_that_stops_under_a_request_says_so_and_not_that_it_was_dead_before() -> None:
    # The ingress tries a replica's refusal (ENGINE_DEAD) on another, never this one (the request may be the cause).
    translated = vllm_errors.map_exception(EngineDeadError(), "prompt")
    assert translated.message == errors.ENGINE_DIED != errors.ENGINE_DEAD
