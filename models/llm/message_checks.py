"""A chat request's messages, checked where vLLM's schema takes anything.

vLLM's chat messages end in a catch-all shape (any role, every other key
optional, unknown keys ignored) so that templates may use roles of their
own. A misspelt key therefore vanished (``{"role": "user", "contnet":
"hi"}`` was answered 200 from an empty user turn), as did a user message
with no ``content`` at all. OpenAI refuses both, naming the place; so does
the gateway. Roles of a template's own stay open, as vLLM keeps them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.errors import InvalidRequestError

# Keys a message may carry: OpenAI's request shapes, what OpenAI and vLLM
# answer with (so an answer's message may be sent back as it came), and
# vLLM's own (``reasoning``, a developer's ``tools``, ``task``).
KNOWN_KEYS = frozenset(
    {
        "role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal",
        "annotations", "audio", "reasoning", "reasoning_content", "tools", "task",
    }
)

# Roles whose message is its content: without one there is nothing to say.
NEEDS_CONTENT = frozenset({"system", "developer", "user", "tool"})


def check_chat_messages(body: Mapping[str, Any]) -> None:
    """Refuses (400, naming ``messages[i].<key>``) a key no message shape
    has, and a system, developer, user or tool message without content."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue  # vLLM's schema names it
        unknown = sorted(message.keys() - KNOWN_KEYS)
        if unknown:
            raise InvalidRequestError(
                f"Unrecognized request argument supplied: messages[{index}].{unknown[0]}",
                param=f"messages[{index}].{unknown[0]}",
            )
        if message.get("role") in NEEDS_CONTENT and message.get("content") is None:
            raise InvalidRequestError(
                f"Missing required parameter: 'messages[{index}].content'.",
                param=f"messages[{index}].content",
                code="missing_required_parameter",
            )
        if message.get("function_call") is not None:
            # vLLM renders only ``tool_calls``: the call vanished, its result answered nothing.
            _unsupported(f"messages[{index}].function_call", "the deprecated function calling; use `tool_calls`")
        _check_image_detail(message.get("content"), index)


def _check_image_detail(content: Any, index: int) -> None:
    """Refuses an image part's ``detail`` of ``low``: vLLM reads every image
    at its full resolution and ignores it (``auto`` and ``high`` ask for no less)."""
    for at, part in enumerate(content if isinstance(content, list) else ()):
        image = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
        if isinstance(image, dict) and image.get("detail") not in (None, "auto", "high"):
            _unsupported(f"messages[{index}].content[{at}].image_url.detail", "low-detail images; send `auto`")


def _unsupported(param: str, what: str) -> None:
    raise InvalidRequestError(
        f"Unsupported parameter: '{param}': this model does not serve {what}.",
        param=param,
        code="unsupported_parameter",
    )
