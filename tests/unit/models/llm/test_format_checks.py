"""models/llm/format_checks.py: a JSON-schema output format without its schema, refused naming it."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequestError
from models.llm.format_checks import check_output_schema

SCHEMA = {"type": "object", "properties": {}}


@pytest.mark.parametrize("endpoint", ["chat", "completion"])  # completions take response_format too
def test_a_json_schema_without_schema_is_refused_naming_it(endpoint: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_output_schema(endpoint, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert refused.value.param == "response_format.json_schema.schema"
    assert refused.value.code == "missing_required_parameter"


@pytest.mark.parametrize("endpoint", ["messages", "messages_count"])
@pytest.mark.parametrize("fmt", [{"type": "json_schema"}, {"type": "json_schema", "schema": {}}], ids=["none", "empty"])
def test_a_messages_json_schema_format_without_schema_is_refused(endpoint: str, fmt: dict[str, object]) -> None:
    # vLLM takes an empty schema for no format at all: the answer was free text.
    with pytest.raises(InvalidRequestError) as refused:
        check_output_schema(endpoint, {"output_config": {"format": fmt}})
    assert refused.value.param == "output_config.format.schema"


def test_formats_with_their_schema_and_others_pass() -> None:
    named = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    check_output_schema("chat", {"response_format": named})
    check_output_schema("chat", {"response_format": {"type": "json_object"}})
    check_output_schema("chat", {})
    check_output_schema("messages", {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}})
    check_output_schema("messages", {"output_config": {"effort": "low"}})


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "json_object", "schema": SCHEMA}, "response_format.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strcit": True}},
         "response_format.json_schema.strcit"),
    ],
)
def test_a_format_key_vllm_would_drop_is_refused_naming_it(fmt: dict[str, object], param: str) -> None:
    # vLLM dropped it: a json_object given a schema was answered with any JSON object.
    with pytest.raises(InvalidRequestError) as refused:
        check_output_schema("chat", {"response_format": fmt})
    assert (refused.value.param, refused.value.message) == (param, f"Unrecognized request argument supplied: {param}")
    check_output_schema("completion", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "description": "d", "schema": SCHEMA, "strict": True}}})
    check_output_schema("chat", {"response_format": {"type": "structural_tag", "format": {}}})
