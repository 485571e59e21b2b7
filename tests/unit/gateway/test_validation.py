"""A request pydantic refuses is answered as OpenAI answers it: the field's
path in the client's JSON, and the client's closest miss among the shapes a
field may take, on vLLM's own request schemas."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

from gateway.errors import InvalidRequestError
from gateway.validation import check_metadata, check_scalars, path_of, scalar_fields


def refused(schema: type[BaseModel], body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(ValidationError) as caught:
        schema.model_validate(body)
    return InvalidRequestError.from_validation(caught.value)


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("schema", "body", "param", "message"),
    [
        (ChatCompletionRequest, {"model": "m", "messages": [{"content": "x"}]},
         "messages[0].role", "Missing required parameter: 'messages[0].role'."),
        (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": 5}]},
         "messages[0].content",
         "Invalid type for 'messages[0].content': expected one of a string or an array, but got an integer instead."),
        (ChatCompletionRequest, {"model": "m", "messages": "hi"},
         "messages", "Invalid type for 'messages': expected an array, but got a string instead."),
        (ChatCompletionRequest, {"model": "m", "messages": USER, "stop": 5},
         "stop", "Invalid type for 'stop': expected one of a string or an array, but got an integer instead."),
        (ChatCompletionRequest, {"model": "m", "messages": USER, "tools": [{"type": "function"}]},
         "tools[0].function", "Missing required parameter: 'tools[0].function'."),
        (ChatCompletionRequest, {"model": "m", "messages": USER, "reasoning_effort": "huge"},
         "reasoning_effort", "Invalid value for 'reasoning_effort': 'huge'. Supported values are: "),
        (CompletionRequest, {"model": "m", "prompt": {"a": 1}},
         "prompt", "Invalid type for 'prompt': expected one of "),
        (ResponsesRequest, {"model": "m", "input": [{"role": "user"}]},
         "input[0].content", "Missing required parameter: 'input[0].content'."),
        (ResponsesRequest, {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
         "input[0].content[0].text", "Missing required parameter: 'input[0].content[0].text'."),
        (ResponsesRequest, {"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]},
         "input[0].output", "Missing required parameter: 'input[0].output'."),
        (ResponsesRequest, {"model": "m", "input": 5},
         "input", "Invalid type for 'input': expected one of a string or an array, but got an integer instead."),
        (ResponsesRequest, {"model": "m", "input": "x", "tools": [{"type": "function"}]},
         "tools[0].name", "Missing required parameter: 'tools[0].name'."),
        (ResponsesRequest, {"model": "m", "input": "x", "tools": [{"type": "nope"}]},
         "tools[0].type", "Invalid value for 'tools[0].type': 'nope'. Supported values are: 'function', "),
        # A message item of a role no message has: its role, not the string `input` might have been.
        (ResponsesRequest, {"model": "m", "input": [{"type": "message", "role": "wizard", "content": "x"}]},
         "input[0].role", "Invalid value for 'input[0].role': 'wizard'. Supported values are: "),
    ],
    ids=[
        "chat-role-missing", "chat-content-type", "chat-messages-type", "chat-stop-type", "chat-tool-function",
        "chat-literal", "completion-prompt-type", "responses-content-missing", "responses-part-text",
        "responses-item-output", "responses-input-type", "responses-tool-name", "responses-tool-type",
        "responses-item-role",
    ],
)
def test_the_closest_miss_is_named_by_its_path(
    schema: type[BaseModel], body: dict[str, Any], param: str, message: str
) -> None:
    error = refused(schema, body)
    assert error.param == param
    assert error.message.startswith(message), error.message
    assert "Param" not in error.message and "str]" not in error.message  # no pydantic shape names


class Text(BaseModel):
    type: Literal["text"]
    text: str


class Image(BaseModel):
    type: Literal["image"]
    url: str
    detail: str


class Body(BaseModel):
    model: str
    parts: list[Text | Image] | str
    n: int = 1


def test_a_part_naming_its_type_is_judged_as_that_type_only() -> None:
    error = refused(Body, {"model": "m", "parts": [{"type": "image"}]})
    assert (error.param, error.message) == ("parts[0].url", "Missing required parameter: 'parts[0].url'.")
    error = refused(Body, {"model": "m", "parts": [{"type": "text", "text": 1}]})
    assert error.param == "parts[0].text"
    assert error.message.startswith("Invalid type for 'parts[0].text': expected a string")


class Said(BaseModel):
    role: Literal["user"]
    text: str


class Heard(BaseModel):
    role: Literal["assistant"]
    text: str
    heard: bool


class Turns(BaseModel):
    turns: list[Said | Heard] | str


def test_a_role_no_shape_takes_is_named_where_every_shape_of_its_type_refuses_it() -> None:
    error = refused(Turns, {"turns": [{"role": "wizard", "text": "x"}]})
    assert (error.param, error.message) == (
        "turns[0].role", "Invalid value for 'turns[0].role': 'wizard'. Supported values are: 'user', 'assistant'."
    )
    # A role some shape takes still picks that shape.
    error = refused(Turns, {"turns": [{"role": "assistant", "text": "x"}]})
    assert (error.param, error.message) == ("turns[0].heard", "Missing required parameter: 'turns[0].heard'.")


class Limited(BaseModel):
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    tags: Annotated[list[str], Field(min_length=2)] = ["a", "b"]
    name: Annotated[str, Field(max_length=8)] = ""
    choice: Literal["auto", "none"] | dict[str, str] = "auto"


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        # The array shape took the array and refused its length: that, not "expected a string".
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop",
         "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length 5 "
         "instead."),
        ({"stop": 5}, "stop",
         "Invalid type for 'stop': expected one of a string or an array, but got an integer instead."),
        ({"tags": []}, "tags",
         "Invalid 'tags': empty array. Expected an array with minimum length 2, but got an empty array instead."),
        ({"tags": ["a"]}, "tags",
         "Invalid 'tags': array too short. Expected an array with minimum length 2, but got an array with length 1 "
         "instead."),
        ({"name": "x" * 9}, "name",
         "Invalid 'name': string too long. Expected a string with maximum length 8, but got a string with length 9 "
         "instead."),
        # A string no literal takes is that value, not "expected an object".
        ({"choice": "sometimes"}, "choice",
         "Invalid value for 'choice': 'sometimes'. Supported values are: 'auto', 'none'."),
    ],
    ids=["array-too-long-in-a-union", "no-shape-of-its-type", "empty-array", "array-too-short", "string-too-long",
         "literal-in-a-union"],
)
def test_a_value_a_shape_of_its_type_refuses_is_named_as_openai_names_it(
    body: dict[str, Any], param: str, message: str
) -> None:
    error = refused(Limited, body)
    assert (error.param, error.message) == (param, message)


class Bounded(BaseModel):
    n: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(le=2)] = 1.0


@pytest.mark.parametrize(
    ("schema", "body", "code"),
    [
        (ChatCompletionRequest, {"model": "m", "messages": [{"content": "x"}]}, "missing_required_parameter"),
        (ChatCompletionRequest, {"model": "m", "messages": "hi"}, "invalid_type"),
        (ChatCompletionRequest, {"model": "m", "messages": USER, "reasoning_effort": "huge"}, "invalid_value"),
        (Limited, {"tags": []}, "empty_array"),
        (Limited, {"stop": ["a"] * 5}, "array_above_max_length"),
        (Limited, {"name": "x" * 9}, "string_above_max_length"),
        (Limited, {"tags": ["a"]}, None),  # no code OpenAI is known to send for it
        (Bounded, {"n": 0}, "integer_below_min_value"),
        (Bounded, {"temperature": 3}, "decimal_above_max_value"),
    ],
    ids=["missing", "type", "literal", "empty-array", "array-too-long", "string-too-long", "array-too-short",
         "integer-below", "decimal-above"],
)
def test_a_refusal_carries_openais_code_for_its_kind(schema: type[BaseModel], body: dict[str, Any], code: str | None) -> None:
    assert refused(schema, body).code == code


def test_the_first_field_pydantic_found_wrong_is_the_one_reported() -> None:
    error = refused(Body, {"parts": [{"type": "image"}], "n": "x"})
    assert error.message == "Missing required parameter: 'model'."


@pytest.mark.parametrize(
    ("schema", "field", "item", "many"),
    [
        (ChatCompletionRequest, "messages", {"role": "wizard", "content": 1}, 1_000),
        (ResponsesRequest, "input", {"type": "nope", "role": "wizard", "content": 1}, 200),
    ],
)
def test_many_wrong_items_are_answered_as_their_first_alone(
    schema: type[BaseModel], field: str, item: dict[str, Any], many: int
) -> None:
    # Every item's shapes were weighed against every other's: a 34 KB body of
    # wrong messages held the replica's event loop for minutes.
    alone = refused(schema, {"model": "m", field: [item]})
    crowded = refused(schema, {"model": "m", field: [{"role": "user", "content": "hi"}] + [item] * many})
    assert (crowded.param, str(crowded)) == (alone.param.replace("[0]", "[1]"), str(alone).replace("[0]", "[1]"))


def test_a_body_that_is_not_an_object_has_no_param() -> None:
    error = refused(Body, [1, 2])  # type: ignore[arg-type]
    assert error.param is None and "valid dictionary" in error.message


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("messages", 0, "ChatCompletionUserMessageParam", "content", "list[union[...]]", 1, "text"),
         "messages[0].content[1].text"),
        (("prompt", "list[constrained-int]", 1), "prompt[1]"),
        (("logit_bias", "50256"), "logit_bias.50256"),
        ((0, "ChatCompletionContentPartTextParam", "text"), "[0].text"),
    ],
)
def test_a_location_is_written_as_a_path_into_the_json(loc: tuple[int | str, ...], path: str) -> None:
    assert path_of(loc) == path


@pytest.mark.parametrize(
    ("schema", "field", "value", "words"),
    [
        (ChatCompletionRequest, "max_tokens", True, "expected an integer, but got a boolean"),  # lax mode: 1
        (ChatCompletionRequest, "n", "2", "expected an integer, but got a string"),
        (ChatCompletionRequest, "temperature", "0.5", "expected a number, but got a string"),
        (ChatCompletionRequest, "top_p", False, "expected a number, but got a boolean"),
        (ChatCompletionRequest, "logprobs", "yes", "expected a boolean, but got a string"),
        (ChatCompletionRequest, "logprobs", 1, "expected a boolean, but got an integer"),
        (CompletionRequest, "logprobs", True, "expected an integer, but got a boolean"),
        (CompletionRequest, "echo", "true", "expected a boolean, but got a string"),
        (ResponsesRequest, "max_output_tokens", True, "expected an integer, but got a boolean"),
    ],
)
def test_a_scalar_pydantic_would_convert_is_refused_naming_it(
    schema: type[BaseModel], field: str, value: Any, words: str
) -> None:
    prompt = {ChatCompletionRequest: {"messages": USER}, CompletionRequest: {"prompt": "hi"}}.get(schema, {"input": "hi"})
    assert schema.model_validate({"model": "m", **prompt, field: value})  # pydantic alone takes it
    refusal = check_scalars(schema, {"model": "m", field: value})
    assert refusal == (f"Invalid type for '{field}': {words} instead.", field, "invalid_type")


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 3), ("max_tokens", 3.0), ("temperature", 1), ("temperature", 0.5), ("logprobs", False),
     ("n", None), ("seed", 2**70), ("messages", "a string: not a scalar field"), ("unknown", True)],
)
def test_scalars_of_the_type_their_field_takes_pass(field: str, value: Any) -> None:
    assert check_scalars(ChatCompletionRequest, {field: value}) is None


def test_a_schemas_scalar_fields_are_read_once_by_the_name_a_client_sends() -> None:
    class Schema(BaseModel):
        count: int | None = None
        ratio: Annotated[float, Field(ge=0)] = 0.0
        flag: bool = False
        both: int | float = 0
        words: str | None = None
        either: int | str = 0
        aliased: int = Field(0, alias="sent_as")

    fields = scalar_fields(Schema)
    assert fields == {
        "count": "an integer", "ratio": "a number", "flag": "a boolean", "both": "a number", "sent_as": "an integer",
    }
    assert scalar_fields(Schema) is fields


@pytest.mark.parametrize(
    ("metadata", "param", "code", "words"),
    [
        ("team-a", "metadata", "invalid_type", "expected an object, but got a string"),
        ({f"k{i}": "v" for i in range(17)}, "metadata", "object_above_max_properties", "at most 16 properties"),
        ({"k" * 65: "v"}, "metadata", "string_above_max_length", "a key with length 65"),
        ({"team": 5}, "metadata.team", "invalid_type", "expected a string, but got an integer"),
        ({"team": "v" * 513}, "metadata.team", "string_above_max_length", "maximum length 512"),
    ],
)
def test_metadata_beyond_openais_bounds_is_refused_in_its_words(
    metadata: object, param: str, code: str, words: str
) -> None:
    refusal = check_metadata({"metadata": metadata})
    assert refusal is not None and (refusal.param, refusal.code) == (param, code)
    assert words in refusal.message


def test_metadata_within_openais_bounds_passes() -> None:
    assert check_metadata({"metadata": {f"k{i}": "v" * 512 for i in range(16)}}) is None
    assert check_metadata({"metadata": {"k" * 64: ""}}) is None
    assert check_metadata({"metadata": None}) is None and check_metadata({}) is None

