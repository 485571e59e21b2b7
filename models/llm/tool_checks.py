"""Tool calls asked of a model that cannot make them: refused naming the field,
in the words of the gateway's configuration.

vLLM makes tool calls with a tool-call parser (a model's ``tool_call_parser``
in the gateway's configuration), or without one for a Mistral tokenizer or a
gpt-oss (harmony) model. Without it, vLLM refuses a ``tool_choice`` that asks
for calls ("auto", the default with ``tools``; "required"; a named tool) in
its command line's words, naming no field: '"auto" tool choice requires
--enable-auto-tool-choice and --tool-call-parser to be set', flags a client
never sees and a gateway's operator does not set. Here such a request is
refused before vLLM sees it, naming ``tool_choice`` (``tools`` when the
client left the choice to the default) and the setting that would serve it.
A ``tool_choice`` of "none" is served as vLLM serves it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import InvalidRequestError


def asks_for_calls(endpoint: str, request: Any) -> bool:
    """Whether ``request`` (vLLM-parsed) asks the model to call tools: chat's
    ``tool_choice`` other than "none" (vLLM's schema makes it "auto" when
    ``tools`` come without one); the Messages API's ``tools`` with a choice
    that is not ``{"type": "none"}``; the Responses API's function tools
    (``_RENDERED``) with a choice other than "none" (vLLM answered those as
    plain text, a ``required`` or named choice ignored)."""
    if endpoint == "chat":
        return getattr(request, "tool_choice", None) not in (None, "none")
    if endpoint in ("messages", "messages_count"):  # (a count renders as its request would)
        choice = getattr(request, "tool_choice", None)
        return bool(getattr(request, "tools", None)) and getattr(choice, "type", None) != "none"
    if endpoint == "responses":
        tools = getattr(request, "tools", None) or ()
        rendered = any(getattr(tool, "type", None) in _RENDERED for tool in tools)
        return rendered and getattr(request, "tool_choice", None) != "none"
    return False


def check_tool_calls(endpoint: str, body: Mapping[str, Any], request: Any, model: str, calls_tools: bool) -> None:
    """Refuses (400, ``unsupported_parameter``) a request that asks for tool
    calls of a model that cannot make them (``calls_tools`` False)."""
    if calls_tools or not asks_for_calls(endpoint, request):
        return
    field = "tool_choice" if body.get("tool_choice") is not None else "tools"
    none = '{"type": "none"}' if endpoint.startswith("messages") else '"none"'
    raise InvalidRequestError(
        f"Unsupported parameter: '{field}': the model `{model}` is not set up to call tools (its "
        f"`tool_call_parser` is not set in the gateway's configuration). Send `tool_choice` {none} "
        "to give it the tools without calls.",
        param=field,
        code="unsupported_parameter",
    )


# The Responses API tool types vLLM renders without a tool server.
_RENDERED = ("function", "custom", "namespace")


def check_builtin_tools(body: Mapping[str, Any], model: str) -> None:
    """Refuses (400, ``unsupported_parameter``, naming ``tools[i].type``) a
    Responses API tool vLLM does not render on a model whose engine runs no
    tool server (vLLM's ``--tool-server``, for gpt-oss models): it renders
    only ``function`` tools then (``custom`` ones as a function of one
    string, a ``namespace``'s functions by their flattened names), and
    answered as if a ``web_search`` or ``file_search`` tool had not been sent."""
    tools = body.get("tools")
    for at, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind not in _RENDERED:
            raise InvalidRequestError(
                f"Unsupported parameter: 'tools[{at}].type': the model `{model}` runs no built-in tools "
                f"('{kind}'); only 'function', 'custom' and 'namespace' tools are served.",
                param=f"tools[{at}].type",
                code="unsupported_parameter",
            )


def check_anthropic_tools(body: Mapping[str, Any]) -> None:
    """Refuses (400, in Anthropic's words) what Anthropic's API refuses and
    vLLM's Messages layer served: two tools of one name (vLLM kept both, and a
    call could mean either), a ``tool_choice`` that asks for a call with no
    ``tools`` (answered as plain text), a ``tool_result`` block whose
    ``tool_use_id`` no ``tool_use`` of the assistant turn before it has
    (rendered as an answer to nothing), one after other content in its turn
    or a call the turn after leaves unanswered (``_check_results``), and one
    holding blocks vLLM drops (``document``, ``search_result``: the model
    saw an empty result)."""
    tools = body.get("tools")
    names = [tool.get("name") for tool in tools if isinstance(tool, dict)] if isinstance(tools, list) else []
    if len(set(names)) < len(names):
        raise InvalidRequestError("tools: Tool names must be unique.", param="tools")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool") and not tools:
        raise InvalidRequestError(
            f"tool_choice: `{choice.get('type')}` asks for a tool call, but no `tools` were given.",
            param="tool_choice",
        )
    _check_results(body.get("messages"))


def _check_results(messages: Any) -> None:
    """Each ``tool_result`` answers a ``tool_use`` of the assistant turn
    before it and comes first in its user turn, and that user turn answers
    each of those calls (vLLM rendered an answer to nothing, moved a result
    before the text sent ahead of it, and let a call go unanswered). A
    conversation may end on calls. Consecutive messages of one role are one
    turn, as Anthropic combines them (a client may send parallel calls'
    results as several user messages)."""
    asked: dict[Any, int] = {}  # the tool_use ids of the assistant turn before, and the message of each
    for role, turn in _turns(messages):
        if role == "assistant":
            asked = {b.get("id"): at for at, blocks in turn for b in blocks or () if b.get("type") == "tool_use"}
            continue
        if role == "system":
            continue  # (vLLM may move it before the conversation: the calls are answered by the user turn after)
        if role == "user":
            _check_user_turn(turn, asked)
        asked = {}


def _turns(messages: Any) -> list[tuple[Any, list[tuple[int, list[Any] | None]]]]:
    """Messages as turns: each turn's role and its messages' blocks (None: text content) by index."""
    turns: list[tuple[Any, list[tuple[int, list[Any] | None]]]] = []
    for at, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict):
            continue  # vLLM's schema refuses it
        content = message.get("content")
        blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else None
        _check_ids(blocks or [], at)
        if turns and turns[-1][0] == message.get("role"):
            turns[-1][1].append((at, blocks))
        else:
            turns.append((message.get("role"), [(at, blocks)]))
    return turns


def _check_user_turn(turn: list[tuple[int, list[Any] | None]], asked: dict[Any, int]) -> None:
    first, answered = True, set()
    for at, blocks in turn:
        for place, block in enumerate(blocks if blocks is not None else [None]):
            if block is None or block.get("type") != "tool_result":
                first = False
                continue
            where = f"messages.{at}.content.{place}"
            _check_result_blocks(block.get("content"), f"messages[{at}].content[{place}].content")
            if block.get("tool_use_id") not in asked:
                raise InvalidRequestError(
                    f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                    "`tool_use` block in the previous message.",
                    param=f"messages[{at}].content[{place}].tool_use_id",
                )
            if not first:
                raise InvalidRequestError(
                    f"{where}: `tool_result` blocks must come first in a user turn, before any other content.",
                    param=f"messages[{at}].content[{place}]",
                )
            answered.add(block.get("tool_use_id"))
    missing = [call for call in asked if call not in answered]
    if missing:
        at = asked[missing[0]]
        raise InvalidRequestError(
            f"messages.{at}: `tool_use` ids were found without `tool_result` blocks immediately after: "
            f"{', '.join(str(call) for call in missing)}. Each `tool_use` block must have a corresponding "
            "`tool_result` block in the next message.",
            param=f"messages[{at}]",
        )


# What vLLM renders of a tool_result's blocks; it drops any other.
_RESULT_BLOCKS = ("text", "image", "tool_reference")


def _check_result_blocks(content: Any, where: str) -> None:
    for at, item in enumerate(content if isinstance(content, list) else ()):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in _RESULT_BLOCKS:
            raise InvalidRequestError(
                f"{where}.{at}: a `tool_result` here holds `text`, `image` and `tool_reference` blocks; "
                f"this model's server does not read {f'`{kind}`' if isinstance(kind, str) else 'this'} blocks "
                "in one (send the document's text as a `text` block).",
                param=f"{where}[{at}].type",
            )


def check_tool_schemas(endpoint: str, body: Mapping[str, Any]) -> None:
    """Refuses (400, naming the schema's place) a function tool whose
    parameters are not a JSON Schema of an object, as OpenAI and Anthropic
    refuse them (OpenAI's code ``invalid_function_parameters``): vLLM took
    any, and a grammar it could not make of one failed at generation."""
    tools = body.get("tools")
    for at, tool in enumerate(tools if isinstance(tools, list) else ()):
        place = _schema_place(endpoint, tool, at)
        if place is None:
            continue
        name, schema, param = place
        problem = _schema_problem(schema)
        if problem is None:
            continue
        if endpoint.startswith("messages"):
            raise InvalidRequestError(f"tools.{at}.input_schema: {problem}", param=param)
        raise InvalidRequestError(
            f"Invalid schema for function '{name}': {problem}", param=param, code="invalid_function_parameters"
        )


def _schema_place(endpoint: str, tool: Any, at: int) -> tuple[Any, Any, str] | None:
    """A tool's name, parameters schema and its place in the body; None where it has none to check."""
    if not isinstance(tool, dict):
        return None
    if endpoint == "chat":
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("parameters"), dict):
            return None
        return function.get("name"), function["parameters"], f"tools[{at}].function.parameters"
    if endpoint.startswith("responses") and tool.get("type") == "function" and isinstance(tool.get("parameters"), dict):
        return tool.get("name"), tool["parameters"], f"tools[{at}].parameters"
    if endpoint.startswith("messages") and isinstance(tool.get("input_schema"), dict):
        return tool.get("name"), tool["input_schema"], f"tools[{at}].input_schema"
    return None


_ID_FIELDS = {"tool_use": "id", "tool_result": "tool_use_id"}


def _check_ids(blocks: list[dict[str, Any]], at: int) -> None:
    """Refuses, as Anthropic's API does, a ``tool_use`` block without its
    ``id`` or a ``tool_result`` without its ``tool_use_id``: vLLM made up a
    call id for the one and rendered the other as an answer to nothing, so
    the two paired on the missing value."""
    for place, block in enumerate(blocks):
        field = _ID_FIELDS.get(str(block.get("type")))
        if field is not None and block.get(field) is None:
            raise InvalidRequestError(
                f"messages.{at}.content.{place}.{block.get('type')}.{field}: Field required",
                param=f"messages[{at}].content[{place}].{field}",
            )


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """What makes ``schema`` no JSON Schema of an object; None when it is one
    (or says no ``type``: a function of no parameters may send ``{}``)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    kind = schema.get("type")
    if kind is not None and kind != "object":
        return f"schema must be a JSON Schema of 'type: \"object\"', got 'type: {json.dumps(kind)}'."
    try:
        # The draft the schema names (2020-12 where it names none); formats
        # unchecked: a `pattern` is ECMA-262's (`\p{L}`, named groups), not Python's.
        named = isinstance(schema.get("$schema", ""), str)  # (one that is no string: the metaschema says so)
        draft = validator_for(schema, default=Draft202012Validator) if named else Draft202012Validator
        draft.check_schema(schema, format_checker=None)
    except SchemaError as error:
        where = "/".join(str(part) for part in error.path)
        return f"{error.message}{f' (at {where})' if where else ''}."
    except RecursionError:  # the check recurses several frames a level
        return "schema is nested too deeply to check."
    return None


def check_named_choice(body: Mapping[str, Any]) -> None:
    """Refuses (400, naming ``tool_choice.name``) a Responses API
    ``tool_choice`` naming a tool that ``tools`` does not have: vLLM's words
    for it name the type, "Tool choice 'function' not found", whatever the
    name. A namespace's function may be named by its own name or its
    flattened one (vLLM resolves which)."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict) or choice.get("type") not in ("function", "custom"):
        return
    name = choice.get("name")
    if not isinstance(name, str) or not name:
        return  # vLLM's schema refuses it
    from vllm.tool_parsers.utils import flat_namespace_tool_name

    tools = body.get("tools")
    names: set[Any] = set()
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        names.add(tool.get("name"))
        inners = (tool.get("tools") or ()) if tool.get("type") == "namespace" else ()
        for inner in inners:
            if isinstance(inner, dict) and isinstance(inner.get("name"), str) and isinstance(tool.get("name"), str):
                names.update((inner["name"], flat_namespace_tool_name(tool["name"], inner["name"])))
    if name not in names:
        raise InvalidRequestError(f"Tool choice '{name}' not found in 'tools' parameter.", param="tool_choice.name")
