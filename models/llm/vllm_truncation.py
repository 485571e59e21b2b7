"""The Responses API's ``truncation: "auto"``, as OpenAI's: a conversation
that does not fit the context window with its output budget drops items
from its beginning (the previous response's conversation first, then its
answer, then the oldest input items; the request's ``instructions`` and
its last input item always stay) until it fits.

vLLM's own server cut the rendered prompt's oldest tokens instead (its
``truncate_prompt_tokens``), starting the model mid-message, without the
chat template's opening or the instructions, and lowered the output budget
to what the window had left. Here the fewest items are dropped (a binary
search over how many, each try one render); a function call's output whose
call was dropped goes with it. Where even the last item alone does not fit,
the request is refused as with ``"disabled"`` (400 ``context_length_exceeded``).
Not for gpt-oss (harmony) models, whose conversations vLLM keeps in
another form: those keep vLLM's own truncation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Items that answer an earlier one and cannot lead a conversation.
_ANSWERS = ("function_call_output", "reasoning")


async def fitting(responses: Any, request: Any, previous: Any, fits: Callable[[Any], bool], **kwargs: Any) -> Any:
    """The render of ``request`` (vLLM-parsed), continuing stored response
    ``previous`` (None: none), with the fewest oldest items dropped that
    ``fits`` a render; the render with every item but the last input item
    dropped where none fits (the caller refuses it). An ``ErrorResponse``
    from vLLM's renderer is returned as it is."""
    kept = _conversation(responses, request, previous)
    low, high, best = 1, kept.droppable, None
    while low <= high:
        middle = (low + high) // 2
        result = await _render(responses, request, kept, middle, **kwargs)
        if not hasattr(result, "engine_input"):
            return result
        if fits(result):
            best, high = result, middle - 1
        else:
            low = middle + 1
    return best if best is not None else await _render(responses, request, kept, kept.droppable, **kwargs)


class _Conversation:
    """What a Responses request is prompted with, oldest first, in vLLM's forms."""

    def __init__(self, messages: list[Any], outputs: list[Any], items: list[Any], text: bool) -> None:
        self.messages = messages  # the previous response's conversation (chat messages)
        self.outputs = outputs  # the previous response's output items
        self.items = items  # the request's input items
        self.text = text  # the input was one string
        self.droppable = len(messages) + len(outputs) + len(items) - 1


def _conversation(responses: Any, request: Any, previous: Any) -> _Conversation:
    messages: list[Any] = []
    outputs: list[Any] = []
    if previous is not None:
        stored = responses.msg_store.get(previous.id)
        # vLLM leaves a stored conversation's system messages out of a follow-up.
        messages = [m for m in (stored or ()) if m.get("role") != "system"]
        outputs = list(previous.output)
    text = isinstance(request.input, str)
    return _Conversation(messages, outputs, [request.input] if text else list(request.input), text)


async def _render(responses: Any, request: Any, kept: _Conversation, dropped: int, **kwargs: Any) -> Any:
    """vLLM's render of ``request`` with the ``dropped`` oldest items of ``kept`` left out."""
    messages = kept.messages[dropped:]
    while messages and messages[0].get("role") == "tool":
        messages = messages[1:]
    dropped = max(0, dropped - len(kept.messages))
    outputs = kept.outputs[dropped:]
    dropped = max(0, dropped - len(kept.outputs))
    items = kept.items[dropped:]
    while len(items) > 1 and _kind(items[0]) in _ANSWERS:
        items = items[1:]
    shorter = request.model_copy(update={"input": items[0] if kept.text else items})
    return await responses.online_renderer.render_responses(
        shorter,
        previous_messages=messages or None,
        previous_response_outputs=outputs or None,
        tool_server=responses.tool_server,
        **kwargs,
    )


def _kind(item: Any) -> Any:
    return item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
