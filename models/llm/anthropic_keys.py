"""Keys inside a Messages API request that vLLM's schema would drop.

``gateway.protocol.extras`` refuses a top-level field vLLM does not know.
Below the top level, vLLM's Anthropic models ignore keys they do not know,
and one model holds every content block's keys whatever its type. So a
message's ``name``, a ``tool_use`` block's ``text``, a misspelt
``disable_parallel_tool_us`` or a ``source.url`` beside ``"type":
"base64"`` reached the model as if never sent, answered 200. Anthropic's API
refuses each of them (``messages.0.name: Extra inputs are not permitted``),
and so does the gateway, in those words and naming the place.

Keys Anthropic's API defines are taken where they do not change the answer
(``cache_control``: vLLM caches prefixes by itself) and refused, naming what
the model does not serve, where they ask for something (``citations``, a
tool's ``input_examples``, a server tool, an image from the Files API).
As at the top level, a null asks for nothing and passes; so does an empty
list or object, and a ``caller`` that says the model called the tool itself
(``direct``: what vLLM's calls are), as clients send back Anthropic's answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import InvalidRequestError

# Prompt caching's breakpoint: vLLM caches every prefix by itself.
_CACHED = frozenset({"cache_control"})
_TOOL_CALLERS = "programmatic tool calls"
_TOOLSETS = "MCP toolsets"


@dataclass(frozen=True)
class Shape:
    """The keys of one kind of object: what vLLM reads, Anthropic's keys that
    change nothing here, and Anthropic's keys that ask for what the model does
    not serve (by what they ask for)."""

    read: frozenset[str]
    hints: frozenset[str] = frozenset()
    unserved: Mapping[str, str] = field(default_factory=dict)


def _shape(*read: str, hints: frozenset[str] = frozenset(), **unserved: str) -> Shape:
    return Shape(frozenset(read), hints, unserved)


# Content blocks by type (``messages[i].content[j]``, ``system[j]``).
BLOCKS: Mapping[str, Shape] = {
    "text": _shape("type", "text", hints=_CACHED, citations="citations"),
    "image": _shape("type", "source", hints=_CACHED, transformations="image transformations"),
    "tool_use": _shape("type", "id", "name", "input", hints=_CACHED, caller=_TOOL_CALLERS, toolset_name=_TOOLSETS),
    "tool_result": _shape("type", "tool_use_id", "content", "is_error", hints=_CACHED, toolset_name=_TOOLSETS),
    "thinking": _shape("type", "thinking", "signature"),
    "redacted_thinking": _shape("type", "data"),
    "tool_reference": _shape("type", "tool_name", hints=_CACHED),
    "tool_addition": _shape("type", "tool"),
    "tool_removal": _shape("type", "tool"),
}
# A tool_result's own blocks (``tool_checks`` refuses the other types); vLLM
# also reads a reference's ``name``.
RESULT_BLOCKS: Mapping[str, Shape] = {
    "text": BLOCKS["text"],
    "image": BLOCKS["image"],
    "tool_reference": _shape("type", "tool_name", "name", hints=_CACHED),
}
# Where an image comes from, by ``source.type``.
SOURCES: Mapping[str, Shape] = {"base64": _shape("type", "media_type", "data"), "url": _shape("type", "url")}
# A tool as Anthropic's ``custom`` tool; ``eager_input_streaming`` only sets
# how its input is buffered while streamed.
TOOL = _shape(
    "name", "description", "input_schema", "strict", "defer_loading", "type",
    hints=frozenset({"cache_control", "eager_input_streaming"}),
    input_examples="tool input examples", allowed_callers=_TOOL_CALLERS,
)
TOOL_CHOICE = _shape("type", "name", "disable_parallel_tool_use")
_BINDING = "thinking block binding"
THINKING: Mapping[str, Shape] = {
    "enabled": _shape("type", "budget_tokens", "display", block_binding=_BINDING),
    "adaptive": _shape("type", "display", block_binding=_BINDING),
    "disabled": _shape("type"),
}
# A ``system`` turn's (beta): how long it is shown, and its own output settings.
MESSAGE = _shape(
    "role", "content", clear_at="system turns shown for one user turn", output_config="per-turn output settings"
)
METADATA = _shape("user_id")
OUTPUT_CONFIG = _shape("effort", "format", task_budget="task budgets")
FORMAT = _shape("type", "schema")
TOOL_CHANGES: Mapping[str, Shape] = {
    "tool_reference": _shape("type", "name"),
    "tool_definition": _shape("type", "definition"),
}


@dataclass(frozen=True)
class Place:
    """Where an object sits: as Anthropic's errors name it
    (``messages.0.content.1.tool_use``, a union's member by its type) and as
    the error's ``param`` (``messages[0].content[1]``)."""

    words: str
    param: str

    def key(self, key: str | int) -> Place:
        """The place of ``key`` (a list's index, or an object's key) in this one."""
        words = f"{self.words}.{key}" if self.words else str(key)
        param = f"{self.param}[{key}]" if isinstance(key, int) else f"{self.param}.{key}" if self.param else key
        return Place(words, param)


TOP = Place("", "")


def check_keys(body: Mapping[str, Any]) -> None:
    """Refuses (400) the first key inside a Messages or count_tokens request
    that vLLM's schema would drop, or that asks for what the model does not
    serve. Parts of the wrong JSON type are left to vLLM's schema to name."""
    for at, message in _items(body.get("messages")):
        place = TOP.key("messages").key(at)
        if _check(message, MESSAGE, place):
            if message.get("role") == "system":  # (a system turn holds text, and changes to the tools)
                _check_text_only(message.get("content"), place.key("content"), TOOL_CHANGE_TAGS)
            _check_blocks(message.get("content"), place.key("content"), tagged=True)
    _check_text_only(body.get("system"), TOP.key("system"))
    _check_blocks(body.get("system"), TOP.key("system"), tagged=False)
    for at, tool in _items(body.get("tools")):
        _check_tool(tool, TOP.key("tools").key(at))
    choice = body.get("tool_choice")
    _check(choice, TOOL_CHOICE, _tagged(TOP.key("tool_choice"), _kind(choice)))
    _check_union(body.get("thinking"), THINKING, TOP.key("thinking"))
    _check(body.get("metadata"), METADATA, TOP.key("metadata"))
    config = body.get("output_config")
    if isinstance(config, dict) and _check(config, OUTPUT_CONFIG, TOP.key("output_config")):
        form = config.get("format")
        _check(form, FORMAT, _tagged(TOP.key("output_config").key("format"), _kind(form)))


def _items(value: Any) -> list[tuple[int, Any]]:
    return list(enumerate(value)) if isinstance(value, list) else []


def _kind(value: Any) -> str | None:
    """The ``type`` of a JSON object that names one; None otherwise."""
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


def _check(value: Any, shape: Shape, place: Place) -> bool:
    """Refuses a key of ``value`` (a JSON object) that ``shape`` does not
    take; whether ``value`` is an object to look into."""
    if not isinstance(value, dict):
        return False
    for key in value:
        if key in shape.read or key in shape.hints or key in shape.unserved and _asks_nothing(key, value[key]):
            continue
        where = place.key(key)
        if key in shape.unserved:
            _refuse(where, f"this model does not serve {shape.unserved[key]}", "unsupported_parameter")
        _refuse(where, "Extra inputs are not permitted")
    return True


def _asks_nothing(key: str, value: Any) -> bool:
    """Whether an unserved key's ``value`` asks for nothing the model does not do."""
    return value in (None, [], {}) or (key, value) in (("caller", {"type": "direct"}), ("clear_at", "never"))


def _check_union(value: Any, shapes: Mapping[str, Shape], place: Place) -> bool:
    """``_check`` of an object by the shape its ``type`` names (an unknown
    type is left to vLLM's schema)."""
    kind = _kind(value)
    shape = shapes.get(kind) if kind is not None else None
    return shape is not None and _check(value, shape, _tagged(place, kind))


def _tagged(place: Place, tag: str | None) -> Place:
    """``place`` as holding a union's member ``tag``."""
    return Place(f"{place.words}.{tag}", place.param) if tag is not None else place


def _check_blocks(blocks: Any, place: Place, *, tagged: bool) -> None:
    for at, block in _items(blocks):
        where = place.key(at)
        kind = _kind(block)
        shape = BLOCKS.get(kind) if kind is not None else None
        words = _tagged(where, kind) if tagged else where
        if shape is None or not _check(block, shape, words):
            continue
        if kind == "image":
            _check_source(block.get("source"), words.key("source"))
        elif kind == "tool_result":
            for item_at, item in _items(block.get("content")):
                _check_result_block(item, words.key("content").key(item_at))
        elif kind in ("tool_addition", "tool_removal"):
            _check_tool_change(block.get("tool"), words.key("tool"))


# What a system turn holds besides text: vLLM applies these to the tools.
TOOL_CHANGE_TAGS = ("tool_addition", "tool_removal")


def _check_text_only(blocks: Any, place: Place, also: tuple[str, ...] = ()) -> None:
    """A system prompt's blocks: text only, as Anthropic's API takes them
    (vLLM kept the text blocks and dropped any other, an image unseen), and
    the block types ``also`` names."""
    for at, block in _items(blocks):
        kind = _kind(block)
        if kind is not None and kind != "text" and kind not in also:
            tags = ", ".join(f"'{tag}'" for tag in ("text", *also))
            _refuse(
                place.key(at).key("type"),
                f"Input tag '{kind}' found using 'type' does not match any of the expected tags: {tags}",
            )


def _check_result_block(item: Any, place: Place) -> None:
    kind = _kind(item)
    shape = RESULT_BLOCKS.get(kind) if kind is not None else None
    if shape is not None and _check(item, shape, _tagged(place, kind)) and kind == "image":
        _check_source(item.get("source"), _tagged(place, kind).key("source"))


def _check_source(source: Any, place: Place) -> None:
    """An image's source: vLLM reads any other type as base64, so a Files API
    image (``"type": "file"``) became an image of no bytes."""
    kind = _kind(source)
    if isinstance(source, dict) and kind not in SOURCES:
        _refuse(
            place.key("type"),
            f"this model does not serve images from {f'a `{kind}` source' if kind is not None else 'this source'}"
            "; send `base64` or `url`",
            "unsupported_parameter",
        )
    _check_union(source, SOURCES, place)


def _check_tool(tool: Any, place: Place) -> None:
    """A tool: Anthropic's ``custom`` tool, the only kind vLLM serves."""
    if not isinstance(tool, dict):
        return
    kind = tool.get("type")
    if kind not in (None, "custom"):
        _refuse(
            place.key("type"),
            f"this model does not serve Anthropic's server tools ({kind!r}); define the tool with an `input_schema`",
            "unsupported_parameter",
        )
    _check(tool, TOOL, _tagged(place, "custom"))


def _check_tool_change(tool: Any, place: Place) -> None:
    if _check_union(tool, TOOL_CHANGES, place) and tool.get("type") == "tool_definition":
        _check_tool(tool.get("definition"), _tagged(place, "tool_definition").key("definition"))


def _refuse(place: Place, problem: str, code: str | None = None) -> None:
    raise InvalidRequestError(f"{place.words}: {problem}", param=place.param, code=code)
