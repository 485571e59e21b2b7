"""Keys inside a request's objects that vLLM's schema would drop.

``gateway.protocol.extras`` refuses a top-level field vLLM does not know.
Inside the objects it parses, vLLM drops unknown keys just as silently: a
tool's misspelt ``paramters`` reached the model as a tool without
parameters, and ``structured_outputs.disable_any_whitespac`` left the
whitespace as it was, both answered 200. Such a key is refused here as
OpenAI refuses one, named by its path (``tools[0].function.paramters``).

``structured_outputs`` with no constraint, or two, was refused by vLLM in
words that printed its internal state (``'_backend': None``) and named no
field; it is refused here naming the field and the constraints it takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from gateway.errors import InvalidRequestError


# Keys vLLM's objects do not know that ask for nothing the answer lacks,
# taken as hints (``gateway.protocol.envelope.StreamOptions``): OpenAI's
# padding of stream events.
HINTS = {"stream_options": frozenset({"include_obfuscation"})}

# The constraints of ``structured_outputs``, of which vLLM takes exactly one.
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


# The response formats vLLM turns into a constraint of ``structured_outputs``.
FORMAT_CONSTRAINTS = frozenset({"json_object", "json_schema", "structural_tag"})


def check_structured_outputs(body: Mapping[str, Any]) -> None:
    """Refuses (400, before vLLM reads it) a ``structured_outputs`` object
    with a key vLLM's would drop, or not exactly one constraint (vLLM takes
    no settings alone), or beside a ``response_format`` that is a constraint
    too."""
    from vllm.sampling_params import StructuredOutputsParams

    given = body.get("structured_outputs")
    if not isinstance(given, dict):
        return  # vLLM's schema names it
    unknown = sorted(given.keys() - {f.name for f in dataclasses.fields(StructuredOutputsParams) if f.init})
    if unknown:
        place = f"structured_outputs.{unknown[0]}"
        raise InvalidRequestError(f"Unrecognized request argument supplied: {place}", param=place)
    constraints = [name for name in CONSTRAINTS if given.get(name) is not None]
    if len(constraints) != 1:
        said = ", ".join(f"'{name}'" for name in constraints) or "none"
        raise InvalidRequestError(
            f"Invalid 'structured_outputs': exactly one constraint is taken, one of "
            f"{', '.join(repr(name) for name in CONSTRAINTS)}; got {said}.",
            param="structured_outputs",
        )
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in FORMAT_CONSTRAINTS:
        # vLLM puts the format's constraint beside this one (refused with its internal state), or
        # over one of its kind (the client's own dropped unsaid).
        raise InvalidRequestError(
            f"Invalid 'response_format': a {kind!r} format is a constraint of its own; "
            "send it or 'structured_outputs', not both.",
            param="response_format",
        )


def check_nested_keys(body: Mapping[str, Any], parsed: BaseModel) -> None:
    """Refuses (400) the first key, below ``body``'s top level, that vLLM's
    parse of it (``parsed``) did not take."""
    for name, field in type(parsed).model_fields.items():
        key = field.alias or name
        if key in body and (place := _dropped(body[key], getattr(parsed, name), key)) is not None:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {place}", param=place)


def _dropped(raw: Any, parsed: Any, path: str) -> str | None:
    """The path of a key of ``raw`` that its parse ``parsed`` lacks; None when it has them all."""
    if isinstance(raw, list) and isinstance(parsed, list) and len(raw) == len(parsed):
        for index, (item, read) in enumerate(zip(raw, parsed)):
            if (place := _dropped(item, read, f"{path}[{index}]")) is not None:
                return place
        return None
    if not isinstance(raw, dict):
        return None
    if isinstance(parsed, BaseModel):
        extra = sorted((parsed.model_extra or {}).keys() - HINTS.get(path, frozenset()))
        if extra:
            return f"{path}.{extra[0]}"
        for name, field in type(parsed).model_fields.items():
            key = field.alias or name
            if key in raw and (place := _dropped(raw[key], getattr(parsed, name), f"{path}.{key}")) is not None:
                return place
        return None
    if dataclasses.is_dataclass(parsed) and not isinstance(parsed, type):
        taken = {f.name for f in dataclasses.fields(parsed) if f.init}
        unknown = sorted(raw.keys() - taken)
        return f"{path}.{unknown[0]}" if unknown else None
    return None


# Responses settings vLLM takes and never reads, by the values that ask for
# something: refused, as a top-level field the engine does not serve is
# (``gateway.protocol.extras``). Each one's default, and ``auto`` (what is
# available), is what the answer gives, so clients that send them pass.
UNSERVED_SETTINGS = {
    ("text", "verbosity"): (frozenset({"low", "high"}), "verbosity other than the model's own"),
    ("reasoning", "summary"): (frozenset({"concise", "detailed"}), "reasoning summaries"),
    ("reasoning", "generate_summary"): (frozenset({"concise", "detailed"}), "reasoning summaries"),
}


def check_responses_settings(body: Mapping[str, Any], tool_server: bool) -> None:
    """Refuses (400, naming it) a Responses setting vLLM would take and ignore:
    ``text.verbosity`` other than ``medium``, a ``concise`` or ``detailed``
    reasoning summary, a stored prompt template (``prompt``: vLLM only
    echoes it), and ``max_tool_calls`` where built-in tools run (it bounds
    only those, and vLLM only echoes it)."""
    for (field, key), (asking, what) in UNSERVED_SETTINGS.items():
        outer = body.get(field)
        if isinstance(outer, dict) and isinstance(outer.get(key), str) and outer[key] in asking:
            place = f"{field}.{key}"
            raise InvalidRequestError(
                f"Unsupported parameter: '{place}': this model does not serve {what}.",
                param=place,
                code="unsupported_parameter",
            )
    if body.get("prompt") is not None:  # vLLM's schema takes it, and only echoes it in the answer
        raise InvalidRequestError(
            "Unsupported parameter: 'prompt': this model does not serve stored prompt templates; "
            "send the prompt's text as `instructions` or `input`.",
            param="prompt",
            code="unsupported_parameter",
        )
    if tool_server and body.get("max_tool_calls") is not None:
        raise InvalidRequestError(
            "Unsupported parameter: 'max_tool_calls': this model does not bound its built-in tool calls.",
            param="max_tool_calls",
            code="unsupported_parameter",
        )
