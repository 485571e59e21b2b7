"""vLLM's errors as the gateway's: by vLLM's own error objects (their status
and parameter), never by a message's words; and a failed response's ``error``."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from gateway import errors
from gateway.protocol.envelope import LogitBias
from gateway.validation import check_scalars, describe, json_type

logger = logging.getLogger(__name__)


# vLLM's errors as the gateway's, by vLLM's own error objects (``ErrorResponse``:
# its status as ``code``, ``param``): the first row that matches wins. vLLM
# builds those objects from its exceptions by type (``create_error_response``:
# VLLMValidationError 400 naming its parameter, VLLMNotFoundError 404, ...),
# so a row never depends on a message's words.
ANY = None  # a row's param matches any


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """vLLM errors with a status in ``statuses`` and, unless ``params`` is
    ANY, one of ``params`` become ``make(message, param, status)``."""

    statuses: range
    params: frozenset[str | None] | None
    make: Callable[[str, str | None, int], errors.GatewayError]
    # The row's errors name the request's prompt parameter (``messages``,
    # ``prompt``, ``input``), as OpenAI's do, not vLLM's internal name.
    names_prompt: bool = False


def _only(status: int) -> range:
    return range(status, status + 1)


# vLLM's parameters for a prompt longer than the window (renderers/params.py).
CONTEXT_PARAMS = frozenset({"input_tokens", "input_text"})

ERROR_TABLE: tuple[ErrorRow, ...] = (
    ErrorRow(_only(404), frozenset({"response_id"}), lambda m, p, s: errors.ResponseNotFoundError(m, param=p)),
    ErrorRow(_only(404), ANY, lambda m, p, s: errors.ModelNotFoundError(m, param="model")),
    ErrorRow(_only(400), CONTEXT_PARAMS, lambda m, p, s: errors.ContextLengthExceededError(m, param=p), names_prompt=True),
    ErrorRow(range(400, 500), ANY, lambda m, p, s: errors.InvalidRequestError(m, param=p, status=s)),
    # A feature the model lacks is the client's to change, never retried.
    ErrorRow(_only(501), ANY, lambda m, p, s: errors.NotImplementedFeatureError(m)),
    ErrorRow(_only(503), ANY, lambda m, p, s: errors.ServiceUnavailableError(m)),
)


def map_error(envelope: dict[str, Any], prompt_param: str | None = None) -> errors.GatewayError:
    """vLLM's error object (``{"error": {"message", "type", "param", "code"}}``,
    ``code`` its HTTP status, or the inner dict) as a gateway error, by
    ``ERROR_TABLE``; anything else is a 500 whose details stay in the log."""
    error = envelope.get("error", envelope)
    status = int(error.get("code") or 500)
    message = _without_debugging_suffix(str(error.get("message") or ""), error.get("param"))
    param = error.get("param")
    for row in ERROR_TABLE:
        if status in row.statuses and (row.params is ANY or param in row.params):
            return row.make(message, (prompt_param or param) if row.names_prompt else param, status)
    logger.error("engine error (%d): %s", status, message)
    return errors.InternalServerError("The model failed while serving the request.")


def _without_debugging_suffix(message: str, param: str | None) -> str:
    """``message`` without the " (parameter=..., value=...)" that str() of
    vLLM's ``VLLMValidationError`` appends, when it names the error's own
    ``param``: the value (however large) is the client's own."""
    suffix = f" (parameter={param}"
    if param is not None and message.endswith(")") and suffix in message:
        return message[: message.rindex(suffix)]
    return message


def map_exception(exc: BaseException, prompt_param: str | None = None) -> errors.GatewayError:
    """An exception raised by vLLM's serving layer (or by the gateway's checks
    inside it) as a gateway error: the gateway's own pass as they are,
    pydantic's name the field, a dead engine is 503 (the replica is about to
    be replaced), and the rest go through vLLM's own mapping, then
    ``ERROR_TABLE``."""
    if isinstance(exc, errors.GatewayError):
        return exc
    if isinstance(exc, ValidationError):
        if (failure := _failure_as_event(exc)) is not None:
            return map_error(failure, prompt_param)
        return errors.InvalidRequestError.from_validation(exc)
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return errors.ServiceUnavailableError(errors.ENGINE_DIED)
    response = create_error_response(exc if isinstance(exc, Exception) else Exception(str(exc)))
    if response.error.code >= 500:
        logger.error("engine failure", exc_info=exc)
    return map_error(response.model_dump(), prompt_param)


def _failure_as_event(exc: ValidationError) -> dict[str, Any] | None:
    """vLLM's own error body, where its Responses stream failed to read it as
    a stream event: on an engine failure mid-generation it validates
    ``{"error": ...}`` as one, which no event is. The failure is the
    engine's (a 500), not a field the client left out."""
    for error in exc.errors():
        found = error.get("input")
        if isinstance(found, dict) and set(found) == {"error"} and isinstance(found["error"], dict):
            return found
    return None


def validated(schema: Any, body: dict[str, Any]) -> Any:
    """``schema.model_validate(body)``; where one of vLLM's own validators,
    run before the fields', fails on a field of the wrong JSON type
    (``messages: null`` raises TypeError in vLLM's chat schema, a tool
    without ``function`` a KeyError beside a named ``tool_choice``), the field is
    named as pydantic would have named it, and a bad tool call of an
    assistant message by its path (``messages[0].tool_calls[1].function``);
    a ``logit_bias`` outside OpenAI's range is refused, not clamped."""
    if (wrong := check_scalars(schema, body)) is not None:  # pydantic's lax mode would convert it
        raise errors.InvalidRequestError(wrong.message, param=wrong.param, code=wrong.code)
    if (not_an_array := _calls_not_an_array(body)) is not None:  # before vLLM's validator makes a list of them
        raise not_an_array
    try:
        parsed = schema.model_validate(body)
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        # (a tool without its function, read by vLLM's tool_choice validator)
        raise _wrong_field(schema, body) or exc from None
    except ValidationError as exc:
        # An assistant message's tool_calls: vLLM's own validator reads them
        # whole after the fields, and its error has lost where they were; and
        # a string or an object there is read as the array of its characters or keys.
        if any(_of_tool_calls(error["loc"]) for error in exc.errors()):
            raise _bad_tool_calls(body) or exc from None
        raise
    _read_content_parts(parsed)
    bias = body.get("logit_bias")
    if getattr(parsed, "logit_bias", None) and isinstance(bias, dict):  # as sent: vLLM converts and clamps
        _checked(("logit_bias",), lambda: _LOGIT_BIAS.validate_python(bias))
    _check_no_boolean_ids(body)
    return parsed


_LOGIT_BIAS = TypeAdapter(LogitBias)


def _check_no_boolean_ids(body: dict[str, Any]) -> None:
    """Refuses a boolean where token ids go (a completion's ``prompt``,
    ``/detokenize``'s ``tokens``): vLLM's lax schema reads true as id 1."""
    for field in ("prompt", "tokens"):
        value = body.get(field)
        rows = value if isinstance(value, list) else ()
        for index, row in enumerate(rows):
            places = [(f"{field}[{index}]", row)]
            if isinstance(row, list):
                places = [(f"{field}[{index}][{at}]", one) for at, one in enumerate(row)]
            for param, one in places:
                if isinstance(one, bool):
                    raise errors.InvalidRequestError(
                        f"Invalid type for '{param}': expected an integer, but got a boolean instead.",
                        param=param,
                        code="invalid_type",
                    )


def _of_tool_calls(loc: tuple[int | str, ...]) -> bool:
    """Whether an error's location is in tool calls, or starts at a place in
    a list rather than at a field (the list's own place lost)."""
    return "tool_calls" in loc or (bool(loc) and isinstance(loc[0], int))


def _calls_not_an_array(body: dict[str, Any]) -> errors.InvalidRequestError | None:
    """The first message's ``tool_calls`` that is neither an array nor null,
    as a 400 saying so: vLLM reads any message's as a list (a string as its
    characters, an object as its keys; a number fails in Python's words)."""
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls is not None and not isinstance(calls, list):
            param = f"messages[{index}].tool_calls"
            return errors.InvalidRequestError(
                f"Invalid type for '{param}': expected an array, but got {json_type(calls)} instead.",
                param=param,
                code="invalid_type",
            )
    return None


def _bad_tool_calls(body: dict[str, Any]) -> errors.InvalidRequestError | None:
    """The first assistant message's ``tool_calls`` that OpenAI's tool call
    types refuse, as a 400 naming the call's field by its path."""
    from openai.types.chat import ChatCompletionMessageToolCallUnionParam

    calls_type = TypeAdapter(list[ChatCompletionMessageToolCallUnionParam])
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list) and message.get("role") == "assistant":
            try:
                _checked(("messages", index, "tool_calls"), lambda: calls_type.validate_python(calls))
            except errors.InvalidRequestError as error:
                return error
    return None


def _read_content_parts(parsed: Any) -> None:
    """Checks every chat message's content parts now. vLLM's chat schema
    leaves some (a lone part) to be checked as they are read, rendering the
    prompt, where a bad part is named by its place in its own list only
    (``[0].text``), and drops a text part without its text; here each is
    named by its path (``messages[1].content[0].text``)."""
    _check_text_blocks("system", getattr(parsed, "system", None))
    for index, message in enumerate(getattr(parsed, "messages", None) or ()):
        if not isinstance(message, dict):  # Anthropic's: blocks, checked whole
            _check_text_blocks(f"messages[{index}].content", getattr(message, "content", None))
            continue
        content: Any = message.get("content")
        if content is None or isinstance(content, str):
            continue
        where: tuple[int | str, ...] = ("messages", index, "content")
        if not isinstance(content, list):  # read once, here; vLLM reads the list
            content = message["content"] = _checked(where, lambda: list(content), _read_part_types)
        for at, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text":
                _checked((*where, at), lambda: _TEXT_PART.validate_python(part))


def _check_text_blocks(path: str, blocks: Any) -> None:
    """Refuses an Anthropic ``text`` block without its text (vLLM's schema
    lets it through, then drops it)."""
    if not isinstance(blocks, list):
        return
    for at, block in enumerate(blocks):
        if getattr(block, "type", None) == "text" and not isinstance(getattr(block, "text", None), str):
            param = f"{path}[{at}].text"
            raise errors.InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)


class _TextPart(TypedDict):
    type: Literal["text"]
    text: str


_TEXT_PART = TypeAdapter(_TextPart)


def _checked(
    where: tuple[int | str, ...],
    check: Callable[[], Any],
    kept: Callable[[list[Any]], list[Any]] = lambda found: found,
) -> Any:
    """``check()``, its ValidationError (its errors as ``kept`` leaves them)
    as a 400 naming the field by its path below ``where``."""
    try:
        return check()
    except ValidationError as exc:
        found = [{**error, "loc": (*where, *error["loc"])} for error in kept(exc.errors())]
        message, param, code = describe(found)
        raise errors.InvalidRequestError(message, param=param, code=code) from None


def _read_part_types(found: list[Any]) -> list[Any]:
    """pydantic's errors for a chat message's content parts (each at
    ``(index, branch, ...)``), less those of the union's branches for a part
    type vLLM's chat parser refuses once the schema let it through (OpenAI's
    ``file``: "Unsupported chat content part type"), so that no such type is
    offered as a supported value; a branch with no error on ``type`` is of the
    part's own type."""
    from vllm.renderers.chat_utils import MM_PARSER_MAP

    literals: dict[tuple[Any, ...], set[str]] = {}
    given: set[str] = set()
    for error in found:
        literals.setdefault(tuple(error["loc"][:2]), set())
        if error["type"] == "literal_error" and tuple(error["loc"][2:]) == ("type",):
            literals[tuple(error["loc"][:2])] |= set(_QUOTED.findall(str(error.get("ctx", {}).get("expected", ""))))
            given.add(str(error.get("input")))
    unread = {branch for branch, types in literals.items() if not (types or given) & MM_PARSER_MAP.keys()}
    kept = [error for error in found if tuple(error["loc"][:2]) not in unread]
    return kept or found


_QUOTED = re.compile(r"'([^']*)'")  # the values in a literal error's ``expected``


def _wrong_field(schema: Any, body: dict[str, Any]) -> errors.InvalidRequestError | None:
    """The first of ``body``'s fields that its own type refuses, as a 400."""
    for name, field in schema.model_fields.items():
        key = field.alias or name
        if key not in body:
            continue
        try:
            _checked((key,), lambda: TypeAdapter(field.annotation).validate_python(body[key]))
        except errors.InvalidRequestError as error:
            return error
        except Exception:  # noqa: BLE001 - a type pydantic cannot check alone tells nothing
            continue
    return None


def tool_inputs_checked(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """vLLM's conversion of a whole chat answer into a Messages API answer,
    refusing first, as the model's failure (500 naming the tool), an answer
    with a tool call whose arguments are not a JSON object: a ``tool_use``
    block's ``input`` must be one, and vLLM's own conversion fails there with
    pydantic's error about ``input`` (or JSON's), which reads as the client's 400."""

    def converted(answer: Any) -> Any:
        for choice in answer.choices:
            for call in choice.message.tool_calls or ():
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):  # what the model wrote stays out of the log
                    logger.error("the model called tool %r with arguments not a JSON object", call.function.name)
                    raise errors.InternalServerError(
                        f"The model called tool '{call.function.name}' with arguments that are not a JSON "
                        "object, which a tool_use block's input must be."
                    )
        return convert(answer)

    return converted


def response_error(error: errors.GatewayError) -> dict[str, str]:
    """A failed response's ``error`` (OpenAI's ``{code, message}``): a failure
    of the server is OpenAI's ``server_error``; a request the engine refused
    keeps the gateway's code for it (``invalid_prompt`` when it has none)."""
    if error.status_code >= 500:
        code = "server_error"
    else:
        code = error.code or "invalid_prompt"
    return {"code": code, "message": error.message}
