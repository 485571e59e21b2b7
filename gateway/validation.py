"""Pydantic's validation errors worded as OpenAI words its own: the field the
client got wrong as a path into the JSON it sent (``messages[0].content``,
never pydantic's names for the shapes a field may take), and what is wrong
with it.

A field that may take several shapes (a string or an array, one of seven
message types) fails once per shape. The one reported is the client's
closest miss: shapes of another JSON type than the value sent (where another
shape took that type: got past it, or refused the value for its length, range
or literal), then shapes whose ``type``, then ``role``, names
another, are set aside (unless every shape left refuses that value: then it
is the miss); of the rest the shape with the fewest problems wins, and of its
problems the deepest. A value of the wrong JSON type is told
which types the field takes, from every shape at that place; a value none
of the field's literals allows, which values are; an array or string of a
length out of bounds, both lengths."""

from __future__ import annotations

import re
import types
import typing
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from pydantic import BaseModel

# Pydantic's names for a union's members in an error's location: a type
# (``str``, ``list[int]``, ``function-after[...]``) or a class
# (``ChatCompletionUserMessageParam``); OpenAI's fields are snake_case.
_SHAPE = re.compile(r"[A-Z][A-Za-z0-9_]*|str|int|float|bool|bytes|none|list|dict|.*[-\[\](),].*")
INVALID_TYPE = "invalid_type"
_QUOTED = re.compile(r"'([^']*)'")  # the values in a literal error's ``expected``
_WANTED = {
    "string_type": "a string",
    "list_type": "an array",
    "tuple_type": "an array",
    "iterable_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dataclass_type": "an object",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "none_required": "null",
}


def path_of(loc: Sequence[int | str]) -> str:
    """``loc`` as a path into the client's JSON: ``messages[0].content``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _SHAPE.fullmatch(part):
            path += f".{part}" if path else part
    return path


class _Problem(NamedTuple):
    """One of pydantic's errors, with where it is in the client's JSON."""

    error: Any
    path: str
    depth: int  # the path's steps
    shape: tuple[int | str, ...]  # ``loc`` up to its last shape name: which union member it is of


def _problem(error: Any) -> _Problem:
    loc = error["loc"]
    steps = [part for part in loc if isinstance(part, int) or not _SHAPE.fullmatch(part)]
    shapes = [at for at, part in enumerate(loc) if isinstance(part, str) and _SHAPE.fullmatch(part)]
    last_shape = shapes[-1] if shapes else -1
    return _Problem(error, path_of(loc), len(steps), tuple(loc[: last_shape + 1]))


class Refusal(NamedTuple):
    """A 400's message, ``param`` and ``code``, as OpenAI's validation words them."""

    message: str
    param: str | None
    code: str | None = None


def describe(errors: Sequence[Any]) -> Refusal:
    """The refusal of pydantic's ``errors`` (``exc.errors()``)."""
    field = tuple(errors[0]["loc"][:1])  # the first field pydantic found wrong
    errors = [e for e in errors if tuple(e["loc"][:1]) == field]
    problems = [_problem(e) for e in (_first_item(errors) if len(errors) > MANY_ERRORS else errors)]
    error = closest(problems).error
    param = path_of(error["loc"]) or None
    if error["type"] == "missing":
        return Refusal(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if error["type"] == "extra_forbidden":
        return Refusal(f"Unrecognized request argument supplied: {param}", param)
    here = [p.error for p in problems if p.path == param]
    if error["type"] in _WANTED and param is not None:
        kinds = list(dict.fromkeys(_WANTED[e["type"]] for e in here if e["type"] in _WANTED))
        expected = kinds[0] if len(kinds) == 1 else "one of " + ", ".join(kinds[:-1]) + " or " + kinds[-1]
        got = json_type(error.get("input"))
        return Refusal(f"Invalid type for '{param}': expected {expected}, but got {got} instead.", param, INVALID_TYPE)
    if error["type"] == "literal_error" and param is not None:
        allowed = (str(e.get("ctx", {}).get("expected", "")) for e in here if e["type"] == "literal_error")
        found = dict.fromkeys(value for text in allowed for value in _QUOTED.findall(text))
        values = ", ".join(f"'{value}'" for value in found)
        if values:
            message = f"Invalid value for '{param}': {error.get('input')!r}. Supported values are: {values}."
            return Refusal(message, param, "invalid_value")
    if param is not None and (length := _length_words(error)) is not None:
        return Refusal(f"Invalid '{param}': {length[0]}", param, length[1])
    if param is not None and (bound := bound_words(error)) is not None:
        return Refusal(f"Invalid '{param}': {bound[0]}", param, bound[1])
    message = str(error["msg"]).removeprefix("Value error, ")
    return Refusal((f"Invalid value for '{param}': {message}" if param else message), param)


def _length_words(error: Any) -> tuple[str, str | None] | None:
    """An array's or string's length out of bounds, in OpenAI's words
    ("array too long. Expected an array with maximum length 4, but got an
    array with length 5 instead.") and code (``array_above_max_length``,
    ``string_above_max_length``, ``empty_array``); None for any other problem."""
    ctx = error.get("ctx") or {}
    kind = {"too_short": "array", "too_long": "array", "string_too_short": "string", "string_too_long": "string"}
    what = kind.get(error["type"])
    if what is None:
        return None
    value = error.get("input")
    got = len(value) if isinstance(value, (str, list, tuple, dict)) else ctx.get("actual_length")
    code: str | None
    if error["type"].endswith("too_long"):
        bound, most = "maximum", ctx.get("max_length")
        said, code = f"{what} too long", f"{what}_above_max_length"
    else:
        bound, most = "minimum", ctx.get("min_length")
        said = f"empty {what}" if got == 0 else f"{what} too short"
        code = "empty_array" if got == 0 and what == "array" else None  # the codes OpenAI is known to send
    if most is None or got is None:
        return None
    article = "an" if what == "array" else "a"
    sent = f"an empty {what}" if got == 0 else f"{article} {what} with length {got}"
    return f"{said}. Expected {article} {what} with {bound} length {most}, but got {sent} instead.", code


# A number out of its bounds, as pydantic names the bound: its side and OpenAI's sign.
_BOUNDS = {
    "greater_than_equal": ("ge", "below minimum", ">="),
    "greater_than": ("gt", "below minimum", ">"),
    "less_than_equal": ("le", "above maximum", "<="),
    "less_than": ("lt", "above maximum", "<"),
}


def bound_words(error: Any) -> tuple[str, str] | None:
    """A number out of bounds, in OpenAI's words ("integer below minimum
    value. Expected a value >= 1, but got 0 instead.") and code
    (``integer_below_min_value``); None for any other problem."""
    bound = _BOUNDS.get(error["type"])
    if bound is None:
        return None
    key, side, sign = bound
    limit = (error.get("ctx") or {}).get(key)
    value = error.get("input")
    if limit is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return out_of_bounds(value, side, sign, limit), bound_code(value, side, limit)


def bound_code(value: float, side: str, limit: float) -> str:
    """OpenAI's code for ``value`` on the wrong ``side`` of ``limit``: ``integer_below_min_value``,
    ``decimal_above_max_value``..."""
    kind = "integer" if isinstance(value, int) and isinstance(limit, int) else "decimal"
    return f"{kind}_{'below_min' if side.startswith('below') else 'above_max'}_value"


def out_of_bounds(value: float, side: str, sign: str, limit: float) -> str:
    """OpenAI's words for ``value`` on the wrong ``side`` of ``limit``
    ("below minimum" or "above maximum"; ``sign`` as ">="): an integer
    field's bound is an int, a number field's a float."""
    kind = "integer" if isinstance(value, int) and isinstance(limit, int) else "decimal"
    return f"{kind} {side} value. Expected a value {sign} {_number(limit)}, but got {_number(value)} instead."


def _number(value: float) -> str:
    """A number as the client's JSON would write it (2, not 2.0)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def closest(problems: Sequence[_Problem]) -> _Problem:
    """The problem of the shape the client most nearly sent (see above)."""
    # A shape's JSON type where another shape took the value's type: got past
    # it (a problem deeper in), or refused the value for another reason there.
    passed = {p.path[:at] for p in problems for at, char in enumerate(p.path) if char in "[."}
    passed |= {p.path for p in problems if _took_its_type(p.error)}
    kept = [p for p in problems if not (_not_this_type(p.error) and p.path in passed)] or list(problems)
    for name in ("type", "role"):
        wrong = _meant_elsewhere({p.shape for p in kept if _names_another_shape(p.error, name)}, kept)
        kept = [p for p in kept if not _within(p.shape, wrong)] or kept
    per_shape = Counter(p.shape for p in kept)
    fewest = min(per_shape.values())
    kept = [p for p in kept if per_shape[p.shape] == fewest]
    deepest = max(p.depth for p in kept)
    kept = [p for p in kept if p.depth == deepest]
    paths = Counter(p.path for p in kept)
    return max(kept, key=lambda p: paths[p.path])  # the first of the most frequent


def _meant_elsewhere(wrong: set[tuple[int | str, ...]], problems: Sequence[_Problem]) -> set[tuple[int | str, ...]]:
    """The shapes of ``wrong`` with a problem at the same place that is not
    of a shape in ``wrong`` (another shape took the value): where every shape
    at a place refuses the value sent, the client meant none of them, and
    that value is the miss."""

    # Every place (a shape's proper prefix) where a shape not in ``wrong`` has a problem.
    taken = {p.shape[:at] for p in problems if not _within(p.shape, wrong) for at in range(len(p.shape))}
    return {shape for shape in wrong if shape[:-1] in taken}


def _within(shape: tuple[int | str, ...], shapes: set[tuple[int | str, ...]]) -> bool:
    """Whether ``shape`` is one of ``shapes`` or inside one."""
    return any(shape[:at] in shapes for at in range(len(shape) + 1))


# Past this many errors in one field, only each list shape's first wrong item
# is weighed (``_first_item``): a 34 KB body of wrong messages makes 23,000.
MANY_ERRORS = 1_000


def _first_item(errors: Iterable[Any]) -> list[Any]:
    """Of each list shape a field may take (a union's members: ``prompt`` as
    strings, or as token ids), the errors of its first wrong item alone (and
    those not in an item): the client is told of one item anyway, and each
    error weighed costs the replica's loop (it was cubic in their number
    before ``_meant_elsewhere`` looked shapes up in sets: minutes)."""
    errors = list(errors)
    items = [_item(e["loc"]) for e in errors]
    first: dict[tuple[int | str, ...], int] = {}
    for item in items:
        if item is not None:
            first[item[0]] = min(item[1], first.get(item[0], item[1]))
    return [e for e, item in zip(errors, items) if item is None or item[1] == first[item[0]]]


def _item(loc: Sequence[int | str]) -> tuple[tuple[int | str, ...], int] | None:
    """Where ``loc`` is in an item of a list: the list's place (its field and
    union member) and the item's index; None where it is in none."""
    at = next((at for at in range(1, len(loc)) if isinstance(loc[at], int)), None)
    return None if at is None else (tuple(loc[:at]), int(loc[at]))


def _names_another_shape(error: Any, name: str) -> bool:
    """A ``role`` or ``type`` (``name``) that is not this shape's: the client meant another."""
    loc = error["loc"]
    return (
        error["type"] == "literal_error" and len(loc) >= 2 and loc[-1] == name
        and isinstance(loc[-2], str) and _SHAPE.fullmatch(loc[-2]) is not None
    )


def _took_its_type(error: Any) -> bool:
    """A problem with a value of the type its shape takes (too long, out of
    range, not one of its string literals): that shape took the value's type."""
    if error["type"] == "literal_error":
        return isinstance(error.get("input"), str)
    return error["type"] not in _WANTED and error["type"] not in ("missing", "extra_forbidden")


def _not_this_type(error: Any) -> bool:
    """A value of another JSON type than a whole shape's (a string where the
    shape is an array)."""
    loc = error["loc"]
    return error["type"] in _WANTED and bool(loc) and isinstance(loc[-1], str) and _SHAPE.fullmatch(loc[-1]) is not None


def json_type(value: Any) -> str:
    """The JSON type of ``value`` in OpenAI's words ("an integer", "a string", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "an object"


# A schema's top-level fields that take one JSON scalar type (and null), by
# the name a client sends: what pydantic's lax mode would convert from
# another type (``"max_tokens": true`` to 1, ``"temperature": "0.5"`` to 0.5,
# ``"logprobs": "yes"`` to true), which OpenAI refuses.
_SCALARS = {int: "an integer", float: "a number", bool: "a boolean"}
_TAKES: dict[str, tuple[type, ...]] = {"an integer": (int, float), "a number": (int, float), "a boolean": (bool,)}
_scalar_fields: dict[type[BaseModel], dict[str, str]] = {}


def scalar_fields(schema: type[BaseModel]) -> dict[str, str]:
    """``schema``'s fields of one JSON scalar type, by name, and the type's
    words (a field of int or float: "a number"); read once per schema."""
    fields = _scalar_fields.get(schema)
    if fields is None:
        fields = {}
        for name, field in schema.model_fields.items():
            kinds = _kinds(field.annotation) - {type(None)}
            if kinds and kinds <= _SCALARS.keys():
                kind = bool if kinds == {bool} else float if float in kinds else int
                fields[field.alias or name] = _SCALARS[kind]
        _scalar_fields[schema] = fields
    return fields


def _kinds(annotation: Any) -> set[Any]:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    return {typing.get_args(m)[0] if typing.get_origin(m) is typing.Annotated else m for m in members}


def check_scalars(schema: type[BaseModel], body: Mapping[str, Any]) -> Refusal | None:
    """The refusal, in OpenAI's words (code ``invalid_type``), of the first top-level field of
    ``body`` whose value is not of the JSON type ``schema`` takes there (a
    boolean for a number, a string for a boolean...); None when every one
    is. An integral field's fractional number is left to pydantic, whose
    words for it are already OpenAI's."""
    wanted = scalar_fields(schema)
    for name, value in body.items():
        kind = wanted.get(name)
        if kind is None or value is None:
            continue
        if isinstance(value, bool) != (kind == "a boolean") or not isinstance(value, _TAKES[kind]):
            message = f"Invalid type for '{name}': expected {kind}, but got {json_type(value)} instead."
            return Refusal(message, name, INVALID_TYPE)
    return None


# OpenAI's bounds on ``metadata`` (chat completions and the Responses API).
METADATA_KEYS, METADATA_KEY_LENGTH, METADATA_VALUE_LENGTH = 16, 64, 512


def check_metadata(body: Mapping[str, Any]) -> Refusal | None:
    """The refusal, in OpenAI's words, of a ``metadata`` that is not what
    OpenAI takes: an object of at most 16 string values, keys up to 64
    characters, values up to 512; None when it is (or is absent, or null)."""
    metadata = body.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        got = json_type(metadata)
        return Refusal(f"Invalid type for 'metadata': expected an object, but got {got} instead.", "metadata",
                       "invalid_type")
    if len(metadata) > METADATA_KEYS:
        return Refusal(
            f"Invalid 'metadata': too many properties. Expected an object with at most {METADATA_KEYS} "
            f"properties, but got an object with {len(metadata)} properties instead.",
            "metadata", "object_above_max_properties",
        )
    for key, value in metadata.items():
        param = f"metadata.{key}"
        if len(key) > METADATA_KEY_LENGTH:
            return Refusal(
                f"Invalid 'metadata': string too long. Expected a key with maximum length {METADATA_KEY_LENGTH}, "
                f"but got a key with length {len(key)} instead.", "metadata", "string_above_max_length",
            )
        if not isinstance(value, str):
            return Refusal(f"Invalid type for '{param}': expected a string, but got {json_type(value)} instead.",
                           param, "invalid_type")
        if len(value) > METADATA_VALUE_LENGTH:
            return Refusal(
                f"Invalid '{param}': string too long. Expected a string with maximum length "
                f"{METADATA_VALUE_LENGTH}, but got a string with length {len(value)} instead.",
                param, "string_above_max_length",
            )
    return None
