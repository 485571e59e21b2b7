"""A structured output format that names a JSON schema and gives none:
refused naming the missing field, before vLLM reads the request.

- chat's ``response_format: {"type": "json_schema", "json_schema": {"name":
  ...}}`` without ``schema``: vLLM refused it in the words of its own
  internals ("You must use one kind of structured outputs constraint but none
  are specified: {'json': None, ... '_backend': None ...}", no field named).
- the Messages API's ``output_config.format`` of ``type: "json_schema"``
  without ``schema``: vLLM answered unconstrained text, the format dropped
  unsaid; Anthropic's API requires the schema.

A key of chat's or a completion's ``response_format`` that vLLM would drop
(``{"type": "json_object", "schema": ...}``) is refused naming it too.

The Responses API's ``text.format`` is refused by vLLM's own schema, naming
``text.format.schema`` already.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.errors import InvalidRequestError


def check_output_schema(endpoint: str, body: Mapping[str, Any]) -> None:
    """Raises InvalidRequestError (400) for a JSON-schema output format without its schema."""
    if endpoint in ("chat", "completion"):
        fmt = body.get("response_format")
        _check_format_keys(fmt)
        spec = fmt.get("json_schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
        if isinstance(spec, dict) and spec.get("schema") is None:
            raise InvalidRequestError(
                "Missing required parameter: 'response_format.json_schema.schema'.",
                param="response_format.json_schema.schema",
                code="missing_required_parameter",
            )
    elif endpoint.startswith("messages"):
        config = body.get("output_config")
        fmt = config.get("format") if isinstance(config, dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and fmt.get("schema") is None:
            raise InvalidRequestError(
                "output_config.format.schema: Field required", param="output_config.format.schema"
            )
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and fmt.get("schema") == {}:
            # vLLM takes an empty schema for no format: the answer would be free text.
            raise InvalidRequestError(
                "output_config.format.schema: the schema is empty; give the JSON schema the output must follow",
                param="output_config.format.schema",
            )


# The keys of OpenAI's response formats (vLLM reads these and drops any other:
# a ``json_object`` given a ``schema``, as some providers take it, would be
# answered with any JSON object).
_FORMAT_KEYS = frozenset({"type", "json_schema"})
_SCHEMA_KEYS = frozenset({"name", "description", "schema", "strict"})


def _check_format_keys(fmt: Any) -> None:
    """Refuses (400, naming it by its path) a key of a ``text``,
    ``json_object`` or ``json_schema`` response format that vLLM would drop."""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        return  # (vLLM's schema refuses the rest, or reads its structural tags whole)
    spec = fmt.get("json_schema")
    unknown = [f"response_format.{key}" for key in sorted(fmt.keys() - _FORMAT_KEYS)]
    if isinstance(spec, dict):
        unknown += [f"response_format.json_schema.{key}" for key in sorted(spec.keys() - _SCHEMA_KEYS)]
    if unknown:
        raise InvalidRequestError(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
